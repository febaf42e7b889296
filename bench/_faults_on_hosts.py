"""Part 3 of bench/faults.py (a module it imports, not a benchmark of its own): the same
network run twice on separate hosts (network namespaces, tests/netns.py), once with a random
fault every 3 rounds and once without.

Four hospitals, complete topology, mean aggregation, no DP (the comparison is about faults,
not noise). hospital_3 is behind a firewall that drops inbound connections and reaches the
others only through the relay on a fifth host. The faults, drawn with a fixed seed: a
random hospital SIGKILLed and restarted (it resumes from its checkpoint), a random
hospital's link cut for 4 s and restored, or the relay killed and restarted.
"""

from __future__ import annotations

import random
import signal
import tempfile
import time
from pathlib import Path
from typing import Any

from tests import netns
from tests.netns import place_on_hosts, start_on_host, status_of
from tests.netutil import REPO, make_network
from tests.relayutil import NATS_SERVER, kill_group, start_relay_cli, use_relay

HOSPITALS = 4
RELAY_PORT = 4222
FAULT_EVERY = 3


def dataset_args() -> list[str]:
    """The four Heart Disease sites (real, non-IID, not saturated) where ../shared has them;
    else breast-cancer with label skew (Dirichlet 0.5), so that AUC is not 1.0 for all."""
    if (REPO.parent / "shared" / "data" / "heart_disease").is_dir():
        return ["--dataset", "heart-disease"]
    return ["--dataset", "breast-cancer", "--alpha", "0.5"]


def faulty_comparison(rounds: int, seed: int = 17) -> dict[str, Any]:
    why = netns.why_not() or (None if NATS_SERVER else "nats-server is not installed")
    if why:
        return {"skipped": why}
    clean = _run(rounds, faults=False, seed=seed)
    faulty = _run(rounds, faults=True, seed=seed)
    return {
        "aborts": faulty["aborts"] + clean["aborts"],
        "auc_clean": clean["auc"],
        "auc_faulty": faulty["auc"],
        "auc_gap": clean["auc"] - faulty["auc"],
        "relay_only_ok": faulty["relay_only_ok"] and clean["relay_only_ok"],
        "faults": faulty["faults"],
    }


def _run(rounds: int, *, faults: bool, seed: int) -> dict[str, Any]:
    rng = random.Random(seed)
    with tempfile.TemporaryDirectory(prefix="murmur-faults-run-") as tmp_name:
        tmp = Path(tmp_name)
        net = make_network(
            tmp, "--nodes", str(HOSPITALS), "--rounds", str(rounds), "--no-dp",
            "--aggregator", "mean", "--round-timeout", "6", "--seed", str(seed),
            *dataset_args(),
        )  # fmt: skip
        hidden = net.nodes[-1].name
        relay = None
        done: list[str] = []
        with netns.Lab() as lab:
            try:
                place_on_hosts(net, lab)
                relay_host = lab.add_host("relay")
                lab.firewall_inbound(hidden)
                pubs = sorted((tmp / "keys").glob("*.pub"))
                listen = f"{relay_host}:{RELAY_PORT}"
                relay = start_relay_cli(tmp / "relay", pubs, listen, lab.prefix("relay"))
                use_relay(net, f"nats://{listen}", {hidden})
                for node in net.nodes:
                    start_on_host(net, lab, node.name)
                next_fault = FAULT_EVERY
                end = time.monotonic() + 60 + 20 * rounds
                while time.monotonic() < end and any(p.poll() is None for p in net.procs.values()):
                    top = max(status_of(net, n.name).get("round", 0) for n in net.nodes)
                    if faults and top >= next_fault and top < rounds:
                        relay = _fault(rng, net, lab, tmp, pubs, listen, relay, done)
                        next_fault += FAULT_EVERY
                    time.sleep(0.2)
                codes = {name: proc.poll() for name, proc in net.procs.items()}
                statuses = {n.name: status_of(net, n.name) for n in net.nodes}
            finally:
                net.kill_all()
                if relay is not None:
                    kill_group(relay)
    finished = {
        name: codes[name] == 0 and s.get("round") == rounds and s.get("phase") == "done"
        for name, s in statuses.items()
    }
    aucs = [
        s["history"][-1]["metrics"].get("auc")
        for s in statuses.values()
        if s.get("history") and s["history"][-1]["metrics"].get("auc") is not None
    ]
    return {
        "aborts": sum(not ok for ok in finished.values()),
        "auc": sum(aucs) / len(aucs) if aucs else float("nan"),
        "relay_only_ok": finished[hidden],
        "faults": done,
    }


def _fault(rng, net, lab, tmp, pubs, listen, relay, done):  # type: ignore[no-untyped-def]
    """Inject one random fault and undo it; returns the (possibly restarted) relay."""
    kind = rng.choice(["kill_node", "cut_link", "kill_relay"])
    name = rng.choice(net.nodes).name
    if kind == "kill_node":
        proc = net.procs[name]
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)
            time.sleep(1)
            start_on_host(net, lab, name)
        done.append(f"kill {name}")
    elif kind == "cut_link":
        lab.cut(name)
        time.sleep(4)
        lab.restore(name)
        done.append(f"cut {name}")
    else:
        kill_group(relay)
        time.sleep(3)
        relay = start_relay_cli(tmp / "relay", pubs, listen, lab.prefix("relay"))
        done.append("kill relay")
    return relay
