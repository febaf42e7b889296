"""The outgoing path: what this node sends its neighbours each round, and the sending itself.

Why its own part: the round coordinator (node/rounds.py) only says "share this round's
model"; *what* is shared is a `Sharing` object. An honest node's is `HonestSharing`: one
envelope, signed and encrypted for each neighbour, carrying the evidence the node holds. A
Byzantine test node (node/byzantine.py) replaces it with an attack, and nothing here or in
the coordinator knows.

Only DP-SGD output leaves the hospital: the training loss is computed from raw patient rows
without noise, so it is not shared (docs/privacy.md).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import numpy as np
from murmur.crypto.allowlist import Peer
from murmur.crypto.identity import Identity
from murmur.gossip.compression import CompressionSettings, DeltaEncoder
from murmur.gossip.noise_claims import NoiseClaim
from murmur.gossip.probe import Contact
from murmur.gossip.receipts import AuditHead
from murmur.gossip.sampling import PeerSample
from murmur.gossip.transport import PeerTransport
from murmur.gossip.wire import ModelUpdate, build_envelope
from murmur.models.params import state_sha256
from murmur.node.audit import AuditLog
from murmur.node.evidence import EvidenceBook
from murmur.node.metrics import NodeMetrics
from murmur.node.state import NodeState

State = dict[str, np.ndarray]


class Sharing(Protocol):
    """What the coordinator calls once per trained round, after the round is durably marked
    signed: send round r's model (`own_state`, hash `own_sha`, trained from `reference`)."""

    async def share(
        self, r: int, transport: PeerTransport, own_state: State, own_sha: str, reference: State
    ) -> None: ...


class Sender:
    """Sends one envelope to some peers and accounts for it: each result is evidence about
    the peer's reachability, the bytes are counted, and an `update_sent` record is audited."""

    def __init__(
        self,
        *,
        record_contact: Callable[[str, Contact], None],
        audit: AuditLog,
        metrics: NodeMetrics,
        state: NodeState,
    ) -> None:
        self._record_contact = record_contact
        self._audit = audit
        self._metrics = metrics
        self._state = state

    async def send(
        self,
        r: int,
        transport: PeerTransport,
        peers: list[Peer],
        envelope: bytes,
        model_sha256: str,
        compressed: dict[str, str | bool] | None = None,
    ) -> bool:
        """Send ``envelope`` to ``peers``; True if every one of them took it. ``compressed``:
        for a compressed envelope, its codec and the hash of the model its receivers
        reconstruct (what their `message_received` records name), audited with the send."""
        results = await transport.send_all(peers, envelope)
        for result in results:
            self._record_contact(
                result.peer,
                Contact.from_answer(result.status, result.reason, "", source="send"),
            )
        self._state.bytes_sent += len(envelope) * len(peers)
        self._metrics.bytes_sent.inc(len(envelope) * len(peers))
        self._audit.append(
            "update_sent",
            r,
            recipients=[p.name for p in peers],
            delivered=[x.peer for x in results if x.ok],
            failed={x.peer: x.reason for x in results if not x.ok},
            bytes=len(envelope),
            model_sha256=model_sha256,
            epsilon_spent=self._state.privacy.get("epsilon_spent"),
            **(compressed or {}),
        )
        return len(results) == len(peers) and all(x.ok for x in results)


class HonestSharing:
    """The one envelope an honest node sends every neighbour: its model, the receipts of the
    envelopes it accepted last round and the proofs it learned since (gossip/receipts.py),
    and its own signed audit head (`own_head`).

    With a compressing codec, the model goes out as a delta against what every neighbour
    holds from this node's previous envelope (gossip/compression.py `DeltaEncoder`); after a
    send that some neighbour did not take, the next envelope is a keyframe. The audited
    ``model_sha256`` stays the hash of the model trained, not of its compressed form.
    """

    def __init__(
        self,
        *,
        identity: Identity,
        peers: list[Peer],
        evidence: EvidenceBook,
        sender: Sender,
        own_head: Callable[[], AuditHead],
        study: bytes | None = None,
        sample: PeerSample | None = None,
        compression: CompressionSettings | None = None,
        noise_claim: Callable[[], NoiseClaim | None] | None = None,
    ) -> None:
        self._identity = identity
        # this round's DP noise parameters (node/study.py), announced in every envelope
        self._noise_claim = noise_claim
        self._study = study  # the manifest hash every envelope names (node/studies/)
        self._peers = peers
        self._sample = sample  # set: round r goes to the s peers sampled for r only
        self._evidence = evidence
        self._sender = sender
        self._own_head = own_head
        codec = compression.codec if compression is not None else "none"
        self.encoder = DeltaEncoder(compression) if codec != "none" else None

    async def share(
        self, r: int, transport: PeerTransport, own_state: State, own_sha: str, reference: State
    ) -> None:
        receipts, proofs = self._evidence.outgoing(r)
        peers = self._peers
        if self._sample is not None:
            targets = set(self._sample.targets(r))
            peers = [p for p in self._peers if p.name in targets]
        keys = [p.public_key for p in peers]
        noise = self._noise_claim() if self._noise_claim is not None else None
        if self.encoder is None:
            update = ModelUpdate(
                own_state, metrics={}, receipts=receipts, proofs=proofs, noise=noise
            )
            envelope = build_envelope(
                update, self._identity, keys, r, head=self._own_head(), study=self._study
            )
            await self._sender.send(r, transport, peers, envelope, own_sha)
            return
        message, held = self.encoder.encode(own_state)
        update = ModelUpdate({}, metrics={}, receipts=receipts, proofs=proofs, noise=noise)
        envelope = build_envelope(
            update,
            self._identity,
            keys,
            r,
            head=self._own_head(),
            study=self._study,
            compressed=message,
        )
        audited = {
            "codec": message.codec,
            "keyframe": message.base is None,
            "received_model_sha256": state_sha256(held),
        }
        everyone = await self._sender.send(r, transport, peers, envelope, own_sha, audited)
        # Under peer sampling the peers not drawn this round do not hold `held`: the next
        # envelope is a keyframe, never a delta on a base some neighbour lacks.
        self.encoder.delivered(message, held, everyone and self._sample is None)
