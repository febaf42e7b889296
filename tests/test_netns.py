"""Three hospitals on three "hosts" (network namespaces) and a relay on a fourth, with faults.

hospital_2 sits behind a firewall that drops every inbound connection and opens no peer port
(`inbound = false`); it reaches the others only through the relay. hospital_0 and hospital_1
talk HTTPS directly (their certificates are for their own keys, tests/test_tls.py), and
reach hospital_2 through the relay; hospital_0 reaches the relay through a proxy that adds
latency and cuts connections at random (tests/faultproxy.py). During the run: the relay is
killed and restarted, hospital_1 is SIGKILLed and restarted, and hospital_0's link is cut
for several seconds and restored. No process may abort or hang, and every node finishes
every planned round. docs/deployment.md shows the same steps for real hosts.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest

import run_cluster
from tests import netns
from tests.netns import place_on_hosts, start_on_host, status_of, wait_round
from tests.netutil import REPO, make_network
from tests.relayutil import kill_group, needs_nats, start_relay_cli, use_relay

pytestmark = [pytest.mark.slow, needs_nats]

ROUNDS = 8
RELAY_PORT = 4222
PROXY_PORT = 4223


def _connect_times_out(lab: netns.Lab, source: str, address: str, port: int) -> bool:
    """From ``source``, whether a TCP connection to address:port is silently dropped."""
    probe = (
        "import socket,sys\n"
        "s=socket.socket(); s.settimeout(1.5)\n"
        f"try: s.connect(({address!r},{port})); print('open')\n"
        "except socket.timeout: print('dropped')\n"
        "except OSError: print('refused')\n"
    )
    out = subprocess.run(
        [*lab.prefix(source), sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        timeout=20,
    )
    return out.stdout.strip() == "dropped"


def test_hospitals_on_separate_hosts_survive_relay_node_and_link_faults(tmp_path: Path) -> None:
    why = netns.why_not()
    if why:
        pytest.skip(f"multi-host test needs network namespaces: {why}")
    net = make_network(
        tmp_path,
        "--nodes",
        "3",
        "--rounds",
        str(ROUNDS),
        "--no-dp",
        "--aggregator",
        "mean",
        "--round-timeout",
        "6",
        "--local-epochs",
        "20",
    )
    hidden = net.nodes[2].name
    proxy = relay = None
    with netns.Lab() as lab:
        try:
            place_on_hosts(net, lab)
            relay_host = lab.add_host("relay")
            lab.firewall_inbound(hidden)
            pubs = sorted((tmp_path / "keys").glob("*.pub"))
            relay_listen = f"{relay_host}:{RELAY_PORT}"
            relay = start_relay_cli(tmp_path / "relay", pubs, relay_listen, lab.prefix("relay"))
            proxy = subprocess.Popen(
                [
                    *lab.prefix("relay"),
                    sys.executable,
                    "-m",
                    "tests.faultproxy",
                    "--listen",
                    f"{relay_host}:{PROXY_PORT}",
                    "--target",
                    relay_listen,
                    "--delay-ms",
                    "20",
                    "--cut",
                    "0.002",
                    "--seed",
                    "7",
                ],
                cwd=REPO,
            )
            use_relay(net, f"nats://{relay_listen}", {hidden})
            # hospital_0 reaches the relay through the lossy, slow proxy.
            doc = tomllib.loads(net.nodes[0].config_path.read_text())
            doc["relays"][0]["url"] = f"nats://{relay_host}:{PROXY_PORT}"
            net.nodes[0].config_path.write_text(run_cluster.to_toml(doc))
            for node in net.nodes:
                node.log_path.parent.mkdir(parents=True, exist_ok=True)
                start_on_host(net, lab, node.name)
            # The firewall drops inbound connections to the hidden hospital's host.
            assert _connect_times_out(lab, net.nodes[0].name, lab.hosts[hidden], 8700)

            first, second = net.nodes[0].name, net.nodes[1].name
            wait_round(net, first, 2)
            kill_group(relay)  # the relay dies ...
            time.sleep(4)
            relay = start_relay_cli(tmp_path / "relay", pubs, relay_listen, lab.prefix("relay"))
            wait_round(net, first, 4)
            net.procs[second].send_signal(signal.SIGKILL)  # a node dies ...
            net.procs[second].wait(timeout=10)
            time.sleep(2)
            start_on_host(net, lab, second)  # ... and comes back from its checkpoint
            wait_round(net, first, 5)
            lab.cut(first)  # a link goes down for several rounds' worth of time
            time.sleep(8)
            lab.restore(first)

            codes = net.wait_all(timeout_s=240)
            logs = {n.name: net.log(n.name) for n in net.nodes}
            assert codes == {n.name: 0 for n in net.nodes}, logs
            for node in net.nodes:
                status = status_of(net, node.name)
                assert status["round"] == ROUNDS, (node.name, status.get("phase"), logs)
                assert status["phase"] == "done"
            assert "peer listener on none (inbound = false" in logs[hidden]
            assert "relay r: reconnected" in logs[hidden]
        finally:
            net.kill_all()
            if relay is not None:
                kill_group(relay)
            if proxy is not None:
                proxy.kill()
                proxy.wait(timeout=10)
