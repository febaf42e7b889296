"""Honest uncertainty: DeLong intervals, calibration, small-split warnings, the report."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from murmur.models.metrics import UNCERTAINTY_METRICS, clinical_metrics, roc_auc
from murmur.models.uncertainty import calibration, delong_interval, delong_variance, margin
from murmur.node.report import write_html_report
from murmur.node.report_values import hospital_warnings


def brute_force_delong(y: np.ndarray, s: np.ndarray) -> tuple[float, float]:
    """DeLong 1988 straight from its definition: the pairwise kernel psi, O(m n)."""
    pos, neg = s[y == 1], s[y == 0]
    psi = (pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])
    v10, v01 = psi.mean(axis=1), psi.mean(axis=0)
    auc = psi.mean()
    return auc, v10.var(ddof=1) / len(pos) + v01.var(ddof=1) / len(neg)


@pytest.mark.parametrize("seed", range(5))
def test_delong_matches_its_definition_with_ties(seed: int) -> None:
    rng = np.random.default_rng(seed)
    y = (rng.random(70) < 0.3).astype(float)
    s = np.round(rng.normal(size=70) + y, 1)  # rounded: many tied scores
    auc, variance = delong_variance(y, s)
    expected_auc, expected_variance = brute_force_delong(y, s)
    assert auc == pytest.approx(expected_auc) == pytest.approx(roc_auc(y, s))
    assert variance == pytest.approx(expected_variance, rel=1e-10)


def test_delong_interval_holds_the_auc_narrows_and_needs_both_classes() -> None:
    widths = []
    for n in (40, 400):
        rng = np.random.default_rng(n)
        y = (rng.random(n) < 0.5).astype(float)
        s = rng.normal(size=n) + y
        low, high = delong_interval(y, s)
        assert low < roc_auc(y, s) < high
        widths.append(high - low)
    assert widths[1] < widths[0] / 2.5  # about 1/sqrt(10)
    assert delong_interval(np.ones(5), np.arange(5.0)) is None
    # One case of a class: its DeLong component has no variance estimate; no interval.
    assert delong_interval(np.r_[np.ones(15), 0.0], np.arange(16.0)) is None


def test_delong_interval_covers_the_true_auc_about_95_percent_of_the_time() -> None:
    # Scores N(0,1) vs N(1,1): true AUC = Phi(1 / sqrt 2).
    true_auc = 0.5 * (1 + math.erf(0.5))
    rng = np.random.default_rng(7)
    covered = 0
    for _ in range(300):
        y = np.r_[np.zeros(60), np.ones(60)]
        s = rng.normal(size=120) + y
        low, high = delong_interval(y, s)
        covered += low <= true_auc <= high
    assert 0.90 <= covered / 300 <= 0.99


def test_expected_calibration_error_by_hand() -> None:
    result = calibration(np.array([0, 1, 1, 1.0]), np.array([0.1, 0.1, 0.9, 0.9]))
    # Bin 1: predicted 0.1, observed 0.5 (gap 0.4); bin 9: 0.9 vs 1.0 (gap 0.1); half each.
    assert result["ece"] == pytest.approx(0.25)
    assert [b["bin"] for b in result["bins"]] == [1, 9]
    rng = np.random.default_rng(0)
    p = rng.random(20000)
    calibrated = calibration((rng.random(20000) < p).astype(float), p)
    assert calibrated["ece"] < 0.02


def test_clinical_metrics_carry_the_interval_and_calibration() -> None:
    y = np.array([0, 0, 1, 1, 0, 1.0])
    p = np.array([0.1, 0.4, 0.35, 0.8, 0.2, 0.9])
    metrics = clinical_metrics(y, p)
    assert set(UNCERTAINTY_METRICS) <= set(metrics)
    assert metrics["auc_low"] <= metrics["auc"] <= metrics["auc_high"]
    one_class = clinical_metrics(np.ones(3), np.array([0.2, 0.5, 0.9]))
    assert one_class["auc_low"] is None and one_class["ece"] is not None


def test_margin_interval_is_conservative_sum_of_variances() -> None:
    result = margin([(0.8, 0.01, 0.7, 0.01), (0.9, 0.0004, 0.85, 0.0004)])
    assert result["mean"] == pytest.approx(0.075)
    half = 1.959963984540054 * math.sqrt(0.0208) / 2
    assert result["low"] == pytest.approx(0.075 - half)
    assert margin([]) is None


def hospital(**fields) -> dict:
    entry = {"name": "h", "byzantine": False, "auc": 0.8, "accuracy": 0.9}
    entry |= {"majority_accuracy": 0.5, "n_test": 60, "n_test_positives": 30}
    return entry | fields


@pytest.mark.parametrize(("positives", "warned"), [(30, False), (10, False), (9, True), (51, True)])
def test_fewer_than_ten_of_a_class_warns_that_the_auc_is_not_informative(positives, warned):
    warnings = hospital_warnings(hospital(n_test_positives=positives), None)
    flagged = [w for w in warnings if "AUC is not informative" in w]
    assert bool(flagged) is warned, warnings


def test_a_survival_split_with_few_deaths_is_warned_about() -> None:
    few = {"name": "r", "c_index": 0.9, "events": 3, "n_test": 33}
    assert any("only 3 death(s)" in w for w in hospital_warnings(few, None))
    enough = {"name": "r", "c_index": 0.8, "events": 14, "n_test": 63}
    assert hospital_warnings(enough, None) == []


def test_report_shows_intervals_ece_and_the_reliability_plot(tmp_path: Path) -> None:
    bins = [{"bin": 2, "n": 10, "predicted": 0.25, "observed": 0.3}]
    h = hospital(auc_low=0.7, auc_high=0.9, ece=0.042, reliability=bins, history=[])
    page = write_html_report({"hospitals": [h]}, tmp_path).read_text()
    assert "Uncertainty and calibration" in page and "0.700 to 0.900" in page
    assert "0.042" in page and 'src="reliability.png"' in page
    assert (tmp_path / "reliability.png").stat().st_size > 1000
