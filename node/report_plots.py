"""The PNG plots of a run report: AUC, privacy spent, disagreement and trust per round.

Drawn with matplotlib's object API (Figure + Agg canvas) rather than pyplot, so writing a
report touches no global plotting state and works in any thread or process.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from murmur.node.report_sections import (
    is_survival,
)
from murmur.node.report_values import (
    BASELINE_KINDS,
    baseline_mean,
    has_finite,
    rounds_and,
    to_number,
)

AUC_PLOT = "auc.png"
EPSILON_PLOT = "epsilon.png"
DISAGREEMENT_PLOT = "disagreement.png"
TRUST_PLOT = "trust.png"

_LEGEND_MAX = 12  # lines a plot's legend names; more and it hides the plot
_TRUST_PANELS = 8  # hospitals that get a trust panel each; more get one summary panel


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


def plot_auc(report: dict[str, Any], hospitals: list[dict[str, Any]], path: Path) -> bool:
    """AUC (survival: C-index) per round per hospital, honest solid and Byzantine dashed,
    with baseline lines."""
    field, name = ("c_index", "C-index") if is_survival(report) else ("auc", "AUC")
    series = [(h, *rounds_and(h.get("history", []), field)) for h in hospitals]
    if not any(has_finite(values) for _, _, values in series):
        return False
    figure = _new_figure()
    ax = figure.add_subplot()
    _plot_hospital_lines(ax, series)
    colours = {"local": "tab:gray", "pooled": "black", "local_dp": "tab:orange"}
    colours["reference"] = "tab:green"
    colours["pooled_dp"] = "tab:brown"
    for kind, title in BASELINE_KINDS:
        mean = baseline_mean(report, kind)
        if mean is not None:
            ax.axhline(mean, color=colours[kind], linestyle=":", label=f"{title}: mean {name}")
    ax.set_xlabel("round")
    ax.set_ylabel(f"test {name}")
    ax.set_title(f"Held-out {name} per round")
    _legend(ax)
    _save(figure, path)
    return True


def plot_epsilon(report: dict[str, Any], hospitals: list[dict[str, Any]], path: Path) -> bool:
    """Cumulative ε per round; nothing when DP was off (ε is then unbounded, not 0)."""
    if not (report.get("dp") or {}).get("enabled"):
        return False
    series = [(h, *rounds_and(h.get("history", []), "epsilon")) for h in hospitals]
    if not any(has_finite(values) for _, _, values in series):
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
        rounds, values = rounds_and(hospital.get("history", []), "neighbour_distance")
        for r, v in zip(rounds, values, strict=True):
            if math.isfinite(v):
                by_round.setdefault(r, []).append(v)
    return {r: sum(vs) / len(vs) for r, vs in sorted(by_round.items())}


def plot_disagreement(hospitals: list[dict[str, Any]], path: Path) -> bool:
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


def plot_trust(hospitals: list[dict[str, Any]], path: Path) -> bool:
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
            values = [to_number(s) for s in scores]
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
            for r, score in enumerate(to_number(s) for s in scores):
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
    if not any(has_finite(values) for values in means.values()):
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
