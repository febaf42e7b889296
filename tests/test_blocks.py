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
