"""The dashboard's alerts (node/alerts.py) on /status snapshots, and its two operator routes
(GET /alerts, GET /audit/recent) on a real operator listener."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from murmur.node.alerts import AlertSettings, evaluate
from murmur.node.audit import AuditRecord
from murmur.node.wording import describe_record, number, reason_meaning

from tests.test_http import TOKEN, get, running

SETTINGS = AlertSettings(round_timeout_s=10.0, timestamp_window_s=300.0, low_trust=0.5)
PEERS = ("hospital_b", "hospital_c", "hospital_d")


def status(**fields: Any) -> dict[str, Any]:
    """A /status snapshot of a node with three neighbours, DP at ε = 1, round 3 of 10."""
    base: dict[str, Any] = {
        "name": "hospital_a",
        "round": 3,
        "phase": "training",
        "planned_rounds": 10,
        "peers": {p: {"address": "http://x", "last_round": 3, "last_seen": 1.0} for p in PEERS},
        "privacy": {
            "enabled": True,
            "epsilon_spent": 0.3,
            "epsilon_budget": 1.0,
            "remaining_steps": 70,
        },
        "trust": dict.fromkeys(PEERS, 1.0),
        "quarantined": [],
        "too_far": {},
        "equivocation": {"proven": {}},
        "rollback": {"proven": {}},
        "history": [{"round": r, "missing": [], "seconds": 0.5, "auc": 0.9} for r in (1, 2, 3)],
    }
    base.update(fields)
    return base


def record(kind: str, round_: int, **fields: Any) -> AuditRecord:
    return AuditRecord(1, 0, kind, round_, fields, b"", b"", b"")


def codes(report: Any) -> list[str]:
    return [a.code for a in report.alerts]


def check(report: Any, code: str) -> Any:
    return next(c for c in report.checks if c.code == code)


def test_a_healthy_node_raises_nothing_and_says_what_it_checked() -> None:
    sent = record("update_sent", 3, recipients=list(PEERS), failed={})
    report = evaluate(status(), SETTINGS, last_sent=sent)
    assert report.alerts == []
    assert {c.code: c.state for c in report.checks} == dict.fromkeys(
        ("budget", "trust", "silence", "deadline", "clock"), "ok"
    )
    assert check(report, "budget").detail == "ε 0.300 of 1.000 spent (30%), 70% left"


@pytest.mark.parametrize(
    ("spent", "phase", "remaining", "expected", "level"),
    [
        (0.79, "training", 20, [], None),
        (0.8, "training", 19, ["budget_low"], "warning"),
        (0.95, "training", 5, ["budget_low"], "warning"),
        (1.0, "budget_exhausted", 0, ["budget_spent"], "critical"),  # before its last round
    ],
)
def test_the_budget_alarm_starts_at_80_percent_spent(
    spent: float, phase: str, remaining: int, expected: list[str], level: str | None
) -> None:
    privacy = {"enabled": True, "epsilon_spent": spent, "epsilon_budget": 1.0}
    report = evaluate(
        status(privacy={**privacy, "remaining_steps": remaining}, phase=phase), SETTINGS
    )
    assert codes(report) == expected
    if level:
        assert report.alerts[0].level == level
        assert f"{round(100 * (1 - spent))}% left" in report.alerts[0].detail


def test_a_finished_run_that_spent_its_budget_is_a_warning_and_no_dp_is_one_too() -> None:
    privacy = {"enabled": True, "epsilon_spent": 1.0, "epsilon_budget": 1.0, "remaining_steps": 0}
    report = evaluate(status(privacy=privacy, phase="done", round=10), SETTINGS)
    assert [(a.code, a.level) for a in report.alerts] == [("budget_spent", "warning")]
    report = evaluate(status(privacy={"enabled": False, "epsilon_spent": 0.0}), SETTINGS)
    assert codes(report) == ["no_dp"] and "not protected" in report.alerts[0].detail


def test_quarantine_equivocation_rollback_and_low_trust_name_the_peer() -> None:
    report = evaluate(
        status(
            trust={"hospital_b": 0.1, "hospital_c": 0.0, "hospital_d": 0.3},
            quarantined=["hospital_b", "hospital_c"],
            equivocation={"proven": {"hospital_c": 2}},
            rollback={"proven": {"hospital_d": {"round": 3}}},
            too_far={"hospital_b": 4},
        ),
        SETTINGS,
    )
    by_code = {a.code: a for a in report.alerts}
    assert set(by_code) == {"quarantined", "equivocation", "rollback", "low_trust"}
    assert by_code["quarantined"].peer == "hospital_b" and "0.10" in by_code["quarantined"].detail
    assert "round 2" in by_code["equivocation"].detail  # proven, so not also "quarantined"
    assert by_code["low_trust"].peer == "hospital_d" and by_code["low_trust"].level == "warning"
    assert [a.level for a in report.alerts][:3] == ["critical"] * 3  # critical first
    standing = {p: s.standing for p, s in report.peers.items()}
    assert standing == {
        "hospital_b": "quarantined",
        "hospital_c": "proven equivocation",
        "hospital_d": "rolled back",
    }
    assert any("(4 rounds)" in x for x in report.peers["hospital_b"].left_out)


def test_a_neighbour_missing_for_three_rounds_is_silent_and_the_round_hit_its_deadline() -> None:
    history = [
        {"round": 1, "missing": [], "seconds": 0.4},
        {"round": 2, "missing": ["hospital_c"], "seconds": 10.0},
        {"round": 3, "missing": ["hospital_c", "hospital_d"], "seconds": 10.0},
        {"round": 4, "missing": ["hospital_c", "hospital_d"], "seconds": 10.0},
    ]
    report = evaluate(status(history=history, round=4), SETTINGS)
    silent = [a for a in report.alerts if a.code == "silent"]
    assert [a.peer for a in silent] == ["hospital_c"]  # hospital_d: two rounds only
    assert report.peers["hospital_c"].silent_rounds == 3
    assert report.peers["hospital_d"].silent_rounds == 2
    (deadline,) = [a for a in report.alerts if a.code == "deadline"]
    assert deadline.title == "Round 4 finished at the deadline"
    assert "3 of the last 4 rounds waited the full 10 s" in deadline.detail
    # One round without anyone missing: no deadline alarm, and the tally stays.
    report = evaluate(status(history=[*history, {"round": 5, "missing": []}]), SETTINGS)
    assert "deadline" not in codes(report)
    assert check(report, "deadline").detail.startswith("3 of the last 5 rounds")


def test_the_node_s_liveness_fields_raise_down_refused_and_waiting_alerts() -> None:
    """/status's per-peer liveness (gossip/liveness.py: state, silent_rounds, why, contact) and
    `neighbours` are used as they are."""
    peers = status()["peers"]
    peers["hospital_b"].update(state="down", silent_rounds=4, why="silent for 3 rounds")
    peers["hospital_c"].update(
        state="up", contact="refused", contact_detail="HTTP 403 unknown_sender"
    )
    report = evaluate(status(peers=peers), SETTINGS)
    by_code = {a.code: a for a in report.alerts}
    assert set(by_code) == {"silent", "refused"}
    assert (
        by_code["silent"].peer == "hospital_b" and "silent for 3 rounds" in by_code["silent"].detail
    )
    assert report.peers["hospital_b"].silent_rounds == 4
    assert by_code["refused"].title == "hospital_c refuses this node's envelopes"
    assert by_code["refused"].detail.startswith("HTTP 403 unknown_sender")
    assert check(report, "silence").detail == "hospital_b and hospital_c"
    waiting = {"min_neighbours": 2, "waiting_for": {"hospital_b": "down", "hospital_c": "refused"}}
    report = evaluate(status(phase="waiting_for_neighbours", neighbours=waiting), SETTINGS)
    (alert,) = report.alerts
    assert alert.code == "waiting_for_neighbours"
    assert alert.detail == (
        "the node needs 2 neighbours that take its envelopes before it trains; "
        "hospital_b: down; hospital_c: refused"
    )


def test_a_round_that_did_not_wait_for_a_neighbour_marked_down_is_not_at_the_deadline() -> None:
    """A neighbour marked down is missing from every round but no longer waited for: those
    rounds end early, and only their length says so."""
    history = [{"round": r, "missing": ["hospital_b"], "seconds": 0.3} for r in (1, 2, 3)]
    report = evaluate(status(history=history), SETTINGS)
    assert "deadline" not in codes(report)
    assert check(report, "deadline").detail == "0 of the last 3 rounds waited the full 10 s"


def test_the_clock_check_reads_the_neighbours_answers_or_says_it_cannot_yet() -> None:
    report = evaluate(status(), SETTINGS)
    assert check(report, "clock").state == "unavailable"
    assert check(report, "clock").detail.startswith("not yet available")
    stale = {"hospital_b": "stale", "hospital_c": "stale"}
    report = evaluate(
        status(), SETTINGS, last_sent=record("update_sent", 3, recipients=list(PEERS), failed=stale)
    )
    assert codes(report) == ["clock"] and report.alerts[0].level == "critical"
    assert "2 of 3 neighbours refused its round 3 envelope" in report.alerts[0].detail
    assert "±300 s" in report.alerts[0].detail
    one = {"hospital_b": "stale", "hospital_c": "timeout"}
    report = evaluate(
        status(), SETTINGS, last_sent=record("update_sent", 3, recipients=list(PEERS), failed=one)
    )
    assert codes(report) == [] and "hospital_b refused them" in check(report, "clock").detail


def test_records_in_words() -> None:
    sent = record(
        "update_sent",
        2,
        recipients=["b", "c"],
        delivered=["b"],
        failed={"c": "unreachable: ClientConnectorError"},
        bytes=29619,
        model_sha256="ab" * 32,
        epsilon_spent=0.41,
    )
    assert describe_record(sent) == (
        "model abababababab (29.6 kB) sent to b and c; delivered to 1; "
        "failed: c (unreachable: ClientConnectorError); ε spent so far 0.410"
    )
    agg = record(
        "aggregation",
        2,
        rule="clipping",
        used=[{"peer": "b"}],
        excluded=[{"peer": "x", "reason": "quarantined"}],
    )
    assert "left out x (quarantined:" in describe_record(agg)
    refused = record("message_received", 2, sender="b", accepted=False, reason="duplicate")
    assert describe_record(refused).endswith("same sender for the same round")
    assert describe_record(record("catch_up", 3, to_round=5)) == (
        "behind its neighbours: jumped to round 5"
    )
    assert describe_record(record("something_new", 1, a=1, b="x" * 50)).startswith(
        "something new: a=1, b=xxx"
    )
    waiting = record(
        "waiting_for_neighbours", 1, min_neighbours=2, counted=[], reasons={"b": "unreachable"}
    )
    assert describe_record(waiting) == "waiting for 2 neighbours before training (b: unreachable)"
    ready = record("neighbours_ready", 1, waited_s=3.21, counted=["b", "c"], missing={})
    assert describe_record(ready) == "ready to train with b and c after waiting 3.2 s"
    assert reason_meaning("unreachable: OSError") == "the neighbour could not be reached: OSError"
    assert (number(36), number(0.5), number(None), number(1e-5)) == (
        "36",
        "0.500",
        "undefined",
        "1e-05",
    )


# ---------------------------------------------------------------------------- the routes


async def test_alerts_and_recent_records_are_operator_routes_behind_the_token(
    tmp_path: Path,
) -> None:
    token_file = tmp_path / "operator.token"
    token_file.write_text(TOKEN)
    token_file.chmod(0o600)
    async with running(tmp_path / "net", operator={"token_file": str(token_file)}) as (node, api):
        node.audit.append("evaluation", 1, metrics={"auc": 0.91, "n": 36})
        node.audit.append("quarantine", 1, peer="hospital_1", evidence={"score": 0.1})
        auth = {"Authorization": f"Bearer {TOKEN}"}
        for path in ("/alerts", "/audit/recent"):
            code, _, body = await get(api.operator.address + path)
            assert (code, body) == (401, b'{"reason": "unauthorized"}'), path
            code, _, _ = await get(api.peer.address + path, headers=auth)
            assert code == 404, path  # never on the peer listener
        code, headers, body = await get(
            api.operator.address + "/audit/recent?limit=2", headers=auth
        )
        assert code == 200 and headers["Cache-Control"] == "no-store"
        records = json.loads(body)["records"]
        assert [r["kind"] for r in records] == ["evaluation", "quarantine"]
        assert records[0]["summary"] == "evaluated: AUC 0.910 on 36 test patients"
        assert set(records[1]) == {"seq", "kind", "round", "time_utc", "summary"}  # no fields
        for bad in ("0", "201", "x", "-1"):
            code, _, body = await get(
                api.operator.address + f"/audit/recent?limit={bad}", headers=auth
            )
            assert (code, body) == (400, b'{"reason": "bad_limit"}'), bad
        code, _, body = await get(api.operator.address + "/alerts", headers=auth)
        answer = json.loads(body)
        assert code == 200 and [a["code"] for a in answer["alerts"]] == ["no_dp"]
        clock = next(c for c in answer["checks"] if c["code"] == "clock")
        assert clock["state"] == "unavailable"
        assert set(answer["peers"]) == {"hospital_1"}
