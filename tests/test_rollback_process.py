"""Real `murmur node` processes: POST /receipts over HTTP refuses a key's fresh start, the
intact state starts, and a second process on a live node's state directory is refused."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest
from murmur.node.audit import records_of_kind

import run_cluster
from tests.netutil import REPO, make_network

pytestmark = pytest.mark.slow


def murmur_node(config: Path, timeout_s: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "murmur.node.cli", "node", "--config", str(config)],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        timeout=timeout_s,
    )


def test_over_http_a_fresh_state_for_a_known_key_is_refused_and_the_real_one_starts(
    tmp_path: Path,
) -> None:
    net = make_network(
        tmp_path, "--nodes", "2", "--rounds", "2", "--dp-epsilon", "1.0", "--aggregator", "mean",
        "--round-timeout", "10",
    )  # fmt: skip
    a, b = net.nodes
    try:
        net.start(a.name)
        b_proc = net.start(b.name, "--serve")  # keeps answering after its rounds
        assert net.procs[a.name].wait(timeout=180) == 0, net.log(a.name)
        net.wait_for_round(b.name, 2, timeout_s=60)

        # One process per state directory: a second node on b's is refused, naming b's PID.
        second = murmur_node(b.config_path, timeout_s=60)
        assert second.returncode == 2, second.stderr
        assert f"PID {b_proc.pid}" in second.stderr and "in use" in second.stderr

        # The same key with a new state directory: b holds a's round-2 receipt, so a refuses.
        doc = tomllib.loads(a.config_path.read_text())
        doc["node"]["state_dir"] = str(tmp_path / "fresh_state")
        fresh_config = tmp_path / "fresh.toml"
        fresh_config.write_text(run_cluster.to_toml(doc))
        fresh = murmur_node(fresh_config)
        assert fresh.returncode == 2, fresh.stderr[-3000:]
        assert "older than what it already signed" in fresh.stderr
        assert f"{b.name} holds this node's own signed envelope of round 2" in fresh.stderr
        refused = records_of_kind(tmp_path / "fresh_state", "startup_refused")
        assert [r.fields["holder"] for r in refused] == [b.name]

        # Its real state directory starts: no false alarm. It has no rounds left, so without
        # --serve it would exit at once without asking anyone (it signs nothing); with --serve
        # it checks, then stays up.
        checks_before = len(records_of_kind(a.state_dir, "rollback_check"))
        again = subprocess.Popen(
            [sys.executable, "-m", "murmur.node.cli", "node", "--config", str(a.config_path),
             "--serve"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=REPO,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )  # fmt: skip
        deadline = time.monotonic() + 60
        while len(records_of_kind(a.state_dir, "rollback_check")) == checks_before:
            assert again.poll() is None, again.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "the real state never ran its rollback check"
            time.sleep(0.2)
        again.send_signal(signal.SIGTERM)
        _, again_err = again.communicate(timeout=60)
        assert again.returncode == 0, again_err[-3000:]
        assert "rollback check: 1 of 1 neighbours answered" in again_err
        checks = records_of_kind(a.state_dir, "rollback_check")
        assert checks[-1].fields["outcome"] == "ok"
        answered = records_of_kind(b.state_dir, "receipts_request")
        assert [r.fields["outcome"] for r in answered].count("answered") >= 3
        assert net.status(b.name)["rollback"]["receipts_requests"]["answered"] >= 3
    finally:
        for proc in net.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 30
        for proc in net.procs.values():
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
