"""Accounting for refused requests that costs the node the same however many arrive.

Anyone who can reach the peer listener can send it junk, and nothing about junk is worth
more than a count: one log line or one signed audit record per junk request would let a
stranger grow the node's log and audit database without bound. So:

- `RateLimitedLog` writes at most one line per reason per interval, and says on the next
  line how many similar ones it held back;
- `RejectionTally` counts unauthenticated rejections by reason and source address in bounded
  memory, and `summary()` turns them into the fields of ONE audit record per round.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

DEFAULT_LOG_INTERVAL_S = 10.0
# Reasons are codes from a fixed set, so this bound only matters if a caller misuses the log.
_MAX_KEYS = 256
_OVERFLOW_KEY = "(other)"


@dataclass
class _KeyState:
    last: float
    suppressed: int = 0


class RateLimitedLog:
    """At most one log line per key (a reason code) per `interval_s`."""

    def __init__(
        self,
        logger: logging.Logger,
        interval_s: float = DEFAULT_LOG_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.logger = logger
        self.interval_s = interval_s
        self._clock = clock
        self._keys: dict[str, _KeyState] = {}

    def log(self, level: int, key: str, msg: str, *args: Any, **kwargs: Any) -> bool:
        """Log `msg % args` unless a line for `key` went out less than `interval_s` ago;
        returns whether it was written. Keyword arguments go to `Logger.log` (exc_info)."""
        if key not in self._keys and len(self._keys) >= _MAX_KEYS:
            key = _OVERFLOW_KEY
        now = self._clock()
        state = self._keys.get(key)
        if state is not None and now - state.last < self.interval_s:
            state.suppressed += 1
            return False
        if state is not None and state.suppressed:
            msg += " (and %d more like it in the last %.0f s, not logged)"
            args = (*args, state.suppressed, now - state.last)
        self._keys[key] = _KeyState(last=now)
        self.logger.log(level, msg, *args, **kwargs)
        return True

    def warning(self, key: str, msg: str, *args: Any) -> bool:
        return self.log(logging.WARNING, key, msg, *args)


# Source addresses remembered per round; past it, new addresses are counted as "other".
MAX_SOURCES = 1024
TOP_SOURCES = 10
OTHER_SOURCES = "(other)"


@dataclass
class RejectionTally:
    """Unauthenticated rejections since the last summary: reason -> count and
    source address -> count, in memory bounded by the reason codes and MAX_SOURCES."""

    reasons: Counter[str] = field(default_factory=Counter)
    sources: Counter[str] = field(default_factory=Counter)

    def add(self, reason: str, source: str | None) -> None:
        self.reasons[reason] += 1
        key = source or "unknown"
        if key not in self.sources and len(self.sources) >= MAX_SOURCES:
            key = OTHER_SOURCES
        self.sources[key] += 1

    def __bool__(self) -> bool:
        return bool(self.reasons)

    def summary(self) -> dict[str, Any]:
        """The audit record's fields, then a fresh start (the caller writes the record)."""
        fields = {
            "total": sum(self.reasons.values()),
            "reasons": dict(sorted(self.reasons.items())),
            "top_sources": [
                {"source": source, "count": count}
                for source, count in self.sources.most_common(TOP_SOURCES)
            ],
            "distinct_sources": len(self.sources),
        }
        self.reasons.clear()
        self.sources.clear()
        return fields


def printable(text: str, limit: int = 160) -> str:
    """`text` as one short line of printable ASCII: rejection details can quote bytes a
    stranger chose, which must not reach the log as control characters or at length."""
    cut = text[:limit]
    safe = cut.encode("ascii", "backslashreplace").decode("ascii")
    safe = "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in safe)
    return safe + ("..." if len(text) > limit else "")
