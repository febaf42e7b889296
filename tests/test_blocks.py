"""Aggregation over models read block by block (gossip/blocks.py) and spooled models
(gossip/spool.py): the same results as the rules on the whole matrix."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from murmur.gossip import blocks
from murmur.gossip.aggregation import AGGREGATORS, distances_to, krum_select
from murmur.gossip.spool import SpooledModel, spool_folder
from murmur.models.params import flatten, state_sha256

SHAPES = {"conv": (3, 2, 5), "bias": (7,), "fc": (4, 6)}  # 61 entries
D = 61


def models(k: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [
        {name: rng.standard_normal(shape).astype(np.float32) for name, shape in SHAPES.items()}
        for _ in range(k)
    ]


def weights(k: int) -> np.ndarray:
    w = np.full(k + 1, 1.0 / (k + 2))
    w[0] = 1 - w[1:].sum()
    return w


@pytest.mark.parametrize("rule", sorted(AGGREGATORS))
@pytest.mark.parametrize("block", [1, 7, 61, 1000])
def test_every_rule_matches_the_whole_matrix(rule: str, block: int) -> None:
    own_model, *received = models(7)
    received[2] = {n: a * 40 for n, a in received[2].items()}  # an outlier to clip or drop
    own = flatten(own_model)
    f = 0 if rule == "mean" else 2
    expected = AGGREGATORS[rule](own, np.stack([flatten(m) for m in received]), weights(6), f)
    rows = blocks.ModelRows(received, D, block=block)
    got = blocks.aggregate(rule, own, rows, weights(6), f)
    np.testing.assert_allclose(got, expected, rtol=2e-5, atol=2e-6)


def test_distances_and_krum_selection_match(tmp_path: Path) -> None:
    own_model, *received = models(6, seed=3)
    own, stack = flatten(own_model), np.stack([flatten(m) for m in received])
    spooled = [SpooledModel.of(m, tmp_path) for m in received]
    rows = blocks.ModelRows(spooled, D, block=5)
    np.testing.assert_allclose(blocks.distances(own, rows), distances_to(own, stack), rtol=1e-6)
    assert (
        blocks.krum_select(own, rows, 1, m=3).tolist() == krum_select(own, stack, 1, m=3).tolist()
    )


def test_a_spooled_model_reads_back_exactly(tmp_path: Path) -> None:
    model = models(1, seed=5)[0]
    spooled = SpooledModel.of(model, spool_folder(tmp_path))
    assert list(spooled) == list(model) and len(spooled) == 3 and spooled.size == D
    for name, array in model.items():
        np.testing.assert_array_equal(spooled[name], array)
        assert not spooled[name].flags.writeable
    np.testing.assert_array_equal(spooled.read_flat(5, 40), flatten(model)[5:40])
    assert state_sha256(spooled) == state_sha256(model)
    with pytest.raises(IndexError):
        spooled.read_flat(0, D + 1)
    # the file has no name: nothing is left in the folder, and the folder is private
    assert list((tmp_path / "spool").iterdir()) == []
    assert (tmp_path / "spool").stat().st_mode & 0o777 == 0o700


def test_a_non_finite_aggregate_names_the_input() -> None:
    own_model, *received = models(3)
    received[1]["fc"][0, 0] = np.inf
    rows = blocks.ModelRows(received, D, block=8)
    with pytest.raises(ValueError, match=r"received\[1\]"):
        blocks.aggregate("mean", flatten(own_model), rows, weights(2), 0)


def test_bad_inputs_are_refused_as_the_rules_refuse_them() -> None:
    own_model, *received = models(3)
    own = flatten(own_model)
    with pytest.raises(ValueError, match="needs at least"):
        blocks.aggregate("krum", own, blocks.ModelRows(received, D), weights(2), 1)
    with pytest.raises(ValueError, match="entries"):
        blocks.ModelRows([{"x": np.zeros(3, np.float32)}], D)
    with pytest.raises(ValueError, match="unknown aggregation rule"):
        blocks.aggregate("nope", own, blocks.ModelRows(received, D), weights(2), 0)


@pytest.mark.parametrize("block", [1, 5, 64, 10_000])
def test_screening_block_by_block_matches_the_whole_matrix(block: int) -> None:
    """The node screens models read block by block (gossip/blocks.py screen_inputs): the
    centre, radius, pulled, muted and twin masks, and every rule's result on the pulled-in
    rows, equal aggregation.screen_inputs on the stacked matrix."""
    from murmur.gossip.aggregation import screen_inputs

    rng = np.random.default_rng(7)
    d = 203
    own = rng.normal(size=d).astype(np.float32)
    honest = own + rng.normal(scale=0.1, size=(5, d)).astype(np.float32)
    far = own + 40.0 * rng.normal(size=(2, d)).astype(np.float32)  # pulled in
    twin = honest[:1] + np.float32(1e-4)  # within the twin distance of honest[0]
    overflowed = np.full((1, d), np.inf, dtype=np.float32)  # lands on the centre
    received = np.concatenate([honest, far, twin, overflowed])
    params = {"spread": 1.5, "floor": 0.05, "own_limit": 3.0, "twin_distance": 0.01}
    whole = screen_inputs(own, received, 3, **params)
    rows = blocks.ModelRows(list(received), d, block=block)
    split = blocks.screen_inputs(own, rows, 3, **params)
    assert split.radius == pytest.approx(whole.radius)
    np.testing.assert_allclose(split.centre, whole.centre)
    for mask in ("pulled", "muted", "twins"):
        np.testing.assert_array_equal(getattr(split, mask), getattr(whole, mask), err_msg=mask)
    assert whole.pulled[5:7].all() and whole.pulled[-1] and whole.twins[5 + 2]
    for i in range(received.shape[0]):
        np.testing.assert_allclose(split.rows.row(i), whole.rows[i], rtol=1e-5, atol=1e-5)
    weights = np.full(received.shape[0] + 1, 1.0 / (received.shape[0] + 1))
    for rule in ("mean", "median", "trimmed_mean", "clipping"):
        f = 0 if rule == "mean" else 3
        expected = AGGREGATORS[rule](own, whole.rows, weights, f)
        got = blocks.aggregate(rule, own, split.rows, weights, f)
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5, err_msg=rule)
