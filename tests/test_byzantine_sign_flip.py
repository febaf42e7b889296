"""Sign flipping at 43 % on the four real Fed-Heart-Disease hospitals (docs/robustness.md).

Three attackers among seven nodes on a complete graph: every honest hospital has as many
Byzantine neighbours as honest ones, so no spread-based test (robust rule or trust score) has
an honest majority to lean on, and it was the one cell of the matrix no rule held. Each
attacker sends the honest mean model negated, which lies about twice its own length away from
an honest node's model; the per-round screening (gossip/aggregation.py ``screen_inputs``:
far from the robust centre and farther than ``[trust] max_relative_distance`` times ||own||
from the node's own model) mutes it from round 1 without lowering the rule's f, and trust
scores, measured against an aggregate that is honest again, then quarantine it.

Real ``HospitalNode`` round loops in one process, exactly as bench/byzantine.py runs them. The
control, the same run with that check turned off and everything else as the default, loses
more than the target, so the test can fail.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from murmur.node.audit import records_of_kind

from tests.netutil import run_in_process

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
pytestmark = pytest.mark.skipif(
    not (SHARED_DATA / "heart_disease").is_dir(),
    reason=f"needs the Fed-Heart-Disease files in {SHARED_DATA / 'heart_disease'}",
)

ROUNDS = 20
COMMON = [
    "--dataset", "heart-disease", "--topology", "complete", "--rounds", str(ROUNDS),
    "--lr", "0.1", "--no-dp", "--seed", "0", "--round-timeout", "30",
]  # fmt: skip
ATTACK = ["--aggregator", "clipping:3", "--byzantine", "3", "--attack", "sign_flip"]
TARGET = 0.03


def run(tmp_path: Path, *extra: str) -> tuple[dict[str, Any], list[Any]]:
    return run_in_process([*COMMON, *extra], tmp_path)


def test_sign_flip_at_three_of_seven_is_muted_every_round_and_f_is_kept(tmp_path: Path) -> None:
    clean, _ = run(tmp_path / "clean", "--aggregator", "clipping:2")  # the honest four alone
    report, nodes = run(tmp_path / "defended", *ATTACK)
    honest = [n for n in nodes if n.adversary is None]
    attackers = sorted(n.config.node.name for n in nodes if n.adversary is not None)
    assert len(honest) == 4 and len(attackers) == 3
    assert report["mean_auc"] >= clean["mean_auc"] - TARGET
    for node in honest:
        name = node.config.node.name
        # Every attacker's model was muted in every round (pulled in towards the robust centre
        # and weighed 0, as far from the centre and from the node's own model), then also
        # quarantined by trust once the aggregate it is measured against was honest again. No
        # honest model was ever muted (Switzerland included), and the rule kept its f = 3
        # throughout: nobody is left out, so nothing uses up the Byzantine inputs it tolerates.
        status = node.status()
        assert set(status["too_far"]) == set(attackers), name
        assert status["quarantined"] == attackers, name
        for record in records_of_kind(node.state_dir, "aggregation"):
            assert record.fields["f"] == 3, (name, record.round)
            assert record.fields["excluded"] == [], (name, record.round)
            pulled = {p["peer"]: p["muted"] for p in record.fields.get("pulled_in", [])}
            assert pulled == dict.fromkeys(attackers, True), (name, record.round)
        quarantines = records_of_kind(node.state_dir, "quarantine")
        assert sorted(r.fields["peer"] for r in quarantines) == attackers
        entry = next(h for h in report["hospitals"] if h["name"] == name)
        assert entry["too_far"] == status["too_far"]

    control, nodes = run(tmp_path / "control", *ATTACK, "--max-relative-distance", "inf")
    assert all(n.status()["too_far"] == {} for n in nodes)
    assert control["mean_auc"] < clean["mean_auc"] - TARGET
