"""bench/byzantine.py's bookkeeping over seeds and with DP, on hand-made results (no runs)."""

from __future__ import annotations

import pytest

from bench import byzantine
from bench.byzantine import Attack, Matrix, Options, Rule, Setting, cluster_options, main


def _run(mean: float, lowest: float, too_far: int = 0) -> dict:
    return {
        "mean": mean,
        "min": lowest,
        "attackers_quarantined": 1,
        "honest_quarantined": 0,
        "attackers_proven": 0,
        "honest_proven": 0,
        "honest_too_far": too_far,
    }


SETTING = Setting("heart-disease", "complete", 4, 3)
RULE, ATTACK = Rule("clipping"), Attack("sign_flip")


def test_a_cell_over_seeds_reports_the_mean_gap_and_the_worst_seed() -> None:
    matrix = Matrix([SETTING], (ATTACK,), (RULE,), Options(seed=0, seeds=3, dp_epsilon=1.0))
    for seed, (clean, hit) in enumerate(((0.84, 0.83), (0.86, 0.70), (0.80, 0.81))):
        matrix.results[("clean", SETTING, RULE, seed)] = _run(clean, clean - 0.1)
        matrix.results[("attack", SETTING, RULE, ATTACK, seed)] = _run(hit, 0.067, too_far=2)
    assert matrix.seed_gaps(SETTING, RULE, ATTACK) == pytest.approx([0.01, 0.16, -0.01])
    assert matrix.gap(SETTING, RULE, ATTACK) == pytest.approx(0.16 / 3)
    assert matrix.worst_seed_gap(SETTING, RULE, ATTACK) == pytest.approx(0.16)
    assert matrix.worst_gap([SETTING], RULE, worst_seed=True) == pytest.approx(0.16)
    hit = matrix.attacked(SETTING, RULE, ATTACK)
    assert hit["mean"] == pytest.approx((0.83 + 0.70 + 0.81) / 3) and hit["min"] == 0.067
    assert hit["honest_too_far"] == 6 and hit["attackers_quarantined"] == 3
    assert "worst seed 0.160" in matrix._cell(SETTING, RULE, ATTACK)
    # a seed missing: the cell is not reported as held on the seeds that did run
    del matrix.results[("attack", SETTING, RULE, ATTACK, 2)]
    assert matrix.gap(SETTING, RULE, ATTACK) is None
    assert matrix.attacked(SETTING, RULE, ATTACK) is None


def test_each_seed_gets_its_own_runs_with_dp_on() -> None:
    matrix = Matrix([SETTING], (ATTACK,), (RULE,), Options(seed=0, seeds=3, dp_epsilon=1.0))
    jobs = matrix.jobs()
    assert len(jobs) == 6  # clean and attacked, three seeds
    assert sorted({j.options["seed"] for j in jobs}) == [0, 1, 2]
    assert all(j.options["dp_epsilon"] == 1.0 and "no_dp" not in j.options for j in jobs)
    plain = cluster_options(SETTING, RULE, 3, ATTACK, Options(), clean=False)
    assert plain["no_dp"] is True and "dp_epsilon" not in plain


def test_bad_flags_name_the_fix() -> None:
    with pytest.raises(SystemExit):
        main(["--dp-epsilon", "0"])
    with pytest.raises(SystemExit):
        main(["--quick", "--rule", "nonsense"])


def test_the_byzantine_heavy_ring_gives_every_honest_node_two_honest_and_two_byzantine() -> None:
    from murmur.topologies.graphs import build_topology

    ring = byzantine.ring_setting("breast-cancer")
    topology = build_topology(ring.topology, ring.honest + ring.byzantine)
    attackers = set(range(ring.honest, ring.honest + ring.byzantine))
    for i in range(ring.honest):
        neighbours = set(topology.neighbours(i))
        assert len(neighbours - attackers) == 2 and len(neighbours & attackers) == 2, i
        assert topology.mixing_weights(i).tolist() == pytest.approx([0.2] * 5)
    assert byzantine.local_f(ring, 0) == 2
    # The clean reference is the honest hospitals' own ring; the attacked run the edge file.
    rule, attack = byzantine.Rule("clipping"), byzantine.RING_ATTACKS[1]
    options = byzantine.Options(dp_epsilon=1.0)
    clean = byzantine.cluster_options(ring, rule, 1, None, options, clean=True)
    hit = byzantine.cluster_options(ring, rule, 2, attack, options, clean=False)
    assert clean["topology"] == "ring" and "byzantine" not in clean
    assert hit["topology"] == ring.topology and hit["byzantine"] == 11
    assert hit["attack_param"] == ["z=10"] and hit["dp_epsilon"] == 1.0


def test_the_noise_blind_row_turns_the_own_model_limit_off() -> None:
    blind = byzantine.Rule("clipping", own_limit=False)
    assert blind.label == "clipping/noise-blind"
    setting = Setting("heart-disease", "complete", 4, 3)
    options = cluster_options(setting, blind, 3, None, Options(dp_epsilon=1.0), clean=True)
    assert options["max_relative_distance"] == "inf"
    assert "max_relative_distance" not in cluster_options(
        setting, Rule("clipping"), 3, None, Options(dp_epsilon=1.0), clean=True
    )
