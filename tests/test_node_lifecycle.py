"""A node as an operator runs it by hand: it says who it is and why it stops, logs to a
rotating file, and a finished node says so and exits at once instead of waiting for peers."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.netutil import make_network

pytestmark = pytest.mark.slow


def test_a_node_explains_itself_and_a_finished_node_exits_at_once(tmp_path: Path) -> None:
    net = make_network(
        tmp_path, "--nodes", "2", "--rounds", "2", "--round-timeout", "5", "--aggregator", "mean"
    )
    log_file = tmp_path / "hospital_0-logs" / "node.log"
    net.edit_config("hospital_0", "logging", file=str(log_file), max_mb=1.0, backups=2)
    net.start_all()
    codes = net.wait_all(timeout_s=180)
    assert codes == {"hospital_0": 0, "hospital_1": 0}, net.log("hospital_0")

    text = log_file.read_text()
    start = next(line for line in text.splitlines() if "listening on" in line)
    key_fingerprint = start.split("(key ")[1].split(")")[0]
    assert len(key_fingerprint.split(":")) == 8  # the identity's 128-bit fingerprint
    node = net.node("hospital_0")
    assert "node hospital_0" in start and "peers: hospital_1 (http://127.0.0.1:" in start
    assert "study: breast-cancer" in start and "2 rounds" in start and "ε=1" in start
    assert "stopping at round 2: all 2 planned rounds done" in text

    # Re-run the finished node: it must not wait 60 s for peers that are gone.
    began = time.monotonic()
    again = net.start("hospital_0")
    assert again.wait(timeout=60) == 0
    assert time.monotonic() - began < 30
    rerun_log = log_file.read_text()[len(text) :]
    assert "has already finished: all 2 planned rounds done (round 2" in rerun_log
    assert net.final_status("hospital_0")["round"] == 2  # not 0, as before
    assert node.state_dir.exists()
