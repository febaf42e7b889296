"""The round protocol: the coordinator that runs each round by calling the node's parts.

A round is synchronous with a deadline (docs/protocol.md, "Rounds"): a dead or slow neighbour
costs at most `gossip.round_timeout_s`, never the run. Before each round: jump ahead if a
quorum of trusted peers is there, then hold the round until enough neighbours can take it
(node/neighbours.py), so no privacy budget is spent on a round nobody receives. Then:

    train (study) -> mark the round signed (persistence) -> share (sharing) ->
    collect (round inbox, filled by node/receiver.py) -> aggregate (node/aggregator.py) ->
    evaluate (study) -> checkpoint, sign the audit head

Everything CPU-heavy (training, aggregation) runs in a worker thread, so the HTTP API keeps
answering peers and operators while the node trains.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import numpy as np
from murmur.gossip.blocks import ModelRows
from murmur.gossip.rounds import CatchUp, CollectedRound, RoundInbox, catch_up_quorum
from murmur.gossip.sampling import PeerSample
from murmur.gossip.transport import Transport
from murmur.gossip.trust import TrustTracker
from murmur.models.params import state_sha256, unflatten
from murmur.models.privacy import BudgetExhausted
from murmur.node.aggregator import RoundAggregator
from murmur.node.audit import AuditLog
from murmur.node.config import NodeConfig
from murmur.node.evidence import EvidenceBook
from murmur.node.metrics import NodeMetrics
from murmur.node.neighbours import NeighbourWatch
from murmur.node.persistence import NodeStore
from murmur.node.receiver import ReceivedUpdate, Receiver
from murmur.node.sharing import Sharing
from murmur.node.state import NodeState, RoundRecord
from murmur.node.study import Study

log = logging.getLogger("murmur.node")

State = dict[str, np.ndarray]


class RoundCoordinator:
    """Runs the planned rounds (`run_rounds`). `sharing` is the outgoing path (honest unless
    node/byzantine.py replaced it); `checkpoint(r)` saves everything the node holds."""

    def __init__(
        self,
        config: NodeConfig,
        *,
        study: Study,
        store: NodeStore,
        inbox: RoundInbox[ReceivedUpdate],
        evidence: EvidenceBook,
        trust: TrustTracker,
        neighbours: NeighbourWatch,
        aggregator: RoundAggregator,
        receiver: Receiver,
        sharing: Sharing,
        audit: AuditLog,
        metrics: NodeMetrics,
        state: NodeState,
        stop: asyncio.Event,
        checkpoint: Callable[[int], None],
        next_round: int,
        sample: PeerSample | None = None,
    ) -> None:
        self._config = config
        self._study = study
        self._store = store
        self._inbox = inbox
        self._evidence = evidence
        self._trust = trust
        self._neighbours = neighbours
        self._aggregator = aggregator
        self._receiver = receiver
        self.sharing = sharing
        self._audit = audit
        self._metrics = metrics
        self._state = state
        self._stop = stop
        self.checkpoint = checkpoint
        self.next_round = next_round
        self._peer_names = [p.name for p in config.peers]
        # Randomized peer sampling (gossip/sampling.py): round r hears from its s sampled
        # senders only; None: from every peer, every round.
        self._sample = sample
        self.catch_up_quorum = catch_up_quorum(config.aggregation.f, len(self._peer_names))
        # A node joining a running consortium starts from its neighbours' robust aggregate
        # in the round it catches up to, and contributes from the next (`_join_round`).
        self.joining = False
        self.join_on_catch_up = False
        # Why the node may no longer train at all (e.g. its study's approval was withdrawn,
        # node/studies/gate.py), asked at every round boundary; None: go on.
        self.halt: Callable[[], str | None] = lambda: None

    def set_peer_names(self, names: list[str]) -> None:
        """A membership change (node/governance.py): whom rounds wait for and count."""
        self._peer_names[:] = names
        self.catch_up_quorum = catch_up_quorum(self._config.aggregation.f, len(names))

    async def run_rounds(self, transport: Transport) -> None:
        """Run every planned round that is left, then return."""
        planned = self._config.training.rounds
        r = self.next_round
        starting = True
        if self.join_on_catch_up and r == 1 and self._store.last_signed_round == 0:
            await self._await_running_network()
        asynchronous = self._config.gossip.asynchronous
        while r <= planned and not self._stop.is_set():
            # Asynchronous: a round is this node's own step; no one else's round moves it.
            jump = None if asynchronous else self.catch_up_target()
            if jump is not None and jump.round > r:
                self.joining = self.join_on_catch_up and self._store.last_signed_round == 0
                self._jump(r, jump)
                r = jump.round
            halted = self.halt()
            if halted is not None:
                log.warning("stopping before round %d: %s", r, halted)
                self._state.phase = "approval_withdrawn"
                self._state.stop_detail = halted
                self._audit.append("study_stopped", r, reason="approval_withdrawn", detail=halted)
                return
            self._inbox.advance_to(r)
            if not await self._neighbours.wait_for_peers(transport, r, starting=starting):
                break
            starting = False
            if not asynchronous and self.catch_up_target() is not None:
                continue  # the network moved on while this node waited: jump first
            try:
                await self._one_round(r, transport)
            except BudgetExhausted as exc:
                log.warning("privacy budget spent: %s; this node stops training and sharing", exc)
                self._state.phase = "budget_exhausted"
                self._audit.append("privacy", r, event="budget_exhausted", detail=str(exc))
                return
            r += 1
        self._state.phase = "stopped" if self._stop.is_set() else "done"

    async def _await_running_network(self) -> None:
        """A fresh node admitted to a running consortium: before training round 1, give the
        members up to `startup_timeout_s` to send it their current round, so that it joins
        that round (from their robust aggregate) instead of training rounds they are past."""
        self._state.phase = "joining"
        end = time.monotonic() + self._config.gossip.startup_timeout_s
        while time.monotonic() < end and not self._stop.is_set():
            if self.catch_up_target() is not None:
                return
            if len(self._inbox.highest_round_seen) >= self.catch_up_quorum:
                return  # enough members spoke and none is ahead: the network is starting too
            await asyncio.sleep(0.2)

    def catch_up_target(self) -> CatchUp | None:
        """The round a quorum of trusted peers has reached, if ahead of ours.

        Claims of quarantined peers and of proven equivocators never count (a proof is a fact
        even with trust off, and a liar's round claims are worth nothing); the quorum is
        `catch_up_quorum`, so one far-ahead peer alone cannot make this node skip rounds.
        """
        distrusted = self._trust.quarantined() | set(self._trust.proven())
        return self._inbox.catch_up_round(self.catch_up_quorum, exclude=distrusted)

    def _jump(self, r: int, jump: CatchUp) -> None:
        """Log and audit a catch-up; a jump over more than one round loudly, with who vouched."""
        skipped = jump.round - r
        if skipped > 1:
            log.warning(
                "\n%s\nCATCH-UP: jumping from round %d to round %d, skipping %d rounds (no "
                "privacy budget is spent on them); vouched for by %s (quorum %d of %d "
                "neighbours)\n%s",
                "=" * 78,
                r,
                jump.round,
                skipped,
                ", ".join(jump.vouchers),
                self.catch_up_quorum,
                len(self._peer_names),
                "=" * 78,
            )
        else:
            log.info(
                "behind: %s are at round %d; moving on from round %d", jump.vouchers, jump.round, r
            )
        self._audit.append(
            "catch_up",
            r,
            to_round=jump.round,
            skipped=skipped,
            quorum=self.catch_up_quorum,
            vouched_by=list(jump.vouchers),
        )

    async def _one_round(self, r: int, transport: Transport) -> None:
        started = time.monotonic()
        self._state.round = r
        self._evidence.receipts.advance(r)
        if r <= self._store.last_signed_round:
            # Restarted after signing this round: a second, different round-r envelope would
            # be equivocation. Share nothing; collect and aggregate from the checkpoint.
            log.warning(
                "round %d was already signed before a restart; not training or sending it "
                "again (collecting and aggregating from the checkpointed model)",
                r,
            )
            self._audit.append("round_resumed", r, last_signed_round=self._store.last_signed_round)
            own_state = self._study.state()
            own_sha = state_sha256(own_state)
        previous_state = self._study.state()  # the model round r starts from
        joining = self.joining
        if joining:
            own_state, own_sha = self._join_round(r, previous_state)
        elif r > self._store.last_signed_round:
            own_state, own_sha = await self._train_and_share(r, transport)

        self._state.phase = "collecting"
        expected = self.senders_of(r)
        if self._config.gossip.asynchronous:
            collected = self._take_fresh(r, expected)
            # No barrier, so no silence to count: a slower peer is not a dead one.
            self._neighbours.round_finished(r, self._peer_names)
        else:
            live = set(self._neighbours.liveness.live())  # not the neighbours marked down
            collected = await self._inbox.collect(
                r,
                expected,
                self._config.gossip.round_timeout_s,
                self._stop,
                wait_for=[n for n in expected if n in live],
            )
            # A peer that was not to send this round is not silent: only expected senders.
            not_due = set(self._peer_names) - set(expected)
            self._neighbours.round_finished(r, collected.messages.keys() | not_due)
        if joining and collected.messages:
            own_state, own_sha = self._joined(r, collected.messages, own_state)
        self._state.phase = "aggregating"
        new_state, new_sha, distance = await asyncio.to_thread(
            self._aggregator.aggregate, r, own_state, own_sha, collected.messages, previous_state
        )
        self._study.load(new_state)

        self._state.phase = "evaluating"
        metrics = self._study.evaluate()
        self._state.personal = self._study.personal_metrics
        self._audit.append("evaluation", r, metrics=metrics)
        epsilon = self._state.privacy.get("epsilon_spent", 0.0)
        record = RoundRecord(
            round=r,
            auc=metrics.get("auc"),
            epsilon=epsilon,
            metrics=metrics,
            received=sorted(collected.messages),
            missing=collected.missing,
            neighbour_distance=distance,
            seconds=time.monotonic() - started,
        )
        self._state.history.append(asdict(record))
        self._state.last_metrics = metrics
        self._state.model_sha256 = new_sha
        self._metrics.observe_round(r, metrics, epsilon, record.seconds)
        self._receiver.summarise_rejections(r)
        self.checkpoint(r)
        self._audit.sign_head()
        log.info(
            "round %d done in %.2fs: auc=%s eps=%.3f received=%d/%d",
            r,
            record.seconds,
            _fmt(metrics.get("auc")),
            epsilon,
            len(collected.messages),
            len(expected),
        )

    def _join_round(self, r: int, current: State) -> tuple[State, str]:
        """A joining node's first round: nothing trained or shared (its model is not worth
        mixing in yet); it collects and starts from the neighbours' robust aggregate."""
        log.warning(
            "round %d: joining the running network; starting from the neighbours' robust "
            "aggregate this round, contributing from round %d",
            r,
            r + 1,
        )
        return current, state_sha256(current)

    def _joined(self, r: int, messages: dict[str, Any], template: State) -> tuple[State, str]:
        start = _neighbours_median(messages, template)
        sha = state_sha256(start)
        self._audit.append("joined", r, start_sha256=sha, neighbours=sorted(messages))
        self.joining = False
        return start, sha

    def _take_fresh(self, r: int, expected: list[str]) -> CollectedRound[ReceivedUpdate]:
        """Asynchronous step r: whatever arrived since the last step, without waiting; a model
        more than `gossip.max_staleness` of this node's steps old is dropped and counted
        (/status `rejected.stale_model`, /metrics, and a `message_received` audit record)."""
        limit = self._config.gossip.max_staleness
        fresh, stale = self._inbox.take_fresh(r, limit, expected)
        for peer, sent_round in sorted(stale.items()):
            self._receiver.record_rejection(
                "stale_model",
                f"round {sent_round} model from {peer} is {r - sent_round} steps old at step "
                f"{r} (max_staleness {limit}): dropped",
                sender=peer,
                round_=r,
            )
        missing = [n for n in expected if n not in fresh]
        return CollectedRound(round=r, messages=fresh, missing=missing, waited_s=0.0)

    def senders_of(self, r: int) -> list[str]:
        """Whose round-r models this node waits for and aggregates: the round's sampled
        senders, or every peer. Anything else that arrives for round r (an attacker that
        ignores the sampling, say) is left out."""
        return self._sample.sources(r) if self._sample is not None else self._peer_names

    async def _train_and_share(self, r: int, transport: Transport) -> tuple[State, str]:
        """Train round r, durably record that round r is being signed, then share it."""
        self._state.phase = "training"
        reference = self._study.state()
        self.write_privacy_intent()
        if not await asyncio.to_thread(self._study.train_round, reference):
            # Share and keep the model the round started from rather than NaN.
            log.warning(
                "round %d: local training diverged to NaN/inf; keeping the previous model", r
            )
            self._audit.append("training_diverged", r)
        own_state = self._study.state()
        own_sha = state_sha256(own_state)
        self._state.privacy = self._study.privacy_status()

        await self._settle_head()
        self._state.phase = "sharing"
        self._store.write_signed_round(r)
        await self.sharing.share(r, transport, own_state, own_sha, reference)
        return own_state, own_sha

    def write_privacy_intent(self) -> None:
        """Before training, durably record the steps this round may spend (write-ahead)."""
        planned = self._study.steps_after_round()
        if planned is not None:
            self._store.write_privacy_intent(planned)

    async def _settle_head(self) -> None:
        """Let the audit head signed at the end of the last round reach the disk before this
        round's envelope claims it (the syncer has usually done so long before). Bounded: a
        slow disk makes the claim lag a round, it never holds the round up."""
        timeout = self._config.gossip.send_timeout_s
        if not await asyncio.to_thread(self._audit.wait_durable, timeout):
            log.warning("the audit log's last head is not on disk after %.0f s", timeout)


def _fmt(x: float | None) -> str:
    return "undefined" if x is None else f"{x:.3f}"


def _neighbours_median(messages: dict[str, Any], template: State) -> State:
    """The coordinate-wise median of the neighbours' models: the robust start of a node that
    joins a running network (it has no model of its own worth mixing in yet)."""
    d = sum(int(np.prod(np.shape(a))) for a in template.values())
    rows = ModelRows([m.envelope.update.tensors for m in messages.values()], d)
    median = np.empty(d, dtype=np.float32)
    for cols, block in rows.blocks():  # never all the models at once (gossip/blocks.py)
        median[cols] = np.median(block, axis=0)
    return unflatten(median, template)
