"""ADVERSARY MODE, for tests and demos only: turning an honest node into a Byzantine one.

Why a wrapper: a Byzantine node here is an honest node with two things replaced, so that the
honest modules contain no attack logic and the attack cannot leak into a real node's path:

* its outgoing path: `AttackSharing` takes the place of node/sharing.py's `HonestSharing` and
  sends whatever the attack (gossip/attacks.py, `Adversary`) builds;
* for label flipping, its training data (`poisoned_data`).

`arm` wires one in: it also lets the attack keep the authentic envelopes it receives (to
replay them), and makes its aggregation ignore its colluders' poison. node/node.py is the one
place that calls it, when `[adversary]` is configured (node/config.py).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
from murmur.gossip.attacks import Adversary, attack_rng, flip_labels
from murmur.gossip.noise_claims import NoiseClaim
from murmur.gossip.receipts import AuditHead
from murmur.gossip.rounds import RoundInbox
from murmur.gossip.transport import PeerTransport
from murmur.models.data import HospitalSplit
from murmur.node.audit import AuditLog
from murmur.node.config import NodeConfig
from murmur.node.receiver import ReceivedUpdate
from murmur.node.sharing import Sender
from murmur.node.state import NodeState

if TYPE_CHECKING:
    from murmur.node.node import HospitalNode

log = logging.getLogger("murmur.node")

State = dict[str, np.ndarray]


def poisoned_data(config: NodeConfig, data: HospitalSplit) -> HospitalSplit:
    """The training split a label-flipping attacker trains on (unchanged for other attacks)."""
    adversary = config.adversary
    if adversary.attack != "label_flip":
        return data
    fraction = float(adversary.params.get("fraction", 1.0))
    rng = attack_rng(adversary.seed, config.node.name, 0)
    return dataclasses.replace(data, y_train=flip_labels(data.y_train, fraction, rng))


class AttackSharing:
    """Sends this round's malicious messages instead of the honest update.

    Model attacks rush: they wait (up to the round deadline) for the honest neighbours'
    round-r models, so they craft from this round's honest statistics, as in the papers.
    """

    def __init__(
        self,
        adversary: Adversary,
        *,
        sender: Sender,
        inbox: RoundInbox[ReceivedUpdate],
        stop: asyncio.Event,
        round_timeout_s: float,
        state: NodeState,
        audit: AuditLog,
        own_head: Callable[[], AuditHead],
        senders_of: Callable[[int], list[str]] | None = None,
    ) -> None:
        self.adversary = adversary
        # Whose round-r models reach this node (with peer sampling, the round's s senders
        # only): a rushing attacker waits for those, not for models that will not come.
        self._senders_of = senders_of
        self._sender = sender
        self._inbox = inbox
        self._stop = stop
        self._round_timeout_s = round_timeout_s
        self._state = state
        self._audit = audit
        self._own_head = own_head

    async def share(
        self, r: int, transport: PeerTransport, own_state: State, own_sha: str, reference: State
    ) -> None:
        adversary = self.adversary
        log.warning("ADVERSARY MODE round %d: attacking with %s", r, adversary.describe())
        honest: dict[str, State] = {}
        if adversary.rushes:
            self._state.phase = "attacker_waiting_for_honest_models"
            due = set(self._senders_of(r)) if self._senders_of is not None else None
            wanted = [p.name for p in adversary.honest_peers if due is None or p.name in due]
            if self._inbox.asynchronous:  # no round to wait for: the newest that arrived
                seen = self._inbox.newest(wanted)
            else:
                collected = await self._inbox.collect(r, wanted, self._round_timeout_s, self._stop)
                seen = collected.messages
            honest = {n: m.envelope.update.tensors for n, m in seen.items()}
        messages = adversary.messages(r, own_state, reference, honest, self._own_head())
        for message in messages:
            if message.abuse is None:
                assert message.model_sha256 is not None
                await self._sender.send(
                    r, transport, list(message.recipients), message.data, message.model_sha256
                )
        abuse = [m for m in messages if m.abuse is not None]
        for message in abuse:
            await transport.send_all(list(message.recipients), message.data, message.signer)
        if abuse:
            self._audit.append(
                "attack_abuse_sent",
                r,
                counts=dict(Counter(m.abuse for m in abuse)),
                recipients=[p.name for p in adversary.honest_peers],
            )


def arm(node: HospitalNode) -> Adversary:
    """Make `node` (honest, just composed) the configured attacker; returns its attack."""
    config = node.config
    section = config.adversary
    adversary = Adversary(
        section.attack,
        section.params,
        identity=node.identity,
        peers=node.peers,
        colluders=section.colluders,
        seed=section.seed,
        byzantine_neighbours=section.byzantine_neighbours,
        initial=node.study.initial_state,
        max_message_bytes=node.limits.max_message_bytes,
        study=node.gate.wire_id,  # a member knows the study it attacks
        noise=_noise_claim(node),
    )
    node.rounds.sharing = AttackSharing(
        adversary,
        sender=node.sender,
        inbox=node.inbox,
        stop=node.stop,
        round_timeout_s=config.gossip.round_timeout_s,
        state=node.state,
        audit=node.audit,
        own_head=node.own_head,
        senders_of=node.rounds.senders_of,
    )
    node.receiver.accepted_listeners.append(adversary.remember)
    node.aggregator.ignored = adversary.colluders  # it never averages in their poison
    node.state.adversary = adversary.status()
    node.on_start.append(lambda: announce(node, adversary))
    return adversary


def _noise_claim(node: HospitalNode) -> NoiseClaim | None:
    """The DP noise its crafted models announce: the most the plan accepts (the smallest
    site's, where the noise peaks), or its own training's (`[adversary] noise_claim`)."""
    if node.config.adversary.noise_claim == "loudest":
        loudest = node.noise_plan.loudest_claim(node.study.trainable_parameters())
        if loudest is not None:
            return loudest
    return node.study.noise_claim()


def announce(node: HospitalNode, adversary: Adversary) -> None:
    """Say loudly, in the log and the audit log, that this node attacks its neighbours."""
    log.warning(
        "\n%s\nADVERSARY MODE: node %s is a Byzantine attacker (%s), for tests and demos "
        "only. Never run this config in a real consortium.\n%s",
        "!" * 78,
        node.config.node.name,
        adversary.describe(),
        "!" * 78,
    )
    node.audit.append("adversary_mode", node.next_round, **adversary.status())
