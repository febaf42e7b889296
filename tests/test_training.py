"""Local training (models/training.py): losses, FedProx, threshold, budget stop, checkpoints."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from murmur.models.data import load_dataset
from murmur.models.nets import build_model
from murmur.models.privacy import BudgetExhausted, PrivacyLedger
from murmur.models.training import (
    LocalTrainer,
    TrainingSettings,
    choose_threshold,
    class_weights,
    make_loss,
    poisson_sample_rate,
    predict_proba,
    steps_per_epoch,
)
from sklearn.metrics import roc_auc_score
from torch import nn


@pytest.fixture(scope="module")
def hospital():
    return load_dataset("breast-cancer", num_hospitals=2, seed=0)[0]


def mlp(hospital, seed: int = 0) -> nn.Module:
    return build_model("mlp", hospital.input_shape, seed=seed)


def parameters(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def dp_trainer(hospital, settings: TrainingSettings, epsilon: float, rounds: int, seed: int = 0):
    model = mlp(hospital, seed)
    planner = LocalTrainer(model, hospital.x_train, hospital.y_train, settings)
    ledger = PrivacyLedger.plan(
        epsilon=epsilon,
        delta=None,
        n_patients=len(hospital.y_train),
        sample_rate=planner.sample_rate(),
        planned_steps=rounds * planner.steps_per_round(),
        accountant="rdp",
    )
    return LocalTrainer(model, hospital.x_train, hospital.y_train, settings, ledger)


# --------------------------------------------------------------------------- losses


def test_class_weights_balance_the_two_classes() -> None:
    y = np.array([0, 0, 0, 0, 0, 0, 1, 1], dtype=np.float32)
    w_neg, w_pos = class_weights(y)
    assert (w_neg, w_pos) == pytest.approx((8 / 12, 8 / 4))
    assert 6 * w_neg == pytest.approx(2 * w_pos)  # each class carries the same total weight
    assert class_weights(np.ones(5)) == (1.0, 1.0)


def test_weighted_bce_and_focal_losses() -> None:
    y = torch.tensor([0.0, 0.0, 0.0, 1.0])
    logits = torch.tensor([-3.0, 0.2, -0.1, 2.5])
    plain = nn.functional.binary_cross_entropy_with_logits(logits, y, reduction="none")
    weighted = make_loss(TrainingSettings(class_weighting="balanced"), y, private=False)(logits, y)
    torch.testing.assert_close(weighted, plain * torch.tensor([4 / 6, 4 / 6, 4 / 6, 2.0]))
    focal_zero = make_loss(
        TrainingSettings(loss="focal", focal_gamma=0, class_weighting="none"), y, private=False
    )
    torch.testing.assert_close(focal_zero(logits, y), plain)
    focal = make_loss(
        TrainingSettings(loss="focal", focal_gamma=2, class_weighting="none"), y, private=False
    )
    ratio = focal(logits, y) / plain
    # Focal loss shrinks well-classified examples (index 0, 3) far more than uncertain ones.
    assert ratio[0] < 0.01 and ratio[3] < 0.01 and ratio[1] > 0.25


def test_settings_reject_bad_values_by_name() -> None:
    for bad, message in [
        ({"batch_size": 0}, "batch_size"),
        ({"optimizer": "lbfgs"}, "optimizer"),
        ({"loss": "hinge"}, "loss"),
        ({"momentum": 1.0}, "momentum"),
        ({"fedprox_mu": -0.1}, "fedprox_mu"),
        ({"learning_rate": float("nan")}, "learning_rate"),
    ]:
        with pytest.raises(ValueError, match=message):
            TrainingSettings(**bad)


def test_trainer_rejects_unusable_data(hospital) -> None:
    model, settings = mlp(hospital), TrainingSettings()
    x, y = hospital.x_train, hospital.y_train
    with pytest.raises(ValueError, match="NaN"):
        LocalTrainer(
            model, np.where(np.arange(x.size).reshape(x.shape) == 3, np.nan, x), y, settings
        )
    with pytest.raises(ValueError, match="0 or 1"):
        LocalTrainer(model, x, y * 2, settings)
    with pytest.raises(ValueError, match="labels"):
        LocalTrainer(model, x, y[:-1], settings)
    with pytest.raises(ValueError, match="no training rows"):
        LocalTrainer(model, x[:0], y[:0], settings)


# --------------------------------------------------------------------------- sampling, training


def test_poisson_batches_average_the_expected_batch_size(hospital) -> None:
    trainer = LocalTrainer(mlp(hospital), hospital.x_train, hospital.y_train, TrainingSettings())
    n = len(hospital.y_train)
    assert trainer.steps_per_round() == steps_per_epoch(n, 32) == -(-n // 32)
    assert trainer.sample_rate() == poisson_sample_rate(n, 32) == 1 / trainer.steps_per_round()
    sizes = [len(trainer._poisson_batch(trainer.sampling_rng)) for _ in range(2000)]
    assert len(set(sizes)) > 5  # variable batch size, as Poisson sampling has
    assert np.mean(sizes) == pytest.approx(trainer.expected_batch_size(), rel=0.03)


def test_local_steps_replace_epochs_and_keep_the_sample_rate(hospital) -> None:
    epochs = LocalTrainer(mlp(hospital), hospital.x_train, hospital.y_train, TrainingSettings())
    settings = TrainingSettings(local_steps=3)
    trainer = LocalTrainer(mlp(hospital), hospital.x_train, hospital.y_train, settings)
    assert trainer.steps_per_round() == 3 < epochs.steps_per_round()
    assert trainer.sample_rate() == epochs.sample_rate()
    assert trainer.train_round().steps == 3
    with pytest.raises(ValueError, match="local_steps"):
        TrainingSettings(local_steps=-1)


@pytest.mark.parametrize("loss", ["bce", "focal"])
def test_plain_training_learns_a_useful_model(hospital, loss: str) -> None:
    model = mlp(hospital)
    settings = TrainingSettings(learning_rate=0.1, momentum=0.9, local_epochs=5, loss=loss)
    trainer = LocalTrainer(model, hospital.x_train, hospital.y_train, settings)
    before = roc_auc_score(hospital.y_test, predict_proba(model, hospital.x_test))
    first = trainer.train_round()
    last = trainer.train_round()
    assert first.epsilon_spent is None and last.steps == trainer.steps_per_round()
    assert last.mean_loss < first.mean_loss
    after = roc_auc_score(hospital.y_test, predict_proba(model, hospital.x_test))
    assert after > 0.97 and after > before


def test_dp_training_still_learns_at_a_moderate_budget(hospital) -> None:
    settings = TrainingSettings(learning_rate=0.5, local_epochs=2)
    trainer = dp_trainer(hospital, settings, epsilon=4.0, rounds=5)
    assert trainer._dp is not None and trainer._dp.engine == "hooks"
    for _ in range(5):
        stats = trainer.train_round()
    assert stats.epsilon_spent <= 4.0
    auc = roc_auc_score(hospital.y_test, predict_proba(trainer.model, hospital.x_test))
    assert auc > 0.9


def test_fedprox_keeps_the_model_near_its_reference(hospital) -> None:
    drift = {}
    for mu in (0.0, 10.0):
        model = mlp(hospital)
        reference = {n: p.detach().numpy().copy() for n, p in model.named_parameters()}
        start = parameters(model)
        settings = TrainingSettings(learning_rate=0.05, local_epochs=5, fedprox_mu=mu)
        LocalTrainer(model, hospital.x_train, hospital.y_train, settings).train_round(reference)
        drift[mu] = (parameters(model) - start).norm().item()
    assert drift[10.0] < 0.5 * drift[0.0]


def test_fedprox_rejects_a_reference_that_does_not_fit(hospital) -> None:
    model = mlp(hospital)
    settings = TrainingSettings(fedprox_mu=0.1)
    trainer = LocalTrainer(model, hospital.x_train, hospital.y_train, settings)
    with pytest.raises(ValueError, match="lacks parameter"):
        trainer.train_round({})
    wrong = {n: np.zeros((1, 1), np.float32) for n, _ in model.named_parameters()}
    with pytest.raises(ValueError, match="shape"):
        trainer.train_round(wrong)


# --------------------------------------------------------------------------- the budget


def test_trainer_refuses_to_train_past_its_budget(hospital) -> None:
    model, settings = mlp(hospital), TrainingSettings()
    planner = LocalTrainer(model, hospital.x_train, hospital.y_train, settings)
    per_round = planner.steps_per_round()
    ledger = PrivacyLedger.plan(  # a budget for one and a half rounds
        epsilon=1.0,
        delta=None,
        n_patients=len(hospital.y_train),
        sample_rate=planner.sample_rate(),
        planned_steps=per_round + per_round // 2,
    )
    trainer = LocalTrainer(model, hospital.x_train, hospital.y_train, settings, ledger)
    allowed = ledger.max_steps()
    assert per_round < allowed < 2 * per_round
    first = trainer.train_round()
    assert first.steps == per_round and not first.budget_exhausted
    second = trainer.train_round()  # the budget runs out part-way: the round stops early
    assert second.budget_exhausted and second.steps == allowed - per_round
    assert ledger.steps_taken == allowed and second.epsilon_spent <= 1.0
    trained = parameters(model)
    with pytest.raises(BudgetExhausted, match="no step is left"):
        trainer.train_round()
    assert torch.equal(parameters(model), trained)  # nothing more was trained
    assert ledger.steps_taken == allowed


def test_ledger_for_another_sample_rate_is_refused(hospital) -> None:
    ledger = PrivacyLedger.plan(
        epsilon=1.0, delta=None, n_patients=100, sample_rate=0.5, planned_steps=10
    )
    with pytest.raises(ValueError, match="sample rate"):
        LocalTrainer(mlp(hospital), hospital.x_train, hospital.y_train, TrainingSettings(), ledger)


def test_dp_randomness_does_not_come_from_the_shared_seed(hospital) -> None:
    # Peers know the config's seed; if it drove the noise they could subtract it.
    results = []
    for _ in range(2):
        trainer = dp_trainer(hospital, TrainingSettings(seed=7), epsilon=2.0, rounds=1)
        trainer.train_round()
        results.append(parameters(trainer.model))
    assert not torch.equal(results[0], results[1])


# --------------------------------------------------------------------------- checkpoints


def test_trainer_state_round_trip_resumes_the_same_trajectory(hospital) -> None:
    # Without DP the batches come from the config-seeded sampler, which the state holds, so a
    # resumed trainer retraces the original exactly (Adam's moments included).
    settings = TrainingSettings(optimizer="adam", learning_rate=0.01, seed=3)
    original = LocalTrainer(mlp(hospital), hospital.x_train, hospital.y_train, settings)
    original.train_round()
    saved_model = copy.deepcopy(original.model.state_dict())
    saved_trainer = original.state_dict_bytes()
    original.train_round()

    resumed_model = mlp(hospital, seed=99)
    resumed_model.load_state_dict(saved_model)
    resumed = LocalTrainer(resumed_model, hospital.x_train, hospital.y_train, settings)
    resumed.load_state_dict_bytes(saved_trainer)
    assert resumed.rounds_trained == 1
    resumed.train_round()
    torch.testing.assert_close(parameters(resumed.model), parameters(original.model))


def test_dp_trainer_state_holds_no_private_randomness_and_restores_draw_fresh_noise(
    hospital,
) -> None:
    # The failure this guards against (issue #15): the checkpoint held the DP generator, so a
    # node restarted from it trained the next round with the very batches and noise it had
    # already released.
    settings = TrainingSettings(optimizer="adam", learning_rate=0.01)
    original = dp_trainer(hospital, settings, epsilon=3.0, rounds=3)
    original.train_round()
    state = original.state_dict()
    assert set(state) == {"optimizer", "sampling_rng", "rounds_trained"}
    saved_model = copy.deepcopy(original.model.state_dict())
    saved_trainer, saved_ledger = original.state_dict_bytes(), original.ledger.to_state()

    def restored() -> torch.Tensor:
        model = mlp(hospital, seed=99)
        model.load_state_dict(saved_model)
        trainer = LocalTrainer(
            model,
            hospital.x_train,
            hospital.y_train,
            settings,
            PrivacyLedger.from_state(saved_ledger),
        )
        trainer.load_state_dict_bytes(saved_trainer)
        start = parameters(model)
        trainer.train_round()
        assert trainer.ledger.steps_taken == 2 * trainer.steps_per_round()
        return parameters(model) - start

    first, second = restored(), restored()
    cosine = torch.nn.functional.cosine_similarity(first, second, dim=0).item()
    assert not torch.equal(first, second)
    assert cosine < 0.9  # the same start and data, independent batches and noise


def test_a_checkpoint_with_the_old_private_generator_state_still_loads(hospital) -> None:
    trainer = dp_trainer(hospital, TrainingSettings(), epsilon=2.0, rounds=1)
    old_format = {**trainer.state_dict(), "private_rng": torch.Generator().get_state()}
    trainer.load_state_dict(old_format)  # the old field is ignored, not restored
    assert "private_rng" not in trainer.state_dict()


def test_damaged_trainer_state_is_refused(hospital) -> None:
    trainer = LocalTrainer(mlp(hospital), hospital.x_train, hospital.y_train, TrainingSettings())
    with pytest.raises(ValueError, match="not a saved trainer state"):
        trainer.load_state_dict_bytes(b"\x00garbage")
    with pytest.raises(ValueError, match="lacks"):
        trainer.load_state_dict({"optimizer": {}})


# --------------------------------------------------------------------------- threshold


def test_youden_threshold_separates_a_separable_set() -> None:
    y = np.array([0, 0, 0, 1, 1, 1])
    p = np.array([0.1, 0.2, 0.35, 0.4, 0.8, 0.9])
    threshold = choose_threshold(y, p)
    assert threshold == pytest.approx(0.4)
    assert ((p >= threshold) == y.astype(bool)).all()


def test_youden_threshold_maximises_sensitivity_plus_specificity() -> None:
    rng = np.random.default_rng(0)
    y = (rng.random(300) < 0.2).astype(float)
    p = np.clip(0.3 * y + rng.normal(0.35, 0.15, 300), 0, 1)
    threshold = choose_threshold(y, p)

    def youden(t: float) -> float:
        predicted = p >= t
        return predicted[y == 1].mean() + (~predicted[y == 0]).mean() - 1

    assert youden(threshold) == pytest.approx(max(youden(t) for t in np.unique(p)))


def test_threshold_falls_back_to_one_half_and_rejects_bad_input() -> None:
    assert choose_threshold(np.ones(4), np.array([0.2, 0.3, 0.9, 0.5])) == 0.5
    with pytest.raises(ValueError, match="labels but"):
        choose_threshold(np.ones(3), np.ones(2))
    with pytest.raises(ValueError, match="within"):
        choose_threshold(np.array([0, 1]), np.array([0.5, 1.5]))


def test_predict_proba_restores_the_training_mode(hospital) -> None:
    model = nn.Sequential(nn.Linear(hospital.input_shape[0], 8), nn.Dropout(0.5), nn.Linear(8, 1))
    model.train()
    first = predict_proba(model, hospital.x_test)
    assert model.training
    assert first.shape == (len(hospital.y_test),) and ((first > 0) & (first < 1)).all()
    np.testing.assert_array_equal(first, predict_proba(model, hospital.x_test))  # dropout off


def test_youden_threshold_matches_scikit_learn_roc_curve() -> None:
    """The numpy ROC cut points give the threshold scikit-learn's roc_curve gives, ties too."""
    from sklearn.metrics import roc_curve

    rng = np.random.default_rng(1)
    for trial in range(200):
        n = int(rng.integers(4, 200))
        y = (rng.random(n) < rng.uniform(0.1, 0.9)).astype(float)
        if len(np.unique(y)) < 2:
            continue
        # coarse scores make many ties, which is where cut points are easy to get wrong
        p = np.round(np.clip(0.3 * y + rng.normal(0.4, 0.2, n), 0, 1), int(rng.integers(1, 4)))
        fpr, tpr, thresholds = roc_curve(y, p)
        expected = thresholds[int(np.argmax(tpr[1:] - fpr[1:])) + 1]
        assert choose_threshold(y, p) == pytest.approx(float(np.clip(expected, 0, 1))), trial


# --------------------------------------------------------------------------- optimizer


def test_sgd_step_gives_torch_optim_sgd_parameters_step_for_step(hospital) -> None:
    """SGDStep runs torch's own SGD update: same parameters as torch.optim.SGD, and each
    loads the other's state (so checkpoints written before the change still restore)."""
    from murmur.models.local_sgd import SGDStep

    ours, theirs = mlp(hospital, seed=3), mlp(hospital, seed=3)
    ours_opt = SGDStep(list(ours.parameters()), lr=0.05, momentum=0.9)
    theirs_opt = torch.optim.SGD(theirs.parameters(), lr=0.05, momentum=0.9)
    x = torch.as_tensor(hospital.x_train[:64])
    y = torch.as_tensor(hospital.y_train[:64])
    loss = nn.BCEWithLogitsLoss()

    def step(model, optimizer, rows) -> None:
        optimizer.zero_grad(set_to_none=True)
        loss(model(x[rows]).reshape(-1), y[rows]).backward()
        optimizer.step()

    for i in range(6):
        rows = slice(8 * i, 8 * i + 16)
        step(ours, ours_opt, rows)
        step(theirs, theirs_opt, rows)
        assert torch.equal(parameters(ours), parameters(theirs)), f"step {i}"

    # swap the optimizer states between the two implementations and keep going
    restored = SGDStep(list(ours.parameters()), lr=0.05, momentum=0.9)
    restored.load_state_dict(theirs_opt.state_dict())
    theirs_again = torch.optim.SGD(theirs.parameters(), lr=0.05, momentum=0.9)
    theirs_again.load_state_dict(ours_opt.state_dict())
    step(ours, restored, slice(0, 32))
    step(theirs, theirs_again, slice(0, 32))
    assert torch.equal(parameters(ours), parameters(theirs))

    with pytest.raises(ValueError, match="parameters"):
        SGDStep(list(ours.parameters())[:1], lr=0.05, momentum=0.9).load_state_dict(
            theirs_opt.state_dict()
        )


def test_a_node_trains_and_evaluates_without_scikit_learn_or_the_torch_compiler() -> None:
    """Each costs every node process about a second and 70+ MB (docs/performance.md)."""
    import subprocess
    import sys

    script = (
        "import sys\n"
        "import murmur.node.node\n"
        "from murmur.models.data import load_dataset\n"
        "from murmur.models.metrics import clinical_metrics\n"
        "from murmur.models.nets import build_model\n"
        "from murmur.models.training import LocalTrainer, TrainingSettings, choose_threshold, "
        "predict_proba\n"
        "h = load_dataset('breast-cancer', num_hospitals=3, seed=0)[1]\n"
        "model = build_model('mlp', h.input_shape, seed=0)\n"
        "trainer = LocalTrainer(model, h.x_train, h.y_train, TrainingSettings(local_epochs=1))\n"
        "trainer.train_round()\n"
        "p = predict_proba(model, h.x_test)\n"
        "t = choose_threshold(h.y_train, predict_proba(model, h.x_train))\n"
        "print(clinical_metrics(h.y_test, p, t)['auc'] > 0.5)\n"
        "print(sorted(m for m in ('sklearn', 'scipy', 'torch._dynamo') if m in sys.modules))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True
    )
    assert done.stdout.split("\n")[:2] == ["True", "[]"], done.stdout + done.stderr
