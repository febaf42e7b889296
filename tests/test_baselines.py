"""Local-only and pooled baselines on real data (scikit-learn's bundled breast cancer set)."""

from __future__ import annotations

from typing import Any, ClassVar

import murmur.models.baselines as baselines
import numpy as np
import pytest
from murmur.models.data import HospitalSplit, load_dataset
from murmur.models.training import LocalTrainer, TrainingSettings

DATASET: dict[str, Any] = {"name": "breast-cancer", "num_hospitals": 3, "seed": 0}
ROUNDS = 3
SETTINGS = TrainingSettings(batch_size=32, learning_rate=0.05, local_epochs=2, seed=0)


class RecordingTrainer(LocalTrainer):
    """A real LocalTrainer that remembers what it was given and how often it trained."""

    created: ClassVar[list[RecordingTrainer]] = []

    def __init__(self, model: Any, x: np.ndarray, y: np.ndarray, settings: Any, ledger: Any):
        super().__init__(model, x, y, settings, ledger)
        self.x_seen, self.y_seen, self.ledger_seen = x.copy(), y.copy(), ledger
        self.settings_seen = settings
        self.train_round_calls = 0
        RecordingTrainer.created.append(self)

    def train_round(self, *args: Any, **kwargs: Any) -> Any:
        self.train_round_calls += 1
        return super().train_round(*args, **kwargs)


@pytest.fixture(scope="module")
def run() -> tuple[dict[str, Any], list[RecordingTrainer]]:
    with pytest.MonkeyPatch.context() as patch:
        RecordingTrainer.created = []
        patch.setattr(baselines, "LocalTrainer", RecordingTrainer)
        result = baselines.run_baselines(DATASET, "logreg", {}, SETTINGS, ROUNDS, seed=0)
    return result, RecordingTrainer.created


def test_both_baselines_cover_every_hospital(run: tuple[dict[str, Any], list[Any]]):
    result, _ = run
    names = [split.name for split in load_dataset(**DATASET)]

    assert set(result) == {"local", "pooled", "reference"}  # reference: tuned scikit-learn
    for kind in ("local", "pooled", "reference"):
        entries = result[kind]["hospitals"]
        assert [e["name"] for e in entries] == names
        for entry in entries:
            assert 0.0 <= entry["auc"] <= 1.0
            assert 0.0 <= entry["accuracy"] <= 1.0
            assert 0.0 <= entry["majority_accuracy"] <= 1.0
            assert 0.0 <= entry["threshold"] <= 1.0
        assert result[kind]["mean_auc"] == pytest.approx(np.mean([e["auc"] for e in entries]))


def test_pooled_model_learns_this_easy_data(run: tuple[dict[str, Any], list[Any]]):
    result, _ = run

    assert result["pooled"]["mean_auc"] > 0.9
    for entry in result["pooled"]["hospitals"]:
        assert entry["accuracy"] > entry["majority_accuracy"]


def test_local_baseline_trains_each_hospital_on_its_own_rows_only(
    run: tuple[dict[str, Any], list[RecordingTrainer]],
):
    result, trainers = run
    splits = load_dataset(**DATASET)

    assert len(trainers) == len(splits) + 1  # one per hospital, then the pooled model
    for split, trainer, entry in zip(splits, trainers, result["local"]["hospitals"], strict=False):
        assert np.array_equal(trainer.x_seen, split.x_train)
        assert np.array_equal(trainer.y_seen, split.y_train)
        assert entry["n_train"] == len(split.y_train)
        assert entry["n_test"] == len(split.y_test)


def test_pooled_baseline_trains_once_on_all_rows(
    run: tuple[dict[str, Any], list[RecordingTrainer]],
):
    result, trainers = run
    splits = load_dataset(**DATASET)
    pooled = trainers[-1]

    assert np.array_equal(pooled.x_seen, np.concatenate([s.x_train for s in splits]))
    assert np.array_equal(pooled.y_seen, np.concatenate([s.y_train for s in splits]))
    assert all(e["n_train"] == len(pooled.y_seen) for e in result["pooled"]["hospitals"])


def test_same_epochs_as_the_nodes_and_no_dp(run: tuple[dict[str, Any], list[RecordingTrainer]]):
    _, trainers = run

    for trainer in trainers:
        assert trainer.ledger_seen is None
        assert trainer.train_round_calls == ROUNDS
        assert trainer.settings_seen.local_epochs == SETTINGS.local_epochs
        assert trainer.settings_seen.fedprox_mu == 0.0


def _split(name: str, y_test: list[float], seed: int) -> HospitalSplit:
    rng = np.random.default_rng(seed)
    y_train = np.array([0.0, 1.0] * 20, dtype=np.float32)
    x_train = (rng.normal(size=(40, 3)) + y_train[:, None] * 2).astype(np.float32)
    y = np.array(y_test, dtype=np.float32)
    x_test = (rng.normal(size=(len(y), 3)) + y[:, None] * 2).astype(np.float32)
    return HospitalSplit(name, x_train, y_train, x_test, y)


def test_undefined_auc_is_null_and_left_out_of_the_mean():
    splits = [_split("two_classes", [0, 1, 0, 1, 1, 0], 1), _split("one_class", [1, 1, 1, 1], 2)]

    result = baselines.local_baseline(splits, "logreg", {}, SETTINGS, 2, seed=0)

    one_class = result["hospitals"][1]
    assert one_class["auc"] is None
    assert one_class["specificity"] is None  # no negative patients to be specific about
    assert result["mean_auc"] == result["hospitals"][0]["auc"]


def test_pooling_hospitals_with_different_features_is_refused():
    odd = _split("odd", [0, 1], 3)
    odd = HospitalSplit(
        "odd", odd.x_train[:, :2].copy(), odd.y_train, odd.x_test[:, :2].copy(), odd.y_test
    )

    with pytest.raises(ValueError, match="different feature shapes"):
        baselines.pooled_baseline([_split("a", [0, 1], 4), odd], "logreg", {}, SETTINGS, 1, seed=0)


def test_dataset_name_is_required():
    with pytest.raises(ValueError, match="no 'name'"):
        baselines.run_baselines({"num_hospitals": 3}, "logreg", {}, SETTINGS, 1, seed=0)
