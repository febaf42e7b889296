"""Nodes train only when they can share: waiting for neighbours, peers marked down and back
up, and catch-up that no single or distrusted peer can steer (docs/protocol.md, "Rounds").

Every node here is a real HospitalNode with its real HTTP API on a free loopback port and a
real PeerTransport, all in this process; a dead neighbour is one whose port nobody serves.
"""

from __future__ import annotations

import asyncio
import logging
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest
from murmur.crypto.allowlist import Peer
from murmur.crypto.identity import Identity, generate_identity, load_identity, save_identity
from murmur.gossip.memory_transport import MemoryTransport
from murmur.gossip.probe import Contact, build_probe, check_probe
from murmur.gossip.transport import PeerTransport
from murmur.gossip.wire import ModelUpdate, RejectReason, WireError, build_envelope
from murmur.models.params import get_state
from murmur.node.api import NodeApi, start_api
from murmur.node.audit import records_of_kind
from murmur.node.config import load_config
from murmur.node.node import HospitalNode

import run_cluster
from tests.netutil import Network, make_network

PAIR = ("--aggregator", "clipping:0")  # two hospitals: one neighbour each


class CountingTransport(PeerTransport):
    """The real transport, counting the probes it sends (to show the wait is not a busy loop)."""

    def __init__(self, *, identity: Identity, send_timeout_s: float) -> None:
        super().__init__(identity=identity, send_timeout_s=send_timeout_s)
        self.probes = 0

    async def probe(self, peer: Peer, probe: bytes, timeout_s: float) -> Contact:
        self.probes += 1
        return await super().probe(peer, probe, timeout_s)


@dataclass
class Running:
    """One node: its API serving, and (once `run` is called) its round loop."""

    node: HospitalNode
    api: NodeApi
    transport: CountingTransport | None = None
    task: asyncio.Task[None] | None = field(default=None, repr=False)

    @property
    def name(self) -> str:
        return self.node.config.node.name

    def run(self, group: asyncio.TaskGroup) -> None:
        self.task = group.create_task(self._rounds())

    async def _rounds(self) -> None:
        node = self.node
        timeout = node.config.gossip.send_timeout_s
        async with CountingTransport(identity=node.identity, send_timeout_s=timeout) as transport:
            self.transport = transport
            await self.node.run_rounds(transport)

    async def close(self) -> None:
        self.node.stop.set()
        if self.task is not None:
            await self.task
        await self.api.close()
        self.node.audit.close()


async def serve(net: Network, name: str) -> Running:
    node = HospitalNode(load_config(net.node(name).config_path))
    return Running(node, await start_api(node, None))


async def until(predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
    end = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > end:
            raise TimeoutError(what)
        await asyncio.sleep(0.05)


def network(tmp_path: Path, *args: str, **gossip: float) -> Network:
    net = make_network(tmp_path, *args)
    for node in net.nodes:
        net.edit_config(node.name, "gossip", startup_timeout_s=0.2, **gossip)
    return net


def messages(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if text in r.getMessage()]


async def test_a_lone_node_spends_no_budget_says_whom_it_waits_for_and_starts_with_its_peer(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="murmur.node")
    net = network(tmp_path, "--nodes", "2", "--rounds", "3", "--dp-epsilon", "1", *PAIR)
    a_name, b_name = (n.name for n in net.nodes)
    a = await serve(net, a_name)
    b: Running | None = None
    try:
        async with asyncio.TaskGroup() as group:
            a.run(group)
            await until(lambda: a.node.state.phase == "waiting_for_neighbours", 10, "no wait")
            await asyncio.sleep(2.5)
            assert a.node.ledger is not None and a.node.ledger.steps_taken == 0
            assert a.node.state.history == [] and a.node.state.privacy["epsilon_spent"] == 0
            async with (
                aiohttp.ClientSession() as session,
                session.get(f"{net.node(a_name).operator_address}/status") as response,
            ):
                status = await response.json()
            assert status["phase"] == "waiting_for_neighbours"
            assert status["peers"][b_name]["contact"] == "unreachable"
            assert "unreachable" in status["neighbours"]["waiting_for"][b_name]
            said = messages(caplog, "waits for neighbours")
            assert said and b_name in said[0] and "unreachable" in said[0]
            assert len(said) == 1  # said once while the reason stays the same, not per probe
            assert a.transport is not None and 2 <= a.transport.probes <= 6  # backoff
            assert "murmur_waiting_for_neighbours 1.0" in a.node.metrics.render().decode()
            b = await serve(net, b_name)
            b.run(group)
            await until(lambda: a.node.state.phase == "done", 60, "A never finished")
            await until(lambda: b.node.state.phase == "done", 60, "B never finished")
    finally:
        for running in (a, b):
            if running is not None:
                await running.close()
    assert [h["round"] for h in a.node.state.history] == [1, 2, 3]
    assert all(h["received"] == [b_name] for h in a.node.state.history)
    assert a.node.ledger.steps_taken > 0
    assert messages(caplog, "goes ahead after waiting")
    state = net.node(a_name).state_dir
    assert len(records_of_kind(state, "waiting_for_neighbours")) == 1
    assert len(records_of_kind(state, "neighbours_ready")) == 1


async def test_a_node_nobody_admits_logs_the_peers_refusal_and_spends_nothing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="murmur.node")
    net = network(tmp_path, "--nodes", "2", "--rounds", "3", "--dp-epsilon", "1", *PAIR)
    a_name, b_name = (n.name for n in net.nodes)
    # B lists a different key under A's name: it does not admit the real A.
    _, impostor = save_identity(generate_identity(a_name), tmp_path / "impostor")
    b_config = net.node(b_name).config_path
    doc = tomllib.loads(b_config.read_text())
    doc["peers"][0]["public_key_file"] = str(impostor)
    b_config.write_text(run_cluster.to_toml(doc))
    b = await serve(net, b_name)  # B's API only: it answers probes
    a = await serve(net, a_name)
    try:
        async with asyncio.TaskGroup() as group:
            a.run(group)
            await until(
                lambda: a.node.state.peers[b_name].get("contact") == "refused", 10, "no refusal"
            )
            await until(lambda: a.transport is not None and a.transport.probes >= 3, 10, "probes")
            a.node.stop.set()
    finally:
        await a.close()
        await b.close()
    assert a.node.ledger is not None and a.node.ledger.steps_taken == 0
    assert a.node.state.history == []
    # B refuses the probes' requests before reading them, with the one code a stranger gets
    # (docs/protocol.md, "Request authentication"), and counts the precise reason.
    assert a.node.state.peers[b_name]["contact_detail"] == "HTTP 401 unauthenticated"
    said = messages(caplog, "waits for neighbours")
    assert said and "not admitting us (HTTP 401 unauthenticated)" in said[0]
    assert b.node.state.unauthenticated["unknown_sender"] >= 3
    # The refusing side says who knocked, once, however many times it was asked.
    knocked = messages(caplog, "rejected message (unauthenticated)")
    assert len(knocked) == 1 and "unknown_sender" in knocked[0]


async def test_a_dead_neighbour_stops_delaying_rounds_and_is_readmitted_when_it_returns(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="murmur.node")
    timeout = 1.0
    net = network(
        tmp_path,
        "--nodes", "3", "--rounds", "400", "--no-dp", "--aggregator", "mean",
        round_timeout_s=timeout,
    )  # fmt: skip
    a_name, b_name, c_name = (n.name for n in net.nodes)
    a, b = await serve(net, a_name), await serve(net, b_name)
    c: Running | None = None
    try:
        async with asyncio.TaskGroup() as group:
            a.run(group)
            b.run(group)
            await until(lambda: len(a.node.state.history) >= 8, 60, "A made no progress")
            early = [h["seconds"] for h in a.node.state.history[:8]]
            down = a.node.status()["peers"][c_name]
            assert (down["state"], down["since_round"]) == ("down", 3), down
            assert "silent for 3 rounds" in down["why"]
            assert f'murmur_peer_up{{peer="{c_name}"}} 0.0' in a.node.metrics.render().decode()
            c = await serve(net, c_name)
            c.run(group)
            await until(
                lambda: (
                    a.node.state.peers[c_name]["state"] == "up"
                    and c_name in a.node.state.history[-1]["received"]
                ),
                60,
                "C was never re-admitted",
            )
            back = a.node.status()["peers"][c_name]
            assert "spoke again" in back["why"] and back["since_round"] > 8
            for running in (a, b, c):
                running.node.stop.set()
    finally:
        for running in (a, b, c):
            if running is not None:
                await running.close()
    # Rounds 1-3 wait the full deadline for C; from round 4 on only for the live B.
    assert all(s >= 0.9 * timeout for s in early[:3]), early
    assert all(s < 0.3 * timeout for s in early[4:]), early
    print(f"round seconds with C dead: {[round(s, 3) for s in early]}")
    # One log line per state change, not one per round.
    changes = records_of_kind(net.node(a_name).state_dir, "peer_down", "peer_up")
    assert [(r.kind, r.fields["peer"]) for r in changes][:2] == [
        ("peer_down", c_name),
        ("peer_up", c_name),
    ]
    assert len(messages(caplog, f"neighbour {c_name} is DOWN")) == 2  # once by A, once by B


def forge(net: Network, sender: str, to: HospitalNode, round_: int, seed: int = 0) -> bytes:
    """An authentic envelope from `sender` (its real key) to node `to` for `round_`."""
    identity = load_identity(net.run_dir / "keys" / f"{sender}.key")
    state = {k: v + seed for k, v in get_state(to.model).items()}
    update = ModelUpdate(state)
    return build_envelope(update, identity, [to.identity.public_key], round_)


async def test_one_far_ahead_or_distrusted_peer_cannot_make_a_node_jump(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="murmur.node")
    net = network(
        tmp_path, "--nodes", "4", "--rounds", "16", "--no-dp", round_timeout_s=0.3
    )  # default rule, f = 0: the old quorum was one peer
    a_name, b_name, c_name, d_name = (n.name for n in net.nodes)
    nodes = {n.name: HospitalNode(load_config(n.config_path)) for n in net.nodes}
    a = nodes[a_name]
    try:
        assert a.rounds.catch_up_quorum == 2
        code, reason, _ = await a.receive(forge(net, b_name, a, 15))
        assert (code, reason) == (409, "too_far_ahead")
        assert a.catch_up_target() is None  # one peer alone
        # C equivocates (two different round-2 envelopes): proven, so its claims never count.
        assert (await a.receive(forge(net, c_name, a, 2, seed=1)))[1] == "accepted"
        assert (await a.receive(forge(net, c_name, a, 2, seed=2)))[1] == "duplicate"
        assert c_name in a.trust.proven()
        await a.receive(forge(net, c_name, a, 15, seed=3))
        assert a.catch_up_target() is None  # B and a proven liar are not two peers
        await a.receive(forge(net, d_name, a, 15))
        transport = MemoryTransport({n.address: nodes[n.name] for n in net.nodes}, a.identity)
        await a.run_rounds(transport)  # only A runs: it jumps, then trains rounds 15 and 16
    finally:
        for node in nodes.values():
            node.audit.close()
    assert [h["round"] for h in a.state.history] == [15, 16]
    jumps = records_of_kind(net.node(a_name).state_dir, "catch_up")
    assert len(jumps) == 1 and jumps[0].round == 1
    assert jumps[0].fields["vouched_by"] == [b_name, d_name] and jumps[0].fields["skipped"] == 14
    loud = messages(caplog, "CATCH-UP")
    assert loud and f"{b_name}, {d_name}" in loud[0] and "skipping 14 rounds" in loud[0]


def test_a_probe_is_answered_with_the_verdict_an_envelope_would_get(tmp_path: Path) -> None:
    me, peer, stranger = (generate_identity(n) for n in ("me", "peer", "stranger"))
    from murmur.crypto.allowlist import Allowlist

    allowlist = Allowlist([Peer("peer", "http://127.0.0.1:1", peer.public_key)])
    now = time.time()
    probe = build_probe(peer, me.public_key, now=now)
    assert check_probe(probe, me.public_key, allowlist, timestamp_window_s=60).name == "peer"
    cases = [
        (build_probe(stranger, me.public_key), me.public_key, RejectReason.UNKNOWN_SENDER),
        (probe, stranger.public_key, RejectReason.WRONG_RECIPIENT),
        (build_probe(peer, me.public_key, now=now - 600), me.public_key, RejectReason.STALE),
        (probe[:-1] + bytes([probe[-1] ^ 1]), me.public_key, RejectReason.BAD_SIGNATURE),
        (probe[:-1], me.public_key, RejectReason.MALFORMED),
        (b"MRMPROBX" + probe[8:], me.public_key, RejectReason.MALFORMED),
    ]
    for data, recipient, reason in cases:
        with pytest.raises(WireError) as err:
            check_probe(data, recipient, allowlist, timestamp_window_s=60)
        assert err.value.reason is reason
