"""run_cluster's live progress (node/progress.py): a table redrawn in place on a terminal,
plain lines elsewhere; and a real run_cluster in a pseudo-terminal."""

from __future__ import annotations

import io
import os
import pty
import re
import select
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from murmur.node.alerts import AlertSettings
from murmur.node.progress import Progress, bar, progress_table

REPO = Path(__file__).resolve().parents[1]
SETTINGS = AlertSettings(round_timeout_s=15.0)


@dataclass
class Node:
    name: str
    byzantine: bool = False
    exit_code: int | None = None
    status: dict[str, Any] = field(default_factory=dict)


def running(name: str, done: int, **extra: Any) -> Node:
    status = {
        "round": done + 1,
        "phase": "collecting",
        "history": [{"round": r, "missing": []} for r in range(1, done + 1)],
        "last_metrics": {"auc": 0.9512},
        "privacy": {"enabled": True, "epsilon_spent": 0.25 * done, "epsilon_budget": 1.0},
        "peers": {"other": {"last_round": done}},
        "trust": {"other": 0.93},
        **extra,
    }
    return Node(name, status=status)


def test_the_table_has_a_bar_per_hospital_and_names_its_alerts() -> None:
    nodes = [
        running("hospital_0", 2),
        running("hospital_1", 4, quarantined=["byzantine_0"], trust={"byzantine_0": 0.05}),
        Node("byzantine_0", byzantine=True, exit_code=0, status={"phase": "done"}),
        Node("hospital_2", exit_code=2),
    ]
    nodes[1].status["peers"] = {"byzantine_0": {"last_round": 4}}
    lines = progress_table(nodes, 4, SETTINGS, width=160, height=40)
    assert lines[0].split() == ["hospital", "progress", "round", "phase", "AUC", "ε", "spent",
                                "min", "trust", "alerts"]  # fmt: skip
    assert lines[1].split()[:4] == ["hospital_0", bar(2, 4), "3/4", "collecting"]
    assert bar(2, 4).count("█") == 10
    assert "0.951" in lines[1] and "0.50 / 1.00" in lines[1] and "0.93" in lines[1]
    assert bar(4, 4) == "[" + "█" * 20 + "]"
    assert lines[2].endswith("byzantine_0 quarantined (+1)")  # + the ε at 100% warning
    assert "byzantine_0 (attacker)" in lines[3] and "done ✓" in lines[3]
    assert "FAILED (exit 2)" in lines[4]
    # Exited while its last polled status was mid-round; nothing evaluated yet: no AUC.
    early = [Node("h", exit_code=0, status={"phase": "training"}), running("g", 0)]
    rows = progress_table(early, 4, SETTINGS, width=160, height=40)
    assert "exited ✓" in rows[1] and rows[2].split()[4] == "-"
    # Narrow and short terminals: no line wraps, and extra hospitals fold into one line.
    small = progress_table(nodes, 4, SETTINGS, width=40, height=4)
    assert all(len(line) <= 39 for line in small)
    assert len(small) == 3 and small[-1] == "... and 3 more hospitals (2 finished)"


def test_a_terminal_gets_the_table_redrawn_in_place_and_a_pipe_gets_lines() -> None:
    out = io.StringIO()
    progress = Progress(out, 4, SETTINGS, lambda ns: f"{len(ns)} nodes", live=True)
    nodes = [running("hospital_0", 1), running("hospital_1", 1)]
    progress.update(nodes)
    first = out.getvalue()
    assert not first.startswith("\x1b[") and first.count("\n") == 3  # heading + 2 rows
    progress.update(nodes)  # unchanged: nothing drawn
    assert out.getvalue() == first
    nodes[0].status["history"].append({"round": 2, "missing": []})
    progress.update(nodes)
    redraw = out.getvalue()[len(first) :]
    assert redraw.startswith("\x1b[3F") and redraw.endswith("\x1b[J")  # up over the old table
    progress.interrupt()  # something printed below it: the next frame goes below that
    nodes[1].status["history"].append({"round": 2, "missing": []})
    progress.update(nodes)
    assert not out.getvalue()[len(first) + len(redraw) :].startswith("\x1b[")
    # Not a terminal: the one-line summary, once per change, and the final one always.
    piped = io.StringIO()
    progress = Progress(piped, 4, SETTINGS, lambda ns: f"{len(ns)} nodes")
    assert not progress.live
    progress.update(nodes)
    progress.update(nodes)
    progress.final(nodes)
    assert piped.getvalue() == "2 nodes\n2 nodes\n"


@pytest.mark.slow
def test_run_cluster_in_a_terminal_draws_the_live_table(tmp_path: Path) -> None:
    """The real script with its stdout on a pseudo-terminal: the table is drawn and redrawn
    with cursor movement, and the final summary follows as before."""
    leader, follower = pty.openpty()
    proc = subprocess.Popen(
        [
            sys.executable,
            "run_cluster.py",
            "--nodes",
            "2",
            "--rounds",
            "2",
            "--no-baselines",
            "--aggregator",
            "mean",
            "--out",
            str(tmp_path),
        ],
        cwd=REPO,
        stdin=subprocess.DEVNULL,
        stdout=follower,
        stderr=follower,
        env={**os.environ, "COLUMNS": "160", "LINES": "40"},
    )
    os.close(follower)
    output = b""
    end = time.monotonic() + 240
    try:
        while time.monotonic() < end:
            ready, _, _ = select.select([leader], [], [], 1.0)
            if ready:
                try:
                    chunk = os.read(leader, 65536)
                except OSError:  # the child closed the terminal
                    break
                if not chunk:
                    break
                output += chunk
            elif proc.poll() is not None:
                break
        assert proc.wait(timeout=30) == 0, output.decode(errors="replace")[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(leader)
    text = output.decode(errors="replace")
    assert re.search(r"\x1b\[3F", text), text[-2000:]  # redrawn over its 3 lines
    assert "hospital_0" in text and "[" + "█" * 20 + "]" in text
    assert "report:" in text and "report.html" in text  # the final summary, as before
