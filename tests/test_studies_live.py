"""Studies with real `murmur node` processes: a node refuses an unapproved study and a study
over its site budget; it refuses envelopes of another study; two studies run at once on the
same hospitals, sharing each hospital's site budget, composed by the accountant."""

from __future__ import annotations

import subprocess
import sys
import tomllib
import urllib.request
from pathlib import Path

import pytest
from murmur.models.privacy import composed_epsilon
from murmur.node.studies.site_budget import SiteBudgetStore

from tests.netutil import REPO, Network, make_network

pytestmark = pytest.mark.slow

DELTA = 1e-5
SITE = "site_budget"
SITE_KEYS = {"hospital", "path", "reference"}  # the node's own, never the study's


def murmur(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "murmur.node.cli", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )


def propose(tmp: Path, name: str, config_path: Path, key: Path) -> Path:
    """A manifest signed with ``key``, built from the sections run_cluster wrote into
    ``config_path``, so that the manifest and the configs agree."""
    from run_cluster import to_toml

    config = tomllib.loads(config_path.read_text())
    draft = {"study": {"name": name, "topology": "both hospitals, complete graph"}}
    for section in ("data", "model", "training", "privacy", "aggregation"):
        draft[section] = {k: v for k, v in config[section].items() if k not in SITE_KEYS}
    draft_path = tmp / f"{name}.toml"
    draft_path.write_text(to_toml(draft))
    manifest = tmp / f"{name}.json"
    done = murmur("study", "propose", str(draft_path), "--key", str(key), "--out", str(manifest))
    assert done.returncode == 0, done.stderr
    return manifest


def study_network(tmp: Path, name: str, epsilon: float, rounds: int = 2) -> tuple[Network, Path]:
    """A 2-hospital network whose configs name one manifest, proposed by hospital_0."""
    net = make_network(
        tmp / name,
        *("--nodes", "2", "--rounds", str(rounds), "--round-timeout", "5"),
        *("--aggregator", "mean", "--dp-epsilon", str(epsilon), "--dp-delta", str(DELTA)),
    )
    key = net.run_dir / "keys" / "hospital_0.key"
    manifest = propose(tmp, name, net.node("hospital_0").config_path, key)
    for node in net.nodes:
        net.edit_config(node.name, "study", manifest=str(manifest))
        net.edit_config(node.name, "gossip", startup_timeout_s=3.0)
    return net, manifest


def approve(net: Network, name: str, manifest: Path) -> None:
    node = net.node(name)
    key = net.run_dir / "keys" / f"{name}.key"
    done = murmur(
        "study", "approve", str(manifest), "--state", str(node.state_dir), "--key", str(key)
    )
    assert done.returncode == 0 and "kept: study" in done.stdout, done.stderr


def site_budget(net: Network, name: str, store: Path, max_epsilon: float) -> None:
    net.edit_config(
        name,
        SITE,
        store=str(store),
        datasets={"breast-cancer": {"max_epsilon": max_epsilon, "delta": DELTA}},
    )


def manifest_id(manifest: Path) -> str:
    shown = murmur("study", "show", str(manifest))
    assert shown.returncode == 0, shown.stderr
    return next(line.split()[1] for line in shown.stdout.splitlines() if line.startswith("study:"))


def metrics(net: Network, name: str) -> str:
    url = f"{net.node(name).operator_address}/metrics"
    with urllib.request.urlopen(url, timeout=5) as reply:
        return reply.read().decode()


def test_unapproved_over_budget_and_foreign_studies_are_refused(tmp_path: Path) -> None:
    net, manifest = study_network(tmp_path, "alpha", epsilon=1.0, rounds=1)
    study = manifest_id(manifest)
    try:
        # 1. Not approved by this node's operator: refused before anything starts.
        proc = net.start("hospital_0")
        assert proc.wait(timeout=60) == 2
        log = net.log("hospital_0")
        assert f"study alpha ({study}) is not approved by this node's operator" in log
        assert "murmur study approve" in log and str(manifest) in log

        # 2. Approved, but the site budget left for the data set is below the study's plan.
        approve(net, "hospital_0", manifest)
        store = tmp_path / "h0-site.sqlite"
        site_budget(net, "hospital_0", store, max_epsilon=0.5)
        proc = net.start("hospital_0")
        assert proc.wait(timeout=60) == 2
        log = net.log("hospital_0")
        assert "would take data set breast-cancer past its lifetime budget" in log
        assert "> max_epsilon=0.5" in log and "ε=0.000 on 0 admitted studies" in log
        assert SiteBudgetStore(store).runs("breast-cancer") == []  # nothing reserved

        # 3. Envelopes of another study (hospital_1 runs a manifest with another hash) are
        # refused with unknown_study, counted in /status and /metrics; nothing is applied.
        site_budget(net, "hospital_0", store, max_epsilon=5.0)
        h1 = net.node("hospital_1")
        beta = propose(tmp_path, "beta", h1.config_path, net.run_dir / "keys" / "hospital_1.key")
        net.edit_config("hospital_1", "study", manifest=str(beta))
        approve(net, "hospital_1", beta)  # hospital_1 approves beta, not alpha
        net.start("hospital_0", "--serve")
        net.start("hospital_1")
        assert net.procs["hospital_1"].wait(timeout=120) == 0, net.log("hospital_1")
        net.wait_for_round("hospital_0", 1, timeout_s=60)
        status = net.status("hospital_0")
        assert status["study"]["study"] == study and status["study"]["approved_by"] == [
            "hospital_0"
        ]
        assert status["rejected"].get("unknown_study", 0) >= 1, status["rejected"]
        assert 'murmur_messages_rejected_total{reason="unknown_study"}' in metrics(
            net, "hospital_0"
        )
        assert status["history"][-1]["received"] == []  # nothing of beta's was applied
        assert "unknown_study" in net.log("hospital_0")
    finally:
        net.kill_all()


def test_two_studies_run_at_once_on_the_same_hospitals(tmp_path: Path) -> None:
    one, m1 = study_network(tmp_path, "one", epsilon=1.5)
    two, m2 = study_network(tmp_path, "two", epsilon=1.5)
    stores = {name: tmp_path / f"{name}-site.sqlite" for name in ("hospital_0", "hospital_1")}
    for net, manifest in ((one, m1), (two, m2)):
        for name in ("hospital_0", "hospital_1"):
            approve(net, name, manifest)
            site_budget(net, name, stores[name], max_epsilon=3.2)
    try:
        for net in (one, two):
            net.start_all()
        for net in (one, two):
            codes = net.wait_all(timeout_s=240)
            assert codes == {"hospital_0": 0, "hospital_1": 0}, net.log("hospital_0")
        for net, manifest in ((one, m1), (two, m2)):
            status = net.final_status("hospital_0")
            assert status["round"] == 2 and status["phase"] == "done"
            assert status["study"]["study"] == manifest_id(manifest)
            assert status["rejected"].get("unknown_study", 0) == 0
        # Each hospital's store holds both studies, finished, composed by the accountant.
        store = SiteBudgetStore(stores["hospital_0"])
        runs = store.runs("breast-cancer")
        assert sorted(r.name for r in runs) == ["one", "two"] and all(r.finished for r in runs)
        assert all(r.steps_taken > 0 for r in runs)
        composed = composed_epsilon([r.event() for r in runs], DELTA)
        alone = [composed_epsilon([r.event()], DELTA) for r in runs]
        assert max(alone) < composed < sum(alone)  # composed, not added
        final = next(
            rec for rec in reversed(status_audit(one, "hospital_0")) if rec.get("finished")
        )
        assert final["epsilon_composed"] == pytest.approx(composed, rel=1e-6)

        # A third study on hospital_0 that does not fit in what is left is refused.
        three, m3 = study_network(tmp_path, "three", epsilon=2.7)
        approve(three, "hospital_0", m3)
        site_budget(three, "hospital_0", stores["hospital_0"], max_epsilon=3.2)
        proc = three.start("hospital_0")
        assert proc.wait(timeout=60) == 2
        log = three.log("hospital_0")
        assert f"the data set has spent ε={composed:.3f} on 2 admitted studies" in log
        assert "> max_epsilon=3.2" in log
    finally:
        for net in (one, two):
            net.kill_all()


def status_audit(net: Network, name: str) -> list[dict]:
    """The node's site_budget audit records' fields, oldest first."""
    from murmur.node.audit import records_of_kind

    return [r.fields for r in records_of_kind(net.node(name).state_dir, "site_budget")]
