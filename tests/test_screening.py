"""Screening before the robust rule (gossip/aggregation.py ``screen_inputs``, issue 19 items 4
and 2): far models are pulled in towards the robust centre instead of being left out, so the
rule keeps its f; under DP the radii allow for the noise the node's own ledger implies."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from murmur.gossip.aggregation import (
    bound_far_inputs,
    clipping,
    coordinate_median,
    dp_noise_norm,
    mute,
    screen_inputs,
    screening_radius,
    trimmed_mean,
)
from murmur.models.dp_sgd import DPSGDGradient


def test_the_coordinate_median_stays_in_the_honest_range_per_coordinate() -> None:
    own = np.array([1.0, -1.0])
    honest = np.array([[1.2, -0.8], [0.9, -1.1]])
    attackers = np.array([[-50.0, 50.0], [-50.0, 50.0]])
    centre = coordinate_median(own, np.vstack([honest, attackers]))
    every_honest = np.vstack([own, honest])
    assert (centre >= every_honest.min(axis=0)).all() and (centre <= every_honest.max(axis=0)).all()


def test_the_radius_is_spread_times_the_n_minus_f_th_distance_and_at_least_the_floor() -> None:
    distances = np.array([0.0, 1.0, 2.0, 3.0, 100.0, math.inf])
    # n = 6, f = 2: the 4th smallest is 3.0, whatever the two largest (the attackers) are.
    assert screening_radius(distances, 2, spread=1.5) == 4.5
    assert screening_radius(distances, 2, spread=1.5, floor=10.0) == 10.0
    assert screening_radius(np.array([1.0, math.inf]), 0, spread=1.5, floor=0.5) == 0.5
    with pytest.raises(ValueError, match="NaN not"):
        screening_radius(np.array([math.nan]), 0, spread=1.5)
    with pytest.raises(ValueError, match="spread"):
        screening_radius(distances, 2, spread=0.0)


def test_far_models_are_pulled_onto_the_ball_in_their_own_direction_and_near_ones_kept() -> None:
    own = np.zeros(2)
    near = [[0.1, 0.0], [-0.1, 0.0], [0.0, 0.1], [0.0, -0.1]]
    received = np.array([*near, [30.0, 40.0], [np.inf, 0.0]])
    bound = bound_far_inputs(own, received, 2, spread=1.5)
    np.testing.assert_array_equal(bound.centre, [0.0, 0.0])
    assert bound.radius == pytest.approx(0.15)  # 1.5 x the 5th smallest of 7 distances, 0.1
    np.testing.assert_array_equal(bound.pulled, [False] * 4 + [True, True])
    np.testing.assert_array_equal(bound.rows[:4], received[:4])
    np.testing.assert_allclose(bound.rows[4], [0.09, 0.12])  # 0.15 along (3, 4) / 5
    np.testing.assert_array_equal(bound.rows[5], bound.centre)  # overflowed: no direction
    assert bound.distances[4] == pytest.approx(50.0)


def test_mute_moves_the_muted_weight_to_own_and_keeps_the_sum() -> None:
    weights = np.array([0.4, 0.2, 0.2, 0.2])
    out = mute(weights, np.array([False, True, True]))
    np.testing.assert_allclose(out, [0.8, 0.2, 0.0, 0.0])
    with pytest.raises(ValueError, match="shape"):
        mute(weights, np.array([True]))


def test_a_model_is_muted_only_when_far_from_the_centre_and_from_own() -> None:
    own = np.array([1.0, 0.0])
    received = np.array([[1.1, 0.0], [0.9, 0.1], [-1.0, 0.0], [1.0, 0.05]])
    screened = screen_inputs(own, received, 1, spread=1.5, own_limit=1.5)
    assert screened.f == 1
    np.testing.assert_array_equal(screened.pulled, [False, False, True, False])
    np.testing.assert_array_equal(screened.muted, [False, False, True, False])
    # Far from the centre but within the own-model limit: pulled in, not muted.
    relaxed = screen_inputs(own, received, 1, spread=1.5, own_limit=5.0)
    np.testing.assert_array_equal(relaxed.muted, [False, False, False, False])
    assert relaxed.pulled[2]


# ------------------------------------------------------------- f is never lowered (item 4)

OWN = np.array([1.0])
HONEST = np.array([[1.1], [0.9]])
NON_IID = np.array([[3.0]])  # honest, but beyond 1.5 x ||own|| from own
ATTACKERS = np.array([[-0.45], [-0.45]])  # 1.45 from own: just inside that limit


def _old_policy(own: np.ndarray, received: np.ndarray, f: int) -> tuple[np.ndarray, int]:
    """What the node did before: leave out what lies beyond 1.5 ||own|| and lower f by it."""
    far = np.linalg.norm(received - own, axis=1) > 1.5 * np.linalg.norm(own)
    return received[~far], max(0, f - int(far.sum()))


def test_an_attacker_that_gets_an_honest_model_left_out_no_longer_weakens_the_rule() -> None:
    received = np.vstack([HONEST, NON_IID, ATTACKERS])
    f = 2  # the two attackers
    kept, lowered_f = _old_policy(OWN, received, f)
    assert lowered_f == 1  # the honest non-IID model used up one of the f
    old = trimmed_mean(OWN, kept, np.full(len(kept) + 1, 1 / (len(kept) + 1)), lowered_f)
    screened = screen_inputs(OWN, received, f, spread=1.5, own_limit=1.5)
    assert screened.f == f and screened.rows.shape == received.shape
    new = trimmed_mean(OWN, screened.rows, np.full(len(received) + 1, 1 / 6), screened.f)
    honest = np.vstack([OWN, HONEST, NON_IID])
    # The old policy let one attacker through: the result left the honest range.
    assert old[0] < honest.min() - 0.3
    # With f kept, the trimmed mean stays inside the honest range, as its bound promises.
    assert honest.min() <= new[0] <= honest.max()


@settings(max_examples=60, deadline=None)
@given(
    attack=st.lists(
        st.lists(st.floats(-1e6, 1e6, allow_nan=False), min_size=3, max_size=3),
        min_size=2,
        max_size=2,
    ),
    non_iid=st.floats(2.0, 50.0),
)
def test_whatever_f_attackers_send_screening_keeps_the_trimmed_mean_in_the_honest_range(
    attack: list[list[float]], non_iid: float
) -> None:
    own = np.array([1.0, 0.5, -0.5])
    honest = np.array([[1.1, 0.4, -0.6], [0.9, 0.6, -0.4], [non_iid, 0.5, -0.5]])
    received = np.vstack([honest, np.array(attack)])
    screened = screen_inputs(own, received, 2, spread=1.5, own_limit=1.5)
    assert screened.f == 2
    result = trimmed_mean(own, screened.rows, np.full(6, 1 / 6), screened.f)
    every_honest = np.vstack([own, honest])
    assert (result >= every_honest.min(axis=0) - 1e-9).all()
    assert (result <= every_honest.max(axis=0) + 1e-9).all()


def test_a_muted_honest_model_cannot_let_an_attacker_through_unclipped() -> None:
    # Self-centred clipping with f = 2 clips the two farthest inputs. A muted input still
    # counts among them, so the attacker beyond it is still clipped to the honest radius.
    own = np.array([1.0, 0.0])
    received = np.array([[1.1, 0.0], [0.9, 0.1], [1.0, 3.0], [-4.0, 0.0]])
    weights = np.full(5, 0.2)
    screened = screen_inputs(own, received, 2, spread=1.5, own_limit=1.5)
    assert screened.muted[2] and screened.muted[3] and screened.f == 2
    result = clipping(own, screened.rows, mute(weights, screened.muted), screened.f)
    assert np.linalg.norm(result - own) <= 0.2 * 2 * np.linalg.norm(received[0] - own) + 1e-9


# ------------------------------------------------------------------ the DP yardstick (item 2)


def test_dp_noise_norm_is_the_length_of_one_rounds_dp_sgd_noise() -> None:
    """Against the real DP-SGD gradient: a batch Poisson sampling left empty gets the noise
    alone, so T plain SGD steps move the model by exactly the noise (torch's seeded RNG)."""
    torch.manual_seed(0)
    model = torch.nn.Linear(40, 10)
    d = sum(p.numel() for p in model.parameters())
    sigma, clip, batch, lr, steps = 1.3, 1.0, 16.0, 0.1, 25
    dp = DPSGDGradient(
        model,
        torch.nn.functional.cross_entropy,
        max_grad_norm=clip,
        noise_multiplier=sigma,
        expected_batch_size=batch,
    )
    start = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    empty_x, empty_y = torch.zeros(0, 40), torch.zeros(0, dtype=torch.long)
    with torch.no_grad():
        for _ in range(steps):
            dp.compute(empty_x, empty_y)
            for p in model.parameters():
                p -= lr * p.grad
    moved = torch.cat([p.detach().flatten() for p in model.parameters()]) - start
    expected = dp_noise_norm(sigma, clip, batch, lr, steps, d)
    assert float(moved.norm()) == pytest.approx(expected, rel=0.08)
    with pytest.raises(ValueError, match="noise_multiplier"):
        dp_noise_norm(0.0, clip, batch, lr, steps, d)


def test_under_dp_the_floor_keeps_noisy_honest_models_where_they_are() -> None:
    # Five honest models: one consensus plus each its own round of DP noise (length ~ nu), and
    # two attackers sitting on the centre to shrink the spread-based radius.
    rng = np.random.default_rng(0)
    d, nu = 2000, 0.5
    consensus = rng.normal(size=d)
    honest = consensus + rng.normal(size=(5, d)) * nu / math.sqrt(d)
    own, others = honest[0], honest[1:]
    attackers = np.tile(coordinate_median(own, others), (2, 1))
    received = np.vstack([others, attackers])
    without = screen_inputs(own, received, 2, spread=1.0)
    assert without.pulled[:4].any()  # the attackers shrank the radius below the noise
    with_floor = screen_inputs(own, received, 2, spread=1.0, floor=2.0 * nu)
    assert not with_floor.pulled[:4].any()
    np.testing.assert_array_equal(with_floor.rows[:4], others)


def test_under_dp_colluders_sending_one_model_are_twins_and_honest_noisy_models_never() -> None:
    from murmur.gossip.aggregation import twins

    rng = np.random.default_rng(1)
    d, nu = 500, 0.4
    consensus = rng.normal(size=d)
    honest = consensus + rng.normal(size=(5, d)) * nu / math.sqrt(d)  # one round of noise each
    alie = consensus - 0.1  # what colluders crafted: the same model from each of them
    received = np.vstack([honest[1:], alie, alie + 1e-6, alie])
    np.testing.assert_array_equal(twins(honest[0], received, 0.3 * nu), [False] * 4 + [True] * 3)
    assert not twins(honest[0], received, 0.0).any()  # no DP: no yardstick, nobody
    screened = screen_inputs(honest[0], received, 3, spread=1.5, twin_distance=0.3 * nu)
    np.testing.assert_array_equal(screened.muted, [False] * 4 + [True] * 3)
    assert screened.f == 3 and screened.rows.shape == received.shape  # still inputs
