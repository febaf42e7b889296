"""Strong and honest baselines: the tuned reference, no local model for one-class sites, and
the federation's margin over local-only with an interval."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from murmur.models.baselines import local_baseline, no_local_model, run_baselines
from murmur.models.data import HospitalSplit
from murmur.models.reference import reference_baseline
from murmur.models.training import TrainingSettings
from murmur.models.uncertainty import federation_margins
from murmur.node.report import write_html_report

HEART = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "heart_disease"


def site(name: str, n: int, seed: int, positives: float | None = None) -> HospitalSplit:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 4)).astype(np.float32)
    y = (x[:, 0] + 0.5 * rng.normal(size=n) > 0).astype(np.float32)
    if positives is not None:
        y[: int(n * 0.7)] = positives  # the training part below is one class
    cut = int(n * 0.7)
    return HospitalSplit(name, x[:cut], y[:cut], x[cut:], y[cut:])


def test_a_one_class_training_split_has_no_local_model() -> None:
    splits = [site("a", 80, 0), site("swiss", 40, 1, positives=1.0)]
    result = local_baseline(splits, "logreg", {}, TrainingSettings(), rounds=3, seed=0)
    a, swiss = result["hospitals"]
    assert a["auc"] is not None and "no_model" not in a
    assert swiss["auc"] is None and "all positive" in swiss["no_model"]
    assert result["mean_auc"] == a["auc"]  # the site without a model does not count
    assert no_local_model(splits[0]) is None


def test_the_reference_is_tuned_on_training_rows_only() -> None:
    splits = [site("a", 120, 0), site("b", 90, 1)]
    first = reference_baseline(splits, seed=0)
    assert first["C"] > 0 and all(0.7 < h["auc"] <= 1 for h in first["hospitals"])
    # Scrambling every test row changes the test metrics but not the fitted model.
    scrambled = [
        HospitalSplit(s.name, s.x_train, s.y_train, s.x_test[::-1], 1 - s.y_test) for s in splits
    ]
    second = reference_baseline(scrambled, seed=0)
    assert second["C"] == first["C"]
    assert [h["threshold"] for h in second["hospitals"]] == [
        h["threshold"] for h in first["hospitals"]
    ]
    assert first["mean_auc"] - second["mean_auc"] > 0.2  # the test rows did change


def test_margin_with_and_without_one_class_sites() -> None:
    hospitals = [
        {"name": "a", "auc": 0.80, "auc_se": 0.05},
        {"name": "b", "auc": 0.90, "auc_se": 0.02},
        {"name": "swiss", "auc": 0.70, "auc_se": 0.10},
    ]
    local = [
        {"name": "a", "auc": 0.75, "auc_se": 0.05},
        {"name": "b", "auc": 0.80, "auc_se": 0.02},
        {"name": "swiss", "auc": None, "no_model": "one class"},
    ]
    margins = federation_margins(hospitals, local)
    without, with_sites = margins["without_one_class_sites"], margins["with_one_class_sites"]
    assert without["mean"] == pytest.approx(0.075) and without["hospitals"] == 2
    assert with_sites["mean"] == pytest.approx((0.05 + 0.10 + 0.20) / 3)
    assert with_sites["hospitals"] == 3 and margins["one_class_sites"] == ["swiss"]
    assert without["low"] < without["mean"] < without["high"]
    # One negative test patient (Switzerland): DeLong is undefined, the bound stands in.
    hospitals[2] = {"name": "swiss", "auc": 0.9, "auc_se": None, "n_test": 16}
    hospitals[2]["n_test_positives"] = 15
    bounded = federation_margins(hospitals, local)["with_one_class_sites"]
    assert bounded["hospitals"] == 3
    expected = (0.05**2 * 2 + 0.02**2 * 2 + 0.9 * 0.1 / 1) / 9
    assert bounded["high"] - bounded["mean"] == pytest.approx(1.959963984540054 * expected**0.5)


def test_report_says_no_local_model_and_quotes_the_margin(tmp_path: Path) -> None:
    hospital = {"name": "swiss", "byzantine": False, "auc": 0.7, "history": []}
    report = {
        "hospitals": [hospital],
        "baselines": {
            "rounds": 3,
            "local": {"mean_auc": None, "hospitals": [{"name": "swiss", "no_model": "x"}]},
            "reference": {"mean_auc": 0.8, "C": 0.1, "hospitals": [{"name": "swiss", "auc": 0.8}]},
        },
        "federation_margin": {
            "against": "local",
            "without_one_class_sites": None,
            "with_one_class_sites": {"mean": 0.2, "low": 0.0, "high": 0.4, "hospitals": 1},
            "one_class_sites": ["swiss"],
        },
    }
    page = write_html_report(report, tmp_path).read_text()
    assert "no local model (one class)" in page and "tuned L2 logistic regression" in page
    assert "counting one-class hospitals against a constant (AUC 0.5): 0.200" in page
    assert "swiss had one class in training" in page


@pytest.mark.skipif(
    not (HEART / "processed.switzerland.data").exists(),
    reason=f"Fed-Heart-Disease files not found in {HEART} (see shared/data SOURCE.md)",
)
def test_switzerland_has_no_local_model_and_the_reference_is_reported() -> None:
    result = run_baselines(
        {"name": "heart-disease"}, "logreg", {}, TrainingSettings(learning_rate=0.5), 2, seed=0
    )
    local = {h["name"]: h for h in result["local"]["hospitals"]}
    assert "all positive" in local["switzerland"]["no_model"]
    assert local["cleveland"]["auc"] is not None
    assert 0.75 < result["reference"]["mean_auc"] < 1
