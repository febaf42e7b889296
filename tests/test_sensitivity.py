"""DP-SGD's sensitivity, measured on neighbouring datasets (issue #15, item 2).

The accountant assumes that adding or removing one patient moves a step's clipped gradient sum
by at most C (max_grad_norm) when that patient is in the batch, and not at all when it is not.
That holds only if nothing else in the training path depends on the other patients. Each test
here builds neighbouring datasets D and D + {x} (x a real held-out patient), takes one step's
clipped sum over the SAME batch of patients, with x sampled and not, and checks both bounds.

The controls show what the tests catch: with `class_weighting = "balanced"` (the old default,
now refused under DP) or with features standardised on the training rows, the clipped sum
moves by more than C, and moves even when x is not sampled.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from murmur.models import csv_data, data
from murmur.models.data import HospitalSplit, load_dataset
from murmur.models.dp_sgd import DPSGDGradient, PerSampleLoss
from murmur.models.nets import build_model
from murmur.models.privacy import PrivacyLedger
from murmur.models.training import LocalTrainer, TrainingSettings, predict_proba
from murmur.node.config import load_config
from murmur.node.node import HospitalNode
from torch import nn

from tests.netutil import make_network
from tests.test_data import HEART_DIR, clinic_rows, needs_heart, write_csv, write_reference

C = 1.0
UNSAMPLED_TOLERANCE = 1e-6  # float noise; the mechanism allows exactly 0


def clipped_sum(model: nn.Module, loss_fn: PerSampleLoss, x: np.ndarray, y: np.ndarray):
    """sum_i clip_C(g_i) over the rows given: one DP-SGD step with the noise turned off."""
    dp = DPSGDGradient(
        model, loss_fn, max_grad_norm=C, noise_multiplier=0.0, expected_batch_size=1.0
    )
    try:
        dp.compute(torch.as_tensor(x), torch.as_tensor(y))
    finally:
        dp.close()
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def training_loss(model: nn.Module, x, y, settings: TrainingSettings, private: bool):
    """The per-sample loss LocalTrainer builds for these rows, with or without DP."""
    trainer = LocalTrainer(copy.deepcopy(model), x, y, settings)
    if private:
        trainer.ledger = PrivacyLedger(
            noise_multiplier=1.0,
            sample_rate=trainer.sample_rate(),
            delta=1e-5,
            epsilon_budget=1.0,
            max_grad_norm=C,
        )
    return trainer.loss_fn


@dataclasses.dataclass
class Neighbours:
    """D's training rows, D + {x}'s (x appended last, so every other patient keeps its index),
    a model, and one step's batch of D's indices."""

    model: nn.Module
    x: np.ndarray
    y: np.ndarray
    x_more: np.ndarray
    y_more: np.ndarray
    batch: np.ndarray

    def movement(self, loss_d: PerSampleLoss, loss_more: PerSampleLoss) -> tuple[float, float]:
        """||S(D + x, batch + x) - S(D, batch)|| and ||S(D + x, batch) - S(D, batch)||, in C."""
        base = clipped_sum(self.model, loss_d, self.x[self.batch], self.y[self.batch])
        sampled_rows = np.r_[self.batch, len(self.y)]
        sampled = clipped_sum(
            self.model, loss_more, self.x_more[sampled_rows], self.y_more[sampled_rows]
        )
        unsampled = clipped_sum(
            self.model, loss_more, self.x_more[self.batch], self.y_more[self.batch]
        )
        return (sampled - base).norm().item() / C, (unsampled - base).norm().item() / C


def add_test_patient(split: HospitalSplit, label: float, model: nn.Module, q: float) -> Neighbours:
    """D = the hospital's training rows; x = its first held-out patient with this label."""
    k = int(np.flatnonzero(split.y_test == label)[0])
    batch = np.flatnonzero(np.random.default_rng(1).random(len(split.y_train)) < q)
    return Neighbours(
        model,
        split.x_train,
        split.y_train,
        np.concatenate([split.x_train, split.x_test[k : k + 1]]),
        np.r_[split.y_train, split.y_test[k]].astype(np.float32),
        batch,
    )


def switzerland() -> Neighbours:
    """Switzerland trains on 30 diseased patients; x is its one healthy held-out patient. With
    every patient in the batch (q = 1 for 30 rows at batch 32), at the initial model."""
    centre = load_dataset("heart-disease", path=HEART_DIR, preprocessing="reference")[2]
    assert centre.name == "switzerland" and centre.y_train.min() == 1.0
    return add_test_patient(centre, 0.0, build_model("logreg", centre.input_shape, 0), q=1.0)


def breast_cancer() -> Neighbours:
    """A simulated hospital (36% malignant) plus one malignant held-out patient, at a model
    trained for 5 epochs so that many patients' gradients are small (unclipped)."""
    split = load_dataset("breast-cancer", num_hospitals=4, seed=0, preprocessing="reference")[0]
    model = build_model("logreg", split.input_shape, 0)
    settings = TrainingSettings(learning_rate=0.5, local_epochs=5, class_weighting="none")
    LocalTrainer(model, split.x_train, split.y_train, settings).train_round()
    return add_test_patient(split, 1.0, model, q=32 / len(split.y_train))


SCENARIOS = {"switzerland": switzerland, "breast-cancer": breast_cancer}
DP_SETTINGS = {
    "default (auto)": TrainingSettings(),
    "none": TrainingSettings(class_weighting="none"),
    "fixed class_weights": TrainingSettings(class_weights=(1.0, 3.0)),
    "focal, fixed weights": TrainingSettings(loss="focal", class_weights=(2.0, 1.0)),
}


@needs_heart
@pytest.mark.parametrize("scenario", SCENARIOS)
@pytest.mark.parametrize("name", DP_SETTINGS)
def test_one_patient_moves_the_dp_clipped_sum_by_at_most_c(scenario: str, name: str) -> None:
    pair, settings = SCENARIOS[scenario](), DP_SETTINGS[name]
    loss_d = training_loss(pair.model, pair.x, pair.y, settings, private=True)
    loss_more = training_loss(pair.model, pair.x_more, pair.y_more, settings, private=True)
    sampled, unsampled = pair.movement(loss_d, loss_more)
    assert sampled <= 1 + 1e-5
    assert sampled > 0.05  # x itself contributes: the measurement is not trivially 0
    assert unsampled <= UNSAMPLED_TOLERANCE


@needs_heart
def test_balanced_class_weights_move_the_clipped_sum_past_c_the_control() -> None:
    # The old default. Without DP it is still allowed; these numbers are why DP refuses it.
    balanced = TrainingSettings(class_weighting="balanced")
    moves = {}
    for scenario, make in SCENARIOS.items():
        pair = make()
        loss_d = training_loss(pair.model, pair.x, pair.y, balanced, private=False)
        loss_more = training_loss(pair.model, pair.x_more, pair.y_more, balanced, private=False)
        moves[scenario] = pair.movement(loss_d, loss_more)
    # Switzerland: its one healthy patient halves every diseased patient's weight.
    sampled, unsampled = moves["switzerland"]
    assert sampled > 2.0 and unsampled > 1.5, moves  # measured 2.91 C and 2.02 C
    # A balanced hospital: far smaller, but not 0 when x is not even in the batch.
    assert moves["breast-cancer"][1] > 1000 * UNSAMPLED_TOLERANCE, moves  # measured 0.018 C
    with pytest.raises(ValueError, match=r"'balanced' computes loss weights.*fix:"):
        training_loss(pair.model, pair.x, pair.y, balanced, private=True)


# --- preprocessing ---------------------------------------------------------------------------


def csv_neighbours(tmp_path: Path) -> tuple[Path, Path, Path, list[str]]:
    """D: one site's 60 patients (missing ages and smoking status included); D + {x}: the same
    file with one more patient, whose age is far from the others'."""
    rows = clinic_rows("north", 60, 1)
    extra = ["97.0", "yes", "B", "1", "north"]
    before = write_csv(tmp_path / "before.csv", rows)
    after = write_csv(tmp_path / "after.csv", [*rows, extra])
    return before, after, write_reference(tmp_path / "reference.csv"), extra


def test_reference_preprocessing_leaves_every_other_patient_bit_identical(tmp_path: Path) -> None:
    before, after, reference, _ = csv_neighbours(tmp_path)
    kwargs = {"label": "outcome", "site": "site", "preprocessing": "reference"}
    (d,) = load_dataset("csv", path=before, reference=reference, **kwargs)
    (more,) = load_dataset("csv", path=after, reference=reference, **kwargs)
    # The per-row split keeps every other patient on its side, in its order; x comes last.
    joined = len(more.y_train) - len(d.y_train)
    assert joined in (0, 1) and len(more.y_test) - len(d.y_test) == 1 - joined
    np.testing.assert_array_equal(more.x_train[: len(d.y_train)], d.x_train)
    np.testing.assert_array_equal(more.x_test[: len(d.y_test)], d.x_test)
    assert more.x_train[: len(d.y_train)].tobytes() == d.x_train.tobytes()  # bit for bit


def test_fitted_preprocessing_moves_every_other_patient_the_control(tmp_path: Path) -> None:
    before, _, reference, extra = csv_neighbours(tmp_path)
    (d,) = load_dataset(
        "csv", path=before, label="outcome", site="site", preprocessing="reference",
        reference=reference,
    )  # fmt: skip
    # The same training patients, plus x, encoded the two ways the loader can.
    table = csv_data._read_csv_with_site(before, "outcome", "site")[0]
    train, test = data.row_split_positions(
        "north", table.cells, table.y, test_fraction=0.25, seed=0
    )
    cells = np.asarray(table.cells, dtype=object)
    with_x = np.concatenate([cells[train], np.asarray([extra[:3]], dtype=object)])
    kinds = {column: "numeric" if column == "patient_age" else "categorical"
             for column in table.columns}  # fmt: skip
    refs = csv_data.read_reference(reference)
    y_more = np.r_[table.y[train], 1.0].astype(np.float32)
    model = build_model("logreg", d.input_shape, 0)
    settings = TrainingSettings()
    moves = {}
    for mode, columns in (("reference", refs), ("fitted", None)):
        x_d, _, _ = csv_data._encode_features(
            cells[train], cells[test], table.columns, kinds, "n", columns
        )
        x_more, _, _ = csv_data._encode_features(
            with_x, cells[test], table.columns, kinds, "n", columns
        )
        others_same = np.array_equal(x_more[:-1], x_d)
        assert others_same == (mode == "reference"), mode
        if mode == "reference":
            np.testing.assert_array_equal(x_d, d.x_train)  # what the loader gives
        pair = Neighbours(model, x_d, table.y[train], x_more, y_more, np.arange(len(x_d)))
        loss = training_loss(model, x_d, table.y[train], settings, private=True)
        moves[mode] = pair.movement(loss, loss)
    assert moves["reference"][0] <= 1 + 1e-5 and moves["reference"][1] <= UNSAMPLED_TOLERANCE
    # One more patient shifts the training mean and std of age, so every row's gradient moves:
    # measured 1.57 C with x sampled, 0.63 C without.
    assert moves["fitted"][0] > 1 + 1e-3 and moves["fitted"][1] > 1000 * UNSAMPLED_TOLERANCE, moves


# --- what evaluation publishes ----------------------------------------------------------------


@pytest.mark.parametrize("private", [True, False])
def test_dp_metrics_use_nothing_from_the_training_rows(tmp_path: Path, private: bool) -> None:
    network = make_network(
        tmp_path,
        "--nodes",
        "2",
        "--rounds",
        "2",
        "--aggregator",
        "mean",
        *([] if private else ["--no-dp"]),
    )
    node = HospitalNode(load_config(network.nodes[0].config_path))
    try:
        metrics = node.study.evaluate()
        train_scores = predict_proba(node.model, node.data.x_train)
        # Other training rows (labels flipped, features shuffled), the same model.
        node.study.data = dataclasses.replace(
            node.data,
            x_train=node.data.x_train[::-1].copy(),
            y_train=(1 - node.data.y_train).astype(np.float32),
        )
        changed = node.study.evaluate()
    finally:
        node.audit.close()
    if private:
        assert metrics == changed  # nothing published depends on the training rows
        assert metrics["threshold"] == 0.5 and metrics["threshold"] not in set(train_scores)
        test_majority = int(2 * node.data.y_test.sum() >= len(node.data.y_test))
        assert metrics["majority_class"] == test_majority
    else:
        # Without DP: Youden's J on the training rows, one training patient's score.
        assert metrics["threshold"] in set(train_scores.tolist())
        assert metrics["majority_class"] != changed["majority_class"]
