"""The per-round inbox: which neighbour models have arrived for which round.

Rounds are synchronous with a deadline. A node waits for its neighbours' models for round r
until all have arrived or the deadline passes, so a dead or slow neighbour costs at most the
deadline and never stalls the network. Messages for past rounds are dropped (counted by the
caller); messages for future rounds are kept, but only for a bounded number of rounds, so a
fast or malicious peer cannot make a node hold unbounded memory.

Asynchronous gossip (`asynchronous=True`, AD-PSGD-like, docs/protocol.md): no round barrier.
Each sender's rounds are its own step count, so the inbox keeps, per sender, the newest
message not yet taken (at most one per sender: bounded memory), and `take_fresh` hands a node
at its step r whatever arrived since its last step, dropping (and returning, to be counted)
those more than `max_staleness` of its own steps old.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Collection
from dataclasses import dataclass
from enum import StrEnum
from typing import Generic, TypeVar

T = TypeVar("T")


class InboxVerdict(StrEnum):
    """What happened to an authenticated message offered to the inbox."""

    ACCEPTED = "accepted"
    OLD_ROUND = "old_round"  # for a round this node has already aggregated
    DUPLICATE = "duplicate"  # a second, different message from the same sender for one round
    TOO_FAR_AHEAD = "too_far_ahead"  # beyond the rounds this node plans or buffers


@dataclass(frozen=True)
class CollectedRound(Generic[T]):
    """The neighbour messages gathered for one round, and who was missing at the deadline."""

    round: int
    messages: dict[str, T]
    missing: list[str]
    waited_s: float


@dataclass(frozen=True)
class CatchUp:
    """A round enough peers have reached to jump to, and the peers that vouch for it."""

    round: int
    vouchers: tuple[str, ...]


def catch_up_quorum(f: int, neighbours: int) -> int:
    """How many distinct peers must have reached a round before a node jumps to it.

    max(f, 1) + 1 means that even with f = 0 one peer alone cannot move a node, and with
    f > 0 at least one of the vouchers is honest; a majority of the neighbours, when that is
    larger, keeps a minority from steering a well-connected node. Bounded by the neighbour
    count so that a node with one or two neighbours can still catch up at all.
    """
    if neighbours < 1:
        return 1
    return min(max(max(f, 1) + 1, neighbours // 2 + 1), neighbours)


class RoundInbox(Generic[T]):
    """Buffers authenticated neighbour messages by round and sender.

    Not thread-safe: every call happens on the node's event loop.
    """

    def __init__(
        self, *, max_round: int, rounds_ahead: int = 3, asynchronous: bool = False
    ) -> None:
        self.current_round = 1
        self.max_round = max_round
        self.rounds_ahead = rounds_ahead
        self.asynchronous = asynchronous
        self._by_round: dict[int, dict[str, T]] = {}
        self._changed = asyncio.Event()
        self.highest_round_seen: dict[str, int] = {}
        # asynchronous: each sender's newest message not yet taken, (round, message)
        self._pending: dict[str, tuple[int, T]] = {}
        self._last_offered: dict[str, int] = {}

    def offer(self, sender: str, round_: int, message: T) -> InboxVerdict:
        """File a message; the caller has already verified signature, recipient and replay.

        Every authenticated round within the plan is noted for catch-up (even one refused as
        too far ahead, so a node that restarted far behind can still learn where the network
        is); a round beyond the plan is not, since no honest peer can be there.
        """
        if round_ <= self.max_round:
            self.highest_round_seen[sender] = max(round_, self.highest_round_seen.get(sender, 0))
        if self.asynchronous:
            return self._offer_async(sender, round_, message)
        if round_ < self.current_round:
            return InboxVerdict.OLD_ROUND
        if round_ > self.max_round or round_ > self.current_round + self.rounds_ahead:
            return InboxVerdict.TOO_FAR_AHEAD
        senders = self._by_round.setdefault(round_, {})
        if sender in senders:
            return InboxVerdict.DUPLICATE
        senders[sender] = message
        self._changed.set()
        return InboxVerdict.ACCEPTED

    def _offer_async(self, sender: str, round_: int, message: T) -> InboxVerdict:
        """Any round of the plan newer than the sender's last one; it replaces an older one
        not yet taken (a node aggregates each peer's newest model only)."""
        if round_ > self.max_round:
            return InboxVerdict.TOO_FAR_AHEAD
        last = self._last_offered.get(sender, 0)
        if round_ == last:
            return InboxVerdict.DUPLICATE
        if round_ < last:
            return InboxVerdict.OLD_ROUND
        self._last_offered[sender] = round_
        self._pending[sender] = (round_, message)
        self._changed.set()
        return InboxVerdict.ACCEPTED

    def take_fresh(
        self, step: int, max_staleness: int, expected: Collection[str]
    ) -> tuple[dict[str, T], dict[str, int]]:
        """Asynchronous: (the messages of ``expected`` senders that arrived since the last
        take and are at most ``max_staleness`` steps behind ``step``, the rounds of those
        dropped as older). Everything taken or dropped is forgotten."""
        fresh: dict[str, T] = {}
        stale: dict[str, int] = {}
        for sender in [s for s in expected if s in self._pending]:
            round_, message = self._pending.pop(sender)
            if step - round_ > max_staleness:
                stale[sender] = round_
            else:
                fresh[sender] = message
        return fresh, stale

    def newest(self, expected: Collection[str]) -> dict[str, T]:
        """Asynchronous: the newest message of each of ``expected`` not yet taken, left in
        place (what a rushing attacker of the adversary mode reads, node/byzantine.py)."""
        return {s: self._pending[s][1] for s in expected if s in self._pending}

    def advance_to(self, round_: int) -> None:
        """Move to a new round and forget everything older."""
        self.current_round = round_
        for old in [r for r in self._by_round if r < round_]:
            del self._by_round[old]
        self._changed.set()

    def catch_up_round(self, quorum: int, exclude: Collection[str] = ()) -> CatchUp | None:
        """The newest round that at least `quorum` distinct peers outside `exclude` have
        reached, if ahead of us, with the peers that vouch for it.

        A node that restarted or fell behind jumps to it. The caller excludes the peers it
        distrusts (quarantined, proven equivocators) and picks the quorum with
        `catch_up_quorum`, so that neither a single peer nor f Byzantine ones can make a node
        skip its training by claiming a far-future round.
        """
        if quorum < 1:
            raise ValueError(f"a catch-up quorum must be >= 1, got {quorum}")
        claims = sorted(
            ((r, s) for s, r in self.highest_round_seen.items() if s not in exclude),
            reverse=True,
        )
        if len(claims) < quorum:
            return None
        target = min(claims[quorum - 1][0], self.max_round)
        if target <= self.current_round:
            return None
        return CatchUp(target, tuple(sorted(s for r, s in claims if r >= target)))

    async def collect(
        self,
        round_: int,
        expected: Collection[str],
        deadline_s: float,
        stop: asyncio.Event,
        *,
        wait_for: Collection[str] | None = None,
    ) -> CollectedRound[T]:
        """Wait until the message for `round_` of every sender in `wait_for` (default: all of
        `expected`) is here, the deadline passes or `stop` is set, whichever comes first.

        A sender already seen in a later round is not waited for: an honest node sends round r
        before it trains round r + 1, so its round-r message is lost or was refused (sent
        while this node was further behind), and will not come. The messages returned are
        those of every expected sender that arrived, waited for or not: a neighbour marked
        down is not waited for, but its update counts when it comes.
        """
        waited = expected if wait_for is None else wait_for
        start = time.monotonic()
        end = start + deadline_s
        while True:
            have = self._by_round.get(round_, {})
            done = all(s in have or self.highest_round_seen.get(s, 0) > round_ for s in waited)
            if done or stop.is_set():
                break
            remaining = end - time.monotonic()
            if remaining <= 0:
                break
            self._changed.clear()
            changed = asyncio.ensure_future(self._changed.wait())
            stopped = asyncio.ensure_future(stop.wait())
            try:
                await asyncio.wait(
                    {changed, stopped}, timeout=remaining, return_when=asyncio.FIRST_COMPLETED
                )
            finally:
                changed.cancel()
                stopped.cancel()
        have = dict(self._by_round.get(round_, {}))
        return CollectedRound(
            round=round_,
            messages={s: have[s] for s in expected if s in have},
            missing=[s for s in expected if s not in have],
            waited_s=time.monotonic() - start,
        )
