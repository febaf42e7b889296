"""Per-peer trust scores (gossip/trust.py): persistent outliers are down-weighted, then
quarantined with evidence; consistent but different honest peers are not; state round-trips."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from murmur.gossip.trust import (
    TrustSettings,
    TrustTracker,
    distance_ratios,
    goodness,
    own_distance_limit,
)

DEFAULT = TrustSettings()


def test_ratios_divide_by_a_robust_scale_of_all_inputs_including_own() -> None:
    # Inputs: own 1.0, peers 2.0, 3.0, 30.0. With f = 1 the scale is the (n - f) = 3rd
    # smallest distance, 3.0 (above the median, 2.5): the one far input is left out.
    ratios = distance_ratios(1.0, {"a": 2.0, "b": 3.0, "c": 30.0}, f=1)
    assert ratios == pytest.approx({"a": 2 / 3, "b": 1.0, "c": 10.0})
    # With f = 3 the 1st smallest would be below the median: the median, 2.5, is the scale.
    ratios = distance_ratios(1.0, {"a": 2.0, "b": 3.0, "c": 30.0}, f=3)
    assert ratios == pytest.approx({"a": 0.8, "b": 1.2, "c": 12.0})
    # f = 0 still leaves one input out: a single broken peer stays detectable.
    assert distance_ratios(1.0, {"a": 2.0, "b": 3.0, "c": 30.0}, f=0) == ratios_f1()
    # Everyone at the aggregate except one: that one is infinitely far.
    assert distance_ratios(0.0, {"a": 0.0, "b": 0.0, "c": 1.0}) == {
        "a": 0.0,
        "b": 0.0,
        "c": math.inf,
    }
    # A model so large that its distance overflows is infinitely far, never an error.
    assert distance_ratios(1.0, {"a": 1.0, "b": math.inf}) == {"a": 1.0, "b": math.inf}
    assert distance_ratios(math.inf, {"a": 1.0, "b": math.inf}) == {"a": 0.0, "b": math.inf}
    with pytest.raises(ValueError, match="NaN not"):
        distance_ratios(1.0, {"a": float("nan")})


def ratios_f1() -> dict[str, float]:
    return distance_ratios(1.0, {"a": 2.0, "b": 3.0, "c": 30.0}, f=1)


def test_goodness_is_one_within_tolerance_zero_past_the_cutoff_linear_between() -> None:
    assert goodness(3.0, DEFAULT) == 1.0
    assert goodness(4.5, DEFAULT) == pytest.approx(0.5)
    assert goodness(6.0, DEFAULT) == 0.0
    assert goodness(math.inf, DEFAULT) == 0.0


def run(tracker: TrustTracker, rounds: int, distances: dict[str, float], own: float = 1.0):
    events = []
    for r in range(1, rounds + 1):
        events += tracker.observe(r, own, distances)
    return events


def test_a_persistent_outlier_is_down_weighted_then_quarantined_with_evidence() -> None:
    tracker = TrustTracker(["honest", "other", "attacker"])
    # log(0.2) / log(0.7) = 4.5: the fifth fully bad round quarantines, not earlier.
    weights = []
    for r in range(1, 5):
        assert tracker.observe(r, 1.0, {"honest": 1.2, "other": 0.9, "attacker": 50.0}) == []
        weights.append(tracker.weight("attacker"))
    assert weights == sorted(weights, reverse=True) and 0 < weights[-1] < 1
    assert tracker.weight("honest") == 1.0
    events = tracker.observe(5, 1.0, {"honest": 1.2, "other": 0.9, "attacker": 50.0})
    assert [(e.kind, e.peer, e.round) for e in events] == [("quarantine", "attacker", 5)]
    evidence = events[0].evidence
    assert evidence["score"] < DEFAULT.quarantine_below
    assert len(evidence["recent_distance_ratios"]) == 5
    assert min(evidence["recent_distance_ratios"]) > DEFAULT.cutoff
    json.dumps(evidence)  # goes into the audit log as is
    assert tracker.quarantined() == {"attacker"}
    assert tracker.weight("attacker") == 0.0


def test_one_bad_round_is_forgiven() -> None:
    tracker = TrustTracker(["a", "b", "c"])
    tracker.observe(1, 1.0, {"a": 1.0, "b": 1.0, "c": 100.0})
    assert run(tracker, 20, {"a": 1.0, "b": 1.0, "c": 1.1}) == []
    assert tracker.scores()["c"] > 0.99


def test_a_consistently_different_honest_site_is_never_quarantined() -> None:
    """A non-IID site sits 2.5x as far as the typical input, every round: within tolerance."""
    tracker = TrustTracker(["cleveland", "hungary", "switzerland"])
    events = run(tracker, 200, {"cleveland": 1.0, "hungary": 1.1, "switzerland": 2.5}, own=0.9)
    assert events == []
    assert tracker.scores()["switzerland"] == 1.0


def test_quarantined_peers_are_still_measured_and_readmitted_after_good_rounds() -> None:
    tracker = TrustTracker(["a", "b", "c"], TrustSettings(readmit_after=3))
    run(tracker, 8, {"a": 1.0, "b": 1.0, "c": 100.0})
    assert tracker.quarantined() == {"c"}
    events = []
    for r in range(9, 12):
        events += tracker.observe(r, 1.0, {"a": 1.0, "b": 1.0, "c": 1.0})
    assert [(e.kind, e.peer, e.round) for e in events] == [("readmit", "c", 11)]
    assert tracker.quarantined() == set()


def test_silent_peers_keep_their_score_and_every_round_is_in_the_history() -> None:
    tracker = TrustTracker(["a", "b", "c"])
    tracker.observe(1, 1.0, {"a": 1.0, "b": 1.0, "c": 20.0})
    score = tracker.scores()["c"]
    tracker.observe(2, 1.0, {"a": 1.0, "b": 1.0})  # c missed the round
    assert tracker.scores()["c"] == score
    assert tracker.history() == {"a": [1.0, 1.0], "b": [1.0, 1.0], "c": [score, score]}
    with pytest.raises(ValueError, match="unknown peers"):
        tracker.observe(3, 1.0, {"mallory": 1.0})


def test_turned_off_trust_measures_but_never_acts() -> None:
    tracker = TrustTracker(["a", "b", "c"], TrustSettings(enabled=False))
    assert run(tracker, 20, {"a": 1.0, "b": 1.0, "c": 100.0}) == []
    assert tracker.scores()["c"] < 0.01
    assert tracker.weight("c") == 1.0 and tracker.quarantined() == set()


def test_state_round_trips_through_json_for_checkpoints() -> None:
    tracker = TrustTracker(["a", "b", "c"])
    run(tracker, 6, {"a": 1.0, "b": 1.0, "c": 100.0})
    state = json.loads(json.dumps(tracker.to_state()))
    restored = TrustTracker.from_state(state, ["a", "b", "c", "d"])
    assert restored.scores() == {**tracker.scores(), "d": 1.0}
    assert restored.quarantined() == {"c"}
    assert restored.history()["c"] == tracker.history()["c"]
    # The next round goes on exactly as it would have.
    assert restored.observe(7, 1.0, {"a": 1.0}) == tracker.observe(7, 1.0, {"a": 1.0})
    with pytest.raises(ValueError, match="version"):
        TrustTracker.from_state({"version": 99}, ["a"])


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"decay": 1.0}, "decay"),
        ({"tolerance": 6.0, "cutoff": 3.0}, "tolerance < cutoff"),
        ({"quarantine_below": 0.6, "downweight_below": 0.5}, "quarantine_below"),
        ({"readmit_after": 0}, "readmit_after"),
    ],
)
def test_bad_settings_are_refused_with_the_rule(changes: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TrustSettings(**changes)


@settings(max_examples=300, deadline=None)
@given(
    honest=st.lists(st.floats(1.0, 2.99), min_size=2, max_size=8),
    attackers=st.lists(st.floats(0.0, 1e6), max_size=7),
    extra_f=st.integers(0, 3),
    rounds=st.integers(1, 30),
)
def test_honest_peers_within_a_factor_three_are_never_quarantined_by_a_minority(
    honest: list[float], attackers: list[float], extra_f: int, rounds: int
) -> None:
    """Whatever a minority of the inputs does (including sitting exactly on the aggregate to
    shrink the scale), with at most f attackers the scale stays between the smallest and the
    largest honest distance, so an honest peer within a factor 3 of the others keeps full
    trust."""
    own, *peers = honest
    attackers = attackers[: max(0, len(honest) - 1)]  # strictly fewer than the honest inputs
    f = len(attackers) + extra_f  # the node may tolerate more attackers than there are
    names = [f"h{i}" for i in range(len(peers))] + [f"b{i}" for i in range(len(attackers))]
    tracker = TrustTracker(names)
    distances = dict(zip(names, peers + attackers, strict=True))
    for r in range(1, rounds + 1):
        tracker.observe(r, own, distances, f=f)
    for i in range(len(peers)):
        assert tracker.weight(f"h{i}") == 1.0


def test_the_trust_config_section_is_validated_with_a_fix() -> None:
    from murmur.node.config import ConfigError, parse_config

    base = {"node": {"name": "a", "key_file": "k", "state_dir": "s"}, "data": {"hospital": "0"}}
    assert parse_config(base).trust.settings() == TrustSettings()  # on by default
    assert not parse_config({**base, "trust": {"enabled": False}}).trust.settings().enabled
    with pytest.raises(ConfigError, match=r"\[trust\] trust decay must be in \[0, 1\).*fix"):
        parse_config({**base, "trust": {"decay": 1.5}})
    with pytest.raises(ConfigError, match=r"max_relative_distance must be a number > 0.*fix"):
        parse_config({**base, "trust": {"max_relative_distance": 0.0}})
    off = parse_config({**base, "trust": {"max_relative_distance": math.inf}})
    assert off.trust.settings().max_relative_distance == math.inf
    set_ = parse_config({**base, "trust": {"max_relative_distance": 2}}).trust.settings()
    assert own_distance_limit(set_, 1.0, 0.5) == 2.0


def test_the_own_model_limit_is_relative_without_dp_and_allows_the_dp_noise_with_it() -> None:
    # Without DP: 1.5 times ||own||. A sign flip of own sits at exactly 2 ||own||: beyond it.
    assert own_distance_limit(TrustSettings(), 2.0, None) == 3.0
    # With DP: at least 4 times the expected noise length, which honest pairs stay within
    # (measured 1.2-2.4 times); where ||own|| dominates, the relative limit stays.
    assert own_distance_limit(TrustSettings(), 2.0, 0.5) == 3.0
    assert own_distance_limit(TrustSettings(), 2.0, 1.0) == 4.0
    assert own_distance_limit(TrustSettings(), 0.4, 0.5) == 2.0
    # A configured limit is the limit, DP or not; inf turns the check off.
    chosen = TrustSettings(max_relative_distance=1.2)
    assert own_distance_limit(chosen, 2.0, None) == own_distance_limit(chosen, 2.0, 9.0) == 2.4
    off = TrustSettings(max_relative_distance=math.inf)
    assert own_distance_limit(off, 2.0, None) == math.inf
    # No yardstick (zero or overflowed own model, or no noise figure): nobody is muted by it.
    assert own_distance_limit(TrustSettings(), 0.0, None) == math.inf
    assert own_distance_limit(TrustSettings(), math.inf, 0.5) == math.inf
    assert own_distance_limit(TrustSettings(), 1.0, math.nan) == math.inf


def test_a_proven_equivocator_is_quarantined_at_once_and_for_good() -> None:
    tracker = TrustTracker(["a", "b", "c"])
    event = tracker.prove_equivocation("a", 2, 1, "ab" * 10)
    assert event is not None and event.kind == "equivocation_proof"
    assert event.evidence == {"equivocation_round": 1, "proof": "ab" * 10, "permanent": True}
    assert tracker.quarantined() == {"a"} and tracker.weight("a") == 0.0
    assert tracker.proven() == {"a": 1}
    assert tracker.prove_equivocation("a", 3, 1, "cd" * 10) is None  # once is enough
    # However well it behaves afterwards, it is never re-admitted and its score stays 0.
    for r in range(3, 3 + 3 * DEFAULT.readmit_after):
        assert tracker.observe(r, 1.0, {"a": 1.0, "b": 1.0, "c": 1.0}) == []
    assert tracker.quarantined() == {"a"} and tracker.scores()["a"] == 0.0
    restored = TrustTracker.from_state(json.loads(json.dumps(tracker.to_state())), ["a", "b"])
    assert restored.quarantined() == {"a"} and restored.proven() == {"a": 1}
    assert restored.peers["a"].equivocation_proof == "ab" * 10
    with pytest.raises(ValueError, match="unknown peer"):
        tracker.prove_equivocation("z", 1, 1, "")


def test_with_trust_off_a_proof_is_recorded_but_not_acted_on() -> None:
    tracker = TrustTracker(["a", "b"], TrustSettings(enabled=False))
    assert tracker.prove_equivocation("a", 2, 1, "ab") is not None
    assert tracker.proven() == {"a": 1}
    assert tracker.quarantined() == set() and tracker.weight("a") == 1.0


def test_trust_state_from_before_proofs_still_loads() -> None:
    state = TrustTracker(["a"]).to_state()
    for saved in state["peers"].values():
        del saved["proven_equivocation_round"], saved["equivocation_proof"]
    assert TrustTracker.from_state(state, ["a"]).proven() == {}
