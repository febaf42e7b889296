"""Turn a finished run's report.json dict into report.html, PNG plots and a plain-text table.

The report is what a clinician or a reviewer reads after a run, often on a hospital machine
with no internet, so the HTML is one self-contained file next to its PNGs: no external CSS,
scripts or fonts. Every value comes from the report dict (docs/report.md); a value that is
undefined there (null) is printed as "undefined", never as 0, because a missing AUC that
reads as 0 or 0.5 is a wrong clinical claim. Every string is HTML-escaped, since node names
and paths come from operators' config files.

The plots are node/report_plots.py's; how each value prints and the warnings a run earns are
node/report_values.py's.
"""

from __future__ import annotations

import html
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from murmur.node.report_extras import PERSONAL_HEADINGS, personal_rows
from murmur.node.report_plots import (
    AUC_PLOT,
    DISAGREEMENT_PLOT,
    EPSILON_PLOT,
    TRUST_PLOT,
    plot_auc,
    plot_disagreement,
    plot_epsilon,
    plot_trust,
)
from murmur.node.report_sections import (
    RELIABILITY_PLOT,
    baseline_cell,
    is_survival,
    margin_text,
    plot_reliability,
    survival_section,
    survival_summary_lines,
    uncertainty_section,
)
from murmur.node.report_values import (
    BASELINE_KINDS,
    baseline_mean,
    check_report,
    format_value,
    report_warnings,
)

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
    ]
    name = "C-index" if is_survival(report) else "AUC"
    rows.append((f"mean {name} (honest nodes)", report.get(_mean_field(report))))
    whole = (report.get("whole_test") or {}).get("mean_auc")
    if whole is not None:  # each final model on every hospital's test rows together
        rows.append(("mean AUC on all hospitals' test rows", whole))
    for kind, title in BASELINE_KINDS:
        if (report.get("baselines") or {}).get(kind):
            rows.append((f"baseline mean {name}, {title}", baseline_mean(report, kind)))
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


def _warnings_section(report: dict[str, Any]) -> str:
    warnings = report_warnings(report)
    if not warnings:
        return ""
    items = "".join(f"<li>{html.escape(w)}</li>" for w in warnings)
    return f'<h2>Warnings</h2><ul class="warning">{items}</ul>'


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
    kinds = [(kind, title) for kind, title in BASELINE_KINDS if baselines.get(kind)]
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
            *[baseline_mean(report, kind) for kind, _ in kinds],
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
    hospitals = check_report(report)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    plots = _draw_plots(report, hospitals, run_dir)
    summary = _table(("item", "value"), _summary_rows(report, hospitals))
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
{_clinical_section(report, hospitals)}
<h2>Privacy</h2>
<p class="note">What each node's accountant was given (σ, q, steps, δ) and the ε it reported;
anyone can recompute ε from these.</p>
{_privacy_table(hospitals)}
{_personal_section(hospitals)}
{_baseline_section(report, hospitals)}
{_trust_section(hospitals)}
{_rejected_section(hospitals)}
<h2>Plots</h2>
{_figures(report, plots, run_dir)}
</body>
</html>
"""
    path = run_dir / "report.html"
    path.write_text(page, encoding="utf-8")
    return path


def _draw_plots(
    report: dict[str, Any], hospitals: list[dict[str, Any]], run_dir: Path
) -> list[tuple[str, str, bool]]:
    """Draw every plot into `run_dir`: (file name, title, whether it was written)."""
    return [
        (AUC_PLOT, "AUC per round", plot_auc(report, hospitals, run_dir / AUC_PLOT)),
        (EPSILON_PLOT, "ε per round", plot_epsilon(report, hospitals, run_dir / EPSILON_PLOT)),
        (
            DISAGREEMENT_PLOT,
            "disagreement per round",
            plot_disagreement(hospitals, run_dir / DISAGREEMENT_PLOT),
        ),
        (TRUST_PLOT, "trust per peer", plot_trust(hospitals, run_dir / TRUST_PLOT)),
        (
            RELIABILITY_PLOT,
            "reliability (calibration)",
            plot_reliability(hospitals, run_dir / RELIABILITY_PLOT),
        ),
    ]


def _clinical_section(report: dict[str, Any], hospitals: list[dict[str, Any]]) -> str:
    """The survival table, or the classification metrics per hospital with their intervals."""
    if is_survival(report):
        return survival_section(report, hospitals, _table, format_value)
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
    return f"""<h2>Clinical metrics per hospital</h2>
<p class="note">On each hospital's held-out split, at a threshold chosen on its own training
data. Majority accuracy is the accuracy of always predicting the training split's majority
class: a model that does not beat it has learned nothing useful. "undefined" means the metric
does not exist for that split (e.g. AUC with one class), not zero.</p>
{metrics}
{uncertainty_section(report, hospitals, _table, format_value)}"""


def _privacy_table(hospitals: list[dict[str, Any]]) -> str:
    return _table(
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


def _figures(report: dict[str, Any], plots: list[tuple[str, str, bool]], run_dir: Path) -> str:
    """Each written plot as an image; an absent one explained, or left out when its absence
    says nothing (no trust scores, no calibration data)."""
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
    return "".join(figures)


# ---------------------------------------------------------------- plain text


def summary_table(report: dict[str, Any]) -> str:
    """The per-hospital results as a fixed-width text table, for the end of a run's output."""
    hospitals = check_report(report)
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
    for kind, title in BASELINE_KINDS:
        if (report.get("baselines") or {}).get(kind):
            mean = format_value(baseline_mean(report, kind))
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
