"""Relays as a NATS cluster: three brokers joined by authenticated routes, each hospital's
stream replicated on all three, hospitals on different brokers, and one broker killed.

What this shows: no single relay host is needed. A hospital connected to one broker reaches a
hospital connected to another; what was stored for an offline hospital is delivered when it
comes back through a different broker; when the broker a hospital was using dies, it fails
over to another one listed in the same relay url and its envelopes still arrive. A broker
that is not given the route secret cannot join.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import time
from pathlib import Path

import pytest
from murmur.gossip.nats_link import NatsLink
from murmur.gossip.relay import RelayTransport
from murmur.gossip.relay_broker import (
    ROUTE_USER,
    BrokerPlan,
    ClusterPlan,
    broker_config,
    new_admin_seed,
    new_cluster_secret,
)
from murmur.node.relay_inbox import RelayInbox

from tests.relayutil import Broker, free_port, needs_nats
from tests.test_relay import A, B, FakeNode, peer

BODIES = [os.urandom(1_500_000), b"small", os.urandom(3_000)]  # the first one is chunked


def _cluster(tmp_path: Path, secret: str, size: int = 3) -> list[Broker]:
    hospitals = {p.name: p.public_key for p in (A, B)}
    route_ports = [free_port() for _ in range(size)]
    brokers = []
    for i in range(size):
        directory = tmp_path / f"broker{i}"
        directory.mkdir()
        cluster = ClusterPlan(
            server_name=f"relay-{i}",
            listen=f"127.0.0.1:{route_ports[i]}",
            routes=tuple(f"127.0.0.1:{p}" for j, p in enumerate(route_ports) if j != i),
            secret=secret,
        )
        brokers.append(Broker(directory, hospitals, cluster=cluster))
    return brokers


def test_the_cluster_block_authenticates_routes_and_replicates_streams() -> None:
    secret = new_cluster_secret()
    plan = BrokerPlan(
        {"hospital_a": A.public_key},
        cluster=ClusterPlan("relay-0", "127.0.0.1:6222", ("10.0.0.2:6222",), secret),
    )
    config = broker_config(plan, new_admin_seed())
    assert config["server_name"] == "relay-0"
    block = config["cluster"]
    assert block["authorization"] == {"user": ROUTE_USER, "password": secret, "timeout": 2}
    assert block["routes"] == [f"nats-route://{ROUTE_USER}:{secret}@10.0.0.2:6222"]
    assert plan.replicas == 2  # up to 3, at most the cluster's size
    with pytest.raises(ValueError, match="too short"):
        BrokerPlan({"a": A.public_key}, cluster=ClusterPlan("r", "h:1", ("h:2",), "x")).validate()
    with pytest.raises(ValueError, match="replicas 3"):
        ClusterPlan("r", "h:1", ("h:2",), secret, replicas=3).validate()
    json.dumps(config)  # nats-server reads it as JSON


def test_murmur_relay_config_makes_one_private_cluster_secret(tmp_path: Path, capsys) -> None:
    from murmur.crypto.identity import save_identity
    from murmur.node.cli import main

    pub = save_identity(A, tmp_path / "keys")[1]
    secret_file = tmp_path / "cluster.secret"
    common = ["relay", "config", "--pub", str(pub)]
    for i in range(2):  # two relay hosts given the same secret file
        out = tmp_path / f"broker{i}.conf"
        cluster = ["--cluster", f"127.0.0.1:{6222 + i}", "--route", f"127.0.0.1:{6223 - i}"]
        argv = [*common, *cluster, "--cluster-secret", str(secret_file), "--out", str(out)]
        assert main([*argv, "--listen", f"127.0.0.1:{4222 + i}"]) == 0
    assert secret_file.stat().st_mode & 0o777 == 0o600
    secret = secret_file.read_text().strip()
    configs = [json.loads((tmp_path / f"broker{i}.conf").read_text()) for i in range(2)]
    assert {c["cluster"]["authorization"]["password"] for c in configs} == {secret}
    assert [c["server_name"] for c in configs] == ["relay-4222", "relay-4223"]
    capsys.readouterr()
    assert main([*common, "--route", "127.0.0.1:6223"]) == 2
    assert "need --cluster" in capsys.readouterr().err


@needs_nats
def test_hospitals_on_different_brokers_of_a_cluster_reach_each_other_and_survive_one(
    tmp_path: Path,
) -> None:
    brokers = _cluster(tmp_path, new_cluster_secret())
    try:
        for broker in brokers:
            broker.start(provisioned=False)
        brokers[0].provision(timeout_s=40)  # once the cluster has a JetStream meta leader
        outcome = asyncio.run(_through_the_cluster(brokers))
    finally:
        for broker in brokers:
            broker.kill()
    stored_while_away, received_before, received_after, after_results = outcome
    # A's sends while B was away were stored by the cluster (A on broker 0, B later on 2).
    assert all("stored at relay" in r.reason for r in stored_while_away)
    assert sorted(received_before) == sorted(("hospital_a", b) for b in BODIES)
    # Broker 0 killed: A moved to another broker of the cluster, and B still got what A sent.
    assert received_after == [("hospital_a", b"after the failover")]
    assert all(r.ok or "stored at relay" in r.reason for r in after_results)


async def _through_the_cluster(brokers: list[Broker]):  # type: ignore[no-untyped-def]
    url_a = f"{brokers[0].url},{brokers[1].url}"
    url_b = brokers[2].url
    async with NatsLink("r", url_a, A) as link_a:
        ta = RelayTransport("r", A, link_a, 1.0)
        async with asyncio.TaskGroup() as group:
            group.create_task(link_a.serve(RelayInbox(FakeNode(A, [B])), ta))  # type: ignore[arg-type]
            await _until(lambda: link_a.connected)
            stored = [await ta.send(peer(B), body) for body in BODIES]
            node_b = FakeNode(B, [A], max_bytes=2_000_000)
            async with NatsLink("r", url_b, B) as link_b:
                tb = RelayTransport("r", B, link_b, 3)
                group.create_task(link_b.serve(RelayInbox(node_b), tb))
                await _until(lambda: len(node_b.received) >= len(BODIES), timeout_s=30)
                before = list(node_b.received)
                node_b.received.clear()
                brokers[0].kill()
                # nats-py moves to another broker of the cluster: the other one listed, or
                # one the cluster told it of (brokers gossip their client URLs).
                await _until(
                    lambda: link_a.connected and link_a.nc.connected_url.port != brokers[0].port,
                    timeout_s=60,
                )
                after: list = []
                deadline = time.monotonic() + 30
                while not node_b.received and time.monotonic() < deadline:
                    if not after:  # one send; retried only if the cluster refused it
                        result = await ta.send(peer(B), b"after the failover")
                        if result.ok or "stored at relay" in result.reason:
                            after.append(result)
                    await asyncio.sleep(0.2)
                link_b.stop()
            link_a.stop()
    return stored, before, list(node_b.received), after


@needs_nats
def test_a_broker_without_the_route_secret_does_not_join(tmp_path: Path) -> None:
    secret = new_cluster_secret()
    (tmp_path / "good").mkdir()
    (tmp_path / "bad").mkdir()
    for case, joins in (("good", True), ("bad", False)):
        brokers = _cluster(tmp_path / case, secret, size=2)
        other = brokers[1]
        assert other.cluster is not None
        if not joins:
            other.cluster = ClusterPlan(
                server_name="relay-1",
                listen=other.cluster.listen,
                routes=other.cluster.routes,
                secret=new_cluster_secret(),  # not the cluster's
            )
        try:
            for broker in brokers:
                broker.start(provisioned=False)
            seen = _peers_known_to(brokers[0], f"127.0.0.1:{other.port}", wait_s=5)
        finally:
            for broker in brokers:
                broker.kill()
        assert seen == joins, case
    log = (tmp_path / "bad" / "broker0" / "broker.log").read_text(errors="replace")
    assert "Authorization Violation" in log or "authentication error" in log


def _peers_known_to(broker: Broker, client_url: str, wait_s: float) -> bool:
    """Whether ``broker`` advertises ``client_url`` (a cluster member's client listener) in
    the INFO it greets clients with, within ``wait_s``: it does once their route is up."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            with socket.create_connection(("127.0.0.1", broker.port), timeout=2) as s:
                info = json.loads(s.recv(65536).decode().removeprefix("INFO ").strip())
            if client_url in info.get("connect_urls", []):
                return True
        except (OSError, ValueError):
            pass
        if time.monotonic() > deadline:
            return False
        time.sleep(0.25)


async def _until(condition, timeout_s: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    end = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > end:
            raise TimeoutError("condition not met in time")
        await asyncio.sleep(0.05)
