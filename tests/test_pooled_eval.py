"""Pooled evaluation from histograms (models/pooled_eval.py) and the secure sum under it
(crypto/secure_sum.py): the figures equal scikit-learn's on the pooled scores within the bin
resolution, and the masked sum is exact, survives a dropped hospital and hides each part."""

from __future__ import annotations

import numpy as np
import pytest
from murmur.crypto.identity import generate_identity
from murmur.crypto.secure_sum import (
    SecureSum,
    SecureSumError,
    mask_stream,
    masked,
    pair_seed,
    reveal_seed,
)
from murmur.models import pooled_eval as pe
from murmur.models.uncertainty import delong_variance
from sklearn.metrics import brier_score_loss, confusion_matrix, roc_auc_score


def hospitals(seed: int, sizes=(40, 120, 75, 300)) -> list[tuple[np.ndarray, np.ndarray]]:
    """Hospitals with different case mixes and differently calibrated scores."""
    rng = np.random.default_rng(seed)
    out = []
    for i, n in enumerate(sizes):
        y = (rng.random(n) < 0.2 + 0.15 * i).astype(np.int64)
        logit = rng.normal(1.5 * y - 0.7, 1.0 + 0.3 * i)
        out.append((y, 1.0 / (1.0 + np.exp(-logit))))
    return out


@pytest.mark.parametrize("seed", range(5))
def test_pooled_auroc_from_histograms_equals_sklearn_within_bin_resolution(seed):
    spec = pe.BinSpec()
    parts = hospitals(seed)
    pooled = pe.combine(pe.score_histogram(y, p, spec) for y, p in parts)
    y_all = np.concatenate([y for y, _ in parts])
    p_all = np.concatenate([p for _, p in parts])
    exact = roc_auc_score(y_all, p_all)
    got = pe.figures(pooled, spec)["auroc"]
    assert abs(got["value"] - exact) <= got["max_binning_error"] + 1e-12
    assert abs(got["value"] - exact) <= 0.002
    assert got["low"] < exact < got["high"]


def test_coarse_bins_move_the_auroc_by_no_more_than_the_tie_bound():
    spec = pe.BinSpec(bins=8, logit_range=4.0)
    y, p = hospitals(7)[3]
    h = pe.score_histogram(y, p, spec)
    got = pe.figures(h, spec)["auroc"]
    error = abs(got["value"] - roc_auc_score(y, p))
    assert got["max_binning_error"] > 0.01  # the bound is not vacuous here
    assert error <= got["max_binning_error"] + 1e-12


def test_delong_variance_from_bins_equals_delong_on_binned_scores():
    spec = pe.BinSpec(bins=64)
    y, p = hospitals(3)[2]
    h = pe.score_histogram(y, p, spec)
    binned = np.searchsorted(spec.edges(), pe._logit(p), side="right")  # the bin is the score
    auc, var = pe.auroc_with_variance(h)
    ref_auc, ref_var = delong_variance(y, binned)
    assert auc == pytest.approx(ref_auc, abs=1e-12)
    assert var == pytest.approx(ref_var, rel=1e-9)


@pytest.mark.parametrize("threshold", [0.5, 0.3, 0.77])
def test_operating_point_brier_and_calibration_are_exact(threshold):
    spec = pe.BinSpec(threshold=threshold)
    parts = hospitals(11)
    pooled = pe.combine(pe.score_histogram(y, p, spec) for y, p in parts)
    y = np.concatenate([y for y, _ in parts])
    p = np.concatenate([p for _, p in parts])
    tn, fp, fn, tp = confusion_matrix(y, p >= threshold).ravel()
    got = pe.figures(pooled, spec)
    assert (got["tp"], got["fp"], got["tn"], got["fn"]) == (tp, fp, tn, fn)
    assert got["sensitivity"]["value"] == pytest.approx(tp / (tp + fn))
    assert got["specificity"]["value"] == pytest.approx(tn / (tn + fp))
    assert got["ppv"]["value"] == pytest.approx(tp / (tp + fp))
    assert got["npv"]["value"] == pytest.approx(tn / (tn + fn))
    assert got["brier"]["value"] == pytest.approx(brier_score_loss(y, p), rel=1e-12)
    terms = (p - y) ** 2
    half = pe.Z_95 * terms.std(ddof=1) / np.sqrt(len(terms))
    assert got["brier"]["low"] == pytest.approx(terms.mean() - half, rel=1e-9)
    calib = got["calibration"]
    assert calib["mean_predicted"] == pytest.approx(p.mean(), rel=1e-12)
    for row in calib["bins"]:
        k = row["bin"]
        inside = np.minimum((p * 10).astype(int), 9) == k
        assert row["n"] == inside.sum()
        assert row["observed"] == pytest.approx(y[inside].mean())
        assert row["predicted"] == pytest.approx(p[inside].mean(), abs=0.01)


def test_histogram_vector_round_trip_keeps_counts_exact_and_sums_to_fixed_point():
    spec = pe.BinSpec(bins=256)
    y, p = hospitals(2)[1]
    h = pe.score_histogram(y, p, spec)
    back = pe.from_vector(pe.to_vector(h), spec)
    assert np.array_equal(back.counts, h.counts)
    assert np.allclose(back.brier, h.brier, atol=2.0**-30)
    assert np.allclose(back.sum_p, h.sum_p, atol=2.0**-30)
    with pytest.raises(ValueError, match="entries"):
        pe.from_vector(pe.to_vector(h)[:-1], spec)


def test_bad_scores_are_refused_with_the_reason():
    spec = pe.BinSpec()
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        pe.score_histogram(np.array([0, 1]), np.array([0.2, 1.5]), spec)
    with pytest.raises(ValueError, match="one probability per label"):
        pe.score_histogram(np.array([0, 1, 1]), np.array([0.2, 0.5]), spec)
    with pytest.raises(ValueError, match="threshold"):
        pe.BinSpec(threshold=1.0)


# ------------------------------------------------------------------ the secure sum


def _setup(n: int):
    ids = [generate_identity(f"h{i}") for i in range(n)]
    keys = [i.public_key for i in ids]
    partners = {k: [o for o in keys if o != k] for k in keys}
    return ids, keys, partners


def test_pair_seed_is_shared_by_both_ends_and_bound_to_the_session():
    a, b, c = (generate_identity(n) for n in "abc")
    assert pair_seed(a, b.public_key, b"s1") == pair_seed(b, a.public_key, b"s1")
    assert pair_seed(a, b.public_key, b"s1") != pair_seed(a, b.public_key, b"s2")
    assert pair_seed(a, b.public_key, b"s1") != pair_seed(a, c.public_key, b"s1")
    assert len(mask_stream(pair_seed(a, b.public_key, b"s1"), 5)) == 5


def test_masks_cancel_and_the_total_is_exact():
    ids, _keys, partners = _setup(4)
    rng = np.random.default_rng(0)
    values = [rng.integers(0, 2**40, size=50, dtype=np.uint64) for _ in ids]
    summer = SecureSum(partners, 50)
    for ident, v in zip(ids, values, strict=True):
        sent = masked(ident, v, partners[ident.public_key], b"session")
        assert not np.array_equal(sent, v)
        summer.add(ident.public_key, sent)
    assert np.array_equal(summer.total(), sum(values))


def test_a_dropped_hospital_is_tolerated_by_revealing_the_survivors_seeds_with_it():
    ids, keys, partners = _setup(5)
    values = [np.full(8, i + 1, dtype=np.uint64) for i in range(5)]
    summer = SecureSum(partners, 8)
    for ident, v in list(zip(ids, values, strict=True))[:4]:  # h4 drops after setting up masks
        summer.add(ident.public_key, masked(ident, v, partners[ident.public_key], b"s"))
    with pytest.raises(SecureSumError, match="neither received"):
        summer.total()
    needed = summer.declare_dropped()
    assert {d for _, d in needed} == {keys[4]} and len(needed) == 4
    with pytest.raises(SecureSumError, match="revealed seeds missing"):
        summer.total()
    by_key = {i.public_key: i for i in ids}
    for survivor, dropped in needed:
        summer.reveal(survivor, dropped, reveal_seed(by_key[survivor], dropped, b"s"))
    assert np.array_equal(summer.total(), sum(values[:4]))
    late = masked(ids[4], values[4], partners[keys[4]], b"s")
    with pytest.raises(SecureSumError, match="declared dropped"):
        summer.add(keys[4], late)


def test_masks_along_graph_edges_only_also_cancel():
    ids, keys, _ = _setup(6)
    ring = {keys[i]: [keys[(i - 1) % 6], keys[(i + 1) % 6]] for i in range(6)}
    values = [np.arange(10, dtype=np.uint64) * (i + 1) for i in range(6)]
    summer = SecureSum(ring, 10)
    for ident, v in zip(ids, values, strict=True):
        summer.add(ident.public_key, masked(ident, v, ring[ident.public_key], b"ring"))
    assert np.array_equal(summer.total(), sum(values))
    with pytest.raises(SecureSumError, match="symmetric"):
        SecureSum({keys[0]: [keys[1]], keys[1]: []}, 10)
