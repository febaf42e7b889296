"""Clinical metrics agree with scikit-learn, and undefined metrics are None, not a number."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from murmur.models.data import load_dataset
from murmur.models.metrics import clinical_metrics, roc_auc
from sklearn.metrics import accuracy_score, brier_score_loss, confusion_matrix, roc_auc_score

HEART_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "heart_disease"


@st.composite
def labelled_predictions(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray, float]:
    n = draw(st.integers(min_value=1, max_value=60))
    y = np.array(draw(st.lists(st.sampled_from([0, 1]), min_size=n, max_size=n)), dtype=float)
    # Probabilities on a coarse grid so that ties (and ties at the threshold) are common.
    grid = draw(st.lists(st.integers(0, 10), min_size=n, max_size=n))
    threshold = draw(st.sampled_from([0.0, 0.3, 0.5, 0.7, 1.0]))
    return y, np.array(grid, dtype=float) / 10, threshold


@settings(max_examples=300, deadline=None, derandomize=True)
@given(labelled_predictions())
def test_metrics_agree_with_scikit_learn(case: tuple[np.ndarray, np.ndarray, float]) -> None:
    y, p, threshold = case
    m = clinical_metrics(y, p, threshold)
    predicted = (p >= threshold).astype(int)
    tn, fp, fn, tp = confusion_matrix(y, predicted, labels=[0, 1]).ravel()
    assert m["n"] == len(y) and m["positives"] == tp + fn
    assert m["accuracy"] == pytest.approx(accuracy_score(y, predicted))
    assert m["brier"] == pytest.approx(brier_score_loss(y, p, labels=[0, 1]))
    for key, num, den in (
        ("sensitivity", tp, tp + fn),
        ("specificity", tn, tn + fp),
        ("ppv", tp, tp + fp),
        ("npv", tn, tn + fn),
    ):
        assert m[key] == (pytest.approx(num / den) if den else None), key
    if 0 < y.sum() < len(y):
        assert m["auc"] == pytest.approx(roc_auc_score(y, p))
    else:
        assert m["auc"] is None
    majority = int(y.mean() >= 0.5)
    assert m["majority_class"] == majority
    assert m["majority_accuracy"] == pytest.approx(np.mean(y == majority))


def test_auc_is_undefined_not_one_half_on_a_one_class_split() -> None:
    m = clinical_metrics(np.ones(16), np.linspace(0.1, 0.9, 16))
    assert m["auc"] is None
    assert m["specificity"] is None  # no negative patients
    assert m["sensitivity"] == pytest.approx(0.5)  # 8 of 16 scored >= 0.5
    assert roc_auc(np.zeros(3), np.array([0.2, 0.4, 0.6])) is None


def test_predictive_values_are_undefined_without_predictions_of_that_class() -> None:
    y = np.array([0, 1, 0, 1])
    nobody_positive = clinical_metrics(y, np.full(4, 0.2))
    assert nobody_positive["ppv"] is None and nobody_positive["npv"] == 0.5
    everybody_positive = clinical_metrics(y, np.full(4, 0.9))
    assert everybody_positive["npv"] is None and everybody_positive["ppv"] == 0.5


def test_threshold_is_inclusive_and_auc_counts_ties_as_half() -> None:
    y = np.array([0, 1])
    assert clinical_metrics(y, np.array([0.4, 0.5]), threshold=0.5)["accuracy"] == 1.0
    assert clinical_metrics(y, np.array([0.5, 0.5]))["auc"] == 0.5  # a real tie, not a default


def test_majority_baseline_uses_the_training_labels_when_given() -> None:
    y_test = np.array([1, 1, 1, 0])
    from_test = clinical_metrics(y_test, np.full(4, 0.5))
    from_train = clinical_metrics(y_test, np.full(4, 0.5), y_train=np.array([0, 0, 0, 1, 1]))
    assert (from_test["majority_class"], from_test["majority_accuracy"]) == (1, 0.75)
    assert (from_train["majority_class"], from_train["majority_accuracy"]) == (0, 0.25)


@pytest.mark.parametrize(
    ("y", "p", "message"),
    [
        ([0, 1], [0.5], "shape"),
        ([0, 2], [0.5, 0.5], "only 0 and 1"),
        ([0, 1], [0.5, np.nan], "finite probabilities"),
        ([0, 1], [0.5, 1.5], "finite probabilities"),
        ([], [], "at least one"),
    ],
)
def test_bad_inputs_are_clear_errors(y, p, message) -> None:
    with pytest.raises(ValueError, match=message):
        clinical_metrics(np.array(y, dtype=float), np.array(p, dtype=float))


# FLamby's Fed-Heart-Disease benchmark: for each site, the best accuracy any of its 12
# strategies reaches averaged over its five seeds (owkin/FLamby, flamby/results/
# results_benchmark_fed_heart_disease/heart_seed42..46.csv; table in docs/data.md).
FLAMBY_BEST_MEAN_ACCURACY = {
    "cleveland": 0.7865,  # FedAdagrad / FedYogi
    "hungary": 0.8045,  # Local 0
    "switzerland": 0.8125,  # Local 2
    "va": 0.7556,  # FedAdagrad / FedYogi
}


@pytest.mark.skipif(
    not (HEART_DIR / "processed.va.data").exists(),
    reason=f"Fed-Heart-Disease files not found in {HEART_DIR}",
)
def test_predicting_disease_beats_every_flamby_model_at_two_heart_sites() -> None:
    beaten = []
    for split in load_dataset("heart-disease", path=HEART_DIR):
        constant = np.full(len(split.y_test), 0.5)
        m = clinical_metrics(split.y_test, constant, y_train=split.y_train)
        if m["majority_accuracy"] > FLAMBY_BEST_MEAN_ACCURACY[split.name]:
            assert m["majority_class"] == 1  # the baseline predicts "disease"
            beaten.append(split.name)
    assert beaten == ["switzerland", "va"]
