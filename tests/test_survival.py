"""Survival analysis: the Cox losses, Harrell's C (against lifelines), DP, TCGA-BRCA, report."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from murmur.models.data import DataError, HospitalSplit, default_data_path, load_dataset
from murmur.models.dp_sgd import DPSGDGradient
from murmur.models.nets import build_model
from murmur.models.privacy import PrivacyLedger
from murmur.models.survival import (
    concordance_index,
    concordance_interval,
    cox_breslow_losses,
    exponential_losses,
    make_survival_loss,
    survival_metrics,
)
from murmur.models.training import LocalTrainer, TrainingSettings, evaluate

lifelines = pytest.importorskip("lifelines", reason="lifelines is a test dependency (pyproject)")


def synthetic(n: int, seed: int, features: int = 3, ties: bool = False) -> tuple[np.ndarray, ...]:
    """Exponential survival times with hazard exp(x . beta), random censoring."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, features))
    beta = np.linspace(1.0, -0.5, features)
    death = rng.exponential(365.0 / np.exp(x @ beta))
    censor = rng.exponential(500.0, size=n)
    times = np.minimum(death, censor) + 1.0
    if ties:
        times = np.ceil(times / 60.0) * 60.0  # two-monthly follow-up: many tied times
    events = (death <= censor).astype(float)
    return x.astype(np.float32), times, events, beta


@pytest.mark.parametrize("ties", [False, True])
def test_concordance_index_matches_lifelines(ties: bool) -> None:
    from lifelines.utils import concordance_index as lifelines_c

    for seed in range(5):
        x, times, events, beta = synthetic(80, seed, ties=ties)
        risk = np.round(x @ beta + np.random.default_rng(seed).normal(size=80), 1)  # tied risks
        ours = concordance_index(times, risk, events)
        assert ours == pytest.approx(lifelines_c(times, -risk, events), abs=1e-12)


def test_concordance_index_is_undefined_without_a_comparable_pair() -> None:
    assert concordance_index(np.array([5.0, 9.0]), np.array([1.0, 2.0]), np.zeros(2)) is None
    assert concordance_interval(np.array([5.0, 9.0]), np.array([1.0, 2.0]), np.zeros(2)) is None
    metrics = survival_metrics(np.array([[5.0, 0.0], [9.0, 0.0]]), np.array([1.0, 2.0]))
    assert metrics["c_index"] is None and metrics["events"] == 0


def test_bootstrap_interval_brackets_the_estimate_and_narrows_with_more_patients() -> None:
    widths = []
    for n in (40, 400):
        x, times, events, beta = synthetic(n, 1)
        risk = x @ beta
        low, high = concordance_interval(times, risk, events)
        c = concordance_index(times, risk, events)
        assert low <= c <= high and c > 0.5
        widths.append(high - low)
    assert widths[1] < widths[0] / 2


def test_breslow_partial_likelihood_equals_a_direct_computation_with_ties() -> None:
    x, times, events, _ = synthetic(30, 2, ties=True)
    eta = torch.tensor(x[:, 0], dtype=torch.float64)
    labels = torch.tensor(np.c_[times, events])
    total = cox_breslow_losses(eta, labels).sum().item()
    direct = 0.0
    for i in range(30):
        if events[i]:
            at_risk = times >= times[i]
            direct += math.log(np.exp(eta.numpy()[at_risk]).sum()) - eta[i].item()
    assert total == pytest.approx(direct, rel=1e-10)


def test_training_on_the_partial_likelihood_recovers_lifelines_cox_coefficients() -> None:
    import pandas as pd
    from lifelines import CoxPHFitter

    x, times, events, _ = synthetic(300, 3)  # continuous times: Breslow = Efron
    frame = pd.DataFrame(x, columns=["a", "b", "c"]).assign(T=times, E=events)
    expected = CoxPHFitter().fit(frame, "T", "E").params_.to_numpy()
    model = build_model("cox", (3,), seed=0)
    labels = torch.tensor(np.c_[times, events], dtype=torch.float32)
    optimizer = torch.optim.LBFGS(model.parameters(), max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = cox_breslow_losses(model(torch.from_numpy(x)), labels).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    np.testing.assert_allclose(model.linear.weight.detach().numpy()[0], expected, atol=2e-3)


def test_only_the_exponential_loss_is_per_patient() -> None:
    """Removing patient 0 leaves every other patient's exponential term unchanged but moves
    Cox partial-likelihood terms of others: why DP refuses the partial likelihood."""
    x, times, events, beta = synthetic(20, 4)
    eta = torch.tensor(x @ beta)
    labels = torch.tensor(np.c_[times, events])
    longest = int(np.argmax(times))  # in every risk set
    keep = torch.arange(20) != longest
    for loss, per_patient in ((exponential_losses, True), (cox_breslow_losses, False)):
        full, without = loss(eta, labels)[keep], loss(eta[keep], labels[keep])
        assert torch.allclose(full, without) is per_patient


def test_dp_refuses_the_partial_likelihood_and_auto_picks_by_privacy() -> None:
    with pytest.raises(ValueError, match="risk sets"):
        make_survival_loss("cox", private=True)
    assert make_survival_loss("auto", private=True) is exponential_losses
    assert make_survival_loss("auto", private=False) is cox_breslow_losses


def test_config_refuses_the_partial_likelihood_under_dp() -> None:
    from murmur.node.config import ConfigError, parse_config

    raw = {
        "node": {"name": "a", "key_file": "a.key", "state_dir": "s"},
        "data": {"hospital": "region_0", "dataset": "tcga-brca"},
        "training": {"survival_loss": "cox"},
    }
    with pytest.raises(ConfigError, match=r"training.survival_loss .*risk sets"):
        parse_config(raw)
    parse_config({**raw, "privacy": {"enabled": False}})  # fine without DP
    raw["training"] = {"survival_loss": "weibull"}
    with pytest.raises(ConfigError, match="unknown survival loss 'weibull'"):
        parse_config(raw)


def survival_split(n: int = 200, seed: int = 5) -> HospitalSplit:
    x, times, events, _ = synthetic(n, seed)
    y = np.c_[times, events].astype(np.float32)
    half = n // 2
    return HospitalSplit("site", x[:half], y[:half], x[half:], y[half:])


@pytest.mark.parametrize("private", [False, True])
def test_a_node_trainer_learns_a_survival_model_with_and_without_dp(private: bool) -> None:
    split = survival_split()
    model = build_model("cox", split.input_shape, seed=0)
    settings = TrainingSettings(batch_size=32, learning_rate=0.5, local_epochs=2, seed=0)
    trainer = LocalTrainer(model, split.x_train, split.y_train, settings)
    if private:
        trainer.ledger = PrivacyLedger.plan(
            epsilon=8.0,
            delta=1e-5,
            n_patients=len(split.y_train),
            sample_rate=trainer.sample_rate(),
            planned_steps=trainer.steps_per_round() * 10,
            max_grad_norm=1.0,
        )
    for _ in range(10):
        stats = trainer.train_round()
    metrics = evaluate(model, split.x_train, split.y_train, split.x_test, split.y_test, None)
    assert metrics["c_index"] > 0.7  # the true risk score reaches about 0.75 here
    assert (stats.epsilon_spent is not None) is private
    if private:
        assert 0 < stats.epsilon_spent <= 8.0


def test_dp_per_sample_gradients_of_the_exponential_loss_are_each_patients_own() -> None:
    """The hooks engine's per-sample gradient of patient i equals the gradient of i's loss
    alone (so clipping it bounds i's influence), for a Cox model on survival labels."""
    split = survival_split(16)
    model = build_model("cox", split.input_shape, seed=1)
    dp = DPSGDGradient(
        model, exponential_losses, max_grad_norm=1.0, noise_multiplier=0.0, expected_batch_size=8
    )
    assert dp.engine == "hooks"
    x, y = torch.from_numpy(split.x_train), torch.from_numpy(split.y_train)
    grads, _ = dp.per_sample_gradients(x, y)
    for i in range(len(x)):
        model.zero_grad()
        exponential_losses(model(x[i : i + 1]), y[i : i + 1]).sum().backward()
        torch.testing.assert_close(grads[0][i], model.linear.weight.grad)
    dp.close()


def test_hospital_split_refuses_bad_survival_labels() -> None:
    x = np.zeros((2, 1), dtype=np.float32)
    bad = np.array([[10.0, 1.0], [0.0, 0.0]], dtype=np.float32)  # a time of 0
    with pytest.raises(DataError, match="time"):
        HospitalSplit("s", x, bad, x, bad)
    bad = np.array([[10.0, 2.0], [5.0, 0.0]], dtype=np.float32)
    with pytest.raises(DataError, match="event"):
        HospitalSplit("s", x, bad, x, bad)


def _tcga_or_skip() -> None:
    try:
        default_data_path("tcga-brca")
    except DataError as error:
        pytest.skip(f"TCGA-BRCA data not available beside the repo: {error}")


def test_tcga_brca_loads_flambys_six_regions_and_split() -> None:
    _tcga_or_skip()
    splits = load_dataset("tcga-brca")
    sizes = [(len(s.y_train), len(s.y_test)) for s in splits]
    assert sizes == [(248, 63), (156, 40), (164, 42), (129, 33), (129, 33), (40, 11)]
    assert splits[0].name == "region_0_northeast" and splits[5].name == "region_5_canada"
    assert all(s.input_shape == (39,) and s.task == "survival" for s in splits)
    assert sum(int(s.y_train[:, 1].sum() + s.y_test[:, 1].sum()) for s in splits) <= 151
    age = splits[0].x_train[:, splits[0].feature_names.index("age_at_index")]
    assert age.min() > -3 and age.max() < 3  # scaled by public constants


def test_survival_report_shows_c_index_with_intervals(tmp_path) -> None:
    from murmur.node.report import summary_table, write_html_report

    hospital = {
        "name": "region_0",
        "byzantine": False,
        "c_index": 0.81,
        "c_index_low": 0.7,
        "c_index_high": 0.9,
        "events": 14,
        "n_test": 63,
        "n_train": 248,
        "history": [{"round": 1, "auc": None, "c_index": 0.8}],
    }
    report = {"task": "survival", "mean_c_index": 0.81, "hospitals": [hospital]}
    report["baselines"] = {
        "local": {"mean_c_index": 0.7, "hospitals": [{**hospital, "c_index": 0.7}]}
    }
    page = write_html_report(report, tmp_path).read_text()
    assert "C-index murmur" in page and "0.700 to 0.900" in page and "Clinical metrics" not in page
    assert (tmp_path / "auc.png").exists()  # the per-round plot draws the C-index
    text = summary_table(report)
    assert "mean C-index (honest nodes): 0.810" in text
    assert "baseline mean C-index, local only, no DP: 0.700" in text


@pytest.mark.slow
def test_run_cluster_trains_six_tcga_regions_and_reports_their_c_index(tmp_path) -> None:
    import json
    import subprocess
    import sys
    from pathlib import Path

    _tcga_or_skip()
    root = Path(__file__).resolve().parents[1]
    command = [sys.executable, str(root / "run_cluster.py"), "--dataset", "tcga-brca"]
    command += ["--rounds", "2", "--no-dp", "--no-baselines", "--quiet", "--out", str(tmp_path)]
    finished = subprocess.run(command, cwd=root, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr[-2000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["task"] == "survival" and report["model"] == "cox"
    assert len(report["hospitals"]) == 6
    assert all(0 <= h["c_index"] <= 1 for h in report["hospitals"])
    assert report["mean_c_index"] > 0.5
    assert "mean C-index (honest nodes)" in finished.stdout
