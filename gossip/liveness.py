"""Which neighbours are up, which are down, and which can take this node's next envelope.

Two questions, answered from two kinds of evidence:

* **Is it up?** (whom a round waits for.) A neighbour that sent nothing the node accepted for
  `down_after` rounds in a row is marked down, so one dead hospital no longer makes every
  round wait the full `round_timeout_s`. It is up again as soon as an envelope of its is
  accepted. A down neighbour still receives this node's envelope every round: that is how it
  catches up and comes back.
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

from gossip.probe import Contact, Reach


@dataclass
class PeerHealth:
    """One neighbour's liveness, as /status shows it."""

    up: bool = True
    since_round: int = 0  # the round this state began in (0: since this process started)
    why: str = "presumed up at start"
    silent_rounds: int = 0  # consecutive finished rounds without an accepted envelope of its
    last_heard_round: int | None = None
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

    def heard(self, peer: str, round_: int) -> LivenessChange | None:
        """An envelope of `peer` for `round_` was accepted: it is up (again, if it was down)."""
        health = self.peers[peer]
        health.silent_rounds = 0
        health.last_heard_round = max(round_, health.last_heard_round or 0)
        if health.up:
            return None
        health.up, health.since_round = True, round_
        health.why = f"an envelope of round {round_} was accepted"
        return LivenessChange(peer, True, round_, health.why)

    def round_finished(self, round_: int, heard: Collection[str]) -> list[LivenessChange]:
        """Count one more silent round for every neighbour not in `heard`; mark down those
        silent for `down_after` rounds in a row."""
        changes = []
        for name, health in self.peers.items():
            if name in heard:
                health.silent_rounds = 0
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
        self.peers[peer].contact = contact

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
