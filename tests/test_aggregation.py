"""Aggregation rules against hand-worked examples, plus their bounds and error messages."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from murmur.gossip import aggregation as agg
from murmur.gossip.aggregation import (
    AGGREGATORS,
    clipping,
    distances_to,
    finite_rows,
    geometric_median,
    krum,
    krum_scores,
    krum_select,
    mean,
    median,
    min_inputs,
    multi_krum,
    trimmed_mean,
)


def column(*values: float) -> tuple[np.ndarray, np.ndarray]:
    """One-coordinate models: the first value is own, the rest were received."""
    vectors = np.array(values, dtype=np.float32).reshape(-1, 1)
    return vectors[0], vectors[1:]


def uniform(n: int) -> np.ndarray:
    return np.full(n, 1.0 / n)


# ----------------------------------------------------------------------------- mean


def test_mean_is_the_weighted_gossip_average():
    own = np.array([0.0, 0.0], dtype=np.float32)
    received = np.array([[3.0, 0.0], [0.0, 6.0]], dtype=np.float32)
    result = mean(own, received, np.array([0.5, 0.25, 0.25]), 0)
    np.testing.assert_allclose(result, [0.75, 1.5])
    assert result.dtype == np.float32


def test_mean_refuses_byzantine_tolerance():
    own, received = column(0, 1, 2)
    with pytest.raises(ValueError, match="tolerates no Byzantine neighbour"):
        mean(own, received, uniform(3), 1)


def test_mean_refuses_weights_that_do_not_sum_to_one():
    own, received = column(0, 1, 2)
    with pytest.raises(ValueError, match="summing to 1"):
        mean(own, received, np.array([0.5, 0.5, 0.5]), 0)
    with pytest.raises(ValueError, match=r"shape \(3,\)"):
        mean(own, received, np.array([0.5, 0.5]), 0)


# ----------------------------------------------------------------------------- median


def test_median_per_coordinate_includes_own():
    own = np.array([1.0, 10.0], dtype=np.float32)
    received = np.array([[2.0, 20.0], [100.0, -5.0]], dtype=np.float32)
    np.testing.assert_array_equal(median(own, received, uniform(3), 1), [2.0, 10.0])


def test_median_of_an_even_count_averages_the_middle_two():
    own, received = column(1, 2, 3, 10)
    np.testing.assert_array_equal(median(own, received, uniform(4), 1), [2.5])


def test_median_needs_an_honest_majority():
    own, received = column(1, 2, 3, 4)
    with pytest.raises(ValueError, match=r"needs at least 5 inputs \(own \+ 4 received\), got 4"):
        median(own, received, uniform(4), 2)


# ----------------------------------------------------------------------------- trimmed mean


def test_trimmed_mean_drops_f_from_each_end():
    own, received = column(1, 2, 3, 4, 100)
    np.testing.assert_allclose(trimmed_mean(own, received, uniform(5), 1), [3.0])
    np.testing.assert_allclose(trimmed_mean(own, received, uniform(5), 2), [3.0])
    np.testing.assert_allclose(trimmed_mean(own, received, uniform(5), 0), [22.0])


def test_trimmed_mean_with_ties():
    own, received = column(5, 5, 5, 1, 9)
    np.testing.assert_array_equal(trimmed_mean(own, received, uniform(5), 1), [5.0])


def test_trimmed_mean_survives_huge_byzantine_values():
    # A sum-minus-extremes shortcut would lose 1 + 2 + 3 against 1e30 in float32.
    own, received = column(1, 2, 3, 1e30, -1e30)
    np.testing.assert_array_equal(trimmed_mean(own, received, uniform(5), 1), [2.0])


@settings(max_examples=40, deadline=None, derandomize=True, database=None)
@given(
    n=st.integers(min_value=1, max_value=23),
    d=st.integers(min_value=1, max_value=6),
    seed=st.integers(min_value=0, max_value=2**16),
    data=st.data(),
)
def test_trimmed_mean_and_median_match_a_full_sort(n, d, seed, data):
    f = data.draw(st.integers(min_value=0, max_value=(n - 1) // 2))
    values = np.random.default_rng(seed).integers(-5, 5, size=(n, d)).astype(np.float64)
    ordered = np.sort(values, axis=0)
    result = trimmed_mean(values[0], values[1:], uniform(n), f)
    np.testing.assert_allclose(result, ordered[f : n - f].mean(axis=0), atol=1e-12)
    np.testing.assert_allclose(median(values[0], values[1:], uniform(n), 0), np.median(values, 0))


def test_trimmed_mean_across_column_blocks_and_both_selection_paths():
    rng = np.random.default_rng(3)
    d = 2 * agg._BLOCK_COLUMNS + 5
    values = rng.standard_normal((21, d)).astype(np.float32)
    ordered = np.sort(values, axis=0)
    for f in (1, agg._STREAMING_MAX_TRIM + 1):  # streaming selection, then the sort path
        result = trimmed_mean(values[0], values[1:], uniform(21), f)
        np.testing.assert_allclose(result, ordered[f : 21 - f].mean(axis=0), atol=1e-6)


# ----------------------------------------------------------------------------- krum


# 1-D inputs [own, *received] = [0, 1, 2, 4, 100], f = 1: each score sums the squared
# distances to the n - f - 2 = 2 nearest others.
#   0: 1 + 4 = 5     1: 1 + 1 = 2     2: 1 + 4 = 5     4: 4 + 9 = 13     100: 96² + 98² = 18820
KRUM_OWN, KRUM_RECEIVED = column(0, 1, 2, 4, 100)


def test_krum_scores_sum_over_the_n_minus_f_minus_2_nearest():
    np.testing.assert_allclose(krum_scores(KRUM_OWN, KRUM_RECEIVED, 1), [5, 2, 5, 13, 18820])


def test_krum_picks_the_lowest_score():
    # Summing over n - f = 4 neighbours instead (p2pfl, Nebula) would pick 4, not 1.
    np.testing.assert_array_equal(krum(KRUM_OWN, KRUM_RECEIVED, uniform(5), 1), [1.0])
    assert krum_select(KRUM_OWN, KRUM_RECEIVED, 1).tolist() == [1]


def test_multi_krum_averages_the_m_best():
    # Ranking: 1 (2), then 0 and 2 tied at 5 (lower index first), then 4 (13).
    assert krum_select(KRUM_OWN, KRUM_RECEIVED, 1, m=4).tolist() == [1, 0, 2, 3]
    np.testing.assert_allclose(multi_krum(KRUM_OWN, KRUM_RECEIVED, uniform(5), 1, m=3), [1.0])
    # default m = n - f = 4: mean of 1, 0, 2, 4
    np.testing.assert_allclose(multi_krum(KRUM_OWN, KRUM_RECEIVED, uniform(5), 1), [1.75])
    with pytest.raises(ValueError, match=r"m must be a whole number in 1\.\.5"):
        multi_krum(KRUM_OWN, KRUM_RECEIVED, uniform(5), 1, m=6)


def test_krum_needs_more_than_2f_plus_2_inputs():
    own, received = column(0, 1, 2, 3)
    with pytest.raises(ValueError, match=r"'krum' with f=1 needs at least 5 inputs"):
        krum(own, received, uniform(4), 1)


def exact_squared_distances(vectors: np.ndarray) -> np.ndarray:
    """Squared distances between the rows of ``vectors`` from float64 differences, the slow way."""
    exact = vectors.astype(np.float64)
    return ((exact[:, None, :] - exact[None, :, :]) ** 2).sum(axis=-1)


def exact_krum_scores(vectors: np.ndarray, f: int) -> np.ndarray:
    """Krum scores of the rows of ``vectors`` from float64 differences, the slow way."""
    squared = exact_squared_distances(vectors)
    np.fill_diagonal(squared, np.inf)
    return np.sort(squared, axis=1)[:, : len(vectors) - f - 2].sum(axis=1)


def test_krum_distances_stay_accurate_for_nearly_equal_models():
    # Models 1e-3 apart around 1000: ||a||² + ||b||² - 2ab cancels in float32 without centring.
    rng = np.random.default_rng(0)
    base = 1000.0 + rng.standard_normal(50_000)
    vectors = (base + 1e-3 * rng.standard_normal((7, 50_000))).astype(np.float32)
    np.testing.assert_allclose(
        krum_scores(vectors[0], vectors[1:], 1), exact_krum_scores(vectors, 1), rtol=1e-4
    )


def test_krum_distances_stay_accurate_for_colluders_far_from_own():
    # Two colluding models 1.0 from own and 1e-3 from each other: a Gram matrix centred on own
    # (||a||² + ||b||² - 2ab) gave their distance with 13 % error; their scores hang on it.
    rng = np.random.default_rng(1)
    d = 200_000
    own = rng.standard_normal(d)
    honest = own + 1e-3 * rng.standard_normal((4, d))
    colluders = own + rng.standard_normal(d) + 1e-3 * rng.standard_normal((2, d))
    vectors = np.vstack([own, honest, colluders]).astype(np.float32)
    squared = agg.pairwise_squared_distances(vectors[0], vectors[1:])
    exact = vectors[5].astype(np.float64) - vectors[6]
    np.testing.assert_allclose(squared[5, 6], exact @ exact, rtol=1e-5)
    np.testing.assert_allclose(
        krum_scores(vectors[0], vectors[1:], 2), exact_krum_scores(vectors, 2), rtol=1e-5
    )


def test_krum_distances_split_over_workers_match_one_pass(monkeypatch):
    rng = np.random.default_rng(4)
    d = 9 * agg._DISTANCE_BLOCK_COLUMNS + 5  # blocks for 2 workers, and a short last block
    vectors = rng.standard_normal((6, d)).astype(np.float32)
    monkeypatch.setattr(agg, "_distance_workers", lambda d, torch_threads: 2)
    split = agg.pairwise_squared_distances(vectors[0], vectors[1:])
    monkeypatch.setattr(agg, "_distance_workers", lambda d, torch_threads: 1)
    one_pass = agg.pairwise_squared_distances(vectors[0], vectors[1:])
    np.testing.assert_allclose(split, one_pass, rtol=1e-12)
    np.testing.assert_allclose(split, exact_squared_distances(vectors), rtol=1e-5)


def test_distance_workers_use_the_cores_torch_leaves_free(monkeypatch):
    monkeypatch.setattr(agg.os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    blocks = agg._DISTANCE_BLOCK_COLUMNS
    assert agg._distance_workers(1000, 1) == 1  # one block: a thread would cost more
    assert agg._distance_workers(11 * blocks, 1) == 3  # at least 3 blocks per worker
    assert agg._distance_workers(1000 * blocks, 1) == 8  # one per core
    assert agg._distance_workers(1000 * blocks, 2) == 4  # torch's own threads take the rest
    assert agg._distance_workers(1000 * blocks, 8) == 1


def test_krum_takes_read_only_and_half_precision_models_without_warnings():
    rng = np.random.default_rng(5)
    vectors = rng.standard_normal((6, 1000)).astype(np.float16)
    read_only = np.frombuffer(vectors.tobytes(), dtype=np.float16).reshape(6, 1000)
    assert not read_only.flags.writeable  # as models decoded from a message are
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        scores = krum_scores(read_only[0], read_only[1:], 1)
    np.testing.assert_allclose(scores, exact_krum_scores(vectors, 1), rtol=1e-6)


# ----------------------------------------------------------------------------- geometric median


def test_geometric_median_of_collinear_points_is_the_median():
    own, received = column(0, 1, 2, 3, 100)
    result = geometric_median(own, received, uniform(5), 2, nu=1e-9, max_iter=500, tol=1e-12)
    np.testing.assert_allclose(result, [2.0], atol=1e-3)


def test_geometric_median_at_an_obtuse_vertex():
    # A triangle with an angle >= 120° at A has its Fermat point (geometric median) at A.
    own = np.array([0.0, 0.0])
    received = np.array([[1.0, 0.0], [-1.0, 0.1]])
    result = geometric_median(own, received, uniform(3), 1, nu=1e-9, max_iter=1000, tol=1e-14)
    np.testing.assert_allclose(result, [0.0, 0.0], atol=1e-3)


def test_geometric_median_of_a_square_is_its_centre_despite_an_outlier():
    own = np.array([0.0, 0.0])
    # Two points at the centre outweigh the outlier's unit pull, so the median is exactly there.
    received = np.array([[2.0, 0.0], [0.0, 2.0], [2.0, 2.0], [1.0, 1.0], [1.0, 1.0], [1e6, 1e6]])
    result = geometric_median(own, received, uniform(7), 2, max_iter=500, tol=1e-12)
    np.testing.assert_allclose(result, [1.0, 1.0], atol=1e-3)


def test_geometric_median_checks_its_parameters():
    own, received = column(0, 1, 2)
    with pytest.raises(ValueError, match="nu must be"):
        geometric_median(own, received, uniform(3), 1, nu=0.0)
    with pytest.raises(ValueError, match="max_iter must be"):
        geometric_median(own, received, uniform(3), 1, max_iter=0)


# ----------------------------------------------------------------------------- clipping

CLIP_OWN = np.array([0.0, 0.0])
CLIP_RECEIVED = np.array([[1.0, 0.0], [0.0, 3.0], [10.0, 0.0]])  # distances 1, 3, 10


def test_clipping_adaptive_radius_clips_only_the_f_farthest():
    # f = 1: tau = (k - f)-th = 2nd smallest distance = 3, so [10, 0] is pulled in to [3, 0].
    result = clipping(CLIP_OWN, CLIP_RECEIVED, uniform(4), 1)
    np.testing.assert_allclose(result, 0.25 * np.array([1 + 0 + 3, 0 + 3 + 0]))


def test_clipping_with_a_given_radius():
    # tau = 2: [0, 3] -> [0, 2] and [10, 0] -> [2, 0]
    result = clipping(CLIP_OWN, CLIP_RECEIVED, uniform(4), 1, tau=2.0)
    np.testing.assert_allclose(result, [0.75, 0.5])
    with pytest.raises(ValueError, match="tau must be a finite number > 0"):
        clipping(CLIP_OWN, CLIP_RECEIVED, uniform(4), 1, tau=0.0)


def test_clipping_with_f_zero_is_gossip_averaging():
    weights = np.array([0.4, 0.2, 0.2, 0.2])
    np.testing.assert_allclose(
        clipping(CLIP_OWN, CLIP_RECEIVED, weights, 0), mean(CLIP_OWN, CLIP_RECEIVED, weights, 0)
    )


def test_clipping_bounds_what_one_neighbour_can_do():
    rng = np.random.default_rng(1)
    own = rng.standard_normal(100)
    honest = own + 0.1 * rng.standard_normal((4, 100))
    attack = own + 1e9 * rng.standard_normal(100)
    received = np.vstack([honest, attack[None, :]])
    weights = uniform(6)
    honest_only = clipping(own, honest, uniform(5), 0)
    result = clipping(own, received, weights, 1)
    tau = np.sort(distances_to(own, received))[3]
    # the attacker moves the node by at most its weight times the radius
    assert np.linalg.norm(result - own) <= np.linalg.norm(honest_only - own) + weights[5] * tau
    assert tau < 1.0


# ----------------------------------------------------------------------------- helpers


def test_distances_to_matches_numpy_norm():
    rng = np.random.default_rng(2)
    vector = rng.standard_normal(agg._BLOCK_COLUMNS + 17)
    rows = rng.standard_normal((3, vector.shape[0]))
    np.testing.assert_allclose(distances_to(vector, rows), np.linalg.norm(rows - vector, axis=1))


def test_finite_rows_flags_nan_and_inf_but_not_large_values():
    rows = np.ones((4, 3), dtype=np.float32)
    rows[1, 2] = np.nan
    rows[2, 0] = -np.inf
    rows[3] = 3e38  # finite, although its float32 sum overflows
    assert finite_rows(rows).tolist() == [True, False, False, True]


@pytest.mark.parametrize("name", ["mean", "trimmed_mean", "clipping", "geometric_median"])
def test_a_non_finite_input_is_named_not_averaged(name):
    own, received = column(1, 2, np.nan)
    with pytest.raises(ValueError, match=r"non-finite inputs: received\[1\]"):
        AGGREGATORS[name](own, received, uniform(3), 0)


@pytest.mark.parametrize("name", sorted(set(AGGREGATORS) - {"krum", "multi_krum"}))
def test_with_no_neighbours_a_rule_keeps_its_own_model(name):
    own = np.array([1.0, -2.0], dtype=np.float32)
    result = AGGREGATORS[name](own, np.empty((0, 2), np.float32), np.array([1.0]), 0)
    np.testing.assert_array_equal(result, own)


@pytest.mark.parametrize("name", sorted(AGGREGATORS))
def test_robust_rules_keep_honest_values_against_one_attacker(name):
    # Five honest models near 1 and one Byzantine neighbour far away.
    rng = np.random.default_rng(4)
    honest = 1.0 + 0.01 * rng.standard_normal((5, 8))
    received = np.vstack([honest[1:], np.full((1, 8), 1e6)])
    f = 0 if name == "mean" else 1
    result = AGGREGATORS[name](honest[0], received, uniform(6), f)
    if name == "mean":
        assert np.abs(result).max() > 1e5  # the plain mean is the control: it is dragged away
    else:
        assert np.abs(result - 1.0).max() < 0.1


def test_bad_shapes_get_clear_errors():
    with pytest.raises(ValueError, match=r"received must have shape \(k, 2\)"):
        median(np.zeros(2), np.zeros((3, 4)), uniform(4), 1)
    with pytest.raises(ValueError, match="own must be a flat vector"):
        median(np.zeros((2, 2)), np.zeros((3, 2)), uniform(4), 1)
    with pytest.raises(ValueError, match="floating-point"):
        median(np.zeros(2, dtype=np.int64), np.zeros((3, 2)), uniform(4), 1)


def test_min_inputs_bounds():
    assert min_inputs("mean", 0) == 1
    assert [min_inputs("krum", f) for f in range(3)] == [3, 5, 7]
    assert min_inputs("multi_krum", 2) == 7
    assert [min_inputs("trimmed_mean", f) for f in range(3)] == [1, 3, 5]
    assert min_inputs("median", 2) == 5
    assert min_inputs("geometric_median", 1) == 3
    assert [min_inputs("clipping", f) for f in range(3)] == [1, 3, 4]
    with pytest.raises(ValueError, match="unknown aggregation rule 'krumm'"):
        min_inputs("krumm", 1)
    with pytest.raises(ValueError, match="f must be a whole number"):
        min_inputs("median", -1)
