"""Relays: NATS nkeys from the murmur key, the receiver's checks on whatever a broker hands
over, a broker that misbehaves, and a real nats-server's permissions and store-and-forward."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import time
from pathlib import Path
from types import SimpleNamespace

import nkeys
import pytest
from murmur.crypto.allowlist import Allowlist, Peer
from murmur.crypto.identity import Identity, generate_identity, verify_signature
from murmur.gossip.nats_link import NatsLink
from murmur.gossip.relay import (
    RelayTransport,
    frames,
    nkey_of,
    nkey_seed,
    relay_permissions,
    stored_subject,
)
from murmur.gossip.relay_broker import BrokerPlan, broker_config, new_admin_seed
from murmur.node import relay_inbox
from murmur.node.relay_inbox import RelayInbox

from tests.relayutil import Broker, FaultyBroker, needs_nats


class FakeNode:
    """What RelayInbox needs of a HospitalNode, recording what it is handed."""

    def __init__(self, identity: Identity, peers: list[Identity], max_bytes: int = 1_000_000):
        self.identity = identity
        self.allowlist = Allowlist(Peer(p.name, "", p.public_key, ("r",)) for p in peers)
        self.limits = SimpleNamespace(max_message_bytes=max_bytes, timestamp_window_s=300.0)
        self.received: list[tuple[str, bytes]] = []
        self.rejections: list[tuple[str, str | None]] = []

    async def receive(self, body: bytes, source: str | None = None, sender: Peer | None = None):
        assert sender is not None
        self.received.append((sender.name, body))
        return 202, "accepted", ""

    def answer_probe(self, body: bytes, sender: bytes | None = None) -> tuple[int, str]:
        return 200, "admitted"

    def answer_receipts_request(self, body: bytes, sender: bytes | None = None):
        return 200, "application/octet-stream", b""

    def record_rejection(self, reason, detail, *, sender, round_, source=None, why=None, **_):
        self.rejections.append((str(reason), why))


A, B, C = (generate_identity(n) for n in ("hospital_a", "hospital_b", "hospital_c"))


def peer(identity: Identity) -> Peer:
    return Peer(identity.name, "", identity.public_key, ("r",))


def test_the_nats_nkey_is_the_murmur_key() -> None:
    pair = nkeys.from_seed(bytearray(nkey_seed(A)))
    assert pair.public_key.decode() == nkey_of(A.public_key)
    # What the broker verifies (the nonce signed with the nkey) verifies under the murmur key.
    signature = pair.sign(b"server nonce")
    assert verify_signature(A.public_key, b"server nonce", signature)
    assert nkey_of(A.public_key) != nkey_of(B.public_key)


def test_broker_config_admits_each_hospital_by_its_key_with_its_own_permissions() -> None:
    plan = BrokerPlan({"hospital_a": A.public_key, "hospital_b": B.public_key})
    config = broker_config(plan, new_admin_seed())
    users = config["accounts"]["MURMUR"]["users"]
    by_key = {u["nkey"]: u["permissions"] for u in users}
    own = nkey_of(A.public_key)
    assert by_key[own] == relay_permissions(own)
    # A publishes only with itself as sender, and subscribes only under its own name.
    assert all(own in subject for subject in by_key[own]["publish"]["allow"])
    assert all(own in subject for subject in by_key[own]["subscribe"]["allow"])
    assert config["accounts"]["MURMUR"]["jetstream"]["max_file"] == 2 * plan.per_hospital_bytes
    assert "password" not in str(config)  # nkeys only


def _run(broker: FaultyBroker, sends) -> list:  # type: ignore[no-untyped-def]
    async def go() -> list:
        async with broker.running():
            return list(await asyncio.gather(*sends()))

    return asyncio.run(go())


def test_duplicated_messages_are_handed_over_once_and_the_copies_refused_as_replays() -> None:
    node = FakeNode(B, [A])
    broker = FaultyBroker(duplicate=1.0)
    sender = broker.attach(SimpleNamespace(identity=A, **_no_inbox()))
    broker._inboxes[nkey_of(B.public_key)] = RelayInbox(node)
    body = os.urandom(30_000)  # several chunks
    results = _run(broker, lambda: [sender.send(peer(B), body)])
    assert results[0].ok and results[0].reason == "accepted"
    assert node.received == [("hospital_a", body)]
    assert ("unauthenticated", "replay") in node.rejections
    assert broker.counts["duplicated"] > 0


def _no_inbox() -> dict:
    """A sender-only node for FaultyBroker.attach (its own inbox is never used)."""
    return {
        "allowlist": Allowlist([]),
        "limits": SimpleNamespace(max_message_bytes=1, timestamp_window_s=300.0),
    }


def _pair(broker: FaultyBroker, node: FakeNode) -> RelayTransport:
    sender = broker.attach(SimpleNamespace(identity=A, **_no_inbox()))
    broker._inboxes[nkey_of(B.public_key)] = RelayInbox(node)
    return sender


def test_study_approvals_and_membership_exchanges_travel_through_a_relay() -> None:
    """A relay-only member takes part in governance: /approvals and /governance requests go
    through the relay with the same checks and reach the node's handlers; their answers come
    back to the asker."""
    from murmur.node.governance import decode_exchange, encode_exchange

    node = FakeNode(B, [A])
    seen: list[tuple[str, bytes]] = []

    def answer_approvals(body: bytes, sender: Peer) -> tuple[int, str]:
        seen.append(("approvals", body))
        return 202, "accepted"

    node.answer_approvals = answer_approvals  # type: ignore[attr-defined]
    node.governance = None  # type: ignore[attr-defined]  # not in a consortium: 404
    broker = FaultyBroker(seed=1, delay_s=0.05)
    sender = _pair(broker, node)
    exchange = encode_exchange(0, [], [])
    results = _run(
        broker,
        lambda: [
            sender.post_records(peer(B), b'{"approvals": []}', "/approvals"),
            sender.post_governance(peer(B), exchange, 1 << 20),
        ],
    )
    assert results[0] == (202, "accepted")
    assert seen == [("approvals", b'{"approvals": []}')]
    status, reply = results[1]
    assert status == 404 and decode_exchange(reply) == (0, [], [])
    assert node.rejections == []


def test_reordered_and_delayed_chunks_are_reassembled_and_checked() -> None:
    node = FakeNode(B, [A])
    broker = FaultyBroker(seed=3, delay_s=0.3)
    sender = _pair(broker, node)
    bodies = [os.urandom(25_000 + i) for i in range(4)]
    results = _run(broker, lambda: [sender.send(peer(B), b) for b in bodies])
    assert all(r.ok for r in results), results
    assert sorted(node.received) == sorted(("hospital_a", b) for b in bodies)
    assert node.rejections == []


def test_dropped_chunks_cost_the_message_never_the_receiver(monkeypatch) -> None:
    monkeypatch.setattr(relay_inbox, "ASSEMBLY_TIMEOUT_S", 0.0)
    node = FakeNode(B, [A])
    broker = FaultyBroker(seed=5, drop=0.3)
    sender = _pair(broker, node)
    sender.send_timeout_s = 0.5
    bodies = [os.urandom(20_000) for _ in range(6)]
    results = _run(broker, lambda: [sender.send(peer(B), b) for b in bodies])
    received = [b for _, b in node.received]
    assert all(b in bodies for b in received)  # whatever arrived is exactly what was sent
    assert len(received) < len(bodies) and broker.counts["dropped"] > 0
    assert {r.ok for r in results if r.status is None} <= {False}
    assert sum(r.ok for r in results) == len(received)
    node_inbox = broker._inboxes[nkey_of(B.public_key)]
    node_inbox._expire("faulty")
    assert ("incomplete", None) in node.rejections
    assert node_inbox._assemblies == {}


def test_a_broker_that_holds_messages_too_long_gets_them_refused_as_stale() -> None:
    node = FakeNode(B, [A])
    broker = FaultyBroker()
    sender = _pair(broker, node)
    sender.clock = lambda: time.time() - 400  # as if held 400 s, beyond the 300 s window
    sender.send_timeout_s = 0.5
    results = _run(broker, lambda: [sender.send(peer(B), b"x" * 100)])
    assert not results[0].ok
    assert node.received == []
    # The live copy is refused unanswered, so the same frames are stored and refused again.
    assert node.rejections == [("unauthenticated", "stale")] * 2


def test_a_request_signed_by_one_peer_but_published_by_another_is_refused() -> None:
    node = FakeNode(B, [A, C])
    inbox = RelayInbox(node)
    from murmur.gossip.auth import request_headers

    body = b"envelope"
    auth = request_headers(C, B.public_key, "/gossip", body, "x", time.time())["Murmur-Auth"]
    (frame,) = frames("/gossip", auth, "x", body, 1_000_000)
    # The broker's permissions say A published it; the signature says C.
    result = asyncio.run(inbox.handle("r", nkey_of(A.public_key), frame.headers(), body))
    assert result is None and node.received == []
    assert node.rejections == [("unauthenticated", "sender_mismatch")]


def test_oversize_and_malformed_frames_are_refused_before_anything_is_kept() -> None:
    node = FakeNode(B, [A], max_bytes=10_000)
    inbox = RelayInbox(node)
    from murmur.gossip.auth import request_headers

    body = os.urandom(50_000)
    auth = request_headers(A, B.public_key, "/gossip", body, "x", time.time())["Murmur-Auth"]
    first = frames("/gossip", auth, "x", body, 8_000)[0]
    sender = nkey_of(A.public_key)
    assert asyncio.run(inbox.handle("r", sender, first.headers(), first.payload)) is None
    assert asyncio.run(inbox.handle("r", sender, {"Murmur-Path": "/status"}, b"")) is None
    assert node.rejections == [("too_large", None), ("bad_frame", None)]
    assert inbox._assemblies == {}


# ------------------------------------------------------------------ a real nats-server


@needs_nats
def test_a_hospital_cannot_publish_as_another_nor_read_anothers_messages(tmp_path: Path) -> None:
    broker = Broker(tmp_path, {p.name: p.public_key for p in (A, B, C)})
    broker.start()
    try:
        asyncio.run(_forgery(broker))
    finally:
        broker.kill()


async def _forgery(broker: Broker) -> None:
    node_b = FakeNode(B, [A, C])
    async with NatsLink("r", broker.url, A) as link_a, NatsLink("r", broker.url, B) as link_b:
        ta = RelayTransport("r", A, link_a, 3)
        tb = RelayTransport("r", B, link_b, 3)
        async with asyncio.TaskGroup() as group:
            group.create_task(link_a.serve(RelayInbox(FakeNode(A, [B])), ta))  # type: ignore[arg-type]
            group.create_task(link_b.serve(RelayInbox(node_b), tb))
            await _until(lambda: link_a.connected and link_b.connected)
            # A publishes into B's stream claiming to be C: the broker refuses it.
            forged = stored_subject(nkey_of(B.public_key), nkey_of(C.public_key))
            await link_a.nc.publish(forged, b"forged", headers={"Murmur-Path": "/gossip"})
            # A tries to read what is sent to B.
            await link_a.nc.subscribe(f"murmur.live.{nkey_of(B.public_key)}.>")
            await _until(lambda: len(link_a.errors) >= 2)
            # A's own, honest request still goes through.
            result = await ta.send(peer(B), b"hello")
            link_a.stop()
            link_b.stop()
    assert any("permissions violation for publish" in e.lower() for e in link_a.errors)
    assert any("permissions violation for subscription" in e.lower() for e in link_a.errors)
    assert result.ok, result
    assert node_b.received == [("hospital_a", b"hello")]


@needs_nats
def test_an_offline_hospital_gets_what_was_sent_while_it_was_away(tmp_path: Path) -> None:
    broker = Broker(tmp_path, {p.name: p.public_key for p in (A, B)})
    broker.start()
    try:
        results, received = asyncio.run(_offline_then_back(broker))
    finally:
        broker.kill()
    # While B was away, A's sends were stored but unanswered.
    assert [r.ok for r in results] == [False, False, False]
    assert all("stored at relay" in r.reason for r in results)
    assert sorted(received) == sorted(("hospital_a", b) for b in BODIES)


BODIES = [os.urandom(1_500_000), b"small", os.urandom(3_000)]  # the first one is chunked


async def _offline_then_back(broker: Broker):  # type: ignore[no-untyped-def]
    async with NatsLink("r", broker.url, A) as link_a:
        ta = RelayTransport("r", A, link_a, 1.0)
        async with asyncio.TaskGroup() as group:
            group.create_task(link_a.serve(RelayInbox(FakeNode(A, [B])), ta))  # type: ignore[arg-type]
            await _until(lambda: link_a.connected)
            results = [await ta.send(peer(B), body) for body in BODIES]
            node_b = FakeNode(B, [A], max_bytes=2_000_000)
            async with NatsLink("r", broker.url, B) as link_b:
                tb = RelayTransport("r", B, link_b, 3)
                group.create_task(link_b.serve(RelayInbox(node_b), tb))
                await _until(lambda: len(node_b.received) >= len(BODIES), timeout_s=20)
                link_b.stop()
            link_a.stop()
    return results, node_b.received


async def _until(condition, timeout_s: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    end = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > end:
            raise TimeoutError("condition not met in time")
        await asyncio.sleep(0.05)


# ----------------------------------------------- live first, stored when nobody took it


async def _stored(broker: Broker, identity: Identity) -> tuple[int, str]:
    """(messages, storage) of ``identity``'s stream, asked as the broker's admin."""
    import nats
    from murmur.gossip.relay import stream_name

    seed = (broker.tmp / "broker.conf.admin.nk").read_bytes().strip()
    nc = await nats.connect(broker.url, nkeys_seed_str=seed.decode(), allow_reconnect=False)
    try:
        info = await nc.jetstream(timeout=5).stream_info(stream_name(nkey_of(identity.public_key)))
        return info.state.messages, str(getattr(info.config.storage, "value", info.config.storage))
    finally:
        await nc.close()


@needs_nats
def test_an_envelope_for_a_hospital_that_is_up_goes_live_and_is_not_stored(
    tmp_path: Path,
) -> None:
    broker = Broker(tmp_path, {p.name: p.public_key for p in (A, B)})
    broker.start()
    try:
        result, received, stored = asyncio.run(_live(broker))
    finally:
        broker.kill()
    assert result.ok, result
    assert received == [("hospital_a", BODIES[0])]  # chunked, reassembled
    assert stored == 0  # no JetStream write on the way


async def _live(broker: Broker):  # type: ignore[no-untyped-def]
    node_b = FakeNode(B, [A], max_bytes=2_000_000)
    async with NatsLink("r", broker.url, A) as link_a, NatsLink("r", broker.url, B) as link_b:
        ta, tb = RelayTransport("r", A, link_a, 10), RelayTransport("r", B, link_b, 10)
        async with asyncio.TaskGroup() as group:
            group.create_task(link_a.serve(RelayInbox(FakeNode(A, [B])), ta))  # type: ignore[arg-type]
            group.create_task(link_b.serve(RelayInbox(node_b), tb))
            await _until(lambda: link_a.connected and link_b.connected)
            await asyncio.sleep(0.3)  # B's subscriptions are in place
            result = await ta.send(peer(B), BODIES[0])
            stored, _ = await _stored(broker, B)
            link_a.stop()
            link_b.stop()
    return result, node_b.received, stored


@needs_nats
def test_an_envelope_for_an_offline_hospital_is_stored_at_once_and_answered_on_return(
    tmp_path: Path,
) -> None:
    """Nobody subscribed: the broker says so ("no responders") and the envelope goes into
    JetStream right away, not after the live wait; B, back within the send timeout, fetches
    it and its answer reaches A."""
    broker = Broker(tmp_path, {p.name: p.public_key for p in (A, B)})
    broker.start()
    try:
        result, stored_after, received = asyncio.run(_offline_then_answer(broker))
    finally:
        broker.kill()
    assert stored_after < 2.0  # the live wait alone would be 6 s
    assert result.ok, result
    assert received == [("hospital_a", b"envelope")]


async def _offline_then_answer(broker: Broker):  # type: ignore[no-untyped-def]
    node_b = FakeNode(B, [A])
    async with NatsLink("r", broker.url, A) as link_a:
        ta = RelayTransport("r", A, link_a, 12)
        async with asyncio.TaskGroup() as group:
            group.create_task(link_a.serve(RelayInbox(FakeNode(A, [B])), ta))  # type: ignore[arg-type]
            await _until(lambda: link_a.connected)
            start = time.monotonic()
            send = group.create_task(ta.send(peer(B), b"envelope"))
            while (await _stored(broker, B))[0] == 0:
                assert time.monotonic() - start < 5, "not stored"
                await asyncio.sleep(0.05)
            stored_after = time.monotonic() - start
            async with NatsLink("r", broker.url, B) as link_b:
                tb = RelayTransport("r", B, link_b, 3)
                group.create_task(link_b.serve(RelayInbox(node_b), tb))
                result = await send
                link_b.stop()
            link_a.stop()
    return result, stored_after, node_b.received


@needs_nats
def test_an_envelope_taken_live_but_never_answered_is_stored_too(tmp_path: Path) -> None:
    """B is subscribed but drops what it gets (killed while handling, say): after half the
    send timeout A stores the same frames, and B, serving again, receives them once."""
    broker = Broker(tmp_path, {p.name: p.public_key for p in (A, B)})
    broker.start()
    try:
        result, stored, received = asyncio.run(_silent_then_back(broker))
    finally:
        broker.kill()
    assert not result.ok and "stored at relay" in result.reason, result
    assert stored == 1
    assert received == [("hospital_a", b"envelope")]


async def _silent_then_back(broker: Broker):  # type: ignore[no-untyped-def]
    from murmur.gossip.relay import live_subject

    node_b = FakeNode(B, [A])
    async with NatsLink("r", broker.url, A) as link_a:
        ta = RelayTransport("r", A, link_a, 2)
        async with asyncio.TaskGroup() as group:
            group.create_task(link_a.serve(RelayInbox(FakeNode(A, [B])), ta))  # type: ignore[arg-type]
            async with NatsLink("r", broker.url, B) as silent:
                await silent.connect()
                await silent.nc.subscribe(live_subject(nkey_of(B.public_key), "*"))
                await silent.nc.flush()
                await _until(lambda: link_a.connected)
                result = await ta.send(peer(B), b"envelope")
            stored, _ = await _stored(broker, B)
            async with NatsLink("r", broker.url, B) as link_b:
                tb = RelayTransport("r", B, link_b, 3)
                group.create_task(link_b.serve(RelayInbox(node_b), tb))
                await _until(lambda: len(node_b.received) >= 1, timeout_s=20)
                await asyncio.sleep(0.5)  # nothing more comes
                link_b.stop()
            link_a.stop()
    return result, stored, node_b.received


@needs_nats
@pytest.mark.parametrize("storage", ["file", "memory"])
def test_what_a_restarted_broker_still_holds_depends_on_its_storage(
    tmp_path: Path, storage: str
) -> None:
    """File storage (the default) keeps an offline hospital's envelopes across a broker
    restart; memory storage loses them (docs/deployment.md, "Storage")."""
    broker = Broker(tmp_path, {p.name: p.public_key for p in (A, B)}, storage=storage)
    broker.start()
    try:
        held, kind = asyncio.run(_store_for_offline(broker))
        broker.kill()
        broker.start()
        after, _ = asyncio.run(_stored(broker, B))
    finally:
        broker.kill()
    assert (held, kind) == (1, storage)
    assert after == (1 if storage == "file" else 0)


@needs_nats
def test_a_broker_whose_streams_are_on_disk_is_not_silently_switched_to_memory(
    tmp_path: Path,
) -> None:
    import dataclasses

    from murmur.gossip.relay_broker import StorageMismatch, provision

    broker = Broker(tmp_path, {p.name: p.public_key for p in (A, B)})
    broker.start()
    try:
        seed = (tmp_path / "broker.conf.admin.nk").read_bytes().strip()
        plan = dataclasses.replace(broker.plan, storage="memory")
        with pytest.raises(StorageMismatch, match="kept in file storage, the plan says memory"):
            asyncio.run(provision(broker.url, seed, plan, 5))
    finally:
        broker.kill()


async def _store_for_offline(broker: Broker) -> tuple[int, str]:
    async with NatsLink("r", broker.url, A) as link_a:
        ta = RelayTransport("r", A, link_a, 0.5)
        async with asyncio.TaskGroup() as group:
            group.create_task(link_a.serve(RelayInbox(FakeNode(A, [B])), ta))  # type: ignore[arg-type]
            await _until(lambda: link_a.connected)
            result = await ta.send(peer(B), b"envelope")
            link_a.stop()
    assert "stored at relay" in result.reason, result
    return await _stored(broker, B)


def test_frames_are_views_of_the_body_and_reassemble_to_it() -> None:
    """An envelope is framed once per neighbour: its chunks must not be copies of it."""
    body = os.urandom(10_000)
    parts = frames("/gossip", "auth", "x", body, 4_000)
    assert [p.count for p in parts] == [3, 3, 3]
    assert all(isinstance(p.payload, memoryview) and p.payload.obj is body for p in parts)
    assert b"".join(p.payload for p in parts) == body
    (empty,) = frames("/gossip", "auth", "x", b"", 4_000)
    assert bytes(empty.payload) == b""


def test_nats_py_reads_a_mebibyte_at_a_time() -> None:
    """gossip/nats_link.py raises nats-py's read size, which nats-py takes from a module-level
    name on every read; a nats-py that stops doing so would silently undo it."""
    import inspect

    import nats.aio.client
    from murmur.gossip.nats_link import READ_BUFFER_BYTES

    assert nats.aio.client.DEFAULT_BUFFER_SIZE >= READ_BUFFER_BYTES == 2**20
    read_loop = inspect.getsource(nats.aio.client.Client._read_loop)
    assert "self._transport.read(DEFAULT_BUFFER_SIZE)" in read_loop


def test_broker_config_puts_the_streams_where_the_plan_says() -> None:
    hospitals = {"hospital_a": A.public_key, "hospital_b": B.public_key}
    on_disk = broker_config(BrokerPlan(hospitals), new_admin_seed())
    in_memory = broker_config(BrokerPlan(hospitals, storage="memory"), new_admin_seed())
    total = 2 * BrokerPlan(hospitals).per_hospital_bytes
    assert on_disk["accounts"]["MURMUR"]["jetstream"] | {"max_streams": 0} == {
        "max_file": total,
        "max_mem": 0,
        "max_streams": 0,
        "max_consumers": 2,
    }
    assert in_memory["accounts"]["MURMUR"]["jetstream"]["max_mem"] == total
    assert in_memory["accounts"]["MURMUR"]["jetstream"]["max_file"] == 0
    assert in_memory["jetstream"]["max_memory_store"] == total
    assert on_disk["max_payload"] == 2**20
    with pytest.raises(ValueError, match="storage 'tmpfs'"):
        broker_config(BrokerPlan(hospitals, storage="tmpfs"), new_admin_seed())


# ------------------------------------------------------------- whole nodes, bad broker


def _in_process_run(tmp_path: Path, broker: FaultyBroker | None) -> dict[str, dict]:
    """Three real HospitalNodes in this process, relayed by ``broker`` (or handed over
    directly, as bench/byzantine.py does, when None); each node's final state."""
    from murmur.gossip.memory_transport import MemoryTransport
    from murmur.node.config import load_config
    from murmur.node.node import HospitalNode

    from tests.netutil import plain_network

    net = plain_network(tmp_path, round_timeout_s=30)
    hospitals = [HospitalNode(load_config(n.config_path)) for n in net.nodes]
    by_address = {n.address: h for n, h in zip(net.nodes, hospitals, strict=True)}

    async def go() -> None:
        if broker is None:
            await asyncio.gather(
                *(h.run_rounds(MemoryTransport(by_address, h.identity)) for h in hospitals)
            )
            return
        transports = [broker.attach(h) for h in hospitals]
        async with broker.running():
            await asyncio.gather(
                *(h.run_rounds(t) for h, t in zip(hospitals, transports, strict=True))
            )

    try:
        asyncio.run(go())
    finally:
        for h in hospitals:
            h.audit.close()
    return {
        h.config.node.name: {
            "model": h.state.model_sha256,
            "rounds": [r["round"] for r in h.state.history],
            "missing": [r["missing"] for r in h.state.history],
            "rejected": dict(h.rejected),
            "unauthenticated": dict(h.state.unauthenticated),
        }
        for h in hospitals
    }


def test_a_broker_that_duplicates_reorders_and_delays_changes_no_model(tmp_path: Path) -> None:
    clean = _in_process_run(tmp_path / "clean", None)
    faulty = _in_process_run(tmp_path / "faulty", FaultyBroker(seed=1, duplicate=0.5, delay_s=0.2))
    for name, state in faulty.items():
        assert state["rounds"] == [1, 2, 3]
        assert state["model"] == clean[name]["model"], (name, state, clean[name])
    # The copies were refused by the replay guard, not learnt from twice.
    assert sum(s["unauthenticated"].get("replay", 0) for s in faulty.values()) > 0


def test_a_broker_that_drops_messages_costs_contributions_never_a_round(tmp_path: Path) -> None:
    faulty = _in_process_run(tmp_path, FaultyBroker(seed=2, drop=0.05, delay_s=0.05))
    for state in faulty.values():
        assert state["rounds"] == [1, 2, 3], state


# ------------------------------------------------------ processes, one relay-only node


@needs_nats
@pytest.mark.slow
def test_a_network_with_a_relay_only_hospital_finishes(tmp_path: Path) -> None:
    from tests.netutil import plain_network
    from tests.relayutil import free_port, kill_group, start_relay_cli, use_relay

    net = plain_network(tmp_path, round_timeout_s=20)
    port = free_port()
    pubs = sorted((tmp_path / "keys").glob("*.pub"))
    relay = start_relay_cli(tmp_path / "relay", pubs, f"127.0.0.1:{port}")
    outbound_only = net.nodes[2].name
    use_relay(net, f"nats://127.0.0.1:{port}", {outbound_only})
    try:
        net.start_all()
        # While it runs, nothing listens on the port its config would have given peers.
        end = time.monotonic() + 60
        while "peer listener on none" not in net.log(outbound_only):
            assert time.monotonic() < end, net.log(outbound_only)
            time.sleep(0.1)
        port_of_hidden = int(net.node(outbound_only).address.rpartition(":")[2])
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port_of_hidden), timeout=2).close()
        codes = net.wait_all(timeout_s=150)
        logs = {n.name: net.log(n.name) for n in net.nodes}
        assert codes == {n.name: 0 for n in net.nodes}, logs
        for node in net.nodes:
            history = net.final_status(node.name)["history"]
            assert [h["round"] for h in history] == [1, 2, 3]
            assert all(not h["missing"] for h in history), (node.name, history)
        assert "peer listener on none (inbound = false" in logs[outbound_only]
    finally:
        net.kill_all()
        kill_group(relay, signal.SIGTERM)


@needs_nats
def test_a_hospital_that_may_only_speak_http_reaches_the_relay_over_websocket(
    tmp_path: Path,
) -> None:
    from tests.relayutil import free_port

    broker = Broker(tmp_path, {p.name: p.public_key for p in (A, B)}, websocket_port=free_port())
    broker.start()
    try:
        result, received = asyncio.run(_over_websocket(broker))
    finally:
        broker.kill()
    assert result.ok, result
    assert received == [("hospital_a", b"through a websocket")]


async def _over_websocket(broker: Broker):  # type: ignore[no-untyped-def]
    node_b = FakeNode(B, [A])
    ws_url = f"ws://127.0.0.1:{broker.websocket_port}"
    async with NatsLink("r", ws_url, A) as link_a, NatsLink("r", broker.url, B) as link_b:
        ta, tb = RelayTransport("r", A, link_a, 5), RelayTransport("r", B, link_b, 5)
        async with asyncio.TaskGroup() as group:
            group.create_task(link_a.serve(RelayInbox(FakeNode(A, [B])), ta))  # type: ignore[arg-type]
            group.create_task(link_b.serve(RelayInbox(node_b), tb))
            await _until(lambda: link_a.connected and link_b.connected)
            await asyncio.sleep(0.3)
            result = await ta.send(peer(B), b"through a websocket")
            link_a.stop()
            link_b.stop()
    return result, node_b.received


def test_murmur_relay_config_writes_the_broker_config_and_a_private_admin_seed(
    tmp_path: Path, capsys
) -> None:
    from murmur.crypto.identity import save_identity
    from murmur.node.cli import main

    pubs = [save_identity(i, tmp_path / "keys")[1] for i in (A, B)]
    args = ["relay", "config", "--pub", str(pubs[0]), "--pub", str(pubs[1])]
    assert main(args) == 0
    printed = json.loads(capsys.readouterr().out)
    assert {u["nkey"] for u in printed["accounts"]["MURMUR"]["users"]} >= {
        nkey_of(A.public_key),
        nkey_of(B.public_key),
    }
    out = tmp_path / "relay" / "broker.conf"
    out.parent.mkdir()
    assert main([*args, "--out", str(out), "--per-hospital-mb", "64"]) == 0
    written = json.loads(out.read_text())
    assert written["accounts"]["MURMUR"]["jetstream"]["max_file"] == 2 * 64 * 2**20
    seed = out.with_name("broker.conf.admin.nk")
    assert os.stat(seed).st_mode & 0o777 == 0o600
    # A second hospital file with the same name is refused, naming it.
    assert main(["relay", "config", "--pub", str(pubs[0]), "--pub", str(pubs[0])]) == 2


@needs_nats
def test_hospitals_reach_a_relay_over_tls(tmp_path: Path) -> None:
    """The broker serves TLS only; a node verifies it against `ca_file` and gets through."""
    from murmur.node.tls import private_key_pem, selfsigned

    relay_id = generate_identity("relay")
    cert, key = tmp_path / "relay.crt", tmp_path / "relay.key"
    cert.write_bytes(selfsigned(relay_id, ["127.0.0.1"]))
    key.write_bytes(private_key_pem(relay_id))
    broker = Broker(tmp_path, {p.name: p.public_key for p in (A, B)}, tls=(cert, key))
    broker.start()
    try:
        result, received, plain = asyncio.run(_over_tls(broker, cert))
    finally:
        broker.kill()
    assert result.ok, result
    assert received == [("hospital_a", b"over tls")]
    assert not plain  # a plain nats:// connection to a TLS-only broker does not get through


async def _over_tls(broker: Broker, ca: Path):  # type: ignore[no-untyped-def]
    node_b = FakeNode(B, [A])
    url = f"tls://127.0.0.1:{broker.port}"
    async with (
        NatsLink("r", url, A, ca_file=ca) as link_a,
        NatsLink("r", url, B, ca_file=ca) as link_b,
        NatsLink("r", broker.url, B, connect_timeout_s=1) as plain,
    ):
        ta, tb = RelayTransport("r", A, link_a, 5), RelayTransport("r", B, link_b, 5)
        async with asyncio.TaskGroup() as group:
            group.create_task(link_a.serve(RelayInbox(FakeNode(A, [B])), ta))  # type: ignore[arg-type]
            group.create_task(link_b.serve(RelayInbox(node_b), tb))
            group.create_task(plain.serve(RelayInbox(FakeNode(B, [A])), tb))
            await _until(lambda: link_a.connected and link_b.connected)
            await asyncio.sleep(0.5)
            result = await ta.send(peer(B), b"over tls")
            plain_connected = plain.connected
            for link in (link_a, link_b, plain):
                link.stop()
    return result, node_b.received, plain_connected


def test_a_peer_flooding_through_the_relay_is_held_to_its_allowance() -> None:
    from murmur.gossip.auth import PeerAllowance, request_headers

    node = FakeNode(B, [A])
    node.current_round = 1  # type: ignore[attr-defined]
    inbox = RelayInbox(node, PeerAllowance(burst=3, per_round=0, per_second=0))  # type: ignore[arg-type]
    sender = nkey_of(A.public_key)

    async def flood() -> None:
        for i in range(5):
            body = f"envelope {i}".encode()
            auth = request_headers(A, B.public_key, "/gossip", body, "x", time.time())
            (frame,) = frames("/gossip", auth["Murmur-Auth"], "x", body, 1_000_000)
            await inbox.handle("r", sender, frame.headers(), body)

    asyncio.run(flood())
    assert len(node.received) == 3
    assert node.rejections == [("peer_rate_limited", None)] * 2


def test_config_check_finds_a_peer_that_cannot_be_reached_the_way_it_is_listed(
    tmp_path: Path,
) -> None:
    import tomllib

    from murmur.node.config_check import check_configs

    import run_cluster
    from tests.netutil import make_network
    from tests.relayutil import use_relay

    net = make_network(tmp_path, "--nodes", "3", "--no-dp", "--aggregator", "mean")
    hidden = net.nodes[2]
    use_relay(net, "nats://127.0.0.1:4222", {hidden.name})
    paths = [n.config_path for n in net.nodes]
    _, findings = check_configs(paths)
    assert not [f for f in findings if f.level == "error"], findings
    # hospital_0 goes back to the hidden node's address, which can never answer.
    doc = tomllib.loads(net.nodes[0].config_path.read_text())
    entry = next(p for p in doc["peers"] if p["name"] == hidden.name)
    entry.pop("relays")
    entry["address"] = hidden.address
    net.nodes[0].config_path.write_text(run_cluster.to_toml(doc))
    _, findings = check_configs(paths)
    errors = [f.message for f in findings if f.level == "error"]
    assert any("inbound = false" in m and "relays = [...]" in m for m in errors), errors
