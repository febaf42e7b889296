"""Helpers for tests that start real `murmur node` processes on 127.0.0.1, or run the same
network's node round loops in one process (`run_in_process`, as bench/byzantine.py does).

Every wait here is bounded, and `Network` kills whatever it started when the test ends.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import tomllib
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import run_cluster

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Network:
    run_dir: Path
    nodes: list[run_cluster.NodeProcess]
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    def node(self, name: str) -> run_cluster.NodeProcess:
        return next(n for n in self.nodes if n.name == name)

    def edit_config(self, name: str, section: str, **values: Any) -> None:
        path = self.node(name).config_path
        doc = tomllib.loads(path.read_text())
        doc.setdefault(section, {}).update(values)
        path.write_text(run_cluster.to_toml(doc))

    def start(self, name: str, *extra: str, prefix: Sequence[str] = ()) -> subprocess.Popen:
        """Start one node process; `prefix` wraps the command (e.g. `ip netns exec HOST`)."""
        node = self.node(name)
        node.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(node.log_path, "ab")  # noqa: SIM115 - closed after Popen duplicates it
        proc = subprocess.Popen(
            [
                *prefix,
                sys.executable,
                "-m",
                "murmur.node.cli",
                "node",
                "--config",
                str(node.config_path),
                *extra,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=REPO,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        log.close()
        self.procs[name] = proc
        return proc

    def start_all(self) -> None:
        for n in self.nodes:
            self.start(n.name)

    def wait_all(self, timeout_s: float) -> dict[str, int]:
        end = time.monotonic() + timeout_s
        codes = {}
        for name, proc in self.procs.items():
            codes[name] = proc.wait(timeout=max(0.1, end - time.monotonic()))
        return codes

    def status(self, name: str, timeout_s: float = 2.0) -> dict[str, Any]:
        url = f"{self.node(name).operator_address}/status"
        with urllib.request.urlopen(url, timeout=timeout_s) as r:
            return json.loads(r.read())

    def final_status(self, name: str) -> dict[str, Any]:
        return json.loads((self.node(name).state_dir / "status.json").read_text())

    def wait_for_round(self, name: str, round_: int, timeout_s: float) -> None:
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            try:
                if self.status(name)["round"] >= round_:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        raise TimeoutError(
            f"{name} did not reach round {round_} in {timeout_s}s; log:\n{self.log(name)}"
        )

    def log(self, name: str) -> str:
        path = self.node(name).log_path
        return path.read_text()[-4000:] if path.exists() else "(no log)"

    def kill_all(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                proc.wait(timeout=10)


def make_network(tmp_path: Path, *args: str) -> Network:
    """Keys, topology and configs exactly as run_cluster.py writes them."""
    ns = run_cluster.parse_args(["--out", str(tmp_path), *args])
    nodes, _ = run_cluster.write_network(ns, tmp_path)
    return Network(tmp_path, nodes)


def plain_network(
    tmp_path: Path, *extra: str, nodes: int = 3, rounds: int = 3, round_timeout_s: int = 20
) -> Network:
    """A small network with no DP and a plain mean, for tests of transport rather than
    learning: `nodes` hospitals, `rounds` rounds, `extra` further run_cluster options."""
    return make_network(
        tmp_path,
        *("--nodes", str(nodes), "--rounds", str(rounds), "--no-dp", "--aggregator", "mean"),
        *("--round-timeout", str(round_timeout_s), *extra),
    )


def run_in_process(argv: list[str], out: Path) -> tuple[dict[str, Any], list[Any]]:
    """run_cluster.py ARGV as bench/byzantine.py runs it: the real node round loops in this
    process, envelopes handed over by direct calls. Returns the report and the nodes."""
    from bench.byzantine import run_nodes_in_process

    args = run_cluster.parse_args([*argv, "--quiet", "--out", str(out)])
    return asyncio.run(run_nodes_in_process(args, out))


def build_node(tmp_path: Path, nodes: int = 2, **sections: dict[str, Any]) -> Any:
    """hospital_0 of a `nodes`-node network (as run_cluster writes it, no DP), built in this
    process with both listeners on free loopback ports; `sections` edit its config first.
    Start its listeners with `await node.api.start_api(node)`; no round runs. The peers'
    keys are in `tmp_path / "keys"`."""
    from murmur.node.config import load_config
    from murmur.node.node import HospitalNode

    net = make_network(tmp_path, "--nodes", str(nodes), "--no-dp", "--aggregator", "mean")
    name = net.nodes[0].name
    net.edit_config(name, "node", listen="127.0.0.1:0")
    net.edit_config(name, "operator", listen="127.0.0.1:0")
    for section, values in sections.items():
        net.edit_config(name, section, **values)
    return HospitalNode(load_config(net.node(name).config_path))
