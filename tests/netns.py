"""Hosts for tests: Linux network namespaces joined by veth pairs to one bridge.

Each "host" is a namespace with one interface on 10.77.<net>.0/24, plugged into a bridge that
lives in a namespace of its own (so nothing in the machine's own namespace changes). A host
can get a firewall that drops every inbound TCP connection (iptables in that namespace:
established traffic and loopback accepted, new inbound TCP dropped), which is what a
hospital's firewall does; its link can be cut and restored (the bridge port down, then up).

`Lab` removes everything it made when its `with` ends, also after a failure. `why_not()`
says why a lab cannot be made here (no `ip`, no privileges), for a clear skip.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import secrets
import shutil
import subprocess
import time
import tomllib
from dataclasses import dataclass, field
from typing import Any


def why_not() -> str | None:
    """None when namespaces can be made here, else why not (for pytest.skip)."""
    if shutil.which("ip") is None:
        return "no `ip` command (apt-get install iproute2)"
    if shutil.which("iptables") is None:
        return "no `iptables` (apt-get install iptables)"
    if os.geteuid() != 0:
        return "network namespaces need root (CAP_NET_ADMIN and CAP_SYS_ADMIN)"
    probe = f"mprobe{secrets.token_hex(3)}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"cannot create a network namespace: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def run(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True, timeout=30)


@dataclass
class Lab:
    """Namespaces named `<tag>-<host>`, addresses 10.77.<net>.<n>."""

    net: int = field(default_factory=lambda: 100 + secrets.randbelow(100))
    tag: str = field(default_factory=lambda: f"m{secrets.token_hex(2)}")
    hosts: dict[str, str] = field(default_factory=dict)  # host -> address
    _links: dict[str, str] = field(default_factory=dict)  # host -> bridge-side veth

    @property
    def switch(self) -> str:
        return f"{self.tag}-sw"

    def ns(self, host: str) -> str:
        return f"{self.tag}-{host}"

    def __enter__(self) -> Lab:
        run("ip", "netns", "add", self.switch)
        run("ip", "-n", self.switch, "link", "add", "br0", "type", "bridge")
        run("ip", "-n", self.switch, "link", "set", "br0", "up")
        return self

    def add_host(self, host: str) -> str:
        """A namespace for ``host`` on the bridge; returns its address."""
        index = len(self.hosts) + 1
        address = f"10.77.{self.net}.{index}"
        ns, inner, outer = self.ns(host), f"{self.tag}i{index}", f"{self.tag}o{index}"
        run("ip", "netns", "add", ns)
        run("ip", "link", "add", inner, "type", "veth", "peer", "name", outer)
        run("ip", "link", "set", inner, "netns", ns)
        run("ip", "link", "set", outer, "netns", self.switch)
        run("ip", "-n", self.switch, "link", "set", outer, "master", "br0", "up")
        run("ip", "-n", ns, "addr", "add", f"{address}/24", "dev", inner)
        run("ip", "-n", ns, "link", "set", inner, "up")
        run("ip", "-n", ns, "link", "set", "lo", "up")
        self.hosts[host] = address
        self._links[host] = outer
        return address

    def firewall_inbound(self, host: str) -> None:
        """Drop every new inbound TCP connection to ``host`` (it may still dial out)."""
        ns = self.ns(host)
        for rule in (
            ["-A", "INPUT", "-m", "conntrack", "--ctstate", "ESTABLISHED,RELATED", "-j", "ACCEPT"],
            ["-A", "INPUT", "-i", "lo", "-j", "ACCEPT"],
            ["-A", "INPUT", "-p", "tcp", "-j", "DROP"],
        ):
            run("ip", "netns", "exec", ns, "iptables", *rule)

    def cut(self, host: str) -> None:
        run("ip", "-n", self.switch, "link", "set", self._links[host], "down")

    def restore(self, host: str) -> None:
        run("ip", "-n", self.switch, "link", "set", self._links[host], "up")

    def prefix(self, host: str) -> list[str]:
        """The command prefix that runs a program on ``host``."""
        return ["ip", "netns", "exec", self.ns(host)]

    def __exit__(self, *exc: object) -> None:
        for host in list(self.hosts):
            subprocess.run(["ip", "netns", "del", self.ns(host)], capture_output=True)
        subprocess.run(["ip", "netns", "del", self.switch], capture_output=True)


# ------------------------------------------------ a run_cluster network placed on hosts


def status_of(net: Any, name: str) -> dict:
    try:
        return json.loads((net.node(name).state_dir / "status.json").read_text())
    except (OSError, ValueError):
        return {}


def wait_round(net: Any, name: str, round_: int, timeout_s: float = 120) -> None:
    end = time.monotonic() + timeout_s
    while status_of(net, name).get("round", 0) < round_:
        if time.monotonic() > end:
            raise TimeoutError(f"{name} not at round {round_}:\n{net.log(name)}")
        time.sleep(0.2)


def _murmur(argv: list[str]) -> int:
    from murmur.node.cli import main

    return main(argv)


def place_on_hosts(net: Any, lab: Lab) -> None:
    """Each node listens on its host's address over HTTPS; peers use those addresses."""
    addresses = {n.name: lab.add_host(n.name) for n in net.nodes}
    ports = {}
    for node in net.nodes:
        doc = tomllib.loads(node.config_path.read_text())
        ports[node.name] = doc["node"]["listen"].rpartition(":")[2]
    for node in net.nodes:
        key = net.run_dir / "keys" / f"{node.name}.key"
        tls_dir = net.run_dir / "tls"
        host = addresses[node.name]
        with contextlib.redirect_stdout(io.StringIO()):
            made = _murmur(
                ["tls-selfsigned", "--key", str(key), "--out", str(tls_dir), "--host", host]
            )
        assert made == 0
        doc = tomllib.loads(node.config_path.read_text())
        doc["node"]["listen"] = f"{host}:{ports[node.name]}"
        doc["tls"] = {
            "cert": str(tls_dir / f"{node.name}.crt"),
            "key": str(tls_dir / f"{node.name}.tls.key"),
        }
        for peer in doc["peers"]:
            peer["address"] = f"https://{addresses[peer['name']]}:{ports[peer['name']]}"
        node.config_path.write_text(_toml(doc))


def start_on_host(net: Any, lab: Lab, name: str) -> subprocess.Popen:
    """Start a node process inside its host's network namespace."""
    return net.start(name, prefix=lab.prefix(name))


def _toml(doc: dict[str, Any]) -> str:
    import run_cluster

    return run_cluster.to_toml(doc)
