"""run_cluster's live progress: a table redrawn in place on a terminal, lines elsewhere.

Why: someone who runs a whole network wants to see every hospital at once (its round as a
bar, phase, AUC, ε against the budget, its lowest trust in a neighbour and its alerts),
updating in place rather than scrolling a line per change. A log file, a pipe, CI or a test
must still get plain lines, one per change, so the table is drawn only when the stream is a
terminal; otherwise `Progress` prints the caller's one-line summary (run_cluster's
`progress_line`) exactly as before. The table uses only ANSI cursor movement, which every
terminal emulator murmur runs in understands, so it needs no dependency.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Sequence
from typing import Any, Protocol, TextIO

from murmur.node.alerts import AlertSettings, evaluate
from murmur.node.wording import number

BAR_WIDTH = 20
_UP = "\x1b[{}F"  # cursor to the start of the line n lines up
_CLEAR_LINE = "\x1b[K"
_CLEAR_BELOW = "\x1b[J"
_FINAL_PHASES = ("done", "budget_exhausted", "stopped")


class NodeView(Protocol):
    """What the table reads of run_cluster's NodeProcess."""

    name: str
    byzantine: bool
    exit_code: int | None
    status: dict[str, Any]


def bar(done: int, total: int, width: int = BAR_WIDTH) -> str:
    """[██████░░░░] for `done` of `total`."""
    filled = round(width * done / total) if total > 0 else 0
    filled = max(0, min(width, filled))
    return "[" + "█" * filled + "░" * (width - filled) + "]"


def _state(node: NodeView) -> str:
    if node.exit_code is None:
        return str(node.status.get("phase", "starting"))
    if node.exit_code == 0:  # its last polled phase may be from before it finished
        phase = node.status.get("phase")
        return f"{phase if phase in _FINAL_PHASES else 'exited'} ✓"
    return f"FAILED (exit {node.exit_code})"


def _alerts(status: dict[str, Any], settings: AlertSettings) -> str:
    alerts = evaluate(status, settings).alerts if status else []
    if not alerts:
        return ""
    first = alerts[0].title
    return first if len(alerts) == 1 else f"{first} (+{len(alerts) - 1})"


def progress_table(
    nodes: Sequence[NodeView], rounds: int, settings: AlertSettings, width: int, height: int
) -> list[str]:
    """The table's lines, each at most `width` - 1 columns (a full line would wrap on some
    terminals and break the redraw); at most `height` - 1 lines, folding the rest into one."""
    head = ("hospital", "progress", "round", "phase", "AUC", "ε spent", "min trust", "alerts")
    rows = []
    for n in nodes:
        s = n.status
        done = len(s.get("history") or [])
        privacy = s.get("privacy") or {}
        spent = privacy.get("epsilon_spent")
        budget = privacy.get("epsilon_budget")
        eps = "no DP" if privacy and not privacy.get("enabled") else number(spent, 2)
        if budget:
            eps += f" / {number(budget, 2)}"
        trust = s.get("trust") or {}
        rows.append(
            (
                n.name + (" (attacker)" if n.byzantine else ""),
                bar(done, rounds),
                f"{s.get('round', 0)}/{rounds}",
                _state(n),
                number((s.get("last_metrics") or {}).get("auc")) if done else "-",
                eps if privacy else "-",
                number(min(trust.values()), 2) if trust else "-",
                _alerts(s, settings),
            )
        )
    room = max(1, height - 2)  # the heading, and one line for "... more"
    shown = rows if len(rows) <= room else rows[: room - 1]
    widths = [max(len(r[i]) for r in (head, *shown)) for i in range(len(head))]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
        for r in (head, *shown)
    ]
    if len(shown) < len(rows):
        rest = rows[len(shown) :]
        finished = sum(1 for n in nodes[len(shown) :] if n.exit_code is not None)
        lines.append(f"... and {len(rest)} more hospitals ({finished} finished)")
    return [line[: max(1, width - 1)] for line in lines]


class Progress:
    """Progress on `stream`: the live table on a terminal, `line(nodes)` per change elsewhere."""

    def __init__(
        self,
        stream: TextIO,
        rounds: int,
        settings: AlertSettings,
        line: Callable[[Sequence[Any]], str],
        *,
        live: bool | None = None,
    ) -> None:
        self.stream = stream
        self.rounds = rounds
        self.settings = settings
        self.line = line
        self.live = stream.isatty() if live is None else live
        self._drawn = 0
        self._last: object = None

    def update(self, nodes: Sequence[Any]) -> None:
        """Draw the current state if it changed since the last call."""
        if not self.live:
            text = self.line(nodes)
            if text != self._last:
                print(text, file=self.stream, flush=True)
                self._last = text
            return
        size = shutil.get_terminal_size((100, 24))
        frame = progress_table(nodes, self.rounds, self.settings, size.columns, size.lines)
        if frame == self._last:
            return
        out = _UP.format(self._drawn) if self._drawn else ""
        out += "".join(f"{text}{_CLEAR_LINE}\n" for text in frame) + _CLEAR_BELOW
        self.stream.write(out)
        self.stream.flush()
        self._drawn, self._last = len(frame), frame

    def final(self, nodes: Sequence[Any]) -> None:
        """The last state, always shown (as a line even when unchanged, as before)."""
        if not self.live:
            self._last = None
        self.update(nodes)

    def interrupt(self) -> None:
        """Something else was printed below the table: draw the next frame below it."""
        self._drawn, self._last = 0, None
