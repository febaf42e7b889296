"""run_cluster.py as a user runs it: the report it writes, crash recovery, and no orphans."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.netutil import REPO

pytestmark = pytest.mark.slow

METRICS = (
    "auc",
    "sensitivity",
    "specificity",
    "ppv",
    "npv",
    "brier",
    "accuracy",
    "majority_accuracy",
)


def start_cluster(out: Path, *args: str, cwd: Path = REPO) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(REPO / "run_cluster.py"), "--out", str(out), "--quiet", *args],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def children_of(pid: int) -> list[int]:
    """Node processes started by run_cluster (from /proc, so no extra dependency)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == pid and "murmur.node.cli" in cmdline:
            found.append(int(entry.name))
    return found


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has exited


def node_pid(cluster_pid: int, name: str) -> int | None:
    for pid in children_of(cluster_pid):
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        if f"{name}.toml" in cmdline:
            return pid
    return None


def wait_for(predicate, timeout_s: float, what: str) -> None:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if predicate():
            return
        time.sleep(0.1)
    raise TimeoutError(what)


def status_round(run_dir: Path, name: str) -> int:
    path = run_dir / "nodes" / name / "status.json"
    try:
        return len(json.loads(path.read_text())["history"])
    except (OSError, ValueError, KeyError):
        return 0


def assert_no_patient_values_in_audit_logs(run_dir: Path, names: list[str]) -> None:
    """Scan every node's audit database, byte for byte, for any feature value of its patients."""
    import numpy as np
    from murmur.models.data import load_dataset

    splits = {s.name: s for s in load_dataset("breast-cancer", num_hospitals=len(names), seed=0)}
    raw = np.concatenate([s.x_train for s in splits.values()]).ravel()
    for name in names:
        values = np.concatenate([splits[name].x_train.ravel(), splits[name].x_test.ravel()])
        # Every written form a float could take in JSON: float32 and float64 reprs.
        needles = {repr(float(v)) for v in values} | {repr(float(np.float64(v))) for v in raw}
        needles = {n for n in needles if len(n.lstrip("-").replace(".", "").lstrip("0")) >= 6}
        blob = b"".join(p.read_bytes() for p in (run_dir / "nodes" / name).glob("audit.sqlite*"))
        assert len(needles) > 1000 and len(blob) > 10_000  # something to find, somewhere to look
        text = blob.decode("latin-1")
        leaked = [n for n in needles if n in text]
        assert not leaked, f"{name}'s audit log holds training values: {leaked[:5]}"


def independent_epsilon(sigma: float, q: float, steps: int, delta: float) -> float:
    """ε from report.json's (σ, q, steps, δ) with Google's dp-accounting called directly (its
    default PLD grid), not through murmur's own accountant wrapper."""
    from dp_accounting import NeighboringRelation, dp_event
    from dp_accounting.pld import pld_privacy_accountant

    accountant = pld_privacy_accountant.PLDAccountant(NeighboringRelation.ADD_OR_REMOVE_ONE)
    step = dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(sigma))
    accountant.compose(dp_event.SelfComposedDpEvent(step, steps))
    return accountant.get_epsilon(delta)


def test_report_has_the_documented_schema_and_consistent_numbers(tmp_path: Path) -> None:
    # Run from elsewhere with a relative run directory, as a user typing a short --out would.
    proc = start_cluster(
        Path("run"),
        "--nodes",
        "3",
        "--rounds",
        "4",
        "--baselines",
        "--dp-epsilon",
        "2",
        cwd=tmp_path,
    )
    out, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, out
    tmp_path = tmp_path / "run"
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["dataset"] == "breast-cancer" and report["nodes"] == 3
    assert report["dp"]["enabled"] and report["dp"]["epsilon"] == 2
    assert report["aggregator"]["rule"] and isinstance(report["aggregator"]["f"], int)
    assert report["seconds"] > 0 and report["bytes_sent"] > 0 and report["failed"] == []
    assert report["interrupted"] is None and report["exit_code"] == 0
    assert report["rounds_completed"] == 4 and isinstance(report["warnings"], list)
    assert report["data_path"].startswith("embedded")  # the built-in data, named as such
    assert len(report["hospitals"]) == 3
    for h in report["hospitals"]:
        assert h["byzantine"] is False and h["exit_code"] == 0 and h["rounds_completed"] == 4
        for key in METRICS:
            assert h[key] is None or 0.0 <= h[key] <= 1.0, (key, h[key])
        assert h["auc"] is not None and h["auc"] > 0.8
        # Every column the HTML table shows is filled (issue: "n train" was undefined).
        assert h["n_train"] > h["n_test"] > 0 and 0 < h["n_test_positives"] < h["n_test"]
        assert h["phase"] == "done" and isinstance(h["warnings"], list)
        # What the accountant was given is reported, and the spend stays within the budget.
        assert 0 < h["epsilon"] <= 2.0 + 1e-9
        assert 0 < h["delta"] <= 1e-5 and h["noise_multiplier"] > 0 and 0 < h["sample_rate"] <= 1
        assert h["dp_steps"] > 0 and len(h["model_sha256"]) == 64
        assert [x["round"] for x in h["history"]] == [1, 2, 3, 4]
        eps = [x["epsilon"] for x in h["history"]]
        assert eps == sorted(eps) and eps[-1] == pytest.approx(h["epsilon"])
        assert h["epsilon"] == pytest.approx(
            independent_epsilon(h["noise_multiplier"], h["sample_rate"], h["dp_steps"], h["delta"]),
            rel=0.01,
        )
    honest_aucs = [h["auc"] for h in report["hospitals"]]
    assert report["mean_auc"] == pytest.approx(sum(honest_aucs) / 3)
    # With DP on, the baselines include DP ones at the same budget ("did federating help?").
    for kind in ("local", "pooled", "local_dp", "pooled_dp"):
        baseline = report["baselines"][kind]
        assert [h["name"] for h in baseline["hospitals"]] == [
            h["name"] for h in report["hospitals"]
        ]
        assert 0.5 < baseline["mean_auc"] <= 1.0
    assert_no_patient_values_in_audit_logs(tmp_path, [h["name"] for h in report["hospitals"]])
    html = (tmp_path / "report.html").read_text()
    assert "auc.png" in html and (tmp_path / "auc.png").stat().st_size > 1000
    for h in report["hospitals"]:
        assert (tmp_path / "logs" / f"{h['name']}.log").exists()


def test_killing_run_cluster_leaves_no_node_running(tmp_path: Path) -> None:
    proc = start_cluster(
        tmp_path, "--nodes", "3", "--rounds", "500", "--no-dp", "--aggregator", "mean"
    )
    wait_for(lambda: len(children_of(proc.pid)) == 3, 60, "nodes did not start")
    nodes = children_of(proc.pid)
    wait_for(lambda: status_round(tmp_path, "hospital_0") >= 1, 90, "no round finished")
    proc.send_signal(signal.SIGKILL)  # no chance to clean up: the nodes must notice on their own
    proc.wait(timeout=10)
    wait_for(lambda: not any(alive(pid) for pid in nodes), 30, f"orphans left: {nodes}")


def test_ctrl_c_stops_every_node_cleanly(tmp_path: Path) -> None:
    proc = start_cluster(
        tmp_path, "--nodes", "3", "--rounds", "500", "--no-dp", "--aggregator", "mean"
    )
    wait_for(lambda: status_round(tmp_path, "hospital_0") >= 1, 90, "no round finished")
    nodes = children_of(proc.pid)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130, out
    assert not any(alive(pid) for pid in nodes)
    report = json.loads((tmp_path / "report.json").read_text())
    assert all(
        h["exit_code"] == 0 for h in report["hospitals"]
    )  # each node ended its round cleanly
    assert all(0 < h["rounds_completed"] < 500 for h in report["hospitals"])
    # The report says the run was cut short, not that it ran its 500 planned rounds.
    assert report["interrupted"] and "signal" in report["interrupted"], report["interrupted"]
    assert report["exit_code"] == 130 and 0 < report["rounds_completed"] < 500
    assert all(any("stopped after" in w for w in h["warnings"]) for h in report["hospitals"])
    assert "INTERRUPTED" in (tmp_path / "report.html").read_text()


def test_a_node_killed_mid_run_restarts_without_re_spending_privacy(tmp_path: Path) -> None:
    victim = "hospital_1"
    proc = start_cluster(
        tmp_path, "--nodes", "4", "--rounds", "14", "--round-timeout", "3", "--dp-epsilon", "3"
    )
    wait_for(lambda: status_round(tmp_path, victim) >= 2, 120, "victim never finished a round")
    time.sleep(float(os.environ.get("MURMUR_TEST_KILL_DELAY", "0.37")))  # an arbitrary moment
    pid = node_pid(proc.pid, victim)
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    assert f"{victim} was killed by signal 9; restarting" in out
    report = json.loads((tmp_path / "report.json").read_text())
    node = next(h for h in report["hospitals"] if h["name"] == victim)
    assert node["restarts"] == 1 and node["exit_code"] == 0
    # It rejoined and finished, unless the kill landed mid-training: those steps may have
    # touched the data, so they count as spent, and with a budget planned for exactly 14
    # rounds the node then stops one round early, refusing to overspend (docs/privacy.md).
    last_round = node["history"][-1]["round"]
    status = json.loads((tmp_path / "nodes" / victim / "status.json").read_text())
    assert node["auc"] is not None and last_round >= 13, node["history"]
    if last_round < 14:
        assert status["phase"] == "budget_exhausted", status["phase"]
        assert node["epsilon"] == pytest.approx(3.0)
    eps = [h["epsilon"] for h in node["history"]]
    assert eps == sorted(eps), eps  # never reset by the restart
    assert node["epsilon"] <= 3.0 + 1e-9
    rounds = [h["round"] for h in node["history"]]
    assert rounds == sorted(set(rounds)), rounds  # no round recorded twice
    verify = subprocess.run(
        [
            sys.executable, "-m", "murmur.node.cli", "audit", "verify",
            "--state", str(tmp_path / "nodes" / victim),
            "--public-key", str(tmp_path / "keys" / f"{victim}.pub"),
        ],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert verify.returncode == 0, verify.stdout + verify.stderr
