"""Reading a report dict: how each value prints, what a report must hold, and the warnings
a run or a hospital earns. node/report.py (HTML, text) and node/report_plots.py (PNGs) share it.

A value that is undefined in the report (null) prints as "undefined", never as 0: a missing
AUC that reads as 0 or 0.5 is a wrong clinical claim.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

from murmur.node.report_sections import (
    is_survival,
    survival_warnings,
)

UNDEFINED = "undefined"

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


def to_number(value: Any) -> float:
    """A report value as a plottable float: undefined values become NaN (a gap in the line)."""
    if value is None or isinstance(value, bool):
        return math.nan
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def has_finite(values: Iterable[float]) -> bool:
    return any(math.isfinite(v) for v in values)


# ---------------------------------------------------------------- input checks


def check_report(report: Any) -> list[dict[str, Any]]:
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


def baseline_mean(report: dict[str, Any], kind: str) -> float | None:
    baselines = report.get("baselines") or {}
    entry = baselines.get(kind) or {}
    value = entry.get("mean_c_index" if is_survival(report) else "mean_auc")
    return None if value is None else float(value)


def rounds_and(history: Sequence[dict[str, Any]], field: str) -> tuple[list[int], list[float]]:
    rounds = [int(h["round"]) for h in history if "round" in h]
    values = [to_number(h.get(field)) for h in history if "round" in h]
    return rounds, values


def report_warnings(report: dict[str, Any]) -> list[str]:
    """Every warning of the run, run-level first, then per hospital (prefixed by its name)."""
    warnings = list(report.get("warnings") or [])
    for hospital in report.get("hospitals") or []:
        warnings += [f"{hospital.get('name')}: {w}" for w in hospital.get("warnings") or []]
    return warnings


# Baseline kinds in the order the report shows them, with their column names.
BASELINE_KINDS: tuple[tuple[str, str], ...] = (
    ("local_dp", "local only, DP"),
    ("pooled_dp", "pooled, DP"),
    ("local", "local only, no DP"),
    ("pooled", "pooled, no DP"),
    ("reference", "tuned L2 logistic regression, pooled, no DP"),
)
