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
* the node's memory of its peers' heads is rebuilt from its audit log after a crash
  (:func:`received_heads_since`); ``murmur audit heads`` and ``--peer-heads`` are in
  node/peer_heads.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn, Protocol

from aiohttp import web
from murmur.crypto.allowlist import Allowlist, Peer
from murmur.crypto.identity import Identity
from murmur.gossip.heads import (
    ANSWER_CONTENT_TYPE,
    MAX_ANSWER_BYTES,
    HeadBook,
    HeadCheck,
    ReceiptsRequest,
    RequestError,
    RequestGuard,
    RollbackProof,
    check_request,
    open_receipts_answer_with_budget,
    seal_receipts_answer,
)
from murmur.gossip.receipts import EPSILON_TOLERANCE, AuditHead, Receipt
from murmur.gossip.wire import HTTP_STATUS, OpenedEnvelope, RejectReason, study_kind
from murmur.node.audit import (
    HEAD_BEYOND_END,
    HEAD_MISMATCH,
    AuditLog,
    last_seq_of_kind,
    records_of_kind,
)
from murmur.node.config import GossipSection
from murmur.node.metrics import NodeMetrics
from murmur.node.rejections import RateLimitedLog, printable

log = logging.getLogger("murmur.rollback")


class ReceiptsTransport(Protocol):
    """What the startup check needs from a transport (gossip/transport.py, PeerTransport)."""

    async def request_receipts(
        self, peer: Peer, request: bytes, max_bytes: int
    ) -> tuple[int | None, bytes]: ...


# --------------------------------------------------------------------------- serving


async def receipts_route(request: web.Request) -> web.Response:
    """``POST /receipts``: answer an admitted peer's signed request for its own receipts.

    Added with ``node.api.add_peer_route`` and a body limit of ``REQUEST_BYTES``: the request
    is authenticated from its headers, anything longer is refused before it is read, and the
    requester inside must be the peer that signed the request (``sender_mismatch``). Every
    refusal is answered with its reason code.
    """
    from murmur.node.api import NODE_KEY, authenticated_peer, read_peer_body  # node.api imports us

    body = await read_peer_body(request)
    if isinstance(body, web.Response):
        return body
    node = request.app[NODE_KEY]
    status, content_type, payload = node.answer_receipts_request(
        body, authenticated_peer(request).public_key
    )
    return web.Response(status=status, body=payload, content_type=content_type)


# --------------------------------------------------------------------------- asking at startup


@dataclass
class ReceiptsPoll:
    """What the neighbours said when asked for their newest receipts of this node."""

    answered: dict[str, list[Receipt]] = field(default_factory=dict)
    unanswered: dict[str, str] = field(default_factory=dict)  # peer -> why
    ignored: dict[str, int] = field(default_factory=dict)  # peer -> receipts that did not verify
    # peer -> the newest head of this hospital's site budget log it holds (unchecked bytes)
    budget: dict[str, bytes] = field(default_factory=dict)
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
    study: bytes | None = None,
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

    async def ask(peer: Peer) -> tuple[str, list[Receipt] | None, str, int, bytes | None]:
        request = ReceiptsRequest.make(identity, peer.public_key, time.time(), study)
        status, body = await transport.request_receipts(peer, request.encode(), MAX_ANSWER_BYTES)
        if status is None:
            return peer.name, None, "no answer", 0, None
        if status != 200:
            return peer.name, None, f"refused: HTTP {status} {body[:120]!r}", -1, None
        try:
            receipts, ignored, budget = open_receipts_answer_with_budget(identity, request, body)
        except RequestError as exc:
            return peer.name, None, f"bad answer: {exc}", -1, None
        return peer.name, receipts, "answered", ignored, budget

    while pending and not stop.is_set():
        results = await asyncio.gather(*(ask(p) for p in pending.values()))
        for name, receipts, why, ignored, budget in results:
            if budget is not None:
                poll.budget[name] = budget
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
        budget_head_of: Callable[[bytes], bytes | None] = lambda key: None,
        refused_key: Callable[[bytes], str | None] = lambda key: None,
        study: bytes | None = None,
    ) -> None:
        self.identity = identity
        # The study whose envelopes this guard sees (None: a node without one): its heads are
        # the ones it answers POST /receipts with, and asks its neighbours for at start.
        self.study = study
        self.kind = study_kind(study)
        self.allowlist = allowlist
        self.peers = list(allowlist)
        self.audit = audit
        self.metrics = metrics
        self.state_dir = state_dir
        self.gossip = gossip
        self.on_change = on_change
        # The site budget's side (node/studies/gate.py): the newest head of a peer hospital's
        # budget log this hospital holds, for its answer; a peer whose budget log went back.
        self.budget_head_of = budget_head_of
        self.refused_key = refused_key
        self.budget_heads: dict[str, bytes] = {}  # what the startup poll brought back
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
        budget_refusal = self.refused_key(opened.sender.public_key)
        if budget_refusal is not None:
            self.metrics.rollback_detected.labels(peer=peer).inc()
            return budget_refusal
        check, proof = self.heads.observe(opened.receipt)
        if check is HeadCheck.ROLLBACK and proof is not None:
            if self.heads.proof(opened.sender.public_key, opened.receipt.kind) is proof:
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

    def answer(
        self, body: bytes, current_round: int, sender: bytes | None = None
    ) -> tuple[int, str, bytes]:
        """Handle one POST /receipts body: (HTTP status, content type, payload). Never raises.

        An admitted peer gets, sealed to it, the newest receipt this node holds of *that
        peer*, nothing about anyone else; anything else gets a typed, counted refusal.
        ``sender``: the key the HTTP request was authenticated with (the requester's, or
        ``sender_mismatch``); None for callers that hand requests over themselves.
        """
        try:
            request = check_request(
                body,
                own_key=self.identity.public_key,
                known_senders=[p.public_key for p in self.peers],
                guard=self.request_guard,
                now=time.time(),
                window_s=self.gossip.timestamp_window_s,
                sender=sender,
            )
        except RequestError as exc:
            return self._refuse_request(exc)
        # The receipts of the study the request names (none of a study this node does not
        # run), and the hospital's budget log head, which is per hospital, not per study.
        kind = study_kind(request.study_id)
        requester = self.allowlist.by_key(request.requester)
        held = self.heads.latest(request.requester, kind)
        self.requests["answered"] += 1
        self.metrics.receipts_requests.labels(outcome="answered").inc()
        self.audit.append(
            "receipts_request",
            current_round,
            requester=requester.name if requester else None,
            envelope_kind=kind,
            outcome="answered",
            answered={"round": held.round, **held.head.to_json()} if held else None,
        )
        self.on_change()
        receipts = [held] if held is not None else []
        proof = self.heads.proof(request.requester, kind)
        if proof is not None and proof.earlier not in receipts:
            receipts.append(proof.earlier)  # the furthest head, if a later round went back
        budget = self.budget_head_of(request.requester)
        sealed = seal_receipts_answer(self.identity, request, receipts, budget)
        return 200, ANSWER_CONTENT_TYPE, sealed

    def _refuse_request(self, exc: RequestError) -> tuple[int, str, bytes]:
        """Anyone can send a refused request: it is counted in memory (/status, /metrics)
        and logged at most once per reason per interval, never audited one row each, and the
        sender learns only the reason code (docs/protocol.md, "HTTP")."""
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
            from murmur.gossip.transport import PeerTransport

            async with PeerTransport(
                identity=self.identity,
                send_timeout_s=self.gossip.send_timeout_s,
                timestamp_window_s=self.gossip.timestamp_window_s,
            ) as own:
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
            study=self.study,
        )
        self.budget_heads = dict(poll.budget)
        # Only this study's receipts say how far its state had got (another study of the
        # same key keeps another audit log).
        newest = [(holder, r) for holder, r in poll.newest() if r.kind == self.kind]
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
            self._refuse_start(findings, next_round)
        self._say_checked(poll)

    def _refuse_start(
        self, findings: list[tuple[str, Receipt, list[str]]], next_round: int
    ) -> NoReturn:
        """Audit and raise the refusal to start, naming the first neighbour's evidence."""
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

    def _say_checked(self, poll: ReceiptsPoll) -> None:
        """Log the check's outcome: loudly when no neighbour answered in time."""
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
