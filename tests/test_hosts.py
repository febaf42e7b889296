"""Several hospital nodes per process (`murmur hosts`, run_cluster --hosts-per-process)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from murmur.node.audit import records_of_kind

from tests.netutil import REPO, make_network

pytestmark = pytest.mark.slow


def test_six_hospitals_in_two_processes_run_every_round_over_http(tmp_path: Path) -> None:
    out = tmp_path / "run"
    done = subprocess.run(
        [
            *(sys.executable, "run_cluster.py", "--nodes", "6", "--hosts-per-process", "3"),
            *("--rounds", "3", "--no-dp", "--aggregator", "mean", "--model", "mlp"),
            *("--no-baselines", "--quiet", "--out", str(out)),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    report = json.loads((out / "report.json").read_text())
    assert report["rounds_completed"] == 3 and not report["failed"]
    states = sorted((out / "nodes").iterdir())
    pids = {
        s.name: records_of_kind(s, "node_start")[0].fields["pid"] for s in states
    }  # each node's own audit log says which process ran it
    assert len(set(pids.values())) == 2
    assert pids["hospital_0"] == pids["hospital_2"] != pids["hospital_3"] == pids["hospital_5"]
    logs = sorted(p.name for p in (out / "logs").iterdir())
    assert logs == ["host-hospital_0.log", "host-hospital_3.log"]
    text = (out / "logs" / "host-hospital_3.log").read_text()
    for name in ("hospital_3", "hospital_4", "hospital_5"):
        assert f"murmur.node/{name} INFO round 3 done" in text
    # Over HTTP: every node heard every neighbour (the other process's too) each round.
    for state in states:
        status = json.loads((state / "status.json").read_text())
        assert all(len(h["received"]) == 5 and not h["missing"] for h in status["history"])


def test_sigterm_stops_every_node_of_the_process(tmp_path: Path) -> None:
    """One signal handler for the process: both nodes stop, not just the last one started."""
    net = make_network(
        tmp_path, "--nodes", "2", "--rounds", "500", "--no-dp", "--aggregator", "mean"
    )
    configs = [a for n in net.nodes for a in ("--config", str(n.config_path))]
    log = open(tmp_path / "hosts.log", "wb")  # noqa: SIM115 - closed after Popen
    proc = subprocess.Popen(
        [sys.executable, "-m", "murmur.node.cli", "hosts", *configs],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=REPO,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    log.close()
    try:
        end = time.monotonic() + 90
        while time.monotonic() < end and "round 2 done" not in (tmp_path / "hosts.log").read_text():
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    for node in net.nodes:
        stops = records_of_kind(node.state_dir, "node_stop")
        assert [s.fields["reason"] for s in stops] == ["stopped"], node.name
        assert 2 <= stops[0].round < 500
