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

import os
import secrets
import shutil
import subprocess
from dataclasses import dataclass, field


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
