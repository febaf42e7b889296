"""bench/async.py's figures from the curves: rounds to reach a bar, the others' time to reach
it, each node's last AUC by a wall time, and the per-seed epidemic ratios."""

from __future__ import annotations

import importlib

import numpy as np
import pytest

bench = importlib.import_module("bench.async")  # the module name is a keyword
nan = np.nan


def network(aucs: list[list[float]], times: list[list[float]]) -> object:
    n = len(aucs)
    return bench.NetworkRun(np.array(aucs), np.array(times), np.zeros(n, bool), 0.0)


def test_rounds_to_reach_is_the_first_round_at_or_above_the_bar() -> None:
    curve = np.array([0.90, 0.95, 0.94, 0.97])
    assert bench.rounds_to_reach(curve, 0.95) == 2
    assert bench.rounds_to_reach(curve, 0.97) == 4
    assert bench.rounds_to_reach(curve, 0.98) is None


def test_the_others_reach_the_bar_when_the_last_of_them_ends_that_step() -> None:
    run = network(
        # hospital_0 (slow) is left out; step 3 of hospital_2 never finished
        [[0.5, nan, nan], [0.90, 0.96, 0.99], [0.92, 0.96, nan]],
        [[5.0, nan, nan], [1.0, 2.0, 3.0], [1.5, 2.5, nan]],
    )
    assert bench.others_reach(run, [1, 2], 0.96) == 2.5  # mean 0.96 at step 2, at 2.5 s
    assert bench.others_reach(run, [1, 2], 0.97) is None  # step 3 is not everyone's


def test_last_aucs_by_a_wall_time_ignore_a_step_ended_after_it() -> None:
    run = network([[0.8, 0.9, 0.95], [0.7, nan, nan]], [[1.0, 2.0, 3.5], [2.9, nan, nan]])
    assert bench.last_aucs(run).tolist() == [0.95, 0.7]
    assert bench.last_aucs(run, by_s=3.0).tolist() == [0.9, 0.7]


def test_seed_stats_average_the_seeds_that_reached_and_count_them() -> None:
    result = bench.EpidemicResult(ratio=1.3, per_seed=[2.0, None, 1.5])
    mean, sd, reached = result.seed_stats()
    assert reached == 2 and mean == pytest.approx(1.75) and sd == pytest.approx(0.3536, abs=1e-4)
    assert bench.EpidemicResult(None, [None]).seed_stats() == (None, None, 0)
