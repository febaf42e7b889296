"""Turn a finished run's report.json dict into report.html, PNG plots and a plain-text table.

The report is what a clinician or a reviewer reads after a run, often on a hospital machine
with no internet, so the HTML is one self-contained file next to its PNGs: no external CSS,
scripts or fonts. Every value comes from the report dict (docs/report.md); a value that is
undefined there (null) is printed as "undefined", never as 0, because a missing AUC that
reads as 0 or 0.5 is a wrong clinical claim. Every string is HTML-escaped, since node names
and paths come from operators' config files.

Plots are drawn with matplotlib's object API (Figure + Agg canvas) rather than pyplot, so
writing a report touches no global plotting state and works in any thread or process.
"""

from __future__ import annotations

import html
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from murmur.node.report_extras import PERSONAL_HEADINGS, personal_rows
from murmur.node.report_sections import (
    RELIABILITY_PLOT,
    baseline_cell,
    is_survival,
    margin_text,
    plot_reliability,
    survival_section,
    survival_summary_lines,
    survival_warnings,
    uncertainty_section,
)

UNDEFINED = "undefined"

AUC_PLOT = "auc.png"
EPSILON_PLOT = "epsilon.png"
DISAGREEMENT_PLOT = "disagreement.png"
TRUST_PLOT = "trust.png"

_LEGEND_MAX = 12  # lines a plot's legend names; more and it hides the plot
_TRUST_PANELS = 8  # hospitals that get a trust panel each; more get one summary panel

# Clinical metric columns of the per-hospital table: (report field, column heading).
_METRIC_COLUMNS: tuple[tuple[str, str], ...] = (
    ("auc", "AUC"),
    ("sensitivity", "sensitivity"),
    ("specificity", "specificity"),
    ("ppv", "PPV"),
    ("npv", "NPV"),
    ("brier", "Brier"),
    ("accuracy", "accuracy"),
    ("majority_accuracy", "majority accuracy"),
    ("threshold", "threshold"),
    ("n_train", "n train"),
    ("n_test", "n test"),
)


# A test split with fewer patients than this, or fewer than _MIN_TEST_CLASS of either class,
# ranks too few pairs for its AUC, sensitivity or specificity to mean much: one patient more
# or less moves them by tenths. The report says so instead of letting the figure stand alone.
_MIN_TEST_PATIENTS = 30
FINISHED_PHASES = ("done", "budget_exhausted")
"""A node's last phase when it stopped by itself: every round trained, or no budget left."""
_MIN_TEST_CLASS = 5
MIN_CASES_PER_CLASS = 10
"""Fewer test cases of a class than this and the AUC is not informative (issue #24)."""


def hospital_warnings(hospital: dict[str, Any], planned_rounds: int | None) -> list[str]:
    """What a reader must know before trusting one hospital's figures, as plain sentences.

    - a model that does not beat always predicting the training majority class (its accuracy
      is at or below `majority_accuracy`) has learned nothing a clinic could use;
    - a test split too small to rank;
    - a node that stopped before its planned rounds (other than by spending its budget).
    """
    warnings = []
    accuracy, majority = hospital.get("accuracy"), hospital.get("majority_accuracy")
    if _finite(accuracy) and _finite(majority) and accuracy <= majority:
        warnings.append(
            f"accuracy {accuracy:.3f} does not beat always predicting the majority class "
            f"({majority:.3f})"
        )
    n_test, positives = hospital.get("n_test"), hospital.get("n_test_positives")
    if isinstance(n_test, int) and isinstance(positives, int):
        smaller = min(positives, n_test - positives)
        if n_test < _MIN_TEST_PATIENTS or smaller < _MIN_TEST_CLASS:
            warnings.append(
                f"test split too small to rank: {n_test} patients, {positives} positive and "
                f"{n_test - positives} negative; its AUC, sensitivity and specificity can move "
                "by tenths with one patient"
            )
        elif smaller < MIN_CASES_PER_CLASS:
            which = "positive" if positives <= n_test - positives else "negative"
            warnings.append(
                f"only {smaller} {which} patients in the test split (fewer than "
                f"{MIN_CASES_PER_CLASS}): its AUC is not informative; read it with its 95% "
                "interval"
            )
    warnings += survival_warnings(hospital)
    completed, phase = hospital.get("rounds_completed"), hospital.get("phase")
    if isinstance(planned_rounds, int) and isinstance(completed, int):
        if phase is not None and phase not in FINISHED_PHASES:
            warnings.append(f"stopped after {completed} of {planned_rounds} planned rounds")
        elif phase == "done" and completed < planned_rounds:
            warnings.append(
                f"took part in {completed} of {planned_rounds} rounds: after a restart or a "
                "catch-up it skipped the others"
            )
    return warnings


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


# ---------------------------------------------------------------- formatting


def format_value(value: Any, digits: int = 3) -> str:
    """A report value as text: null and NaN are "undefined", floats get `digits` decimals."""
    if value is None:
        return UNDEFINED
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return UNDEFINED
        if value != 0 and abs(value) < 10.0**-digits:
            return f"{value:.2g}"  # e.g. δ = 1e-05, which fixed decimals would print as 0.000
        return f"{value:.{digits}f}"
    return str(value)


def _number(value: Any) -> float:
    """A report value as a plottable float: undefined values become NaN (a gap in the line)."""
    if value is None or isinstance(value, bool):
        return math.nan
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _has_finite(values: Iterable[float]) -> bool:
    return any(math.isfinite(v) for v in values)


# ---------------------------------------------------------------- input checks


def _check_report(report: Any) -> list[dict[str, Any]]:
    """Fail early, naming the problem, rather than draw a half-empty report."""
    if not isinstance(report, dict):
        raise ValueError(
            f"report must be a dict shaped like report.json (docs/report.md), "
            f"got {type(report).__name__}; fix: pass the parsed report.json"
        )
    hospitals = report.get("hospitals")
    if not isinstance(hospitals, list):
        raise ValueError(
            "report['hospitals'] is missing or not a list; fix: give one object per node "
            "as docs/report.md describes"
        )
    for i, hospital in enumerate(hospitals):
        if not isinstance(hospital, dict) or not isinstance(hospital.get("name"), str):
            raise ValueError(
                f"report['hospitals'][{i}] must be an object with a string 'name'; "
                "fix: see the per-hospital fields in docs/report.md"
            )
        history = hospital.get("history", [])
        if not isinstance(history, list) or not all(isinstance(h, dict) for h in history):
            raise ValueError(
                f"report['hospitals'][{i}] ({hospital['name']}): 'history' must be a list of "
                "per-round objects; fix: see docs/report.md"
            )
    return hospitals


def _baseline_mean(report: dict[str, Any], kind: str) -> float | None:
    baselines = report.get("baselines") or {}
    entry = baselines.get(kind) or {}
    value = entry.get("mean_c_index" if is_survival(report) else "mean_auc")
    return None if value is None else float(value)


def _rounds_and(history: Sequence[dict[str, Any]], field: str) -> tuple[list[int], list[float]]:
    rounds = [int(h["round"]) for h in history if "round" in h]
    values = [_number(h.get(field)) for h in history if "round" in h]
    return rounds, values


# ---------------------------------------------------------------- plots


def _new_figure(width: float = 7.0, height: float = 4.0) -> Figure:
    figure = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(figure)
    return figure


def _legend(ax: Any) -> None:
    """A legend when it fits: beyond `_LEGEND_MAX` lines it would cover the plot, and the
    tables of the report name every hospital anyway."""
    if len(ax.get_legend_handles_labels()[1]) <= _LEGEND_MAX:
        ax.legend(fontsize="small")


def _save(figure: Figure, path: Path) -> None:
    for ax in figure.axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # rounds are whole numbers
    figure.tight_layout()
    figure.savefig(path, format="png")


def _plot_hospital_lines(ax: Any, series: list[tuple[dict[str, Any], list, list]]) -> None:
    """One line per hospital: honest solid, Byzantine dashed and labelled as such."""
    for hospital, rounds, values in series:
        byzantine = bool(hospital.get("byzantine"))
        label = hospital["name"] + (" (Byzantine)" if byzantine else "")
        ax.plot(rounds, values, linestyle="--" if byzantine else "-", marker=".", label=label)


def _plot_auc(report: dict[str, Any], hospitals: list[dict[str, Any]], path: Path) -> bool:
    """AUC (survival: C-index) per round per hospital, honest solid and Byzantine dashed,
    with baseline lines."""
    field, name = ("c_index", "C-index") if is_survival(report) else ("auc", "AUC")
    series = [(h, *_rounds_and(h.get("history", []), field)) for h in hospitals]
    if not any(_has_finite(values) for _, _, values in series):
        return False
    figure = _new_figure()
    ax = figure.add_subplot()
    _plot_hospital_lines(ax, series)
    colours = {"local": "tab:gray", "pooled": "black", "local_dp": "tab:orange"}
    colours["reference"] = "tab:green"
    colours["pooled_dp"] = "tab:brown"
    for kind, title in _BASELINE_KINDS:
        mean = _baseline_mean(report, kind)
        if mean is not None:
            ax.axhline(mean, color=colours[kind], linestyle=":", label=f"{title}: mean {name}")
    ax.set_xlabel("round")
    ax.set_ylabel(f"test {name}")
    ax.set_title(f"Held-out {name} per round")
    _legend(ax)
    _save(figure, path)
    return True


def _plot_epsilon(report: dict[str, Any], hospitals: list[dict[str, Any]], path: Path) -> bool:
    """Cumulative ε per round; nothing when DP was off (ε is then unbounded, not 0)."""
    if not (report.get("dp") or {}).get("enabled"):
        return False
    series = [(h, *_rounds_and(h.get("history", []), "epsilon")) for h in hospitals]
    if not any(_has_finite(values) for _, _, values in series):
        return False
    figure = _new_figure()
    ax = figure.add_subplot()
    _plot_hospital_lines(ax, series)
    ax.set_xlabel("round")
    ax.set_ylabel("ε spent (cumulative)")
    ax.set_title("Privacy spent per round")
    _legend(ax)
    _save(figure, path)
    return True


def mean_disagreement(hospitals: Sequence[dict[str, Any]]) -> dict[int, float]:
    """Per round, the mean `neighbour_distance` over honest nodes that reported one.

    Byzantine nodes are left out: their distances measure the attack, not whether the honest
    hospitals are converging to one model.
    """
    by_round: dict[int, list[float]] = {}
    for hospital in hospitals:
        if hospital.get("byzantine"):
            continue
        rounds, values = _rounds_and(hospital.get("history", []), "neighbour_distance")
        for r, v in zip(rounds, values, strict=True):
            if math.isfinite(v):
                by_round.setdefault(r, []).append(v)
    return {r: sum(vs) / len(vs) for r, vs in sorted(by_round.items())}


def _plot_disagreement(hospitals: list[dict[str, Any]], path: Path) -> bool:
    means = mean_disagreement(hospitals)
    if not means:
        return False
    figure = _new_figure()
    ax = figure.add_subplot()
    ax.plot(list(means), list(means.values()), marker=".", color="tab:purple")
    ax.set_xlabel("round")
    ax.set_ylabel("mean distance to neighbours")
    ax.set_title("Disagreement between honest hospitals")
    _save(figure, path)
    return True


def _plot_trust(hospitals: list[dict[str, Any]], path: Path) -> bool:
    """Trust per peer: one panel per hospital in a small network, one summary panel in a big one.

    Up to `_TRUST_PANELS` hospitals, each gets a panel with its trust in each of its peers.
    Beyond that, per-holder panels stop being readable (32 panels of 31 lines) and their
    bitmap alone took 68 MB in run_cluster at 32 hospitals, so one panel shows, per peer, the
    mean trust its honest neighbours hold in it (Byzantine holders' scores are part of the
    attack, as in `mean_disagreement`). The HTML trust table still names, per hospital, whom
    it quarantined and the peer it trusts least, and report.json keeps every score.
    """
    with_trust = [h for h in hospitals if isinstance(h.get("trust"), dict) and h["trust"]]
    if not with_trust:
        return False
    if len(with_trust) > _TRUST_PANELS:
        return _plot_mean_trust(hospitals, path)
    figure = _new_figure(7.0, 2.6 * len(with_trust))
    for i, hospital in enumerate(with_trust, start=1):
        ax = figure.add_subplot(len(with_trust), 1, i)
        for peer, scores in sorted(hospital["trust"].items()):
            values = [_number(s) for s in scores]
            ax.plot(range(1, len(values) + 1), values, marker=".", label=str(peer))
        ax.set_title(f"Trust held by {hospital['name']}")
        ax.set_xlabel("round")
        ax.set_ylabel("trust")
        _legend(ax)
    _save(figure, path)
    return True


def mean_trust_held(hospitals: Sequence[dict[str, Any]]) -> dict[str, list[float]]:
    """Per peer, per round, the mean trust that honest hospitals hold in it (NaN if none).

    Rounds are aligned from the first; a holder that recorded fewer rounds counts only in
    the rounds it has. Non-finite scores are left out of the mean.
    """
    sums: dict[str, list[float]] = {}
    counts: dict[str, list[int]] = {}
    for hospital in hospitals:
        trust = hospital.get("trust")
        if hospital.get("byzantine") or not isinstance(trust, dict):
            continue
        for peer, scores in trust.items():
            for r, score in enumerate(_number(s) for s in scores):
                if not math.isfinite(score):
                    continue
                peer_sums = sums.setdefault(str(peer), [])
                peer_counts = counts.setdefault(str(peer), [])
                while len(peer_sums) <= r:
                    peer_sums.append(0.0)
                    peer_counts.append(0)
                peer_sums[r] += score
                peer_counts[r] += 1
    return {
        peer: [
            total / n if n else math.nan for total, n in zip(sums[peer], counts[peer], strict=True)
        ]
        for peer in sorted(sums)
    }


def _plot_mean_trust(hospitals: list[dict[str, Any]], path: Path) -> bool:
    means = mean_trust_held(hospitals)
    if not any(_has_finite(values) for values in means.values()):
        return False
    byzantine = {h["name"] for h in hospitals if h.get("byzantine")}
    figure = _new_figure()
    ax = figure.add_subplot()
    _plot_hospital_lines(
        ax,
        [
            (
                {"name": peer, "byzantine": peer in byzantine},
                list(range(1, len(values) + 1)),
                values,
            )
            for peer, values in means.items()
        ],
    )
    ax.set_title("Trust held in each hospital (mean over its honest neighbours)")
    ax.set_xlabel("round")
    ax.set_ylabel("trust")
    _legend(ax)
    _save(figure, path)
    return True


# ---------------------------------------------------------------- HTML


def _table(headings: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headings)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(format_value(c))}</td>" for c in row) + "</tr>"
        for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _role(hospital: dict[str, Any]) -> str:
    return "Byzantine" if hospital.get("byzantine") else "honest"


def _dp_text(report: dict[str, Any]) -> str:
    dp = report.get("dp") or {}
    if not dp.get("enabled"):
        return "disabled (no privacy guarantee)"
    return (
        f"ε = {format_value(dp.get('epsilon'))}, δ = {format_value(dp.get('delta'))}, "
        f"clip C = {format_value(dp.get('max_grad_norm'))}, "
        f"accountant {format_value(dp.get('accountant'))}"
    )


def _summary_rows(report: dict[str, Any], hospitals: list[dict[str, Any]]) -> list[tuple[str, Any]]:
    byzantine = sum(1 for h in hospitals if h.get("byzantine"))
    aggregator = report.get("aggregator") or {}
    attack = report.get("attack")
    attack_text = (
        f"{format_value(attack.get('name'))} "
        f"({format_value(attack.get('byzantine'))} Byzantine nodes)"
        if isinstance(attack, dict)
        else "none"
    )
    rows: list[tuple[str, Any]] = [
        ("dataset", report.get("dataset")),
        ("data path", report.get("data_path")),
        ("model", report.get("model")),
        ("nodes", f"{report.get('nodes', len(hospitals))} ({byzantine} Byzantine)"),
        ("topology", report.get("topology")),
        ("spectral gap", report.get("spectral_gap")),
        (
            "aggregation",
            f"{format_value(aggregator.get('rule'))} (f = {format_value(aggregator.get('f'))})",
        ),
        ("attack", attack_text),
        ("differential privacy", _dp_text(report)),
        (
            "rounds × local epochs",
            f"{format_value(report.get('rounds'))} × {format_value(report.get('local_epochs'))}",
        ),
        ("rounds completed", report.get("rounds_completed")),
        ("run", _run_state_text(report)),
        ("seed", report.get("seed")),
        ("seconds", report.get("seconds")),
        ("bytes sent", report.get("bytes_sent")),
        ("mean AUC (honest nodes)", report.get("mean_auc")),
        ("mean AUC on all hospitals' test rows", (report.get("whole_test") or {}).get("mean_auc")),
    ]
    name = "C-index" if is_survival(report) else "AUC"
    rows.append((f"mean {name} (honest nodes)", report.get(_mean_field(report))))
    for kind, title in _BASELINE_KINDS:
        if (report.get("baselines") or {}).get(kind):
            rows.append((f"baseline mean {name}, {title}", _baseline_mean(report, kind)))
    failed = report.get("failed") or []
    rows.append(("failed nodes", ", ".join(failed) if failed else "none"))
    return rows


def _mean_field(report: dict[str, Any]) -> str:
    return "mean_c_index" if is_survival(report) else "mean_auc"


def _run_state_text(report: dict[str, Any]) -> str:
    interrupted = report.get("interrupted")
    if interrupted:
        return f"INTERRUPTED ({interrupted}); exit code {format_value(report.get('exit_code'))}"
    return f"complete; exit code {format_value(report.get('exit_code'))}"


def report_warnings(report: dict[str, Any]) -> list[str]:
    """Every warning of the run, run-level first, then per hospital (prefixed by its name)."""
    warnings = list(report.get("warnings") or [])
    for hospital in report.get("hospitals") or []:
        warnings += [f"{hospital.get('name')}: {w}" for w in hospital.get("warnings") or []]
    return warnings


def _warnings_section(report: dict[str, Any]) -> str:
    warnings = report_warnings(report)
    if not warnings:
        return ""
    items = "".join(f"<li>{html.escape(w)}</li>" for w in warnings)
    return f'<h2>Warnings</h2><ul class="warning">{items}</ul>'


# Baseline kinds in the order the report shows them, with their column names.
_BASELINE_KINDS: tuple[tuple[str, str], ...] = (
    ("local_dp", "local only, DP"),
    ("pooled_dp", "pooled, DP"),
    ("local", "local only, no DP"),
    ("pooled", "pooled, no DP"),
    ("reference", "tuned L2 logistic regression, pooled, no DP"),
)


def _personal_section(hospitals: list[dict[str, Any]]) -> str:
    rows = personal_rows(hospitals)
    if not rows:
        return ""
    return (
        '<h2>Personalized models</h2>\n<p class="note">Each hospital\'s Ditto model, trained on '
        "its own rows pulled towards the shared model; it never left the hospital. Same "
        "test split and threshold rule as the shared model.</p>\n" + _table(PERSONAL_HEADINGS, rows)
    )


def _baseline_section(report: dict[str, Any], hospitals: list[dict[str, Any]]) -> str:
    baselines = report.get("baselines")
    if not baselines or is_survival(report):  # survival: in the C-index table
        return ""
    kinds = [(kind, title) for kind, title in _BASELINE_KINDS if baselines.get(kind)]
    by_kind = {
        kind: {e.get("name"): e for e in (baselines.get(kind) or {}).get("hospitals", [])}
        for kind, _ in kinds
    }
    rows = []
    for hospital in hospitals:
        if hospital.get("byzantine"):
            continue
        name = hospital["name"]
        rows.append(
            (
                name,
                hospital.get("auc"),
                *[baseline_cell(by_kind[kind].get(name, {}), "auc") for kind, _ in kinds],
                hospital.get("accuracy"),
                *[baseline_cell(by_kind[kind].get(name, {}), "accuracy") for kind, _ in kinds],
            )
        )
    rows.append(
        (
            "mean",
            report.get("mean_auc"),
            *[_baseline_mean(report, kind) for kind, _ in kinds],
            *[None] * (1 + len(kinds)),
        )
    )
    table = _table(
        (
            "hospital",
            "AUC murmur",
            *[f"AUC {title}" for _, title in kinds],
            "accuracy murmur",
            *[f"accuracy {title}" for _, title in kinds],
        ),
        rows,
    )
    dp_note = (
        " The DP baselines spend the same ε as each node (the pooled one over all pooled "
        "rows): read murmur against them to see whether federating helped at this privacy "
        "level."
        if any(kind.endswith("_dp") for kind, _ in kinds)
        else ""
    )
    return (
        "<h2>Baselines</h2><p>Local only: each hospital trains alone. Pooled: one model "
        "trained on all hospitals' training rows together. Same splits and model, "
        f"{html.escape(format_value(baselines.get('rounds')))} rounds (as many as the network "
        f"trained), evaluated on each hospital's own test split. The tuned reference is "
        "scikit-learn's L2 logistic regression on the pooled training rows, its C chosen by "
        f"5-fold cross-validation on those rows (C = "
        f"{html.escape(format_value((baselines.get('reference') or {}).get('C')))}).{dp_note}"
        "</p>" + table + margin_text(report, format_value)
    )


def _adversary_banner(report: dict[str, Any]) -> str:
    """Loud, at the top: a run with attackers is a test or a demo, never a real consortium."""
    text = adversary_text(report)
    return f'<p class="adversary">{html.escape(text)}</p>' if text else ""


def adversary_text(report: dict[str, Any]) -> str:
    attack = report.get("attack")
    if not isinstance(attack, dict):
        return ""
    params = attack.get("params") or {}
    shown = ", ".join(f"{k}={format_value(v)}" for k, v in params.items())
    return (
        f"ADVERSARY MODE (tests and demos only): {format_value(attack.get('byzantine'))} "
        f"Byzantine node(s) attacked with {format_value(attack.get('name'))}"
        f"{f' ({shown})' if shown else ''}. Their metrics are left out of the honest mean."
    )


def _trust_section(hospitals: list[dict[str, Any]]) -> str:
    """Per node: whom it quarantined, and its least trusted peer at the end."""
    rows = []
    for h in hospitals:
        trust = h.get("trust")
        if not isinstance(trust, dict) or not trust:
            continue
        final = {p: s[-1] for p, s in trust.items() if isinstance(s, list) and s}
        lowest = min(final, key=final.get) if final else None
        quarantined = h.get("quarantined") or []
        proven = h.get("proven_equivocation") or {}
        rows.append(
            (
                h["name"],
                _role(h),
                ", ".join(quarantined) if quarantined else "none",
                ", ".join(f"{p} (round {r})" for p, r in sorted(proven.items())) or "none",
                lowest,
                final.get(lowest) if lowest else None,
            )
        )
    if not rows:
        return ""
    return (
        '<h2>Trust and quarantine</h2><p class="note">Each node scores its peers by how far '
        "their updates sit from its robust aggregate (docs/robustness.md); a persistently "
        "deviant peer is down-weighted, then quarantined, with the evidence in the node's log "
        "and audit log. A peer proven to have signed two different models for one round "
        "(equivocation) is quarantined at once, with both signed receipts in the audit log.</p>"
        + _table(
            (
                "hospital",
                "role",
                "quarantined",
                "proven equivocation",
                "least trusted peer",
                "its trust",
            ),
            rows,
        )
    )


def _rejected_section(hospitals: list[dict[str, Any]]) -> str:
    reasons = sorted({str(r) for h in hospitals for r in (h.get("rejected") or {})})
    if not reasons:
        return "<h2>Rejected messages</h2><p>No messages were rejected.</p>"
    rows = [
        (h["name"], *[int((h.get("rejected") or {}).get(r, 0)) for r in reasons]) for h in hospitals
    ]
    return "<h2>Rejected messages</h2>" + _table(("hospital", *reasons), rows)


_STYLE = """
body { font-family: sans-serif; margin: 2em; color: #222; max-width: 75em; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em 0; }
th, td { border: 1px solid #bbb; padding: 0.25em 0.6em; text-align: right; }
th { background: #eee; }
td:first-child, th:first-child { text-align: left; }
img { max-width: 100%; border: 1px solid #ddd; margin: 0.5em 0; }
.note { color: #555; }
.adversary { background: #b00020; color: white; padding: 0.6em; font-weight: bold; }
.warning { background: #fff4e0; border-left: 4px solid #e08a00; padding: 0.5em 2em; }
"""


def write_html_report(report: dict[str, Any], run_dir: Path) -> Path:
    """Write report.html and its PNG plots into `run_dir`; return the path of report.html."""
    hospitals = _check_report(report)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)

    plots = [
        (AUC_PLOT, "AUC per round", _plot_auc(report, hospitals, run_dir / AUC_PLOT)),
        (EPSILON_PLOT, "ε per round", _plot_epsilon(report, hospitals, run_dir / EPSILON_PLOT)),
        (
            DISAGREEMENT_PLOT,
            "disagreement per round",
            _plot_disagreement(hospitals, run_dir / DISAGREEMENT_PLOT),
        ),
        (TRUST_PLOT, "trust per peer", _plot_trust(hospitals, run_dir / TRUST_PLOT)),
        (
            RELIABILITY_PLOT,
            "reliability (calibration)",
            plot_reliability(hospitals, run_dir / RELIABILITY_PLOT),
        ),
    ]

    summary = _table(("item", "value"), _summary_rows(report, hospitals))
    metrics = _table(
        ("hospital", "role", *[h for _, h in _METRIC_COLUMNS], "rounds", "exit code"),
        (
            (
                h["name"],
                _role(h),
                *[h.get(field) for field, _ in _METRIC_COLUMNS],
                h.get("rounds_completed"),
                h.get("exit_code"),
            )
            for h in hospitals
        ),
    )
    privacy = _table(
        ("hospital", "ε spent", "δ", "noise multiplier σ", "sample rate q", "DP steps"),
        (
            (
                h["name"],
                h.get("epsilon"),
                h.get("delta"),
                h.get("noise_multiplier"),
                format_value(h.get("sample_rate"), 5),
                h.get("dp_steps"),
            )
            for h in hospitals
        ),
    )
    figures = []
    for filename, title, written in plots:
        if not written:
            (run_dir / filename).unlink(missing_ok=True)  # never leave a stale plot behind
        if written:
            figures.append(
                f'<h3>{html.escape(title)}</h3><img src="{html.escape(filename)}" '
                f'alt="{html.escape(title)}">'
            )
        elif filename == EPSILON_PLOT and not (report.get("dp") or {}).get("enabled"):
            figures.append(
                f'<h3>{html.escape(title)}</h3><p class="note">Differential privacy was off: '
                "there is no privacy guarantee to plot.</p>"
            )
        elif filename not in (TRUST_PLOT, RELIABILITY_PLOT):
            figures.append(
                f'<h3>{html.escape(title)}</h3><p class="note">No values were recorded.</p>'
            )

    if is_survival(report):
        clinical = survival_section(report, hospitals, _table, format_value)
    else:
        clinical = f"""<h2>Clinical metrics per hospital</h2>
<p class="note">On each hospital's held-out split, at a threshold chosen on its own training
data. Majority accuracy is the accuracy of always predicting the training split's majority
class: a model that does not beat it has learned nothing useful. "undefined" means the metric
does not exist for that split (e.g. AUC with one class), not zero.</p>
{metrics}
{uncertainty_section(report, hospitals, _table, format_value)}"""
    title = f"murmur run report: {format_value(report.get('dataset'))}"
    page = f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{html.escape(title)}</title>
<style>{_STYLE}</style>
</head>
<body>
<h1>{html.escape(title)}</h1>
{_adversary_banner(report)}
<h2>Summary</h2>
{summary}
{_warnings_section(report)}
{clinical}
<h2>Privacy</h2>
<p class="note">What each node's accountant was given (σ, q, steps, δ) and the ε it reported;
anyone can recompute ε from these.</p>
{privacy}
{_personal_section(hospitals)}
{_baseline_section(report, hospitals)}
{_trust_section(hospitals)}
{_rejected_section(hospitals)}
<h2>Plots</h2>
{"".join(figures)}
</body>
</html>
"""
    path = run_dir / "report.html"
    path.write_text(page, encoding="utf-8")
    return path


# ---------------------------------------------------------------- plain text


def summary_table(report: dict[str, Any]) -> str:
    """The per-hospital results as a fixed-width text table, for the end of a run's output."""
    hospitals = _check_report(report)
    if is_survival(report):
        return "\n".join(survival_summary_lines(report, format_value) + _closing_lines(report))
    headings = (
        "hospital",
        "AUC",
        "sensitivity",
        "specificity",
        "accuracy",
        "majority acc",
        "epsilon",
        "rounds",
    )
    rows = [
        (
            h["name"] + (" (Byzantine)" if h.get("byzantine") else ""),
            format_value(h.get("auc")),
            format_value(h.get("sensitivity")),
            format_value(h.get("specificity")),
            format_value(h.get("accuracy")),
            format_value(h.get("majority_accuracy")),
            format_value(h.get("epsilon")),
            format_value(h.get("rounds_completed")),
        )
        for h in hospitals
    ]
    widths = [max(len(c) for c in column) for column in zip(headings, *rows, strict=True)]

    def line(cells: Sequence[str]) -> str:
        first, *rest = cells
        parts = [first.ljust(widths[0])]
        parts += [c.rjust(w) for c, w in zip(rest, widths[1:], strict=True)]
        return "  ".join(parts).rstrip()

    lines = [line(headings), "  ".join("-" * w for w in widths)]
    lines += [line(r) for r in rows]
    lines.append("")
    lines.append(f"mean AUC (honest nodes): {format_value(report.get('mean_auc'))}")
    whole = (report.get("whole_test") or {}).get("mean_auc")
    if whole is not None:
        lines.append(f"mean AUC on all hospitals' test rows: {format_value(whole)}")
    for row in personal_rows(hospitals):
        lines.append(
            f"personalized {row[0]}: AUC {format_value(row[2])} (shared {format_value(row[1])}), "
            f"accuracy {format_value(row[4])} (shared {format_value(row[3])})"
        )
    for kind, title in _BASELINE_KINDS:
        if (report.get("baselines") or {}).get(kind):
            mean = format_value(_baseline_mean(report, kind))
            lines.append(f"baseline mean AUC, {title}: {mean}")
    return "\n".join(lines + _closing_lines(report))


def _closing_lines(report: dict[str, Any]) -> list[str]:
    """Failures, interruption, warnings and the adversary notice, for any task."""
    lines = []
    failed = report.get("failed") or []
    if failed:
        lines.append(f"failed nodes: {', '.join(failed)}")
    if report.get("interrupted"):
        lines.append(f"run INTERRUPTED: {_run_state_text(report)}")
    lines += [f"warning: {w}" for w in report_warnings(report)]
    if adversary_text(report):
        lines.append(adversary_text(report))
    return lines
