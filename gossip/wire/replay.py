"""Replay protection: each signed (sender, round, nonce) is accepted once, within a window of
rounds, with a bound on how many envelopes one sender may have accepted per round."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from murmur.gossip.wire.format import (
    RejectReason,
    WireError,
)


class ReplayGuard:
    """Remembers ``(sender, round, nonce)`` of accepted envelopes so none is accepted twice.

    Memory is bounded: per sender only the newest ``round_window`` rounds are kept, envelopes
    for older rounds are refused as ``stale`` (they can no longer be checked), and at most
    ``max_per_round`` envelopes per sender and round are accepted (``rate_limited``). Only
    authenticated envelopes are recorded, so only admitted peers occupy memory, and a peer
    that jumps ahead in rounds only shuts out its own older messages.
    """

    STATE_VERSION = 1

    def __init__(self, round_window: int = 32, max_per_round: int = 16) -> None:
        if round_window < 1 or max_per_round < 1:
            raise ValueError("round_window and max_per_round must be at least 1")
        self.round_window = round_window
        self.max_per_round = max_per_round
        self._newest: dict[bytes, int] = {}
        self._seen: dict[bytes, dict[int, set[bytes]]] = {}

    def check(self, sender: bytes, round: int, nonce: bytes) -> None:
        """Raise ``WireError`` if this envelope must not be accepted; record nothing.

        Only reads, so an opener may call it from a worker thread while the event loop
        records; ``record`` checks again before it writes."""
        newest = self._newest.get(sender)
        if newest is not None and round <= newest - self.round_window:
            raise WireError(
                RejectReason.STALE,
                f"round {round} is older than the replay window (newest round {newest})",
            )
        nonces = self._seen.get(sender, {}).get(round, ())
        if nonce in nonces:
            raise WireError(
                RejectReason.REPLAY, f"this envelope was already accepted (round {round})"
            )
        if len(nonces) >= self.max_per_round:
            raise WireError(
                RejectReason.RATE_LIMITED,
                f"already {len(nonces)} envelopes from this sender in round {round}",
            )

    def record(self, sender: bytes, round: int, nonce: bytes) -> None:
        """Remember an authenticated envelope (checking it first) and forget old rounds."""
        self.check(sender, round, nonce)
        rounds = self._seen.setdefault(sender, {})
        rounds.setdefault(round, set()).add(nonce)
        if round > self._newest.get(sender, -1):
            self._newest[sender] = round
            oldest_kept = round - self.round_window + 1
            for old in [r for r in rounds if r < oldest_kept]:
                del rounds[old]

    def to_state(self) -> dict[str, Any]:
        """Plain JSON/msgpack-able state for the node's checkpoint."""
        return {
            "version": self.STATE_VERSION,
            "round_window": self.round_window,
            "max_per_round": self.max_per_round,
            "senders": {
                sender.hex(): {
                    "newest_round": self._newest[sender],
                    "rounds": {
                        str(r): sorted(n.hex() for n in nonces) for r, nonces in rounds.items()
                    },
                }
                for sender, rounds in self._seen.items()
            },
        }

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> ReplayGuard:
        """Rebuild from ``to_state()``; ``ValueError`` if the state is not one."""
        try:
            if state["version"] != cls.STATE_VERSION:
                raise ValueError(f"unknown replay state version {state['version']!r}")
            guard = cls(int(state["round_window"]), int(state["max_per_round"]))
            for sender_hex, entry in state["senders"].items():
                sender = bytes.fromhex(sender_hex)
                guard._newest[sender] = int(entry["newest_round"])
                guard._seen[sender] = {
                    int(r): {bytes.fromhex(n) for n in nonces}
                    for r, nonces in entry["rounds"].items()
                }
        except (KeyError, TypeError, AttributeError, ValueError) as exc:
            raise ValueError(f"not a ReplayGuard state: {exc!r}") from None
        return guard
