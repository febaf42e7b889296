"""Who among the neighbours is up and admits us, and holding a round until enough can take it.

Why its own part: a round trained but received by nobody spends privacy budget for nothing,
so before each round the coordinator (node/rounds.py) waits here. A neighbour counts when it
is up (gossip/liveness.py) and its last probe answer or send result says it admits us. While
too few count, the node probes them with backoff, says whom it waits for and why (unreachable,
or the peer's refusal reason), and spends nothing; it looks again at once when a neighbour's
envelope is accepted (`spoke`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Collection

from murmur.crypto.allowlist import Peer
from murmur.crypto.identity import Identity
from murmur.gossip.feasibility import default_min_neighbours
from murmur.gossip.liveness import LivenessChange, PeerLiveness
from murmur.gossip.probe import Contact, Reach, build_probe
from murmur.gossip.transport import PeerTransport
from murmur.gossip.trust import TrustTracker
from murmur.node.audit import AuditLog
from murmur.node.config import NodeConfig
from murmur.node.metrics import NodeMetrics
from murmur.node.state import NodeState

log = logging.getLogger("murmur.node")

# Probes back off from the first delay to the longest, and the wait is logged whenever its
# reasons change and at least every reminder.
PROBE_FIRST_DELAY_S = 0.25
PROBE_MAX_DELAY_S = 5.0
PROBE_TIMEOUT_S = 2.0
WAIT_REMINDER_S = 60.0


class NeighbourWatch:
    """The neighbours' liveness and reachability, and the wait before each round."""

    def __init__(
        self,
        config: NodeConfig,
        *,
        identity: Identity,
        peers: list[Peer],
        trust: TrustTracker,
        audit: AuditLog,
        metrics: NodeMetrics,
        state: NodeState,
        stop: asyncio.Event,
        finished_peers: Callable[[], Collection[str]] = tuple,
    ) -> None:
        self._config = config
        # Asynchronous gossip: the peers that sent their last planned step (node/node.py).
        self._finished_peers = finished_peers
        self._identity = identity
        self._peers = peers
        self._trust = trust
        self._audit = audit
        self._metrics = metrics
        self._state = state
        self._stop = stop
        gossip = config.gossip
        self.min_neighbours = (
            gossip.min_neighbours
            if gossip.min_neighbours is not None
            else default_min_neighbours(config.aggregation.rule, config.aggregation.f)
        )
        self.liveness = PeerLiveness([p.name for p in peers], down_after=gossip.down_after_rounds)
        # Set whenever a neighbour's envelope is accepted, so a node waiting for neighbours
        # looks again at once instead of at its next probe.
        self.news = asyncio.Event()
        self.refresh_status()

    async def wait_for_peers(self, transport: PeerTransport, r: int, *, starting: bool) -> bool:
        """Hold round r until at least `min_neighbours` neighbours can take its update; False
        when the node was stopped first. When this process starts, it also gives every
        neighbour up to `startup_timeout_s` to come up, so that the first round includes
        everyone who is starting at the same time.
        """
        grace_end = time.monotonic() + (self._config.gossip.startup_timeout_s if starting else 0)
        delay, next_probe = PROBE_FIRST_DELAY_S, 0.0
        waiting_since: float | None = None
        said, said_at = "", 0.0
        while not self._stop.is_set():
            self.news.clear()  # before looking, so news after the look wakes us
            excluded = self.excluded_from_count()
            candidates = [p for p in self._peers if p.name not in excluded]
            need = self._needed_now(excluded, candidates)
            counted = self.liveness.counted(excluded)
            everyone = len(counted) == len(candidates)
            in_grace = time.monotonic() < grace_end
            if (len(counted) < need or (in_grace and not everyone)) and (
                time.monotonic() >= next_probe
            ):
                up = set(self.liveness.live())
                await self.probe([p for p in candidates if p.name in up], transport)
                next_probe = time.monotonic() + delay
                delay = min(delay * 2, PROBE_MAX_DELAY_S)
                counted = self.liveness.counted(excluded)
                everyone = len(counted) == len(candidates)
            ready = len(counted) >= need
            if ready and (everyone or time.monotonic() >= grace_end):
                self._ready_to_train(
                    r, counted, excluded, waited_since=waiting_since, starting=starting
                )
                return True
            reasons = self.liveness.not_counted(excluded)
            self._state.phase = "waiting_for_neighbours" if not ready else "waiting_for_peers"
            self.refresh_status(waiting_for=reasons)
            if not ready:
                if waiting_since is None:
                    waiting_since = time.monotonic()
                    self._audit.append(
                        "waiting_for_neighbours",
                        r,
                        min_neighbours=need,
                        counted=counted,
                        reasons=reasons,
                    )
                message = "; ".join(f"{n}: {why}" for n, why in sorted(reasons.items()))
                if message != said or time.monotonic() - said_at >= WAIT_REMINDER_S:
                    self._say_waiting(r, need, counted, message)
                    said, said_at = message, time.monotonic()
            wake = max(0.0, next_probe - time.monotonic())
            if in_grace:
                wake = min(wake, max(0.0, grace_end - time.monotonic()))
            await first_of(self._stop, self.news, timeout_s=max(wake, 0.01))
        return False

    def _say_waiting(self, r: int, need: int, counted: list[str], message: str) -> None:
        log.warning(
            "round %d waits for neighbours: it is shared only when at least %d can "
            "take it (gossip.min_neighbours), and %d can (%s). Waiting for %s. No "
            "privacy budget is spent meanwhile.",
            r,
            need,
            len(counted),
            ", ".join(counted) or "none",
            message,
        )

    def _ready_to_train(
        self,
        r: int,
        counted: list[str],
        excluded: dict[str, str],
        *,
        waited_since: float | None,
        starting: bool,
    ) -> None:
        """Say (once) that round r goes ahead, and with whom if not with everyone."""
        missing = self.liveness.not_counted(excluded)
        self._state.phase = "starting_round"
        self.refresh_status()
        if waited_since is not None:
            waited = time.monotonic() - waited_since
            log.warning(
                "round %d goes ahead after waiting %.1fs for neighbours: %s can take it%s",
                r,
                waited,
                ", ".join(counted) or "none needed",
                f" (still without {', '.join(sorted(missing))})" if missing else "",
            )
            self._audit.append(
                "neighbours_ready", r, waited_s=round(waited, 3), counted=counted, missing=missing
            )
        elif missing and starting:
            log.warning(
                "starting round %d without %s",
                r,
                "; ".join(f"{n} ({why})" for n, why in sorted(missing.items())),
            )

    def needed_neighbours(self, excluded: int) -> int:
        """min_neighbours now. When the config leaves it to the rule, each neighbour left out
        for good uses up one of the f Byzantine neighbours the rule must tolerate (as in
        aggregation), so proven equivocators do not leave the honest ones waiting forever."""
        if self._config.gossip.min_neighbours is not None:
            return self.min_neighbours
        cfg = self._config.aggregation
        return default_min_neighbours(cfg.rule, max(0, cfg.f - excluded))

    def _needed_now(self, excluded: dict[str, str], candidates: list[Peer]) -> int:
        """needed_neighbours, but never more than the peers that still have steps to run.

        Asynchronous gossip: a fast peer that sent its last planned step sends nothing more
        and, with `node.after_training = "exit"`, is gone; a slower node waiting for it to
        take its envelopes would wait forever. So once too few unfinished peers are left,
        the node runs its remaining steps with those (with none: alone, its envelopes sent to
        whoever still listens). A Byzantine peer that claims its last step early only lowers
        this count to the honest unfinished ones, never below."""
        need = self.needed_neighbours(len(excluded))
        finished = set(self._finished_peers())
        if not finished:
            return need
        return min(need, sum(p.name not in finished for p in candidates))

    def excluded_from_count(self) -> dict[str, str]:
        """Neighbours that never count toward min_neighbours, with why: proven equivocators
        (left out of aggregation for good while trust is on)."""
        if not self._trust.settings.enabled:
            return {}
        return {
            name: f"proven equivocator (round {round_}): left out for good"
            for name, round_ in self._trust.proven().items()
        }

    async def probe(self, peers: list[Peer], transport: PeerTransport) -> None:
        """Ask each of `peers` at once whether it takes our envelopes (gossip/probe.py)."""
        if not peers:
            return
        timeout = min(PROBE_TIMEOUT_S, self._config.gossip.send_timeout_s)
        async with asyncio.TaskGroup() as group:
            asks = {
                p.name: group.create_task(
                    transport.probe(p, build_probe(self._identity, p.public_key), timeout)
                )
                for p in peers
            }
        for name, task in asks.items():
            self.record_contact(name, task.result())

    def record_contact(self, peer: str, contact: Contact) -> None:
        """Keep the latest evidence about a neighbour; log when it starts or stops taking our
        envelopes (once per change, not every round). Unknown names are not neighbours."""
        if peer not in self.liveness.peers:
            return
        before = self.liveness.peers[peer].contact.reach
        self.liveness.record_contact(peer, contact)
        if contact.reach is not before and before is not Reach.UNKNOWN:
            if contact.reach is Reach.ADMITTED:
                log.info("neighbour %s takes our envelopes again", peer)
            else:
                log.warning("neighbour %s is %s", peer, contact.describe())
        elif before is Reach.UNKNOWN and contact.reach is Reach.REFUSED:
            log.warning("neighbour %s is %s", peer, contact.describe())
        self._state.peers[peer].update(self.liveness.status(peer))

    def spoke(self, peer: str, round_: int) -> None:
        """`peer` sent a recent authentic envelope: it is up, and a waiting round may go ahead."""
        change = self.liveness.spoke(peer, round_)
        if change is not None:
            self._changed(change)
        self.news.set()

    def round_finished(self, r: int, heard: Collection[str]) -> None:
        """After round r's collection: neighbours silent for too long are marked down."""
        for change in self.liveness.round_finished(r, heard):
            self._changed(change)

    def _changed(self, change: LivenessChange) -> None:
        if change.up:
            log.warning(
                "neighbour %s is UP again at round %d: %s", change.peer, change.round, change.why
            )
        else:
            log.warning(
                "neighbour %s is DOWN at round %d: %s; rounds no longer wait for it, and it "
                "still gets our envelopes so it can come back",
                change.peer,
                change.round,
                change.why,
            )
        self._audit.append(
            "peer_up" if change.up else "peer_down", change.round, peer=change.peer, why=change.why
        )
        self.refresh_status()

    def refresh_status(self, waiting_for: dict[str, str] | None = None) -> None:
        """/status: each neighbour's state, and who counts toward min_neighbours now."""
        for name in self._state.peers:
            self._state.peers[name].update(self.liveness.status(name))
        excluded = self.excluded_from_count()
        self._state.neighbours = {
            "min_neighbours": self.needed_neighbours(len(excluded)),
            "counted": self.liveness.counted(excluded),
            "live": self.liveness.live(),
            "down_after_rounds": self.liveness.down_after,
            "waiting_for": waiting_for or {},
        }
        for name, health in self.liveness.peers.items():
            self._metrics.peer_up.labels(peer=name).set(1 if health.up else 0)
        self._metrics.neighbours_counted.set(len(self._state.neighbours["counted"]))
        self._metrics.waiting_for_neighbours.set(
            1 if self._state.phase == "waiting_for_neighbours" else 0
        )


async def first_of(*events: asyncio.Event, timeout_s: float) -> None:
    """Return when any of `events` is set or `timeout_s` has passed, whichever comes first."""
    waits = [asyncio.ensure_future(e.wait()) for e in events]
    try:
        await asyncio.wait(waits, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waits:
            w.cancel()
