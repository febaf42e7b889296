"""The feasibility check refuses an infeasible (topology, rule, f) and accepts a feasible one."""

from __future__ import annotations

import pytest
from murmur.gossip.feasibility import check_feasibility, check_node
from murmur.topologies.graphs import build_topology


def test_krum_on_a_ring_is_refused_for_every_node():
    # Degree 2 gives 3 inputs; Krum with f = 1 needs n > 2f + 2, i.e. 5.
    problems = check_feasibility(build_topology("ring", 6), "krum", 1)
    assert len(problems) == 6
    assert problems[0] == (
        "node 0 has 2 neighbours; rule 'krum' with f=1 needs at least 5 inputs "
        "(4 neighbours + itself): use a topology with degree >= 4 or lower f to 0"
    )


def test_krum_on_a_4_regular_graph_is_accepted():
    assert check_feasibility(build_topology("regular:4", 10, seed=3), "krum", 1) == []


def test_trimmed_mean_needs_2f_plus_1():
    ring = build_topology("ring", 8)
    assert check_feasibility(ring, "trimmed_mean", 1) == []  # 3 inputs >= 3
    assert len(check_feasibility(ring, "trimmed_mean", 2)) == 8  # 3 inputs < 5
    assert check_feasibility(build_topology("regular:4", 8), "median", 2) == []


def test_only_the_weak_nodes_of_an_uneven_graph_are_named():
    neighbours = {
        "hospital_a": ["hospital_b", "hospital_c", "hospital_d", "hospital_e"],
        "hospital_b": ["hospital_a", "hospital_c", "hospital_d", "hospital_e"],
        "hospital_c": ["hospital_a", "hospital_b"],
        "hospital_d": ["hospital_a", "hospital_b", "hospital_e"],
        "hospital_e": ["hospital_a", "hospital_b", "hospital_d"],
    }
    problems = check_feasibility(neighbours, "trimmed_mean", 2)
    assert problems == [
        "node hospital_c has 2 neighbours; rule 'trimmed_mean' with f=2 needs at least 5 "
        "inputs (4 neighbours + itself): use a topology with degree >= 4 or lower f to 1",
        "node hospital_d has 3 neighbours; rule 'trimmed_mean' with f=2 needs at least 5 "
        "inputs (4 neighbours + itself): use a topology with degree >= 4 or lower f to 1",
        "node hospital_e has 3 neighbours; rule 'trimmed_mean' with f=2 needs at least 5 "
        "inputs (4 neighbours + itself): use a topology with degree >= 4 or lower f to 1",
    ]


def test_a_node_listing_itself_or_a_duplicate_is_not_counted_twice():
    problems = check_feasibility({"a": ["a", "b", "b", "c"]}, "median", 1)
    assert problems == []  # neighbours {b, c}: 3 inputs >= 3
    assert len(check_feasibility({"a": ["a", "b", "b"]}, "median", 1)) == 1


def test_check_node_is_what_a_node_calls_at_start():
    assert check_node("hospital_c", 4, "krum", 1) is None
    assert check_node("hospital_c", 3, "krum", 1).startswith("node hospital_c has 3 neighbours")
    assert "needs at least 4 inputs" in check_node("x", 2, "clipping", 2)
    assert "no f >= 0 fits" in check_node("x", 1, "krum", 1)
    assert check_node("x", 0, "mean", 0) is None


def test_configurations_no_node_can_satisfy_raise():
    with pytest.raises(ValueError, match="tolerates no Byzantine neighbour"):
        check_feasibility(build_topology("complete", 5), "mean", 1)
    with pytest.raises(ValueError, match="unknown aggregation rule 'krumm'"):
        check_feasibility(build_topology("complete", 5), "krumm", 1)
    with pytest.raises(ValueError, match="f must be a whole number"):
        check_node("x", 4, "median", -1)
