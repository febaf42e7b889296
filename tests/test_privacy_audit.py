"""The empirical privacy audit (bench/privacy_audit.py): its bound, and that it can fail.

The bound is checked against the paper's formula summed by hand (math.comb, no scipy), a
closed form, and its defining property (an epsilon-DP mechanism exceeds it with probability
at most the significance level). The audit of murmur's real DP-SGD must keep the honest
mechanism within the epsilon its ledger reports and catch a mechanism that adds a tenth of
the planned noise, or replays its randomness, while the ledger reports the same epsilon.
"""

from __future__ import annotations

import math

import murmur.models.privacy as privacy
import numpy as np
import pytest
import torch

from bench.privacy_audit import (
    GUESS_FRACTIONS,
    AuditConfig,
    AuditResult,
    audit_scores,
    epsilon_lower_bound,
    p_value,
    replayed_randomness,
    run_audit,
)

SIGNIFICANCE = 0.05


def paper_p_value(m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """Steinke et al.'s p-value written out term by term (their Appendix D loop)."""
    q = math.exp(epsilon) / (1 + math.exp(epsilon))
    pmf = [math.comb(r, k) * q**k * (1 - q) ** (r - k) for k in range(r + 1)]
    beta = sum(pmf[v:])
    alpha = max((sum(pmf[v - i : v]) / i for i in range(1, v + 1)), default=0.0)
    return min(1.0, beta + 2 * m * delta * alpha)


# --------------------------------------------------------------------------- the bound


@pytest.mark.parametrize("r", [10, 100, 1000])
def test_all_guesses_right_without_delta_gives_the_closed_form(r: int) -> None:
    # delta = 0, v = r: p(eps) = q^r, so the bound solves q^r = significance.
    q = SIGNIFICANCE ** (1 / r)
    expected = math.log(q / (1 - q))
    bound = epsilon_lower_bound(r, r, r, 0.0, SIGNIFICANCE)
    assert expected - 2e-6 <= bound <= expected
    assert p_value(r, r, r, bound, 0.0) < SIGNIFICANCE <= p_value(r, r, r, bound + 1e-5, 0.0)


@pytest.mark.parametrize(("r", "v"), [(100, 50), (100, 40), (1000, 500), (7, 3)])
def test_half_right_or_worse_proves_nothing(r: int, v: int) -> None:
    assert epsilon_lower_bound(2 * r, r, v, 1e-5) == 0.0


@pytest.mark.parametrize(
    ("m", "r", "v", "epsilon", "delta"),
    [
        (100, 40, 35, 1.0, 0.0),
        (100, 40, 35, 1.0, 1e-3),
        (500, 60, 60, 2.5, 1e-4),
        (80, 80, 70, 0.3, 1e-2),
        (1000, 25, 1, 0.0, 1e-5),
    ],
)
def test_p_value_is_the_papers_formula(m: int, r: int, v: int, epsilon: float, delta: float):
    assert p_value(m, r, v, epsilon, delta) == pytest.approx(
        paper_p_value(m, r, v, epsilon, delta), rel=1e-9, abs=1e-15
    )


def test_bound_grows_with_right_guesses_and_shrinks_with_delta_and_confidence() -> None:
    m, r = 2000, 400
    by_v = [epsilon_lower_bound(m, r, v, 1e-6) for v in range(200, 401, 20)]
    assert by_v == sorted(by_v) and by_v[0] == 0.0 and by_v[-1] > 2.0
    by_delta = [epsilon_lower_bound(m, r, 380, d) for d in (0.0, 1e-6, 1e-5, 1e-4)]
    assert by_delta == sorted(by_delta, reverse=True) and by_delta[0] > by_delta[-1]
    by_level = [epsilon_lower_bound(m, r, 380, 1e-6, s) for s in (0.2, 0.05, 0.01, 0.001)]
    assert by_level == sorted(by_level, reverse=True) and by_level[0] > by_level[-1]
    # The same accuracy over more guesses is stronger evidence.
    by_r = [epsilon_lower_bound(m, k, int(0.9 * k), 1e-6) for k in (50, 200, 1000, 2000)]
    assert by_r == sorted(by_r) and by_r[0] < by_r[-1]


@pytest.mark.parametrize(("epsilon", "delta"), [(1.0, 0.0), (2.0, 0.0), (1.0, 1e-4)])
def test_an_epsilon_dp_attack_beats_the_bound_at_most_five_percent_of_the_time(
    epsilon: float, delta: float
) -> None:
    # Randomised response with accuracy e^eps / (1 + e^eps) is the best any epsilon-DP
    # mechanism allows: summing its binomial over every v that would claim more than epsilon
    # gives the exact chance the audit wrongly accuses an epsilon-DP mechanism.
    m = r = 300
    q = math.exp(epsilon) / (1 + math.exp(epsilon))
    accusing = [v for v in range(r + 1) if epsilon_lower_bound(m, r, v, delta) > epsilon]
    assert accusing, "no outcome could ever exceed epsilon: the audit could not fail"
    chance = sum(math.comb(r, v) * q**v * (1 - q) ** (r - v) for v in accusing)
    assert chance <= SIGNIFICANCE


def test_bound_refuses_impossible_counts() -> None:
    with pytest.raises(ValueError, match="0 <= correct v <= guesses r <= canaries m"):
        epsilon_lower_bound(10, 5, 6, 0.0)
    with pytest.raises(ValueError, match="significance"):
        epsilon_lower_bound(10, 5, 5, 0.0, 1.5)


# --------------------------------------------------------------------------- the attack


def test_attack_on_perfect_scores_guesses_the_most_canaries_all_right() -> None:
    rng = np.random.default_rng(1)
    included = rng.random(1000) < 0.5
    scores = included + 0.01 * rng.standard_normal(1000)
    result = audit_scores(scores, included, 1e-6)
    r = round(max(GUESS_FRACTIONS) * 1000)
    assert (result.guesses, result.correct) == (r, r)
    per_test = SIGNIFICANCE / len(GUESS_FRACTIONS)  # Bonferroni over the guess counts
    assert result.epsilon_lower_bound == epsilon_lower_bound(1000, r, r, 1e-6, per_test)


def test_attack_on_scores_without_signal_rarely_proves_anything() -> None:
    rng = np.random.default_rng(2)
    bounds = [
        audit_scores(rng.standard_normal(2000), rng.random(2000) < 0.5, 1e-6).epsilon_lower_bound
        for _ in range(40)
    ]
    assert sum(b > 0 for b in bounds) <= 4  # at most 5% expected, Bonferroni included
    assert max(bounds) < 0.5


def test_one_sided_attack_only_guesses_in() -> None:
    # Ten members score high, ten more score lowest: "out" guesses on the lowest are wrong.
    included = np.r_[np.ones(20, bool), np.zeros(980, bool)]
    scores = np.r_[np.full(10, 5.0), np.full(10, -5.0), np.zeros(980)]
    one_sided = audit_scores(scores, included, 0.0, both_sides=False)
    assert (one_sided.guesses, one_sided.correct) == (10, 10)
    two_sided = audit_scores(scores, included, 0.0)
    assert 0 <= two_sided.epsilon_lower_bound < one_sided.epsilon_lower_bound


# --------------------------------------------------------------------------- murmur's DP-SGD

SMALL = {"canaries": 4000, "epochs": 10, "batch_size": 128}
SIGMA_TOLERANCE = 0.08
"""sigma measured from ~2,000 out-canaries has a standard error of about 1.6%: 5 of them."""
REPLAY = {"canaries": 4000, "epochs": 5, "batch_size": 512, "canary": "drifting"}


@pytest.fixture(scope="module")
def audits() -> dict[str, AuditResult]:
    configs = {
        "honest 1": AuditConfig(1.0, **SMALL),
        "honest 8": AuditConfig(8.0, **SMALL),
        "noise/10 1": AuditConfig(1.0, mechanism="noise/10", **SMALL),
        "drifting honest 1": AuditConfig(1.0, **REPLAY),
        "replay 1": AuditConfig(1.0, mechanism="replay", **REPLAY),
    }
    return {name: run_audit(config) for name, config in configs.items()}


@pytest.mark.parametrize("name", ["honest 1", "honest 8"])
def test_honest_dp_sgd_stays_within_the_epsilon_it_reports(audits, name: str) -> None:
    result = audits[name]
    assert result.epsilon_reported == pytest.approx(result.config.epsilon, rel=1e-3)
    assert result.epsilon_lower_bound <= result.epsilon_reported
    # The run is the mechanism the ledger describes: its noise, read back from the
    # out-canaries, is the planned sigma, and every canary was clipped to C.
    assert result.noise_measured == pytest.approx(result.noise_multiplier, rel=SIGMA_TOLERANCE)
    assert result.min_canary_norm > 1.0


def test_a_tenth_of_the_noise_is_caught_while_the_ledger_reports_the_same_epsilon(audits):
    honest, broken = audits["honest 1"], audits["noise/10 1"]
    assert broken.epsilon_reported == pytest.approx(honest.epsilon_reported, rel=1e-3)
    assert broken.noise_measured == pytest.approx(broken.noise_multiplier / 10, rel=SIGMA_TOLERANCE)
    # Each inclusion moved the canary's coefficient by C, not by its raw gradient norm (about
    # 10 C): clipping held. The tolerance is 5 standard errors of this mean.
    assert broken.signal_per_inclusion == pytest.approx(1.0, abs=0.08)
    assert broken.epsilon_lower_bound > broken.epsilon_reported
    assert broken.violated and not honest.violated


def test_replayed_randomness_is_caught_by_an_attack_on_the_round_models(audits) -> None:
    honest, replay = audits["drifting honest 1"], audits["replay 1"]
    assert replay.noise_measured < 0.01 * replay.noise_multiplier  # rounds repeat the noise
    assert replay.epsilon_lower_bound > replay.epsilon_reported
    assert honest.noise_measured == pytest.approx(honest.noise_multiplier, rel=SIGMA_TOLERANCE)
    assert honest.epsilon_lower_bound <= honest.epsilon_reported


def test_replay_double_fixes_the_per_step_generator_and_undoes_it() -> None:
    # DP-SGD draws from models.privacy.private_generator() at every step; the double must make
    # every call return the same stream, and put the real one back.
    real = privacy.private_generator
    with replayed_randomness(seed=5):
        draws = [torch.randn(4, generator=privacy.private_generator()) for _ in range(3)]
    assert all(torch.equal(draws[0], d) for d in draws[1:])
    assert privacy.private_generator is real
    assert not torch.equal(
        torch.randn(4, generator=privacy.private_generator()),
        torch.randn(4, generator=privacy.private_generator()),
    )
