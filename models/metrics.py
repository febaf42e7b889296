"""Clinical metrics on a node's held-out split.

A metric that is undefined on the split is reported as ``None``, never as a made-up number:
AUC needs both classes (it is not 0.5 on a one-class split), sensitivity needs a positive
patient, PPV needs a positive prediction, and so on. Accuracy is always shown beside the
majority-class baseline, because on imbalanced hospitals a constant prediction can beat a
trained model (on Fed-Heart-Disease it does at two of the four sites; see docs/data.md).
"""

from __future__ import annotations

import numpy as np
from murmur.models.uncertainty import calibration, delong_interval, delong_variance

MetricValue = float | int | None


# The per-hospital clinical metrics that report.json carries (docs/report.md), for the nodes
# and for the baselines alike.
DP_DEFAULT_THRESHOLD = 0.5
"""The decision threshold under DP unless the study fixes another ([evaluation] threshold):
Youden's J on the training rows would publish one training patient's score."""

REPORTED_METRICS: tuple[str, ...] = (
    "auc",
    "sensitivity",
    "specificity",
    "ppv",
    "npv",
    "brier",
    "accuracy",
    "majority_accuracy",
)

UNCERTAINTY_METRICS: tuple[str, ...] = ("auc_low", "auc_high", "auc_se", "ece", "reliability")
"""95% DeLong interval and standard error of the AUC, expected calibration error, and the
reliability diagram's bins (models/uncertainty.py)."""

SURVIVAL_METRICS: tuple[str, ...] = ("c_index", "c_index_low", "c_index_high", "events")
"""What a survival node reports instead (models/survival.py `survival_metrics`)."""


def clinical_metrics(
    y_true: np.ndarray,
    y_prob: np.ndarray,
    threshold: float = 0.5,
    *,
    y_train: np.ndarray | None = None,
) -> dict[str, MetricValue]:
    """Discrimination, calibration and threshold metrics for binary predictions.

    ``y_prob`` is the predicted probability of class 1; a patient is predicted positive when
    ``y_prob >= threshold``. The majority-class baseline predicts, for every test patient,
    the class that is most common in ``y_train`` (the node's own training labels): that is the
    constant model a hospital could actually deploy. Without ``y_train`` the test split's own
    majority is used, which is the best any constant predictor can score there (an upper
    bound, so the comparison is conservative). Ties go to class 1.

    Keys: n, positives, threshold, auc, sensitivity, specificity, ppv, npv, brier, accuracy,
    majority_class, majority_accuracy, and `UNCERTAINTY_METRICS`.
    """
    y, p = _check_inputs(y_true, y_prob, threshold)
    predicted = p >= threshold
    positive = y == 1
    tp = int(np.sum(predicted & positive))
    fp = int(np.sum(predicted & ~positive))
    tn = int(np.sum(~predicted & ~positive))
    fn = int(np.sum(~predicted & positive))
    reference = y if y_train is None else _check_labels(y_train, "y_train")
    majority = int(2 * reference.sum() >= len(reference)) if len(reference) else 1
    return {
        "n": len(y),
        "positives": tp + fn,
        "threshold": float(threshold),
        "auc": roc_auc(y, p),
        "sensitivity": _ratio(tp, tp + fn),
        "specificity": _ratio(tn, tn + fp),
        "ppv": _ratio(tp, tp + fp),
        "npv": _ratio(tn, tn + fn),
        "brier": float(np.mean((p - y) ** 2)),
        "accuracy": (tp + tn) / len(y),
        "majority_class": majority,
        "majority_accuracy": float(np.mean(y == majority)),
        **_uncertainty(y, p),
    }


def _uncertainty(y: np.ndarray, p: np.ndarray) -> dict[str, object]:
    """The AUC's 95% DeLong interval and SE, the ECE and the reliability bins."""
    interval, variance = delong_interval(y, p), delong_variance(y, p)
    calibrated = calibration(y, p)
    return {
        "auc_low": interval[0] if interval else None,
        "auc_high": interval[1] if interval else None,
        "auc_se": float(np.sqrt(variance[1])) if variance else None,
        "ece": calibrated["ece"],
        "reliability": calibrated["bins"],
    }


def roc_auc(y_true: np.ndarray, y_score: np.ndarray) -> float | None:
    """Area under the ROC curve, or None when the labels hold only one class.

    Computed as the Mann-Whitney U statistic: the probability that a random positive patient
    scores higher than a random negative one, ties counting one half (average ranks).
    """
    y = np.asarray(y_true)
    positives = int(np.sum(y == 1))
    negatives = len(y) - positives
    if positives == 0 or negatives == 0:
        return None
    _, inverse, counts = np.unique(np.asarray(y_score), return_inverse=True, return_counts=True)
    average_rank = np.cumsum(counts) - (counts - 1) / 2.0  # 1-based rank shared by ties
    rank_sum = float(np.sum(average_rank[inverse][y == 1]))
    return (rank_sum - positives * (positives + 1) / 2.0) / (positives * negatives)


def _ratio(numerator: int, denominator: int) -> float | None:
    return numerator / denominator if denominator else None


def _check_labels(labels: np.ndarray, what: str) -> np.ndarray:
    y = np.asarray(labels, dtype=np.float64)
    if y.ndim != 1:
        raise ValueError(f"{what} must be one label per patient (1-D), got shape {y.shape}")
    if not np.isin(y, (0.0, 1.0)).all():
        raise ValueError(f"{what} must hold only 0 and 1, got {np.unique(y)[:5]}")
    return y


def _check_inputs(
    y_true: np.ndarray, y_prob: np.ndarray, threshold: float
) -> tuple[np.ndarray, np.ndarray]:
    y = _check_labels(y_true, "y_true")
    p = np.asarray(y_prob, dtype=np.float64)
    if p.shape != y.shape:
        raise ValueError(f"y_prob has shape {p.shape} but y_true has {y.shape}: one each")
    if len(y) == 0:
        raise ValueError("no test patients: metrics need at least one")
    if not np.isfinite(p).all() or p.min() < 0 or p.max() > 1:
        raise ValueError("y_prob must be finite probabilities in [0, 1] (apply a sigmoid)")
    if not 0 <= threshold <= 1:
        raise ValueError(f"threshold must be in [0, 1], got {threshold}")
    return y, p
