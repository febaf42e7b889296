"""Personalization (models/personal.py): a Ditto model per hospital that never leaves it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import murmur.node.sharing as sharing_module
import numpy as np
import pytest
import torch
from murmur.models.params import flatten, get_state, state_sha256
from murmur.models.personal import PersonalModel
from murmur.models.training import TrainingSettings

from tests.netutil import run_in_process

HEART = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "heart_disease"
needs_heart = pytest.mark.skipif(
    not HEART.is_dir(), reason=f"needs the Fed-Heart-Disease files in {HEART}"
)


def _rows(n: int = 40, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    g = np.random.default_rng(seed)
    x = g.normal(size=(n, 3)).astype(np.float32)
    y = (x[:, 0] + 0.3 * g.normal(size=n) > 0.5).astype(np.float32)
    return x, y


def test_ditto_is_local_training_at_mu_zero_and_the_shared_model_as_mu_grows() -> None:
    x, y = _rows()
    shared = torch.nn.Linear(3, 1)
    anchor = get_state(shared)
    settings = TrainingSettings(learning_rate=0.1, local_epochs=3)
    distances = {}
    for mu in (0.0, 1.0, 10.0):
        personal = PersonalModel(shared, x, y, settings, mu=mu)
        for _ in range(5):
            personal.train_round(anchor)
        distances[mu] = float(np.linalg.norm(flatten(get_state(personal.model)) - flatten(anchor)))
    assert distances[0.0] > distances[1.0] > distances[10.0]
    assert distances[10.0] < 0.2 * distances[0.0]
    assert get_state(shared)["weight"].tolist() == anchor["weight"].tolist()  # untouched


def test_personal_state_round_trips_through_the_checkpoint_form() -> None:
    x, y = _rows()
    shared = torch.nn.Linear(3, 1)
    a = PersonalModel(shared, x, y, TrainingSettings(learning_rate=0.5), mu=0.1)
    a.train_round(get_state(shared))
    b = PersonalModel(shared, x, y, TrainingSettings(learning_rate=0.5), mu=0.1)
    b.load_state(a.state())
    assert state_sha256(get_state(a.model)) == state_sha256(get_state(b.model))
    with pytest.raises(ValueError, match="does not fit"):
        b.load_state({"model": {}, "trainer": b""})


@needs_heart
def test_personal_models_never_leave_their_node_and_are_reported_beside_the_shared(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sent: list[tuple[str, dict[str, np.ndarray]]] = []
    original = sharing_module.build_envelope

    def recording(update: Any, identity: Any, *args: Any, **kwargs: Any) -> bytes:
        sent.append((identity.name, {k: np.array(v) for k, v in update.tensors.items()}))
        return original(update, identity, *args, **kwargs)

    monkeypatch.setattr(sharing_module, "build_envelope", recording)
    personal_states: dict[str, list[str]] = {}
    original_train = PersonalModel.train_round

    def train_and_remember(self: PersonalModel, shared_state: Any) -> None:
        original_train(self, shared_state)
        # which node: the personal trainer's rows are that node's training rows
        personal_states.setdefault(str(id(self)), []).append(state_sha256(get_state(self.model)))

    monkeypatch.setattr(PersonalModel, "train_round", train_and_remember)
    argv = ["--dataset", "heart-disease", "--no-dp", "--rounds", "3", "--personalize", "ditto"]
    # Batches smaller than every site (Switzerland has 30 patients): with one full batch per
    # round, round 1's personal model would equal the shared one by construction.
    argv += ["--personal-mu", "0.1", "--aggregator", "mean", "--batch-size", "8"]
    report, hospitals = run_in_process(argv, tmp_path)

    sent_hashes = {state_sha256(tensors) for _, tensors in sent}
    every_personal = {h for states in personal_states.values() for h in states}
    assert len(sent) == 4 * 3 and len(every_personal) == 4 * 3
    assert not sent_hashes & every_personal  # no envelope ever carried a personal model
    for h in hospitals:
        assert h.study.personal is not None
        final_personal = state_sha256(get_state(h.study.personal.model))
        assert final_personal != state_sha256(get_state(h.model))
    for entry in report["hospitals"]:
        assert set(entry["personal"]) >= {"auc", "accuracy"}
        assert entry["personal"]["auc"] is not None
    by_name = {e["name"]: e for e in report["hospitals"]}
    assert {"switzerland", "va"} <= set(by_name)  # the non-IID test cases are reported


@needs_heart
def test_under_dp_the_personal_steps_share_the_one_budget(tmp_path: Path) -> None:
    argv = ["--dataset", "heart-disease", "--dp-epsilon", "1", "--rounds", "2"]
    argv += ["--personalize", "ditto"]
    _, hospitals = run_in_process(argv, tmp_path)
    for h in hospitals:
        per_round = h.study.trainer.steps_per_round() + h.study.personal.steps_per_round()
        assert h.ledger.planned_steps == per_round * 2
        assert h.ledger.steps_taken == per_round * 2
        assert h.ledger.epsilon_spent() <= 1.0 + 1e-9
