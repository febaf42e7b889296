"""Rollback detection on the node: the budget belongs to the hospital's key, not to a folder.

A node's state directory can be put back to an older copy by anyone who can write it (the
audit log cut back to an earlier signed head, the earlier checkpoint and intent files); a new
state directory can be started with the same key. Either way the node would restart with an
earlier epsilon and a log that verifies. What it cannot undo is what it signed: every envelope
carries its signed audit head (gossip/receipts.py, AuditHead), and its neighbours keep the
newest one (gossip/heads.py, HeadBook). This module is the node's side of that:

* ``POST /receipts`` (:func:`receipts_route`): an admitted peer asks, in a small signed
  request, for the newest receipt this node holds *of that peer*; the answer is sealed to it;
* at every start (:func:`poll_own_receipts`, :func:`own_state_behind`) the node asks its
  neighbours for their newest receipt of it and refuses to start when its state is older than
  what it signed; with no answer within a bounded wait it starts with a loud warning (the
  neighbours then catch a rollback on its first envelope);
* ``murmur audit heads`` (:func:`heads_command`) exports the receipts a node holds of a peer,
  and ``murmur audit verify --peer-heads`` (:func:`load_peer_heads`) checks a log against them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol, TextIO

from aiohttp import web

from crypto.allowlist import Allowlist, Peer
from crypto.identity import Identity
from gossip.heads import (
    ANSWER_CONTENT_TYPE,
    MAX_ANSWER_BYTES,
    REQUEST_BYTES,
    HeadBook,
    HeadCheck,
    ReceiptsRequest,
    RequestError,
    RequestGuard,
    RollbackProof,
    check_request,
    open_receipts_answer,
    seal_receipts_answer,
)
from gossip.receipts import EPSILON_TOLERANCE, AuditHead, Receipt, ReceiptError
from gossip.wire import HTTP_STATUS, OpenedEnvelope, RejectReason
from node.audit import (
    HEAD_BEYOND_END,
    HEAD_MISMATCH,
    AuditError,
    AuditLog,
    PeerHead,
    last_seq_of_kind,
    records_of_kind,
    stored_public_key,
)
from node.config import GossipSection
from node.metrics import NodeMetrics
from node.rejections import RateLimitedLog, printable

log = logging.getLogger("murmur.rollback")

HEADS_FORMAT = "murmur-peer-heads/1"
_HEX_KEY = re.compile(r"^[0-9a-fA-F]{64}$")


class ReceiptsTransport(Protocol):
    """What the startup check needs from a transport (gossip/transport.py, PeerTransport)."""

    async def request_receipts(
        self, peer: Peer, request: bytes, max_bytes: int
    ) -> tuple[int | None, bytes]: ...


# --------------------------------------------------------------------------- serving


async def receipts_route(request: web.Request) -> web.Response:
    """``POST /receipts``: answer an admitted peer's signed request for its own receipts.

    At most ``REQUEST_BYTES + 1`` bytes are read, whatever the client claims, so the route
    costs nothing to abuse; the node answers every refusal with its reason code.
    """
    from node.api import NODE_KEY  # node.api imports this module for its route table

    node = request.app[NODE_KEY]
    # One byte more than a request is enough to refuse anything longer as too_large; a client
    # that sends less and stalls is cut off after the peer send timeout.
    try:
        async with asyncio.timeout(node.config.gossip.send_timeout_s):
            body = await read_at_most(request.content, REQUEST_BYTES + 1)
    except TimeoutError:
        body = b""
    status, content_type, payload = node.answer_receipts_request(body)
    return web.Response(status=status, body=payload, content_type=content_type)


async def read_at_most(stream: Any, limit: int) -> bytes:
    """Up to ``limit`` bytes of an aiohttp stream, whatever its chunking (one ``read(n)`` may
    return fewer bytes than are coming); stops at end of stream."""
    data = b""
    while len(data) < limit:
        chunk = await stream.read(limit - len(data))
        if not chunk:
            break
        data += chunk
    return data


# --------------------------------------------------------------------------- asking at startup


@dataclass
class ReceiptsPoll:
    """What the neighbours said when asked for their newest receipts of this node."""

    answered: dict[str, list[Receipt]] = field(default_factory=dict)
    unanswered: dict[str, str] = field(default_factory=dict)  # peer -> why
    ignored: dict[str, int] = field(default_factory=dict)  # peer -> receipts that did not verify
    seconds: float = 0.0

    def newest(self) -> list[tuple[str, Receipt]]:
        """(holder, receipt) for every valid receipt, newest round first."""
        pairs = [(peer, r) for peer, receipts in self.answered.items() for r in receipts]
        return sorted(pairs, key=lambda pair: (-pair[1].round, -pair[1].head.audit_seq))


async def poll_own_receipts(
    transport: ReceiptsTransport,
    identity: Identity,
    peers: Sequence[Peer],
    *,
    deadline_s: float,
    grace_s: float,
    stop: asyncio.Event,
    retry_s: float = 0.5,
) -> ReceiptsPoll:
    """Ask every neighbour for the newest receipt it holds of this node, concurrently.

    Neighbours that are not up yet are asked again every ``retry_s`` until ``deadline_s``; once
    one has answered, the others get at most ``grace_s`` more (so one dead neighbour does not
    hold up every restart). A neighbour that answers with a refusal or a bad answer is not
    asked again. Each request is bounded by the transport's own timeout.
    """
    started = time.monotonic()
    poll = ReceiptsPoll()
    pending = {p.name: p for p in peers}
    first_answer: float | None = None

    async def ask(peer: Peer) -> tuple[str, list[Receipt] | None, str, int]:
        request = ReceiptsRequest.make(identity, peer.public_key, time.time())
        status, body = await transport.request_receipts(peer, request.encode(), MAX_ANSWER_BYTES)
        if status is None:
            return peer.name, None, "no answer", 0
        if status != 200:
            return peer.name, None, f"refused: HTTP {status} {body[:120]!r}", -1
        try:
            receipts, ignored = open_receipts_answer(identity, request, body)
        except RequestError as exc:
            return peer.name, None, f"bad answer: {exc}", -1
        return peer.name, receipts, "answered", ignored

    while pending and not stop.is_set():
        results = await asyncio.gather(*(ask(p) for p in pending.values()))
        for name, receipts, why, ignored in results:
            if receipts is not None:
                poll.answered[name] = receipts
                if ignored:
                    poll.ignored[name] = ignored
                del pending[name]
            else:
                poll.unanswered[name] = why
                if ignored < 0:  # a definite refusal: asking again will not change it
                    del pending[name]
        for name in poll.answered:
            poll.unanswered.pop(name, None)
        now = time.monotonic()
        if first_answer is None and poll.answered:
            first_answer = now
        limit = started + deadline_s
        if first_answer is not None:
            limit = min(limit, first_answer + grace_s)
        if not pending or now >= limit:
            break
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=max(0.0, min(retry_s, limit - now)))
    poll.seconds = time.monotonic() - started
    return poll


def own_state_behind(
    receipt: Receipt,
    *,
    signed_through: int,
    audit_position: Callable[[int, bytes], str],
    dp_steps: int,
    epsilon: float,
) -> list[str]:
    """How this node's state is older than what it signed in ``receipt`` (empty: it is not).

    ``signed_through`` is the newest round the node will never sign again (its signed-round
    record, or its checkpoint's round); ``audit_position`` is ``AuditLog.position``.
    """
    head = receipt.head
    problems = []
    if signed_through < receipt.round:
        problems.append(
            f"its last signed round is {signed_through}, but it signed round {receipt.round}"
        )
    position = audit_position(head.audit_seq, head.audit_hash)
    if position == HEAD_BEYOND_END:
        problems.append(
            f"its audit log ends before record {head.audit_seq}, which it had signed as its "
            f"head (hash {head.audit_hash.hex()})"
        )
    elif position == HEAD_MISMATCH:
        problems.append(
            f"its audit log holds another record at seq {head.audit_seq} than the head it "
            f"signed (hash {head.audit_hash.hex()})"
        )
    if dp_steps < head.dp_steps:
        problems.append(
            f"its privacy ledger has {dp_steps} DP steps, it had signed {head.dp_steps}"
        )
    if head.epsilon - epsilon > EPSILON_TOLERANCE * max(1.0, head.epsilon):
        problems.append(f"its privacy ledger has spent epsilon {epsilon:.4f}, it had signed "
                        f"{head.epsilon:.4f}")  # fmt: skip
    return problems


def describe_receipt(holder: str, receipt: Receipt) -> str:
    """One line naming a neighbour's evidence, for the error and the log."""
    head = receipt.head
    return (
        f"{holder} holds this node's own signed envelope of round {receipt.round} (audit head "
        f"seq {head.audit_seq}, hash {head.audit_hash.hex()[:16]}..., {head.dp_steps} DP steps, "
        f"epsilon {head.epsilon:.4f})"
    )


# --------------------------------------------------------------------------- rebuilding a book


def received_heads_since(state_dir: Path, after_seq: int) -> list[Receipt]:
    """Receipts recorded in this node's own ``message_received`` records after ``after_seq``
    (those that arrived after its last checkpoint, which a crash kept out of its head book)."""
    receipts = []
    for record in records_of_kind(state_dir, "message_received", after_seq=after_seq):
        text = record.fields.get("receipt")
        if isinstance(text, str):
            with contextlib.suppress(ValueError):
                receipts.append(Receipt.decode(bytes.fromhex(text)))
    return receipts


def replay_into(book: HeadBook, receipts: Sequence[Receipt]) -> int:
    """Observe verified ``receipts`` in order; returns how many did not verify (skipped)."""
    bad = 0
    for receipt in receipts:
        if receipt.verify():
            book.observe(receipt)
        else:
            bad += 1
    return bad


# --------------------------------------------------------------------------- murmur audit heads


def _read_checkpoint_heads(state_dir: Path) -> list[Receipt]:
    from node.checkpoint import CheckpointError, checkpoint_path, decode_checkpoint

    path = checkpoint_path(state_dir)
    if not path.is_file():
        return []
    try:
        ckpt = decode_checkpoint(path.read_bytes(), source=str(path))
    except (CheckpointError, OSError) as exc:
        print(f"audit heads: warning: {exc}", file=sys.stderr)
        return []
    out = []
    state = ckpt.extra.get("heads") or {}
    for text in state.get("latest", []) if isinstance(state, dict) else []:
        with contextlib.suppress(ValueError, TypeError):
            out.append(Receipt.decode(bytes.fromhex(text)))
    return out


def collect_peer_receipts(
    state_dir: Path, of: str
) -> tuple[str | None, bytes | None, list[Receipt]]:
    """Every verified receipt the node of ``state_dir`` holds of peer ``of`` (a name from its
    config or a 64-hex public key): (name, key, receipts oldest first, de-duplicated)."""
    name = None if _HEX_KEY.match(of) else of
    key = bytes.fromhex(of) if name is None else None
    found: list[Receipt] = []
    for record in records_of_kind(state_dir, "message_received"):
        text = record.fields.get("receipt")
        if not isinstance(text, str):
            continue
        try:
            receipt = Receipt.decode(bytes.fromhex(text))
        except ValueError:
            continue
        by_name = name is not None and record.fields.get("sender") == name
        if by_name or receipt.sender == key:
            key = key or receipt.sender
            name = name or record.fields.get("sender")
            found.append(receipt)
    if key is not None:
        found += [r for r in _read_checkpoint_heads(state_dir) if r.sender == key]
    unique: dict[bytes, Receipt] = {}
    for receipt in found:
        if receipt.sender == key and receipt.verify():
            unique.setdefault(receipt.encode(), receipt)
    ordered = sorted(unique.values(), key=lambda r: (r.round, r.head.audit_seq))
    return name, key, ordered


def heads_command(state_dir: Path, of: str, out: TextIO, *, limit: int = 100) -> int:
    """``murmur audit heads``: the signed receipts the node of ``state_dir`` holds of ``of``,
    as JSON (the newest ``limit``). Exit 0 with receipts, 1 with none, 2 without a log."""
    try:
        meta_key = stored_public_key(state_dir)
        name, key, receipts = collect_peer_receipts(state_dir, of)
    except AuditError as exc:
        print(f"audit heads: {exc}", file=sys.stderr)
        return 2
    receipts = receipts[-limit:] if limit > 0 else receipts
    doc = {
        "format": HEADS_FORMAT,
        "holder": {"state_dir": str(state_dir), "public_key": meta_key.hex() if meta_key else None},
        "of": {"name": name, "public_key": key.hex() if key else None},
        "exported_utc": datetime.now(tz=UTC).isoformat(timespec="seconds"),
        "receipts": [
            {"round": r.round, **r.head.to_json(), "receipt": r.to_hex()} for r in receipts
        ],
    }
    out.write(json.dumps(doc, indent=1) + "\n")
    print(f"audit heads: {len(receipts)} signed receipt(s) of {of}", file=sys.stderr)
    return 0 if receipts else 1


def load_peer_heads(
    paths: Sequence[Path], expected_key: bytes | None, state_dir: Path
) -> tuple[list[PeerHead], list[str]]:
    """The heads in ``murmur audit heads`` files that the log's node really signed, and
    warnings for entries that are not evidence (bad signature, another node's key).

    Only the ``receipt`` of each entry counts: the readable fields beside it are ignored, so
    an edited file cannot claim a head the node never signed.
    """
    key = expected_key if expected_key is not None else stored_public_key(state_dir)
    heads, warnings = [], []
    for path in paths:
        try:
            doc = json.loads(Path(path).read_text())
            entries = doc["receipts"]
            holder = (doc.get("holder") or {}).get("state_dir") or str(path)
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            warnings.append(f"{path}: not a murmur audit heads file ({exc!r})")
            continue
        for index, entry in enumerate(entries if isinstance(entries, list) else []):
            try:
                receipt = Receipt.decode(bytes.fromhex(entry["receipt"]))
            except (KeyError, TypeError, ValueError, ReceiptError) as exc:
                warnings.append(f"{path} entry {index}: not a receipt ({exc})")
                continue
            if key is not None and receipt.sender != key:
                warnings.append(f"{path} entry {index}: a receipt of another node; ignored")
            elif not receipt.verify():
                warnings.append(f"{path} entry {index}: its signature does not verify; ignored")
            else:
                label = f"signed in the round-{receipt.round} envelope, held by {holder}"
                heads.append(PeerHead(receipt.head.audit_seq, receipt.head.audit_hash, label))
    return heads, warnings


# --------------------------------------------------------------------------- the node's guard


class RolledBackError(RuntimeError):
    """This node's state is older than what it signed; the message names the evidence."""


class RollbackGuard:
    """A node's rollback defences in one object, called from a few places in node/node.py:
    every authenticated envelope (:meth:`check`), ``POST /receipts`` (:meth:`answer`), the
    checkpoint (:meth:`to_state` / :meth:`restore`) and every start (:meth:`check_startup`).

    ``on_change`` is called whenever what /status shows (:meth:`status`) changes.
    """

    def __init__(
        self,
        *,
        identity: Identity,
        allowlist: Allowlist,
        audit: AuditLog,
        metrics: NodeMetrics,
        state_dir: Path,
        gossip: GossipSection,
        on_change: Callable[[], None] = lambda: None,
    ) -> None:
        self.identity = identity
        self.allowlist = allowlist
        self.peers = list(allowlist)
        self.audit = audit
        self.metrics = metrics
        self.state_dir = state_dir
        self.gossip = gossip
        self.on_change = on_change
        # The newest signed audit head of each peer, and proofs that one went backwards.
        self.heads = HeadBook.for_senders(p.public_key for p in self.peers)
        self.request_guard = RequestGuard(window_s=gossip.timestamp_window_s)
        self.refusal_log = RateLimitedLog(log)
        self.requests: Counter[str] = Counter()
        self.startup_check: dict[str, Any] = {"outcome": "not_run"}

    # -- state

    def to_state(self) -> dict[str, Any]:
        return self.heads.to_state()

    def restore(self, state: dict[str, Any] | None) -> None:
        """The peers' heads from the checkpoint, then those the audit log received after it
        (a crash between a round's envelopes and its checkpoint must not forget them)."""
        keys = [p.public_key for p in self.peers]
        if state:
            self.heads = HeadBook.from_state(state, keys)
        after = last_seq_of_kind(self.state_dir, "checkpoint") or 0
        bad = replay_into(self.heads, received_heads_since(self.state_dir, after))
        if bad:
            log.warning("%d receipts in the audit log since the checkpoint do not verify", bad)

    def status(self) -> dict[str, Any]:
        """The ``rollback`` entry of /status."""
        proven = {}
        for key, proof in self.heads.proofs().items():
            peer = self.allowlist.by_key(key)
            evidence = proof.evidence()
            proven[peer.name if peer else key.hex()] = {
                "proof_id": evidence["proof_id"],
                "regressions": evidence["regressions"],
                "earlier": evidence["earlier"],
                "later": evidence["later"],
            }
        return {
            "proven": proven,
            "startup_check": self.startup_check,
            "receipts_requests": dict(self.requests),
        }

    # -- every envelope

    def check(self, opened: OpenedEnvelope, current_round: int) -> str | None:
        """Why this authentic envelope must be refused as ``rollback``, or None.

        Refused: an envelope whose signed head is behind one its sender signed for an earlier
        round, and any envelope of a peer proven to have rolled back (its ledger no longer
        shows what it spent). The caller records the rejection.
        """
        peer = opened.sender.name
        check, proof = self.heads.observe(opened.receipt)
        if check is HeadCheck.ROLLBACK and proof is not None:
            if self.heads.proof(opened.sender.public_key) is proof:
                self._detected(peer, proof, current_round)
            detail = (
                f"{peer}'s round-{opened.round} envelope claims a state older than its round-"
                f"{proof.earlier.round} envelope ({', '.join(proof.regressions)} went back): "
                f"its state directory was rolled back (proof {proof.id[:16]})"
            )
        else:
            held = self.heads.proof(opened.sender.public_key)
            if held is None:
                return None
            detail = (
                f"{peer} was proven to have rolled back its state (proof {held.id[:16]}, "
                f"round {held.later.round}); its envelopes are refused from then on"
            )
        self.metrics.rollback_detected.labels(peer=peer).inc()
        return detail

    def _detected(self, peer: str, proof: RollbackProof, current_round: int) -> None:
        """The first proof against a peer: log it loudly with the evidence, audit it."""
        evidence = proof.evidence()
        log.error(
            "\n%s\nROLLBACK DETECTED: peer %s signed a round-%d envelope whose audit head is "
            "behind the one it signed in round %d (%s went back): its state directory was put "
            "back to an older copy, so its privacy ledger no longer shows what it spent. Its "
            "envelopes are refused from now on. Evidence (both receipts verify with its key): "
            "%s\n%s",
            "#" * 78,
            peer,
            proof.later.round,
            proof.earlier.round,
            ", ".join(proof.regressions),
            json.dumps({k: v for k, v in evidence.items() if k != "receipts"}),
            "#" * 78,
        )
        self.audit.append("rollback_detected", current_round, peer=peer, **evidence)
        self.on_change()

    # -- POST /receipts

    def answer(self, body: bytes, current_round: int) -> tuple[int, str, bytes]:
        """Handle one POST /receipts body: (HTTP status, content type, payload). Never raises.

        An admitted peer gets, sealed to it, the newest receipt this node holds of *that
        peer*, nothing about anyone else; anything else gets a typed, counted refusal.
        """
        try:
            request = check_request(
                body,
                own_key=self.identity.public_key,
                known_senders=[p.public_key for p in self.peers],
                guard=self.request_guard,
                now=time.time(),
                window_s=self.gossip.timestamp_window_s,
            )
        except RequestError as exc:
            # Anyone can send a refused request: it is counted in memory (/status, /metrics)
            # and logged at most once per reason per interval, never audited one row each,
            # and the sender learns only the reason code (docs/protocol.md, "HTTP").
            self.requests[exc.reason] += 1
            self.metrics.receipts_requests.labels(outcome=exc.reason).inc()
            self.refusal_log.warning(
                exc.reason,
                "refused a receipts request (%s): %s",
                exc.reason,
                printable(exc.detail),
            )
            self.on_change()
            payload = json.dumps({"reason": exc.reason}).encode()
            return HTTP_STATUS[RejectReason(exc.reason)], "application/json", payload
        requester = self.allowlist.by_key(request.requester)
        held = self.heads.latest(request.requester)
        self.requests["answered"] += 1
        self.metrics.receipts_requests.labels(outcome="answered").inc()
        self.audit.append(
            "receipts_request",
            current_round,
            requester=requester.name if requester else None,
            outcome="answered",
            answered={"round": held.round, **held.head.to_json()} if held else None,
        )
        self.on_change()
        receipts = [held] if held is not None else []
        proof = self.heads.proof(request.requester)
        if proof is not None and proof.earlier not in receipts:
            receipts.append(proof.earlier)  # the furthest head, if a later round went back
        return 200, ANSWER_CONTENT_TYPE, seal_receipts_answer(request, receipts)

    # -- every start

    async def check_startup(
        self,
        transport: ReceiptsTransport | None,
        *,
        own_head: AuditHead,
        signed_through: int,
        next_round: int,
        stop: asyncio.Event,
    ) -> None:
        """Ask the neighbours for the newest receipt they hold of this node; raise
        ``RolledBackError`` naming the evidence if this node's state (``own_head``: its durable
        audit head and ledger; ``signed_through``: the newest round it will not sign again) is
        older than what it signed. With no answer in time: a loud warning, and go on.

        ``transport=None`` opens a PeerTransport of its own for the check.
        """
        if not self.peers:
            return
        if transport is None:
            from gossip.transport import PeerTransport

            async with PeerTransport(send_timeout_s=self.gossip.send_timeout_s) as own:
                await self.check_startup(
                    own,
                    own_head=own_head,
                    signed_through=signed_through,
                    next_round=next_round,
                    stop=stop,
                )
            return
        poll = await poll_own_receipts(
            transport,
            self.identity,
            self.peers,
            deadline_s=self.gossip.startup_timeout_s,
            grace_s=max(2.0, self.gossip.send_timeout_s),
            stop=stop,
        )
        newest = poll.newest()
        findings = []
        for holder, receipt in newest:
            problems = own_state_behind(
                receipt,
                signed_through=signed_through,
                audit_position=self.audit.position,
                dp_steps=own_head.dp_steps,
                epsilon=own_head.epsilon,
            )
            if problems:
                findings.append((holder, receipt, problems))
        top = (
            {"holder": newest[0][0], "round": newest[0][1].round, **newest[0][1].head.to_json()}
            if newest
            else None
        )
        self.startup_check = {
            "outcome": "refused" if findings else ("ok" if poll.answered else "no_answer"),
            "answered": sorted(poll.answered),
            "unanswered": poll.unanswered,
            "ignored_receipts": poll.ignored,
            "newest": top,
            "seconds": round(poll.seconds, 3),
        }
        self.on_change()
        self.audit.append("rollback_check", next_round, **self.startup_check)
        if findings:
            holder, receipt, problems = findings[0]
            self.audit.append(
                "startup_refused",
                next_round,
                holder=holder,
                receipt=receipt.to_hex(),
                problems=problems,
            )
            more = len(findings) - 1
            raise RolledBackError(
                f"this node's state is older than what it already signed: "
                f"{describe_receipt(holder, receipt)}, but {'; '.join(problems)} (state "
                f"directory {self.state_dir}"
                + (f"; {more} more neighbour receipt(s) show the same" if more else "")
                + "). The state directory was put back to an older copy, or is a new one for a "
                "key that already took part: starting would spend privacy budget already spent "
                "and sign envelopes that contradict earlier ones. Fix: put back the newest copy "
                "of this state directory (its audit log must contain the head above; "
                "`murmur audit verify --peer-heads` checks a copy); if there is none, this key's "
                "budget is gone: retire the key and start a new deployment with a new key, with "
                "your data protection officer's approval"
            )
        if not poll.answered:
            log.warning(
                "\n%s\nROLLBACK CHECK INCOMPLETE: no neighbour answered POST /receipts within "
                "%.0f s (%s), so this node cannot confirm that its state directory is not an "
                "older copy. Starting anyway; its neighbours refuse its first envelope if its "
                "state went back.\n%s",
                "!" * 78,
                poll.seconds,
                json.dumps(poll.unanswered),
                "!" * 78,
            )
        else:
            log.info(
                "rollback check: %d of %d neighbours answered; this node's state is not older "
                "than anything they hold of it",
                len(poll.answered),
                len(self.peers),
            )
