"""Pooled evaluation from per-hospital score histograms (issue #21): pure functions.

Why histograms: the consortium wants one AUROC, one operating point and one calibration
over every hospital's test split together, and no hospital may let a patient's score leave it.
Each hospital therefore reduces its test split to counts of scores by class in fine bins, plus
four per-class sums (count, sum of p, sum of the Brier terms and of their squares) that make
the Brier score and its interval exact. These integers are what the secure sum
(crypto/secure_sum.py) adds up; everything below is computed from the total alone.

Bins: equal width on the logit scale over [-logit_range, logit_range] (probabilities near 0
and 1, where confident models put most patients, stay apart), with the operating threshold and
the calibration boundaries k/10 added as edges, so the operating point and the calibration bins
are exact. Two patients of different classes in one bin count as a tie (half a concordant
pair), so the AUROC's error is at most half the share of positive-negative pairs that share a
bin (`tie_share`), which the tests check against scikit-learn on the pooled scores.

Intervals: AUROC, DeLong et al. (1988) with ties (a bin is a tie), from the bin counts;
sensitivity, specificity, PPV, NPV, Wilson score intervals; Brier, the normal interval of the
mean of the per-patient terms, whose variance the sum of squares gives.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np

Z_95 = 1.959963984540054
FIXED_POINT_BITS = 32  # fractional bits of the sums on the wire (resolution 2.3e-10)
CALIBRATION_BINS = 10
_EPS = 1e-15


@dataclass(frozen=True)
class BinSpec:
    """The consortium's histogram layout: every hospital must use the same one."""

    bins: int = 4096
    logit_range: float = 16.0
    threshold: float = 0.5

    def __post_init__(self) -> None:
        if self.bins < 2:
            raise ValueError("a score histogram needs at least 2 bins")
        if not self.logit_range > 0:
            raise ValueError("logit_range must be positive")
        if not 0.0 < self.threshold < 1.0:
            raise ValueError(f"the operating threshold must be in (0, 1), got {self.threshold}")

    def edges(self) -> np.ndarray:
        """Inner edges on the logit scale, ascending; bin k is [edges[k-1], edges[k])."""
        return self._edges

    @cached_property
    def _edges(self) -> np.ndarray:
        grid = np.linspace(-self.logit_range, self.logit_range, self.bins + 1)
        extra = [_logit(self.threshold)] + [
            _logit(k / CALIBRATION_BINS) for k in range(1, CALIBRATION_BINS)
        ]
        return np.unique(np.concatenate([grid, np.asarray(extra)]))

    @cached_property
    def size(self) -> int:
        return len(self._edges) + 1

    def as_dict(self) -> dict[str, float]:
        return {"bins": self.bins, "logit_range": self.logit_range, "threshold": self.threshold}


def _logit(p: np.ndarray | float) -> np.ndarray:
    q = np.clip(np.asarray(p, dtype=np.float64), _EPS, 1.0 - _EPS)
    return np.log(q) - np.log1p(-q)


@dataclass(frozen=True)
class ScoreHistogram:
    """Counts of scores by class (row 0: negatives, row 1: positives) and per-class sums."""

    counts: np.ndarray  # (2, size) int64
    sum_p: np.ndarray  # (2,) float64: sum of predicted probabilities
    brier: np.ndarray  # (2,) float64: sum of (p - y)^2
    brier_sq: np.ndarray  # (2,) float64: sum of (p - y)^4

    @property
    def n(self) -> int:
        return int(self.counts.sum())

    def __add__(self, other: ScoreHistogram) -> ScoreHistogram:
        return ScoreHistogram(
            self.counts + other.counts,
            self.sum_p + other.sum_p,
            self.brier + other.brier,
            self.brier_sq + other.brier_sq,
        )


def score_histogram(y_true: np.ndarray, y_prob: np.ndarray, spec: BinSpec) -> ScoreHistogram:
    """One hospital's histogram of its own test split (computed where the scores are)."""
    y = np.asarray(y_true).ravel()
    p = np.asarray(y_prob, dtype=np.float64).ravel()
    if len(y) != len(p):
        raise ValueError(f"one probability per label: {len(p)} probabilities, {len(y)} labels")
    if not np.isin(y, (0, 1)).all():
        raise ValueError("labels must be 0 or 1")
    if not np.isfinite(p).all() or (p < 0).any() or (p > 1).any():
        raise ValueError("probabilities must be finite and in [0, 1]")
    which = np.searchsorted(spec.edges(), _logit(p), side="right")
    counts = np.zeros((2, spec.size), dtype=np.int64)
    np.add.at(counts, (y.astype(np.int64), which), 1)
    terms = (p - y) ** 2
    per_class = [y == 0, y == 1]
    return ScoreHistogram(
        counts,
        np.array([p[c].sum() for c in per_class]),
        np.array([terms[c].sum() for c in per_class]),
        np.array([(terms[c] ** 2).sum() for c in per_class]),
    )


def combine(histograms: Iterable[ScoreHistogram]) -> ScoreHistogram:
    """The plain sum (what the secure sum yields without anyone seeing the parts)."""
    items = list(histograms)
    if not items:
        raise ValueError("no histograms to combine")
    total = items[0]
    for h in items[1:]:
        total = total + h
    return total


# ------------------------------------------------------------------ wire vector (uint64)


def to_vector(h: ScoreHistogram) -> np.ndarray:
    """The histogram as one uint64 vector: counts, then the six sums in fixed point."""
    sums = np.concatenate([h.sum_p, h.brier, h.brier_sq])
    fixed = np.round(sums * 2.0**FIXED_POINT_BITS).astype(np.uint64)
    return np.concatenate([h.counts.ravel().astype(np.uint64), fixed])


def vector_length(spec: BinSpec) -> int:
    return 2 * spec.size + 6


def from_vector(vector: np.ndarray, spec: BinSpec) -> ScoreHistogram:
    v = np.asarray(vector, dtype=np.uint64)
    if v.shape != (vector_length(spec),):
        raise ValueError(f"a histogram vector of {spec} has {vector_length(spec)} entries")
    counts = v[: 2 * spec.size].astype(np.int64).reshape(2, spec.size)
    sums = v[2 * spec.size :].astype(np.float64) / 2.0**FIXED_POINT_BITS
    return ScoreHistogram(counts, sums[0:2], sums[2:4], sums[4:6])


# ------------------------------------------------------------------ figures


def auroc_with_variance(h: ScoreHistogram) -> tuple[float, float] | None:
    """(AUROC, DeLong variance) with bins as ties; None without 2 cases of each class."""
    neg, pos = h.counts[0].astype(np.float64), h.counts[1].astype(np.float64)
    m, n = pos.sum(), neg.sum()
    if m < 2 or n < 2:
        return None
    neg_below = np.cumsum(neg) - neg
    pos_above = pos.sum() - np.cumsum(pos)
    v10 = (neg_below + 0.5 * neg) / n  # per positive in the bin: share of negatives below
    v01 = (pos_above + 0.5 * pos) / m  # per negative in the bin: share of positives above
    auc = float((pos * v10).sum() / m)
    s10 = float((pos * (v10 - auc) ** 2).sum() / (m - 1))
    s01 = float((neg * (v01 - auc) ** 2).sum() / (n - 1))
    return auc, s10 / m + s01 / n


def tie_share(h: ScoreHistogram) -> float:
    """Share of positive-negative pairs in one bin: twice the most the AUROC can be off."""
    m, n = h.counts[1].sum(), h.counts[0].sum()
    if m == 0 or n == 0:
        return 0.0
    return float((h.counts[0] * h.counts[1]).sum() / (m * n))


def wilson(successes: int, total: int) -> dict[str, float] | None:
    if total == 0:
        return None
    p = successes / total
    centre = (p + Z_95**2 / (2 * total)) / (1 + Z_95**2 / total)
    half = Z_95 * math.sqrt(p * (1 - p) / total + Z_95**2 / (4 * total**2)) / (1 + Z_95**2 / total)
    return {"value": p, "low": max(0.0, centre - half), "high": min(1.0, centre + half)}


def operating_point(h: ScoreHistogram, spec: BinSpec) -> dict[str, Any]:
    """Sensitivity, specificity, PPV, NPV at the threshold (predicted positive: p >= t)."""
    first_positive = int(np.searchsorted(spec.edges(), _logit(spec.threshold), side="left")) + 1
    tp = int(h.counts[1, first_positive:].sum())
    fn = int(h.counts[1, :first_positive].sum())
    fp = int(h.counts[0, first_positive:].sum())
    tn = int(h.counts[0, :first_positive].sum())
    return {
        "threshold": spec.threshold,
        "tp": tp,
        "fp": fp,
        "tn": tn,
        "fn": fn,
        "sensitivity": wilson(tp, tp + fn),
        "specificity": wilson(tn, tn + fp),
        "ppv": wilson(tp, tp + fp),
        "npv": wilson(tn, tn + fn),
    }


def brier(h: ScoreHistogram) -> dict[str, float] | None:
    n = h.n
    if n == 0:
        return None
    mean = float(h.brier.sum() / n)
    if n < 2:
        return {"value": mean, "low": mean, "high": mean}
    var = max(float(h.brier_sq.sum() / n) - mean**2, 0.0) * n / (n - 1)
    half = Z_95 * math.sqrt(var / n)
    return {"value": mean, "low": max(0.0, mean - half), "high": mean + half}


def calibration(h: ScoreHistogram, spec: BinSpec) -> dict[str, Any]:
    """Reliability bins k/10 (exact membership; mean prediction from fine-bin centres, off by
    at most a fine bin's width) and the expected calibration error; the overall mean
    prediction and observed rate are exact."""
    bounds = 1.0 / (1.0 + np.exp(-spec.edges()))
    lower = np.concatenate([[0.0], bounds])
    upper = np.concatenate([bounds, [1.0]])
    centres = (lower + upper) / 2.0  # each fine bin lies inside one reliability bin
    total = h.counts.sum(axis=0).astype(np.float64)
    which = np.minimum((centres * CALIBRATION_BINS).astype(int), CALIBRATION_BINS - 1)
    counts = np.bincount(which, weights=total, minlength=CALIBRATION_BINS)
    predicted = np.bincount(which, weights=centres * total, minlength=CALIBRATION_BINS)
    positives = np.bincount(which, weights=h.counts[1], minlength=CALIBRATION_BINS)
    n = total.sum()
    rows, ece = [], 0.0
    for k in np.flatnonzero(counts):
        mean_p, observed = predicted[k] / counts[k], positives[k] / counts[k]
        ece += counts[k] / n * abs(mean_p - observed)
        rows.append(
            {
                "bin": int(k),
                "n": int(counts[k]),
                "predicted": float(mean_p),
                "observed": float(observed),
            }
        )
    mean_predicted = float(h.sum_p.sum() / n) if n else None
    observed_rate = float(h.counts[1].sum() / n) if n else None
    return {
        "ece": ece,
        "bins": rows,
        "mean_predicted": mean_predicted,
        "observed_rate": observed_rate,
    }


def figures(h: ScoreHistogram, spec: BinSpec) -> dict[str, Any]:
    """Every pooled figure with its 95% interval, from one histogram."""
    auc = auroc_with_variance(h)
    if auc is None:
        auroc = None
    else:
        half = Z_95 * math.sqrt(max(auc[1], 0.0))
        auroc = {
            "value": auc[0],
            "low": max(0.0, auc[0] - half),
            "high": min(1.0, auc[0] + half),
            "max_binning_error": tie_share(h) / 2.0,
        }
    return {
        "n": h.n,
        "positives": int(h.counts[1].sum()),
        "auroc": auroc,
        **operating_point(h, spec),
        "brier": brier(h),
        "calibration": calibration(h, spec),
    }


def pooled_report(
    own: Mapping[str, ScoreHistogram], pooled: ScoreHistogram, spec: BinSpec
) -> dict[str, Any]:
    """The pooled figures next to each hospital's own (each computed at its hospital from its
    own histogram; only the figures are published, never the histogram)."""
    return {
        "bins": spec.as_dict(),
        "pooled": figures(pooled, spec),
        "hospitals": {name: figures(h, spec) for name, h in sorted(own.items())},
    }
