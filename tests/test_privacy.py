"""DP-SGD and the privacy accountant (models/privacy.py).

The accountant checks use a second, independent implementation (Opacus's RDP and PRV
accountants) as the reference, never murmur's own code path.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from murmur.models import privacy
from murmur.models.data import load_dataset
from murmur.models.dp_sgd import DPSGDGradient, clip_factors
from murmur.models.nets import build_model
from murmur.models.privacy import (
    BudgetExhausted,
    DPConfig,
    PrivacyLedger,
    calibrate_noise,
    default_delta,
    epsilon_for,
    private_generator,
)
from murmur.models.training import LocalTrainer, TrainingSettings, make_loss
from opacus.accountants import PRVAccountant, RDPAccountant
from torch import nn


def bce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return nn.functional.binary_cross_entropy_with_logits(logits, labels, reduction="none")


def engine_for(model: nn.Module, sigma: float = 0.0, clip: float = 1.0, engine: str = "auto"):
    return DPSGDGradient(
        model,
        bce,
        max_grad_norm=clip,
        noise_multiplier=sigma,
        expected_batch_size=10.0,
        engine=engine,
    )


# --------------------------------------------------------------------------- accountant


@pytest.mark.parametrize(("accountant", "expected"), [("rdp", 2.10), ("pld", 1.83)])
def test_accountant_reproduces_the_known_vector(accountant: str, expected: float) -> None:
    # sigma = 1.0, q = 0.01, 1,000 steps, delta = 1e-5 (Abadi et al.'s setting).
    epsilon = epsilon_for(1.0, 0.01, 1000, 1e-5, accountant)
    assert epsilon == pytest.approx(expected, rel=0.02)


def test_pld_is_tighter_than_rdp_and_both_grow_with_steps() -> None:
    pld = [epsilon_for(1.0, 0.01, steps, 1e-5, "pld") for steps in (10, 100, 1000)]
    rdp = [epsilon_for(1.0, 0.01, steps, 1e-5, "rdp") for steps in (10, 100, 1000)]
    assert pld == sorted(pld) and rdp == sorted(rdp)
    assert all(p < r for p, r in zip(pld, rdp, strict=True))
    assert epsilon_for(1.0, 0.01, 0, 1e-5) == 0.0


@pytest.mark.parametrize("accountant", ["pld", "rdp"])
def test_calibrated_noise_is_the_smallest_that_fits_the_budget(accountant: str) -> None:
    sigma = calibrate_noise(2.0, 1e-5, 0.05, 300, accountant)
    assert epsilon_for(sigma, 0.05, 300, 1e-5, accountant) <= 2.0
    assert epsilon_for(sigma - 2e-3, 0.05, 300, 1e-5, accountant) > 2.0


def test_calibration_refuses_budgets_that_protect_nothing() -> None:
    with pytest.raises(ValueError, match="not a meaningful privacy guarantee"):
        calibrate_noise(10_000.0, 1e-5, 0.01, 10, "rdp")
    with pytest.raises(ValueError, match="0 planned steps"):
        calibrate_noise(1.0, 1e-5, 0.01, 0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"noise_multiplier": 0.0}, "noise_multiplier"),
        ({"sample_rate": 1.5}, "sample_rate"),
        ({"steps": -1}, "steps"),
        ({"delta": 0.0}, "delta"),
        ({"accountant": "gdp"}, "unknown accountant"),
    ],
)
def test_accountant_rejects_bad_input_by_name(kwargs: dict, message: str) -> None:
    args = {"noise_multiplier": 1.0, "sample_rate": 0.01, "steps": 10, "delta": 1e-5}
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        epsilon_for(**args)


def test_default_delta_is_below_one_over_ten_n() -> None:
    assert default_delta(100) == 1e-5
    assert default_delta(1_000_000) == pytest.approx(1e-7)
    for n in (1, 50, 10**5, 10**7):
        assert default_delta(n) <= 1 / (10 * n)
    with pytest.raises(ValueError, match="n_patients"):
        default_delta(0)


def test_config_refuses_a_delta_that_does_not_protect_anyone() -> None:
    assert DPConfig(1.0).resolved_delta(200) == 1e-5
    with pytest.raises(ValueError, match="below 1/n_patients"):
        DPConfig(1.0, delta=0.01).resolved_delta(200)
    with pytest.raises(ValueError, match="epsilon"):
        DPConfig(-1.0)
    with pytest.raises(ValueError, match="max_grad_norm"):
        DPConfig(1.0, max_grad_norm=0.0)


# --------------------------------------------------------------------------- ledger


def small_ledger(accountant: str = "rdp") -> PrivacyLedger:
    return PrivacyLedger.plan(
        epsilon=1.0,
        delta=None,
        n_patients=200,
        sample_rate=0.1,
        planned_steps=40,
        accountant=accountant,
    )


def test_ledger_plan_spends_at_most_the_budget_over_the_planned_steps() -> None:
    ledger = small_ledger()
    assert ledger.delta == 1e-5
    assert ledger.epsilon_spent() == 0.0
    assert ledger.epsilon_after(40) <= 1.0
    assert ledger.max_steps() >= 40
    assert (
        ledger.epsilon_after(ledger.max_steps())
        <= 1.0
        < ledger.epsilon_after(ledger.max_steps() + 1)
    )


def test_ledger_hard_stop_never_records_a_step_past_the_budget() -> None:
    ledger = small_ledger()
    allowed = ledger.max_steps()
    for _ in range(allowed):
        ledger.charge(1)
    assert ledger.remaining_steps() == 0 and ledger.is_exhausted()
    with pytest.raises(BudgetExhausted, match="exceed the budget"):
        ledger.charge(1)
    assert ledger.steps_taken == allowed
    assert ledger.epsilon_spent() <= ledger.epsilon_budget


def test_ledger_charge_refuses_a_batch_of_steps_that_does_not_fit() -> None:
    ledger = small_ledger()
    with pytest.raises(BudgetExhausted):
        ledger.charge(ledger.max_steps() + 1)
    assert ledger.steps_taken == 0


def test_ledger_state_survives_a_json_round_trip_and_keeps_counting() -> None:
    ledger = small_ledger("pld")
    ledger.charge(25)
    state = json.loads(json.dumps(ledger.to_state()))
    restored = PrivacyLedger.from_state(state)
    assert restored == ledger
    assert restored.to_state() == ledger.to_state()
    assert restored.epsilon_spent() == pytest.approx(ledger.epsilon_spent(), rel=1e-12)
    restored.charge(5)
    assert restored.steps_taken == 30
    # What the accountant was given is enough to recompute epsilon from outside.
    report = restored.report()
    recomputed = epsilon_for(
        report["noise_multiplier"], report["sample_rate"], report["steps_taken"], report["delta"]
    )
    assert report["epsilon_spent"] == pytest.approx(recomputed)


def test_record_steps_counts_interrupted_work_even_past_the_budget() -> None:
    ledger = small_ledger()
    ledger.record_steps(ledger.max_steps() + 3)
    assert ledger.remaining_steps() == 0
    assert ledger.epsilon_spent() > ledger.epsilon_budget


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda s: s.pop("noise_multiplier"), "lacks 'noise_multiplier'"),
        (lambda s: s.update(steps_taken="12"), "steps_taken"),
        (lambda s: s.update(steps_taken=True), "steps_taken"),
        (lambda s: s.update(version=99), "version"),
        (lambda s: s.update(sample_rate=2.0), "sample_rate"),
        (lambda s: s.update(accountant="moments"), "unknown accountant"),
    ],
)
def test_damaged_ledger_state_is_refused_with_a_reason(damage, message: str) -> None:
    state = small_ledger().to_state()
    damage(state)
    with pytest.raises(ValueError, match=message):
        PrivacyLedger.from_state(state)


# --------------------------------------------------------------------------- clipping and noise


def test_clip_factors_bound_every_norm_by_c() -> None:
    norms = torch.tensor([0.0, 0.5, 1.0, 3.0, 1e6])
    clipped = norms * clip_factors(norms, 1.0)
    assert (clipped <= 1.0 + 1e-6).all()
    assert clipped[:2].tolist() == pytest.approx([0.0, 0.5], abs=1e-5)  # short ones untouched


def test_per_example_gradient_norms_are_at_most_c_after_clipping() -> None:
    torch.manual_seed(0)
    model = build_model("mlp", (13,), seed=0)
    x, y = torch.randn(32, 13) * 5, (torch.rand(32) < 0.4).float()
    dp = engine_for(model, clip=0.3)
    grads, _ = dp.per_sample_gradients(x, y)
    norms = torch.stack([g.flatten(1).pow(2).sum(1) for g in grads]).sum(0).sqrt()
    assert (norms > 0.3).sum() > 10  # the test means something: many need clipping
    factors = clip_factors(norms, 0.3)
    clipped = [g * factors.view(-1, *[1] * (g.ndim - 1)) for g in grads]
    clipped_norms = torch.stack([g.flatten(1).pow(2).sum(1) for g in clipped]).sum(0).sqrt()
    assert (clipped_norms <= 0.3 * (1 + 1e-5)).all()


def naive_clipped_mean(model: nn.Module, x, y, clip: float, expected: float) -> list[torch.Tensor]:
    """One example at a time with torch's own clip_grad_norm_: the reference for the fused path."""
    params = list(model.parameters())
    total = [torch.zeros_like(p) for p in params]
    for i in range(len(x)):
        model.zero_grad()
        bce(model(x[i : i + 1]).reshape(-1), y[i : i + 1]).sum().backward()
        torch.nn.utils.clip_grad_norm_(params, clip)
        for t, p in zip(total, params, strict=True):
            t += p.grad
    return [t / expected for t in total]


@pytest.mark.parametrize("engine", ["hooks", "vmap"])
def test_fused_clipped_sum_matches_clipping_one_example_at_a_time(engine: str) -> None:
    torch.manual_seed(1)
    model = build_model("cnn", (1, 12, 12), seed=3)
    x, y = torch.randn(9, 1, 12, 12), (torch.rand(9) < 0.5).float()
    expected = naive_clipped_mean(model, x, y, clip=0.05, expected=10.0)
    dp = engine_for(model, sigma=0.0, clip=0.05, engine=engine)
    dp.compute(x, y)
    for want, param in zip(expected, model.parameters(), strict=True):
        torch.testing.assert_close(param.grad, want, rtol=1e-4, atol=1e-7)


def test_noise_has_the_configured_standard_deviation() -> None:
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(200, 50), nn.Linear(50, 1), nn.Flatten(0))  # 10,101 params
    x, y = torch.randn(8, 200), (torch.rand(8) < 0.5).float()
    sigma, clip, expected = 1.3, 0.7, 16.0
    noisy = DPSGDGradient(
        model,
        bce,
        max_grad_norm=clip,
        noise_multiplier=sigma,
        expected_batch_size=expected,
    )
    clean = DPSGDGradient(
        model,
        bce,
        max_grad_norm=clip,
        noise_multiplier=0.0,
        expected_batch_size=expected,
    )
    residuals = []
    for _ in range(5):
        clean.compute(x, y)
        signal = [p.grad.clone() for p in model.parameters()]
        noisy.compute(x, y)
        residuals += [
            (p.grad - s).flatten() for p, s in zip(model.parameters(), signal, strict=True)
        ]
    noise = torch.cat(residuals).double()
    target = sigma * clip / expected
    assert noise.numel() == 5 * 10_101
    assert noise.std().item() == pytest.approx(target, rel=0.02)
    assert abs(noise.mean().item()) < 4 * target / math.sqrt(noise.numel())
    # An empty Poisson batch is still a DP step: pure noise of the same scale.
    noisy.compute(x[:0], y[:0])
    empty = torch.cat([p.grad.flatten() for p in model.parameters()]).double()
    assert empty.std().item() == pytest.approx(target, rel=0.05)


# --------------------------------------------------------------------------- randomness


def test_torch_manual_seed_keeps_only_32_bits_so_private_generators_fill_the_whole_state() -> None:
    # Why private_generator does not just call manual_seed(secrets.randbits(64)): torch would
    # keep 2^32 possible noise streams, few enough to search.
    low, high = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7 + 2**32)
    assert torch.equal(torch.rand(8, generator=low), torch.rand(8, generator=high))
    words = [private_generator().get_state()[24 : 24 + 8 * 624].numpy() for _ in range(4)]
    as_u32 = [np.frombuffer(w.tobytes(), dtype="<u8") for w in words]
    assert all(int(w.max()) < 2**32 for w in as_u32)  # mt19937's 32-bit words, as torch keeps
    # Every word is fresh: two generators agree on a word only by chance (2^-32 each).
    assert all((a != b).mean() > 0.99 for i, a in enumerate(as_u32) for b in as_u32[i + 1 :])


def test_private_generators_never_repeat_and_draw_the_right_distributions() -> None:
    firsts = {tuple(torch.rand(4, generator=private_generator()).tolist()) for _ in range(500)}
    assert len(firsts) == 500
    normal = torch.cat([torch.randn(20_000, generator=private_generator()) for _ in range(5)])
    assert abs(normal.mean().item()) < 4 / math.sqrt(normal.numel())
    assert normal.std().item() == pytest.approx(1.0, rel=0.01)
    uniform = torch.rand(100_000, generator=private_generator())
    assert uniform.min() >= 0 and uniform.max() < 1
    assert uniform.mean().item() == pytest.approx(0.5, abs=0.005)


def test_dp_noise_is_drawn_from_private_generator_at_call_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The privacy audit replaces privacy.private_generator with a replaying double; that must
    # reach the noise, and the real one must never replay.
    model = nn.Sequential(nn.Linear(30, 1), nn.Flatten(0))
    x, y = torch.randn(6, 30), (torch.rand(6) < 0.5).float()
    dp = engine_for(model, sigma=1.0)

    def noisy_gradient() -> torch.Tensor:
        dp.compute(x, y)
        return torch.cat([p.grad.flatten() for p in model.parameters()])

    assert not torch.equal(noisy_gradient(), noisy_gradient())
    monkeypatch.setattr(privacy, "private_generator", lambda: torch.Generator().manual_seed(1))
    assert torch.equal(noisy_gradient(), noisy_gradient())


class GroupedConvSequence(nn.Module):
    """Exercises the less common layer shapes: grouped, strided conv and a Linear on (B, T, d)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, kernel_size=3, stride=2, padding=(1, 0), groups=2)
        self.token = nn.Linear(4, 3)
        self.head = nn.Linear(3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(x)).flatten(2).transpose(1, 2)  # (B, T, 4)
        return self.head(torch.tanh(self.token(h)).mean(1)).squeeze(-1)


class ReusedLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(6, 6)
        self.out = nn.Linear(6, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.inner(torch.relu(self.inner(x))))).squeeze(-1)


@pytest.mark.parametrize(
    ("make_model", "shape"),
    [
        (lambda: build_model("mlp", (13,), seed=0), (13,)),
        (lambda: build_model("cnn", (1, 16, 16), seed=0), (1, 16, 16)),
        # GroupNorm without affine parameters mixes no samples and has nothing to train
        (lambda: build_model("cnn_gn", (1, 16, 16), seed=0), (1, 16, 16)),
        (GroupedConvSequence, (2, 9, 8)),
        # packed rows: an 8x8 image and 3 clinical features
        (lambda: build_model("multimodal", (1, 8, 8), seed=0, clinical_features=3), (67,)),
    ],
)
def test_hook_engine_matches_torch_func_per_sample_gradients(make_model, shape) -> None:
    torch.manual_seed(3)
    model = make_model()
    x, y = torch.randn(7, *shape), (torch.rand(7) < 0.5).float()
    fast = engine_for(model, engine="hooks")
    reference = engine_for(model, engine="vmap")
    assert fast.engine == "hooks" and reference.engine == "vmap"
    got, got_losses = fast.per_sample_gradients(x, y)
    want, want_losses = reference.per_sample_gradients(x, y)
    torch.testing.assert_close(got_losses, want_losses)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)


def test_models_the_hooks_cannot_handle_use_torch_func() -> None:
    normed = nn.Sequential(nn.Linear(5, 4), nn.LayerNorm(4), nn.Linear(4, 1), nn.Flatten(0))
    assert engine_for(normed).engine == "vmap"
    with pytest.raises(ValueError, match="engine='hooks'"):
        engine_for(normed, engine="hooks")
    grads, _ = engine_for(normed).per_sample_gradients(torch.randn(3, 5), torch.ones(3))
    assert [g.shape[0] for g in grads] == [3] * 6


class FunctionalUse(nn.Module):
    """Uses a Linear's weights without calling the Linear: its hook never fires."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(6, 6)
        self.out = nn.Linear(6, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = nn.functional.linear(x, self.inner.weight, self.inner.bias)
        return self.out(torch.relu(hidden)).squeeze(-1)


@pytest.mark.parametrize(
    "make_model",
    [
        ReusedLayer,
        FunctionalUse,
        lambda: nn.Sequential(
            nn.Linear(6, 6), nn.ReLU(inplace=True), nn.Linear(6, 1), nn.Flatten(0)
        ),
    ],
)
def test_reused_bypassed_or_in_place_layers_fall_back_to_correct_gradients(make_model) -> None:
    torch.manual_seed(4)
    model = make_model()
    x, y = torch.randn(5, 6), (torch.rand(5) < 0.5).float()
    auto = engine_for(model)
    assert auto.engine == "hooks"  # looks supported until the first forward pass
    got, _ = auto.per_sample_gradients(x, y)
    assert auto.engine == "vmap"
    want, _ = engine_for(model, engine="vmap").per_sample_gradients(x, y)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w)


# --------------------------------------------------------------------------- a real run


@pytest.mark.parametrize("accountant", ["pld", "rdp"])
def test_reported_epsilon_of_a_real_run_matches_an_independent_accountant(accountant: str) -> None:
    hospital = load_dataset("breast-cancer", num_hospitals=2, seed=0)[0]
    settings = TrainingSettings(batch_size=16, learning_rate=0.1)
    model = build_model("mlp", hospital.input_shape, seed=0)
    planner = LocalTrainer(model, hospital.x_train, hospital.y_train, settings)
    ledger = PrivacyLedger.plan(
        epsilon=2.0,
        delta=None,
        n_patients=len(hospital.y_train),
        sample_rate=planner.sample_rate(),
        planned_steps=3 * planner.steps_per_round(),
        accountant=accountant,
    )
    trainer = LocalTrainer(model, hospital.x_train, hospital.y_train, settings, ledger)
    for _ in range(2):
        stats = trainer.train_round()
    assert ledger.steps_taken == 2 * trainer.steps_per_round() == stats.steps * 2
    sigma, q, steps, delta = (
        ledger.noise_multiplier,
        ledger.sample_rate,
        ledger.steps_taken,
        ledger.delta,
    )
    if accountant == "pld":
        independent = PRVAccountant()
        independent.history = [(sigma, q, steps)]
        reference = independent.get_epsilon(delta, eps_error=1e-3)
    else:
        independent = RDPAccountant()
        independent.history = [(sigma, q, steps)]
        reference = independent.get_epsilon(delta)
    assert 0 < stats.epsilon_spent < 2.0
    assert stats.epsilon_spent == pytest.approx(reference, rel=0.01)
    np.testing.assert_allclose(ledger.report()["epsilon_spent"], stats.epsilon_spent)


def test_trainer_loss_function_is_usable_for_dp() -> None:
    # make_loss must give one loss per sample, or clipping would not bound each patient.
    loss = make_loss(TrainingSettings(loss="focal"), torch.tensor([0.0, 1.0, 1.0]), private=True)
    values = loss(torch.tensor([0.3, -2.0, 4.0]), torch.tensor([0.0, 1.0, 1.0]))
    assert values.shape == (3,)
