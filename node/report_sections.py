"""Sections of report.html (and lines of the text summary) beyond the core tables of
node/report.py: the survival table, which replaces the classification metrics when the task
is survival analysis.

Kept apart from node/report.py so that each task's way of reading a run lives in one place;
every value comes from the report dict and "undefined" means the value does not exist.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

TableFn = Callable[[Sequence[str], Iterable[Sequence[Any]]], str]
FormatFn = Callable[..., str]

BASELINE_TITLES: tuple[tuple[str, str], ...] = (
    ("local_dp", "local only, DP"),
    ("pooled_dp", "pooled, DP"),
    ("local", "local only, no DP"),
    ("pooled", "pooled, no DP"),
)


def is_survival(report: dict[str, Any]) -> bool:
    return report.get("task") == "survival"


def _interval(low: Any, high: Any, fmt: FormatFn) -> str:
    if low is None or high is None:
        return "undefined"
    return f"{fmt(low)} to {fmt(high)}"


def _baselines(report: dict[str, Any]) -> list[tuple[str, str, dict[str, dict[str, Any]]]]:
    baselines = report.get("baselines") or {}
    return [
        (kind, title, {e.get("name"): e for e in (baselines.get(kind) or {}).get("hospitals", [])})
        for kind, title in BASELINE_TITLES
        if baselines.get(kind)
    ]


def survival_section(
    report: dict[str, Any], hospitals: list[dict[str, Any]], table: TableFn, fmt: FormatFn
) -> str:
    """Harrell's C-index per hospital with its 95% bootstrap interval, deaths and baselines."""
    kinds = _baselines(report)
    rows = []
    for h in hospitals:
        rows.append(
            (
                h["name"] + (" (Byzantine)" if h.get("byzantine") else ""),
                h.get("c_index"),
                _interval(h.get("c_index_low"), h.get("c_index_high"), fmt),
                h.get("n_test"),
                h.get("events"),
                *[entries.get(h["name"], {}).get("c_index") for _, _, entries in kinds],
                h.get("n_train"),
                h.get("rounds_completed"),
            )
        )
    means = [
        (report.get("baselines") or {}).get(kind, {}).get("mean_c_index") for kind, _, _ in kinds
    ]
    rows.append(("mean (honest)", report.get("mean_c_index"), "", "", "", *means, "", ""))
    headings = (
        "hospital",
        "C-index murmur",
        "95% interval (bootstrap)",
        "n test",
        "deaths in test",
        *[f"C-index {title}" for _, title, _ in kinds],
        "n train",
        "rounds",
    )
    return (
        "<h2>Survival: Harrell's C-index per hospital</h2>"
        '<p class="note">On each hospital\'s held-out split: the share of comparable patient '
        "pairs (one died before the other was last seen) whose earlier death had the higher "
        "predicted risk; 0.5 is chance. The interval resamples the test patients (1,000 "
        "bootstrap replicates). A split with few deaths ranks few pairs: its C-index and "
        "interval are then wide or undefined, not a failure of the model.</p>"
        + table(headings, rows)
    )


def survival_summary_lines(report: dict[str, Any], fmt: FormatFn) -> list[str]:
    """Text-summary lines for a survival run: each hospital's C-index, the means."""
    lines = []
    for h in report.get("hospitals") or []:
        lines.append(
            f"{h.get('name')}: C-index {fmt(h.get('c_index'))} "
            f"(95% {_interval(h.get('c_index_low'), h.get('c_index_high'), fmt)}), "
            f"{fmt(h.get('events'))} deaths in {fmt(h.get('n_test'))} test patients"
        )
    lines.append(f"mean C-index (honest nodes): {fmt(report.get('mean_c_index'))}")
    for kind, title in BASELINE_TITLES:
        entry = (report.get("baselines") or {}).get(kind)
        if entry:
            lines.append(f"baseline mean C-index, {title}: {fmt(entry.get('mean_c_index'))}")
    return lines
