"""Peers' clocks as the operator sees them: /status, /metrics, the audit log and the alerts.

Why: request authentication (gossip/auth.py) refuses a request whose timestamp is more than
`gossip.timestamp_window_s` from the receiver's clock, so a node whose clock is wrong has every
envelope refused, everywhere, as `unauthenticated`. Its transport measures each neighbour's
clock from the `Date` of the neighbour's replies (gossip/transport.py, `ClockWatch`); this
module puts those readings where an operator looks:

* /status `peers.<name>.clock_skew_s` (the neighbour's clock minus this node's, seconds, to
  about a second; null until a reply had a `Date`) and `peers.<name>.clock` (`unknown`, `ok`,
  `drifting`: past half the window, `refused`: refusing this node's requests because of it);
* /metrics `murmur_peer_clock_skew_seconds{peer}`;
* one `clock_skew` audit record per change of a neighbour's state (never one per reply), with
  the skew and the window;
* the `clock` alert (node/alerts.py), from the /status fields.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from murmur.gossip.transport import ClockReading

UNKNOWN = "unknown"


class ClockReport:
    """The `on_clock` callback of a node's `PeerTransport`: it writes each reading into the
    node's per-peer /status dicts and its metrics, and audits each change of state."""

    def __init__(
        self,
        peers: dict[str, dict[str, Any]],
        *,
        window_s: float,
        gauge: Any,
        audit: Callable[..., Any],
        current_round: Callable[[], int],
    ) -> None:
        self._peers = peers
        self._window_s = window_s
        self._gauge = gauge
        self._audit = audit
        self._round = current_round
        for info in peers.values():
            info.setdefault("clock_skew_s", None)
            info.setdefault("clock", UNKNOWN)

    def __call__(self, reading: ClockReading) -> None:
        info = self._peers.get(reading.peer)
        if info is None:  # not a neighbour of this node
            return
        info["clock_skew_s"] = round(reading.skew_s, 1)
        info["clock"] = reading.state.value
        self._gauge.labels(peer=reading.peer).set(reading.skew_s)
        if reading.changed:
            self._audit(
                "clock_skew",
                self._round(),
                peer=reading.peer,
                state=reading.state.value,
                skew_s=round(reading.skew_s, 1),
                window_s=self._window_s,
            )
