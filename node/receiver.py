"""The receive pipeline: open an envelope, check it, file it into the round inbox, keep its
evidence; and every refusal counted, logged (rate-limited) and audited where that is bounded.

Why its own part: this is the code strangers and neighbours reach through POST /gossip and
POST /probe (node/api.py), so it never raises and answers with a reason code only. Opening
(hashing, signature, decryption, parsing) runs in a worker thread; everything that changes
the node's state runs on the event loop.

The order matters: an envelope is authentic before anything else looks at it; the rollback
check (node/rollback.py) runs before the inbox so a rolled-back sender's model never enters a
round; and its receipt is evidence whatever the inbox makes of it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from murmur.crypto.allowlist import Allowlist, Peer
from murmur.crypto.identity import Identity
from murmur.gossip.probe import check_probe
from murmur.gossip.receipts import Receipt
from murmur.gossip.rounds import InboxVerdict, RoundInbox
from murmur.gossip.wire import HTTP_STATUS, EnvelopeOpener, OpenedEnvelope, RejectReason, WireError
from murmur.models.params import state_sha256
from murmur.node.audit import AuditLog
from murmur.node.evidence import EvidenceBook
from murmur.node.metrics import NodeMetrics
from murmur.node.noise_plan import REASON as NOISE_REASON
from murmur.node.noise_plan import NoisePlan
from murmur.node.rejections import RateLimitedLog, RejectionTally, printable
from murmur.node.rollback import RollbackGuard
from murmur.node.state import NodeState

log = logging.getLogger("murmur.node")


@dataclass(frozen=True)
class ReceivedUpdate:
    """An authenticated neighbour update, with its model hash computed once on arrival."""

    envelope: OpenedEnvelope
    model_sha256: str


# Called with (round, envelope body) for every envelope the inbox accepted.
AcceptedListener = Callable[[int, bytes], None]


class Receiver:
    """Turns POST bodies into inbox entries and evidence, or into counted refusals."""

    def __init__(
        self,
        *,
        identity: Identity,
        allowlist: Allowlist,
        opener: EnvelopeOpener,
        inbox: RoundInbox[ReceivedUpdate],
        rollback: RollbackGuard,
        evidence: EvidenceBook,
        audit: AuditLog,
        metrics: NodeMetrics,
        state: NodeState,
        timestamp_window_s: float,
        on_spoke: Callable[[str, int], None],
        noise_plan: NoisePlan | None = None,
    ) -> None:
        self._identity = identity
        # what DP noise a sender may announce (node/noise_plan.py); None: not checked
        self._noise_plan = noise_plan
        self._allowlist = allowlist
        self.opener = opener
        self._inbox = inbox
        self._rollback = rollback
        self._evidence = evidence
        self._audit = audit
        self._metrics = metrics
        self._state = state
        self._timestamp_window_s = timestamp_window_s
        self._on_spoke = on_spoke
        self.accepted_listeners: list[AcceptedListener] = []
        self.rejected: Counter[str] = Counter()
        # Unauthenticated rejections: counted here and summarised in one audit record per
        # round, never one record or log line each (node/rejections.py).
        self.unauthenticated = RejectionTally()
        self.rejection_log = RateLimitedLog(log)

    async def receive(
        self, body: bytes, source: str | None = None, sender: Peer | None = None
    ) -> tuple[int, str, str]:
        """Handle one POST /gossip body from address `source`: (HTTP status, reason code,
        detail). Never raises. The detail is for this node's log; peers get only the code.

        `sender` is the peer whose request signature the listener verified (node/api.py): the
        envelope must be its own, and its refusals are audited under its name. None for
        callers that hand envelopes over themselves (in-process benchmarks and tests).
        """
        key = sender.public_key if sender is not None else None
        try:
            verified = await asyncio.to_thread(self.opener.verify, body, None, key)
            opened = self.opener.accept(verified)
        except (WireError, OSError) as err:
            return self._refused(err, source, sender)
        return await self._deliver(opened, body)

    async def receive_stream(
        self,
        read: Callable[[int], Awaitable[bytes]],
        length: int,
        source: str | None = None,
        sender: Peer | None = None,
    ) -> tuple[int, str, str]:
        """`receive` for a body of `length` bytes opened as it is read (a streamed envelope,
        gossip/wire/stream.py; a whole one is collected and opened at the end): `read(n)`
        returns exactly the body's next n bytes, or raises the listener's own refusal, which
        passes through. A refusal is returned as soon as the bytes read show it, so the
        caller can leave the rest unread. Reading runs on the event loop, checking and
        decrypting each piece in a worker thread."""
        key = sender.public_key if sender is not None else None
        try:
            opening = self.opener.begin_stream(length, None, key)
            while (wanted := opening.wants()) > 0:
                await asyncio.to_thread(opening.feed, await read(wanted))
            verified = await asyncio.to_thread(opening.finish)
            opened = self.opener.accept(verified)
        except (WireError, OSError) as err:
            return self._refused(err, source, sender)
        # The message is never held whole here, so `accepted_listeners` (which take the
        # envelope's bytes) do not hear of it.
        return await self._deliver(opened, None)

    def _refused(
        self, err: WireError | OSError, source: str | None, sender: Peer | None
    ) -> tuple[int, str, str]:
        """Count and log a refused envelope (or a spool failure): the answer to give."""
        if isinstance(err, WireError):
            self.opener.note_failure(err)
            self.record_rejection(
                err.reason.value,
                err.detail,
                sender=sender.name if sender is not None else None,
                round_=None,
                source=source,
            )
            return HTTP_STATUS[err.reason], err.reason.value, err.detail
        # Spooling the opened model failed (gossip/spool.py: the disk is full or gone):
        # this node's fault, not the sender's, which may send again.
        log.error("could not keep a received model on disk: %s", err)
        self.record_rejection(
            "spool_failed",
            str(err),
            sender=sender.name if sender is not None else None,
            round_=None,
            source=source,
        )
        return 503, "spool_failed", str(err)

    async def _deliver(self, opened: OpenedEnvelope, body: bytes | None) -> tuple[int, str, str]:
        """File an opened, accepted envelope: rollback check, inbox, evidence, audit."""
        name = opened.sender.name
        refused = self._rollback.check(opened, self._inbox.current_round)
        if refused is not None:
            self.record_rejection(
                "rollback", refused, sender=name, round_=opened.round, receipt=opened.receipt
            )
            return 409, "rollback", refused
        out_of_plan = await self._check_noise(opened)
        if out_of_plan is not None:
            return out_of_plan
        received = ReceivedUpdate(opened, state_sha256(opened.update.tensors))
        verdict = self._file(name, opened, received)
        if verdict is not InboxVerdict.ACCEPTED:
            detail = f"round {opened.round} from {name} while at round {self._inbox.current_round}"
            self.record_rejection(
                verdict.value, detail, sender=name, round_=opened.round, receipt=opened.receipt
            )
            return 409, verdict.value, detail
        if body is not None:
            for listener in self.accepted_listeners:
                listener(opened.round, body)
        self._audit.append(
            "message_received",
            opened.round,
            sender=name,
            accepted=True,
            reason="accepted",
            body_sha256=opened.body_sha256,
            model_sha256=received.model_sha256,
            audit_head=opened.head.to_json(),
            receipt=opened.receipt.to_hex(),  # the sender's own signed claim (gossip/heads.py)
        )
        self._metrics.received.inc()
        return 202, "accepted", ""

    async def _check_noise(self, opened: OpenedEnvelope) -> tuple[int, str, str] | None:
        """Refuse (``dp_out_of_plan``, 422) an update whose announced DP noise no honest site
        of the study could have (node/noise_plan.py): a larger claim would widen the distance
        at which its model is muted. The first claim of a site size costs one accountant
        calibration, so it runs in a worker thread."""
        claim = opened.update.noise
        if self._noise_plan is None or claim is None:
            return None
        why = await asyncio.to_thread(self._noise_plan.check, claim)
        if why is None:
            return None
        name = opened.sender.name
        detail = f"round {opened.round} from {name} announces DP noise outside the plan: {why}"
        self.record_rejection(
            NOISE_REASON, detail, sender=name, round_=opened.round, receipt=opened.receipt
        )
        return 422, NOISE_REASON, detail

    def _file(self, name: str, opened: OpenedEnvelope, received: ReceivedUpdate) -> InboxVerdict:
        """Offer an authentic envelope to the round inbox, note that its sender is alive, and
        keep its evidence; returns the inbox's verdict."""
        verdict = self._inbox.offer(name, opened.round, received)
        if verdict is not InboxVerdict.OLD_ROUND or opened.round >= self._inbox.current_round - 1:
            self._on_spoke(name, opened.round)  # up again if it was down (gossip/liveness.py)
        peer = self._state.peers[name]
        peer["last_round"] = max(peer["last_round"], opened.round)
        peer["last_seen"] = time.time()
        # The envelope is authentic, so its signature is evidence whatever the inbox made of
        # it: a second, different envelope for one round (a "duplicate") is a proof at once.
        self._evidence.check_envelope(opened.receipt, accepted=verdict is InboxVerdict.ACCEPTED)
        self._evidence.take(name, opened.update)
        return verdict

    def record_rejection(
        self,
        reason: str,
        detail: str,
        *,
        sender: str | None,
        round_: int | None,
        source: str | None = None,
        receipt: Receipt | None = None,
        why: str | None = None,
    ) -> None:
        """Count a refused request in /status and /metrics, and log it (rate-limited).

        `why` is the precise reason behind an `unauthenticated` refusal (gossip/auth.py),
        counted in /status `unauthenticated` and `murmur_unauthenticated_requests_total`.

        `sender` is the admitted peer whose signature verified, or None. Only those are
        audited one record each (their number is bounded by the replay guard), with the
        envelope's `receipt` when there is one, so the sender's signed head survives a crash
        (node/rollback.py); anyone can cause an unauthenticated rejection, so those are
        tallied and summarised in one `rejections` audit record per round
        (`summarise_rejections`).
        """
        reason = str(reason)  # a plain code, whichever enum it came from
        self.rejected[reason] += 1
        self._state.rejected = dict(self.rejected)
        self._metrics.rejected.labels(reason=reason).inc()
        if why is not None:
            unauthenticated = self._state.unauthenticated
            unauthenticated[why] = unauthenticated.get(why, 0) + 1
            self._metrics.unauthenticated.labels(why=why).inc()
        self.rejection_log.warning(
            reason if why is None else f"{reason}:{why}",  # one line per interval per cause
            "rejected message (%s) from %s: %s",
            reason,
            sender or source or "an unknown address",
            printable(detail),
        )
        if sender is None:
            self.unauthenticated.add(reason, source)
            return
        extra = {} if receipt is None else {"receipt": receipt.to_hex()}
        self._audit.append(
            "message_received",
            round_,
            sender=sender,
            accepted=False,
            reason=reason,
            detail=detail[:200],
            **extra,
        )

    def summarise_rejections(self, round_: int | None) -> None:
        """Write the unauthenticated rejections since the last call as ONE audit record
        (reason -> count, the top source addresses); nothing when there were none."""
        if self.unauthenticated:
            self._audit.append("rejections", round_, **self.unauthenticated.summary())

    def answer_probe(self, body: bytes, sender: bytes | None = None) -> tuple[int, str]:
        """Answer a neighbour's POST /probe: (HTTP status, reason code). Never raises.
        `sender`: the key the request was authenticated with, which must be the prober's.

        The verdict is the one the envelope opener would reach on that sender, and like the
        answer to an envelope it is only the reason code: the detail stays in this node's log.
        A refused probe is logged at most once per reason per interval (node/rejections.py), so
        an operator sees who is knocking without a line every few seconds; it is not audited,
        as it changes nothing here.
        """
        try:
            prober = check_probe(
                body,
                self._identity.public_key,
                self._allowlist,
                timestamp_window_s=self._timestamp_window_s,
            )
            if sender is not None and prober.public_key != sender:
                raise WireError(RejectReason.SENDER_MISMATCH, "a probe posted by another peer")
        except WireError as err:
            self.rejection_log.warning(
                f"probe:{err.reason.value}", "refused a probe (%s): %s", err.reason, err.detail
            )
            return HTTP_STATUS[err.reason], err.reason.value
        return 200, "admitted"
