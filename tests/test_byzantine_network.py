"""Byzantine hospitals on real multi-process networks (docs/robustness.md).

For each attack class, honest nodes running the default defence (self-centred clipping with
per-peer trust) end within 0.03 AUC of the same honest hospitals without the attacker, and in
the same test plain averaging under the same attack does not, so the test can fail. Every
network is real `murmur node` processes on 127.0.0.1, configured by run_cluster.py.

Data: the embedded breast-cancer set split across 4 hospitals with strong label skew
(Dirichlet alpha = 0.1), so the honest sites differ; the attacker trains on a copy of one
honest hospital's split. The honest Switzerland test needs the real Fed-Heart-Disease data.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import tomllib
import urllib.request
from pathlib import Path

import pytest

import run_cluster
from tests.netutil import Network, make_network

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
COMMON = [
    "--nodes", "4", "--alpha", "0.1", "--rounds", "8", "--lr", "0.1", "--no-dp",
    "--round-timeout", "60",
]  # fmt: skip
DEFENCE = ["--aggregator", "clipping:1"]  # the default rule, trust on by default
PLAIN_MEAN = ["--aggregator", "mean", "--no-trust"]
TARGET = 0.03
# One attack per class; each strong enough that plain averaging visibly fails.
CLASSES = {
    "model_poisoning": ["--attack", "dissensus"],
    "data_poisoning": ["--attack", "label_flip"],
    "free_riding": ["--attack", "random", "--attack-param", "scale=10"],
    "equivocation": ["--attack", "equivocation"],
}
WAIT_S = 240


def run_networks(*nets: Network) -> None:
    """Start the networks together and wait for every node to finish its rounds."""
    for net in nets:
        net.start_all()
    try:
        for net in nets:
            codes = net.wait_all(timeout_s=WAIT_S)
            assert set(codes.values()) == {0}, {n: net.log(n) for n, c in codes.items() if c}
    finally:
        for net in nets:
            net.kill_all()


def honest_aucs(net: Network) -> dict[str, float]:
    return {
        n.name: net.final_status(n.name)["last_metrics"]["auc"]
        for n in net.nodes
        if not n.byzantine
    }


def mean(values: dict[str, float]) -> float:
    return sum(values.values()) / len(values)


@pytest.fixture(scope="module")
def clean(tmp_path_factory: pytest.TempPathFactory) -> dict[str, float]:
    """The honest hospitals alone, default defence: the AUC every attacked run is held to."""
    net = make_network(tmp_path_factory.mktemp("clean"), *COMMON, *DEFENCE)
    run_networks(net)
    return honest_aucs(net)


@pytest.mark.parametrize("attack_class", list(CLASSES))
def test_honest_nodes_hold_under_each_attack_class_where_plain_averaging_fails(
    attack_class: str, clean: dict[str, float], tmp_path: Path
) -> None:
    attack = ["--byzantine", "1", *CLASSES[attack_class]]
    defended = make_network(tmp_path / "defended", *COMMON, *DEFENCE, *attack)
    control = make_network(tmp_path / "control", *COMMON, *PLAIN_MEAN, *attack)
    run_networks(defended, control)

    defended_gap = mean(clean) - mean(honest_aucs(defended))
    control_gap = mean(clean) - mean(honest_aucs(control))
    assert defended_gap <= TARGET, (attack_class, clean, honest_aucs(defended))
    assert control_gap > TARGET, (attack_class, clean, honest_aucs(control))

    # The attacker announced itself: in /status (status.json) and in its log, every round.
    attacker = next(n for n in defended.nodes if n.byzantine)
    status = defended.final_status(attacker.name)
    assert status["adversary"]["attack"] == CLASSES[attack_class][1]
    assert defended.node(attacker.name).log_path.read_text().count("ADVERSARY MODE round") == 8
    for node in defended.nodes:
        if not node.byzantine:
            honest_status = defended.final_status(node.name)
            assert honest_status["adversary"] is None
            assert len(honest_status["trust_history"][attacker.name]) == 8
            # No honest hospital is ever quarantined by another.
            assert set(honest_status["quarantined"]) <= {attacker.name}
            # Attacks that send different models to different neighbours are proven (signed
            # receipts); the others send one model to all and leave no proof.
            proven = honest_status["equivocation"]["proven"]
            equivocates = CLASSES[attack_class][1] in ("dissensus", "equivocation")
            assert proven == ({attacker.name: 1} if equivocates else {}), proven


def test_run_cluster_quarantines_model_poisoning_with_evidence_in_report_log_and_audit(
    tmp_path: Path,
) -> None:
    """The whole path a user takes: run_cluster with --byzantine, then report.json, report.html,
    the honest nodes' logs and audit logs."""
    attack = ["--byzantine", "1", "--attack", "scaled_boost", "--attack-param", "scale=8"]
    out = subprocess.run(
        [sys.executable, "run_cluster.py", *COMMON, *DEFENCE, *attack, "--out", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=WAIT_S,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "ADVERSARY MODE" in out.stdout
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["attack"] == {"name": "scaled_boost", "byzantine": 1, "params": {"scale": 8.0}}
    assert "ADVERSARY MODE" in (tmp_path / "report.html").read_text()
    assert (tmp_path / "trust.png").stat().st_size > 1000
    attacker = next(h for h in report["hospitals"] if h["byzantine"])
    assert attacker["adversary"]["attack"] == "scaled_boost"
    honest = [h for h in report["hospitals"] if not h["byzantine"]]
    assert report["mean_auc"] == sum(h["auc"] for h in honest) / len(honest)
    for hospital in honest:
        name = attacker["name"]
        assert hospital["quarantined"] == [name]
        assert hospital["proven_equivocation"] == {}  # boosting is not equivocation
        assert len(hospital["trust"][name]) == 8 and hospital["trust"][name][-1] < 0.2
        assert all(s[-1] == 1.0 for p, s in hospital["trust"].items() if p != name)
        log = (tmp_path / "logs" / f"{hospital['name']}.log").read_text()
        assert f"QUARANTINE peer {name}" in log and "recent_distance_ratios" in log
        # The audit log holds the quarantine with its evidence, and from then on every
        # aggregation lists the attacker as quarantined: still an input (the rule keeps its f),
        # with mixing weight 0; nobody is left out (only proven equivocators are).
        records = _audit_records(tmp_path / "nodes" / hospital["name"])
        quarantine = [r for r in records if r["kind"] == "quarantine"]
        assert len(quarantine) == 1 and quarantine[0]["fields"]["peer"] == name
        assert quarantine[0]["fields"]["evidence"]["score"] < 0.2
        later = [
            r for r in records if r["kind"] == "aggregation" and r["round"] > quarantine[0]["round"]
        ]
        assert later
        for record in later:
            assert record["fields"]["quarantined"] == [name], record
            assert record["fields"]["excluded"] == [], record


def test_protocol_abuse_is_rejected_with_reason_codes_and_changes_no_honest_model(
    tmp_path: Path,
) -> None:
    """The abuser also sends its genuine update, so the control is its honest twin: the same
    network with the [adversary] section removed. Every abusive message is refused, so the
    honest hospitals end with bit-identical models."""
    args = [*COMMON, *DEFENCE, "--byzantine", "1", "--attack", "protocol_abuse"]
    abused = make_network(tmp_path / "abused", *args)
    twin = make_network(tmp_path / "twin", *args)
    attacker = next(n for n in twin.nodes if n.byzantine)
    doc = tomllib.loads(attacker.config_path.read_text())
    del doc["adversary"]
    attacker.config_path.write_text(run_cluster.to_toml(doc))
    # The abuser sends a dozen authenticated requests a round, three times what the default
    # per-peer bucket refills (docs/protocol.md, "Per-peer limits"; tested in test_http.py),
    # which would then refuse some of its genuine updates too. Here every abuse must reach
    # the check that refuses it, so both networks allow more.
    for net in (abused, twin):
        for node in net.nodes:
            net.edit_config(node.name, "peer_listener", peer_burst=1000)
    run_networks(abused, twin)

    for node in abused.nodes:
        if node.byzantine:
            continue
        status = abused.final_status(node.name)
        rejected = status["rejected"]
        for reason in (
            "replay",  # its own old envelopes, and its sent one with a bit flipped
            "sender_mismatch",  # its neighbours' envelopes, and its own under their names
            "unauthenticated",  # outsiders' envelopes, posted with the outsiders' keys
            "malformed",
            "too_large",
        ):
            assert rejected.get(reason, 0) >= 1, (node.name, rejected)
        assert status["unauthenticated"].get("unknown_sender", 0) >= 1, status["unauthenticated"]
        assert "peer_rate_limited" not in rejected
        assert status["model_sha256"] == twin.final_status(node.name)["model_sha256"]
        assert status["quarantined"] == []
    assert honest_aucs(abused) == honest_aucs(twin)


@pytest.mark.skipif(
    not (SHARED_DATA / "heart_disease").is_dir(),
    reason=f"needs the Fed-Heart-Disease files in {SHARED_DATA / 'heart_disease'}",
)
def test_switzerland_is_never_quarantined_in_a_clean_heart_disease_run(tmp_path: Path) -> None:
    """Switzerland is the non-IID site (15 of its 16 test patients have disease). Its model
    sits apart from the others, yet in a clean run with DP (the defaults) no node ever
    distrusts it; trust is also served on /metrics."""
    rounds = 10
    net = make_network(tmp_path, "--dataset", "heart-disease", "--rounds", str(rounds))
    for node in net.nodes:
        net.start(node.name, "--serve")
    try:
        for node in net.nodes:
            net.wait_for_round(node.name, rounds, timeout_s=WAIT_S)
        for node in net.nodes:
            _wait_for_phase(net, node.name, "done")
        for node in net.nodes:
            if node.name == "switzerland":
                continue
            status = net.status(node.name)
            assert status["quarantined"] == []
            assert status["trust_history"]["switzerland"] == [1.0] * rounds, status["trust"]
            metrics = (
                urllib.request.urlopen(f"{node.operator_address}/metrics", timeout=5)
                .read()
                .decode()
            )
            assert 'murmur_peer_trust{peer="switzerland"} 1.0' in metrics
    finally:
        net.kill_all()


def _wait_for_phase(net: Network, name: str, phase: str) -> None:
    end = time.monotonic() + 60
    while time.monotonic() < end:
        if net.status(name)["phase"] == phase:
            return
        time.sleep(0.2)
    raise TimeoutError(f"{name} never reached phase {phase}; log:\n{net.log(name)}")


def _audit_records(state_dir: Path) -> list[dict]:
    """The node's audit log as `murmur audit export --format json` writes it."""
    out = subprocess.run(
        [sys.executable, "-m", "murmur.node.cli", "audit", "export", "--state", str(state_dir)],
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO,
    ).stdout
    return json.loads(out)["records"]
