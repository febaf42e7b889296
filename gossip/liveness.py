"""Which neighbours are up, which are down, and which can take this node's next envelope.

Two questions, answered from two kinds of evidence:

* **Is it up?** (whom a round waits for.) A neighbour whose update for the round did not
  arrive in time for `down_after` rounds in a row is marked down, so one dead hospital no
  longer makes every round wait the full `round_timeout_s`. It is up again as soon as it
  speaks: an authentic envelope for this node's round or a later one, or for the round just
  before. That last case matters: a neighbour that catches up lands one round behind the
  others, who no longer wait for it, so its envelopes would always come one round late;
  waiting for it once puts it back in step. A neighbour that stays further behind is not
  waited for. A down neighbour still receives this node's envelope every round: that is how
  it catches up and comes back.
* **Can it take our envelope?** (whether a round may be trained at all.) The last probe answer
  or envelope send result (gossip/probe.py): admitted, refused with the peer's reason, or
  unreachable.

A neighbour counts toward `gossip.min_neighbours` only when both hold: it is up and it
admits us. Pure bookkeeping, no I/O; the node feeds it and logs the changes it returns.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

from murmur.gossip.probe import Contact, Reach


@dataclass
class PeerHealth:
    """One neighbour's liveness, as /status shows it."""

    up: bool = True
    since_round: int = 0  # the round this state began in (0: since this process started)
    why: str = "presumed up at start"
    silent_rounds: int = 0  # consecutive finished rounds its update missed
    last_heard_round: int | None = None  # the last round its update arrived in time for
    contact: Contact = field(default_factory=Contact.unknown)


@dataclass(frozen=True)
class LivenessChange:
    """A neighbour went down or came back up (logged and audited once, not every round)."""

    peer: str
    up: bool
    round: int
    why: str


class PeerLiveness:
    """Up/down state and last contact of every neighbour. Not thread-safe (event loop only)."""

    def __init__(self, peers: Sequence[str], *, down_after: int) -> None:
        if down_after < 1:
            raise ValueError(f"down_after must be >= 1 round, got {down_after}")
        self.down_after = down_after
        self.peers: dict[str, PeerHealth] = {name: PeerHealth() for name in peers}

    def spoke(self, peer: str, round_: int) -> LivenessChange | None:
        """`peer` sent an authentic envelope for `round_` (the caller checks it is recent):
        it is up again if it was down. Only `round_finished` counts rounds as heard."""
        health = self.peers[peer]
        if health.up:
            return None
        health.up, health.since_round, health.silent_rounds = True, round_, 0
        health.why = f"it spoke again: an authentic envelope of round {round_}"
        return LivenessChange(peer, True, round_, health.why)

    def round_finished(self, round_: int, heard: Collection[str]) -> list[LivenessChange]:
        """Round `round_` is over and the updates of `heard` arrived in time: count one more
        silent round for every other neighbour, and mark down those silent for `down_after`
        rounds in a row."""
        changes = []
        for name, health in self.peers.items():
            if name in heard:
                health.silent_rounds = 0
                health.last_heard_round = round_
                continue
            health.silent_rounds += 1
            if health.up and health.silent_rounds >= self.down_after:
                last = health.last_heard_round
                health.up, health.since_round = False, round_
                health.why = (
                    f"silent for {health.silent_rounds} rounds in a row (rounds "
                    f"{round_ - health.silent_rounds + 1}..{round_}; "
                    f"{f'last heard in round {last}' if last else 'never heard'})"
                )
                changes.append(LivenessChange(name, False, round_, health.why))
        return changes

    def record_contact(self, peer: str, contact: Contact) -> None:
        """Keep the newest evidence, except that a probe's answer never replaces a send's
        refusal of our envelope's content (see `Contact.only_a_send_clears`)."""
        health = self.peers[peer]
        if contact.source == "probe" and health.contact.only_a_send_clears:
            return
        health.contact = contact

    def live(self) -> list[str]:
        """The neighbours a round waits for: every one not marked down."""
        return [name for name, health in self.peers.items() if health.up]

    def counted(self, exclude: Collection[str] = ()) -> list[str]:
        """The neighbours that count toward min_neighbours: up and admitting us."""
        return [
            name
            for name, health in self.peers.items()
            if health.up and health.contact.reach is Reach.ADMITTED and name not in exclude
        ]

    def not_counted(self, exclude: dict[str, str]) -> dict[str, str]:
        """Why each neighbour that does not count does not (`exclude`: name -> reason)."""
        reasons = {}
        for name, health in self.peers.items():
            if name in exclude:
                reasons[name] = exclude[name]
            elif not health.up:
                reasons[name] = f"down since round {health.since_round}: {health.why}"
            elif health.contact.reach is not Reach.ADMITTED:
                reasons[name] = health.contact.describe()
        return reasons

    def status(self, peer: str) -> dict[str, Any]:
        """The fields /status shows for one neighbour."""
        health = self.peers[peer]
        contact = health.contact
        return {
            "state": "up" if health.up else "down",
            "since_round": health.since_round,
            "why": health.why,
            "silent_rounds": health.silent_rounds,
            "last_heard_round": health.last_heard_round,
            "contact": contact.reach.value,
            "contact_detail": contact.detail,
            "contact_source": contact.source,
            "contact_at": contact.at,
        }
