"""Server-style adaptive optimizers (models/optimizers.py) against steps worked by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
from murmur.models.optimizers import ServerOptimizer, ServerOptimizerSettings
from murmur.models.params import state_sha256

PREVIOUS = np.array([1.0, 0.0], dtype=np.float32)
AGGREGATE = np.array([1.5, -0.2], dtype=np.float32)  # delta = [0.5, -0.2]
LR, B1, B2, TAU = 0.1, 0.9, 0.99, 1e-3


def _optimizer(name: str) -> ServerOptimizer:
    return ServerOptimizer(ServerOptimizerSettings(name, LR, B1, B2, TAU))


def _expected(m: list[float], v: list[float], x: list[float]) -> np.ndarray:
    return np.array(
        [xi + LR * mi / (math.sqrt(vi) + TAU) for xi, mi, vi in zip(x, m, v, strict=True)]
    )


def test_fedadam_first_step_by_hand() -> None:
    # m = 0.1 * delta; v = 0.99 * tau^2 + 0.01 * delta^2
    m = [0.05, -0.02]
    v = [0.99e-6 + 0.01 * 0.25, 0.99e-6 + 0.01 * 0.04]
    result = _optimizer("adam").step(PREVIOUS, AGGREGATE)
    np.testing.assert_allclose(result, _expected(m, v, [1.0, 0.0]), rtol=1e-6)
    # Adam's normalised step is about lr m / |delta| ~ lr * 0.1 / 0.1 = lr per coordinate.
    assert result[0] == pytest.approx(1.0980, abs=1e-4)
    assert result[1] == pytest.approx(-0.0951, abs=1e-4)
    assert result.dtype == np.float32


def test_fedyogi_two_steps_by_hand() -> None:
    opt = _optimizer("yogi")
    # step 1: v0 = tau^2 < delta^2, so sign(v0 - delta^2) = -1 and v grows by 0.01 delta^2
    m1 = [0.05, -0.02]
    v1 = [1e-6 + 0.01 * 0.25, 1e-6 + 0.01 * 0.04]
    x1 = opt.step(PREVIOUS, AGGREGATE)
    np.testing.assert_allclose(x1, _expected(m1, v1, [1.0, 0.0]), rtol=1e-6)
    # step 2: a small delta (0.01 each): delta^2 = 1e-4 is below both v1 (2.501e-3, 4.01e-4),
    # so sign(v1 - delta^2) = +1 and Yogi shrinks v by 0.01 delta^2 where Adam would decay it.
    x1_64 = x1.astype(np.float64)
    aggregate2 = (x1_64 + 0.01).astype(np.float32)
    delta2 = aggregate2.astype(np.float64) - x1.astype(np.float64)
    m2 = [0.9 * m1[i] + 0.1 * delta2[i] for i in range(2)]
    v2 = [v1[i] - 0.01 * delta2[i] ** 2 for i in range(2)]
    x2 = opt.step(x1, aggregate2)
    np.testing.assert_allclose(x2, _expected(m2, v2, list(x1_64)), rtol=1e-6)
    assert opt.second_moment is not None and (opt.second_moment < np.array(v1)).all()
    assert opt.steps == 2


def test_fedadagrad_accumulates_squares() -> None:
    opt = _optimizer("adagrad")
    v1 = [1e-6 + 0.25, 1e-6 + 0.04]
    x1 = opt.step(PREVIOUS, AGGREGATE)
    np.testing.assert_allclose(x1, _expected([0.05, -0.02], v1, [1.0, 0.0]), rtol=1e-6)
    x2 = opt.step(x1, x1)  # a zero pseudo-gradient: momentum alone moves the model
    v2 = v1  # + 0
    m2 = [0.045, -0.018]
    np.testing.assert_allclose(x2, _expected(m2, v2, list(x1.astype(np.float64))), rtol=1e-6)


def test_no_change_means_no_step_on_the_first_round() -> None:
    result = _optimizer("adam").step(PREVIOUS, PREVIOUS)
    np.testing.assert_array_equal(result, PREVIOUS)


def test_state_round_trips_and_continues_identically() -> None:
    a, b = _optimizer("yogi"), _optimizer("yogi")
    x = a.step(PREVIOUS, AGGREGATE)
    b.load_state(a.to_state())
    target = np.array([1.2, 0.3], dtype=np.float32)
    np.testing.assert_array_equal(a.step(x, target), b.step(x, target))


def test_state_of_another_optimizer_is_refused() -> None:
    state = _optimizer("adam").to_state()
    with pytest.raises(ValueError, match="holds server optimizer 'adam'"):
        _optimizer("yogi").load_state(state)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("name", "sgd", "unknown server optimizer"),
        ("learning_rate", 0.0, "learning_rate must be > 0"),
        ("beta1", 1.0, "beta1 must be in"),
        ("tau", 0.0, "tau must be > 0"),
    ],
)
def test_bad_settings_are_refused(field: str, value: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ServerOptimizerSettings(**{field: value})


def test_a_model_of_another_size_is_refused() -> None:
    opt = _optimizer("adam")
    opt.step(PREVIOUS, AGGREGATE)
    with pytest.raises(ValueError, match="state has 2 entries, model 3"):
        opt.step(np.zeros(3, np.float32), np.ones(3, np.float32))


def test_nodes_step_their_aggregate_and_audit_and_checkpoint_the_optimizer(tmp_path) -> None:
    """A real in-process network with --server-optimizer yogi: each aggregation record names
    the optimizer and the robust aggregate it stepped from; the checkpoint keeps m and v."""
    from murmur.node.audit import records_of_kind
    from murmur.node.checkpoint import checkpoint_path, decode_checkpoint

    from tests.netutil import run_in_process

    argv = ["--no-dp", "--rounds", "2", "--aggregator", "mean", "--server-optimizer", "yogi"]
    _, hospitals = run_in_process([*argv, "--server-lr", "0.05"], tmp_path)
    for h in hospitals:
        records = records_of_kind(h.state_dir, "aggregation")
        assert [r.fields["server_optimizer"] for r in records] == ["yogi", "yogi"]
        assert all(r.fields["aggregate_sha256"] != r.fields["result_sha256"] for r in records)
        ckpt = decode_checkpoint(checkpoint_path(h.state_dir).read_bytes())
        assert ckpt.extra["server_optimizer"]["steps"] == 2
        assert records[-1].fields["result_sha256"] == state_sha256(ckpt.model_state)
        restored = ServerOptimizer(h.study.server_optimizer.settings)
        restored.load_state(ckpt.extra["server_optimizer"])
        np.testing.assert_array_equal(
            restored.second_moment, h.study.server_optimizer.second_moment
        )
