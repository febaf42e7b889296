"""Sections of report.html (and lines of the text summary) beyond the core tables of
node/report.py: the survival table, which replaces the classification metrics when the task
is survival analysis.

Kept apart from node/report.py so that each task's way of reading a run lives in one place;
every value comes from the report dict and "undefined" means the value does not exist.
"""

from __future__ import annotations

import html
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


MIN_DEATHS = 10
"""Fewer deaths than this in a test split and its C-index ranks too few pairs to inform."""


def is_survival(report: dict[str, Any]) -> bool:
    return report.get("task") == "survival"


def survival_warnings(hospital: dict[str, Any]) -> list[str]:
    """A survival hospital whose test split holds fewer than `MIN_DEATHS` deaths."""
    events = hospital.get("events")
    if "c_index" not in hospital or not isinstance(events, int) or events >= MIN_DEATHS:
        return []
    return [
        f"only {events} death(s) in its test split (fewer than {MIN_DEATHS}): its C-index "
        "ranks few patient pairs and is not informative; read it with its 95% interval"
    ]


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


# ---------------------------------------------------------------- uncertainty (classification)

RELIABILITY_PLOT = "reliability.png"


def uncertainty_section(
    report: dict[str, Any], hospitals: list[dict[str, Any]], table: TableFn, fmt: FormatFn
) -> str:
    """Each hospital's AUC with its 95% DeLong interval, test class counts and ECE."""
    if is_survival(report) or not any("auc_low" in h or "ece" in h for h in hospitals):
        return ""
    rows = []
    for h in hospitals:
        n, positives = h.get("n_test"), h.get("n_test_positives")
        negatives = n - positives if isinstance(n, int) and isinstance(positives, int) else None
        rows.append(
            (
                h["name"] + (" (Byzantine)" if h.get("byzantine") else ""),
                h.get("auc"),
                _interval(h.get("auc_low"), h.get("auc_high"), fmt),
                positives,
                negatives,
                h.get("ece"),
            )
        )
    headings = ("hospital", "AUC", "95% interval (DeLong)", "test positives", "test negatives")
    return (
        "<h2>Uncertainty and calibration</h2>"
        '<p class="note">The interval is AUC ± 1.96 DeLong standard errors (DeLong et al. '
        "1988), from the hospital's own test patients: with fewer than 10 of a class it is "
        "wide and the AUC is not informative (see the warnings). ECE, the expected "
        "calibration error, is the patient-weighted gap between predicted risk and observed "
        "rate over 10 risk bins; the reliability plot below draws those bins (on the "
        "diagonal = calibrated).</p>" + table((*headings, "ECE"), rows)
    )


def plot_reliability(hospitals: list[dict[str, Any]], path: Any) -> bool:
    """The reliability diagram: observed rate against mean predicted risk, per hospital."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    series = [(h, h.get("reliability")) for h in hospitals if not h.get("byzantine")]
    series = [(h, bins) for h, bins in series if isinstance(bins, list) and bins]
    if not series:
        return False
    figure = Figure(figsize=(5.5, 5.0), dpi=100)
    FigureCanvasAgg(figure)
    ax = figure.add_subplot()
    ax.plot([0, 1], [0, 1], color="gray", linestyle=":", label="calibrated")
    for hospital, bins in series[:12]:
        ece = hospital.get("ece")
        label = hospital["name"] + ("" if ece is None else f" (ECE {ece:.3f})")
        ax.plot(
            [b["predicted"] for b in bins], [b["observed"] for b in bins], marker="o", label=label
        )
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("mean predicted risk (bin)")
    ax.set_ylabel("observed rate")
    ax.set_title("Reliability on each hospital's test split")
    ax.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path, format="png")
    return True


# ---------------------------------------------------------------- baselines: margin, no model

NO_LOCAL_MODEL = "no local model (one class)"


def baseline_cell(entry: dict[str, Any], field: str) -> Any:
    """A baseline's value for the table, or why it has none (a one-class training split)."""
    return NO_LOCAL_MODEL if entry.get("no_model") else entry.get(field)


def margin_text(report: dict[str, Any], fmt: FormatFn) -> str:
    """The federation's margin over local-only, with and without one-class sites, as HTML."""
    margins = report.get("federation_margin")
    if not isinstance(margins, dict):
        return ""
    parts = []
    for key, title in (
        ("without_one_class_sites", "over hospitals with a local model"),
        ("with_one_class_sites", "counting one-class hospitals against a constant (AUC 0.5)"),
    ):
        m = margins.get(key)
        if isinstance(m, dict):
            parts.append(
                f"{title}: {fmt(m.get('mean'))} (95% {fmt(m.get('low'))} to {fmt(m.get('high'))},"
                f" {fmt(m.get('hospitals'))} hospitals)"
            )
    sites = margins.get("one_class_sites") or []
    note = (
        f" {', '.join(sites)} had one class in training and so no local model."
        if sites
        else " Every hospital had a local model."
    )
    return (
        f"<p>Federation margin, mean AUC of murmur minus {fmt(margins.get('against'))}: "
        + html.escape("; ".join(parts))
        + "."
        + html.escape(note)
        + " The interval adds each hospital's DeLong variances as if the two AUCs were "
        "independent; they are measured on the same patients, so it is conservative. One run "
        "is one seed: bench/margin.py repeats it over seeds.</p>"
    )
