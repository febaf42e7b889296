"""Randomized peer sampling (gossip/sampling.py): the sampled graph of a round, the Byzantine
bound, and a network of real nodes that sends and aggregates by it."""

from __future__ import annotations

import collections
import random
from pathlib import Path

import numpy as np
import pytest
from murmur.gossip.sampling import PeerSample, exceed_probability
from murmur.node.audit import records_of_kind

import run_cluster
from tests.netutil import run_in_process

NAMES = [f"hospital_{i}" for i in range(64)]


def samples(s: int, seed: int = 0) -> dict[str, PeerSample]:
    """Every node's own copy, each built from its own allowlist (everyone else)."""
    return {n: PeerSample.of(n, [m for m in NAMES if m != n], s, seed) for n in NAMES}


def test_every_node_sends_to_and_hears_from_exactly_s_distinct_peers() -> None:
    copies = samples(4)
    for r in (1, 2, 17):
        outs = {n: copies[n].targets(r) for n in NAMES}
        for n, targets in outs.items():
            assert len(set(targets)) == 4 and n not in targets
        heard = collections.Counter(t for targets in outs.values() for t in targets)
        assert set(heard.values()) == {4}
        for n in NAMES:  # a node's senders, derived on its own, are those that picked it
            assert copies[n].sources(r) == sorted(m for m in NAMES if n in outs[m])


def test_rounds_draw_fresh_targets_and_seeds_differ() -> None:
    a, b = samples(4, seed=0)["hospital_0"], samples(4, seed=1)["hospital_0"]
    assert len({tuple(a.targets(r)) for r in range(1, 21)}) > 15
    assert [a.targets(r) for r in range(1, 6)] != [b.targets(r) for r in range(1, 6)]


def test_targets_are_uniform_over_the_other_nodes() -> None:
    copy = samples(4)["hospital_0"]
    counts = collections.Counter(t for r in range(1, 3001) for t in copy.targets(r))
    expected = 3000 * 4 / 63
    assert set(counts) == set(NAMES) - {"hospital_0"}
    assert max(abs(c - expected) for c in counts.values()) < 0.25 * expected


def test_the_round_mixing_matrix_keeps_the_average() -> None:
    """Each node's mean of its own and its s senders' models, weights 1/(s+1): the network
    average is unchanged and the spread shrinks."""
    copies, s = samples(3), 3
    rng = np.random.default_rng(0)
    x = {n: rng.normal(size=5) for n in NAMES}
    start_mean = np.mean(list(x.values()), axis=0)
    start_spread = np.std(list(x.values()), axis=0).sum()
    for r in range(1, 6):
        x = {n: (x[n] + sum(x[m] for m in copies[n].sources(r))) / (s + 1) for n in NAMES}
        np.testing.assert_allclose(np.mean(list(x.values()), axis=0), start_mean, atol=1e-12)
    assert np.std(list(x.values()), axis=0).sum() < 0.2 * start_spread


def test_bad_samples_are_refused() -> None:
    with pytest.raises(ValueError, match="between 1 and the number of peers"):
        PeerSample.of("a", ["b", "c"], 3, 0)
    with pytest.raises(ValueError, match="between 1"):
        PeerSample.of("a", ["b", "c"], 0, 0)


def test_exceed_probability_is_the_hypergeometric_tail() -> None:
    assert exceed_probability(64, 0, 4, 0) == 0.0
    assert exceed_probability(64, 6, 4, 4) == 0.0  # f = s: every round within the bound
    assert exceed_probability(5, 1, 1, 0) == pytest.approx(1 / 4)
    rng = random.Random(0)
    others = ["byz"] * 6 + ["ok"] * 57
    trials = 40000
    hits = sum(rng.sample(others, 4).count("byz") > 1 for _ in range(trials))
    assert exceed_probability(64, 6, 4, 1) == pytest.approx(hits / trials, abs=0.005)


def test_infeasible_rule_for_the_sample_size_is_refused(tmp_path: Path) -> None:
    """Krum with f = 1 needs 5 inputs: 3 sampled senders + itself are too few, however many
    peers the allowlist holds."""
    args = run_cluster.parse_args(
        ["--nodes", "8", "--sample-peers", "3", "--aggregator", "krum:1", "--no-dp"]
    )
    with pytest.raises(SystemExit, match="infeasible"):
        run_cluster.write_network(args, tmp_path)


def test_sampled_network_sends_and_aggregates_by_the_round_graph(tmp_path: Path) -> None:
    report, nodes = run_in_process(
        [
            *("--nodes", "8", "--sample-peers", "2", "--rounds", "3", "--no-dp"),
            *("--aggregator", "trimmed_mean:1", "--model", "mlp", "--no-baselines"),
        ],
        tmp_path,
    )
    assert report["rounds_completed"] == 3 and report["sample_peers"] == 2
    for node in nodes:
        sample = node.sample
        assert sample is not None and sample.s == 2
        sent = records_of_kind(node.state_dir, "update_sent")
        assert [sorted(rec.fields["recipients"]) for rec in sent] == [
            sample.targets(r) for r in (1, 2, 3)
        ]
        for rec in records_of_kind(node.state_dir, "aggregation"):
            peers = {u["peer"] for u in rec.fields["used"] + rec.fields["excluded"]}
            assert peers == set(sample.sources(rec.round))
        assert all(len(h["received"]) == 2 and not h["missing"] for h in node.state.history)
    # Two envelopes per node and round, each sealed for its two recipients only.
    one = records_of_kind(nodes[0].state_dir, "update_sent")[0].fields["bytes"]
    assert report["bytes_sent"] == pytest.approx(8 * 3 * 2 * one, rel=0.05)


def test_sampled_rounds_with_attackers_stay_robust_and_on_time(tmp_path: Path) -> None:
    """Two sign-flipping attackers (they rush: wait for the honest models that reach them)
    among 8 hospitals: no round waits out its deadline, their models do reach the rule when
    sampled, and clipping keeps the honest AUC near the clean run's."""
    common = [
        *("--nodes", "8", "--sample-peers", "4", "--rounds", "4", "--no-dp", "--no-trust"),
        *("--aggregator", "clipping:2", "--alpha", "0.5", "--no-baselines"),
    ]
    clean, _ = run_in_process(common, tmp_path / "clean")
    attacked, nodes = run_in_process(
        [*common, "--byzantine", "2", "--attack", "sign_flip"], tmp_path / "attacked"
    )
    honest = [n for n in nodes if not n.config.adversary.enabled]
    assert all(not h["missing"] for n in honest for h in n.state.history)
    used = [
        u["peer"]
        for n in honest
        for rec in records_of_kind(n.state_dir, "aggregation")
        for u in rec.fields["used"]
    ]
    assert any(p.startswith("byzantine_") for p in used)
    assert abs(attacked["mean_auc"] - clean["mean_auc"]) < 0.03
