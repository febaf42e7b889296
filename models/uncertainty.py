"""How sure a hospital's figures are: AUC intervals (DeLong), calibration, and margins.

A hospital's test split is often small (Fed-Heart-Disease's Switzerland tests 1 healthy
patient; four of FLamby's six TCGA regions hold 3 deaths or fewer), and an AUC from such a
split can move by tenths with one patient. So every AUC comes with a 95% interval, and a
model's probabilities with their calibration:

- `delong_interval`: DeLong, DeLong & Clarke-Pearson (1988), the variance of the
  Mann-Whitney AUC from its structural components, computed with midranks (Sun & Xu 2014,
  "Fast implementation of DeLong's algorithm"); the interval is AUC +- 1.96 SE, clipped to
  [0, 1]. Undefined (None) without both classes.
- `calibration`: the expected calibration error over 10 equal-width probability bins
  (Naeini et al. 2015), and each bin's mean prediction and observed rate: the reliability
  diagram report.html draws.
- `margin`: the mean per-hospital difference between two models' AUCs, with a 95% interval
  from the per-hospital DeLong variances, treating the two AUCs as independent (they are
  measured on the same patients and positively correlated, so this over-states the variance:
  the interval is conservative). Where DeLong is undefined (one case of a class) the bound
  AUC (1 - AUC) / min(positives, negatives) stands in (`auc_variance`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

Z_95 = 1.959963984540054
CALIBRATION_BINS = 10


def _midranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks with ties sharing their mean rank."""
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    return (np.cumsum(counts) - (counts - 1) / 2.0)[inverse]


def delong_variance(y_true: np.ndarray, y_score: np.ndarray) -> tuple[float, float] | None:
    """(AUC, its DeLong variance), or None with fewer than 2 cases of a class."""
    y = np.asarray(y_true, dtype=np.float64).ravel()
    s = np.asarray(y_score, dtype=np.float64).ravel()
    positives, negatives = s[y == 1], s[y == 0]
    m, n = len(positives), len(negatives)
    if m < 2 or n < 2:  # one case of a class: its component's variance cannot be estimated
        return None
    all_ranks = _midranks(np.concatenate([positives, negatives]))
    rank_pos, rank_neg = all_ranks[:m], all_ranks[m:]
    within_pos, within_neg = _midranks(positives), _midranks(negatives)
    auc = (rank_pos.sum() - m * (m + 1) / 2.0) / (m * n)
    v10 = (rank_pos - within_pos) / n  # per positive: share of negatives it outranks
    v01 = 1.0 - (rank_neg - within_neg) / m  # per negative: share of positives above it
    s10 = float(np.var(v10, ddof=1)) if m > 1 else 0.0
    s01 = float(np.var(v01, ddof=1)) if n > 1 else 0.0
    return float(auc), s10 / m + s01 / n


def delong_interval(y_true: np.ndarray, y_score: np.ndarray) -> tuple[float, float] | None:
    """A 95% interval for the AUC: AUC +- 1.96 DeLong SE, clipped to [0, 1]."""
    result = delong_variance(y_true, y_score)
    if result is None:
        return None
    auc, variance = result
    half = Z_95 * math.sqrt(max(variance, 0.0))
    return max(0.0, auc - half), min(1.0, auc + half)


def calibration(
    y_true: np.ndarray, y_prob: np.ndarray, bins: int = CALIBRATION_BINS
) -> dict[str, object]:
    """Expected calibration error and the reliability diagram's bins.

    Bin k holds predictions in [k/bins, (k+1)/bins) (the last bin includes 1). ECE is the
    patient-weighted mean of |mean prediction - observed rate| over non-empty bins.
    """
    y = np.asarray(y_true, dtype=np.float64).ravel()
    p = np.asarray(y_prob, dtype=np.float64).ravel()
    if len(y) == 0 or len(y) != len(p):
        raise ValueError(f"calibration needs one probability per label, got {len(p)}, {len(y)}")
    which = np.minimum((p * bins).astype(int), bins - 1)
    rows = []
    ece = 0.0
    for k in range(bins):
        inside = which == k
        count = int(inside.sum())
        if count == 0:
            continue
        predicted, observed = float(p[inside].mean()), float(y[inside].mean())
        ece += count / len(y) * abs(predicted - observed)
        rows.append({"bin": k, "n": count, "predicted": predicted, "observed": observed})
    return {"ece": ece, "bins": rows}


def margin(
    pairs: Sequence[tuple[float, float, float, float]],
) -> dict[str, float | int] | None:
    """Mean of (a - b) over hospitals, with a conservative 95% interval.

    ``pairs`` holds, per hospital, (auc_a, var_a, auc_b, var_b) with DeLong variances. The
    mean's variance is sum(var_a + var_b) / k^2 (independence assumed: conservative).
    """
    if not pairs:
        return None
    differences = [a - b for a, _, b, _ in pairs]
    variance = sum(va + vb for _, va, _, vb in pairs) / len(pairs) ** 2
    mean = float(np.mean(differences))
    half = Z_95 * math.sqrt(variance)
    return {"mean": mean, "low": mean - half, "high": mean + half, "hospitals": len(pairs)}


def auc_variance(entry: dict) -> float | None:
    """An entry's AUC variance: DeLong's, else (a class with one case) the upper bound
    AUC (1 - AUC) / min(positives, negatives) (Birnbaum & Klose 1957), else None."""
    if entry.get("auc_se") is not None:
        return float(entry["auc_se"]) ** 2
    auc = entry.get("auc")
    n = entry.get("n_test", entry.get("n"))
    positives = entry.get("n_test_positives", entry.get("positives"))
    if auc is None or not isinstance(n, int) or not isinstance(positives, int):
        return None
    smaller = min(positives, n - positives)
    return auc * (1 - auc) / smaller if smaller > 0 else None


def federation_margins(
    hospitals: Sequence[dict], local_entries: Sequence[dict]
) -> dict[str, object] | None:
    """The federation's AUC minus local-only's, mean over hospitals, with 95% intervals.

    ``hospitals`` are the honest nodes' report entries (``auc``, ``auc_se``), ``local_entries``
    the local-only baseline's. Two figures: *without* hospitals that have no local model
    (one class in their training split), and *with* them, where the local alternative is a
    constant prediction (AUC 0.5, no variance): what such a hospital could deploy alone.
    """
    local = {entry.get("name"): entry for entry in local_entries}
    without: list[tuple[float, float, float, float]] = []
    with_sites = list(without)
    one_class = []
    for hospital in hospitals:
        entry = local.get(hospital.get("name"))
        auc, variance = hospital.get("auc"), auc_variance(hospital)
        if entry is None or auc is None or variance is None:
            continue
        if entry.get("no_model"):
            one_class.append(hospital["name"])
            with_sites.append((auc, variance, 0.5, 0.0))
        elif entry.get("auc") is not None and (local_variance := auc_variance(entry)) is not None:
            pair = (auc, variance, entry["auc"], local_variance)
            without.append(pair)
            with_sites.append(pair)
    if not with_sites:
        return None
    return {
        "without_one_class_sites": margin(without),
        "with_one_class_sites": margin(with_sites),
        "one_class_sites": one_class,
    }
