"""Hostile inputs against a real training network (issue #25 item 6), the short version.

`test_a_training_network_takes_every_hostile_input_class` starts real node processes and
throws a few hundred inputs of every class of tests/hostile_inputs.py at them while they train
(bench/hostile.py is the long version, with the measurements). The other tests run one node
in this process: the two refusals the suite found untyped or uncounted, and the re-signed
envelope of issue #25 item 1, refused since protocol v4.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp
import pytest
from murmur.gossip.auth import request_headers
from murmur.gossip.wire import build_envelope
from murmur.models.params import get_state
from murmur.node.api import operator_token, start_api
from murmur.node.config import load_config
from murmur.node.node import HospitalNode

from tests.hostile_inputs import (
    EXPECTED,
    INSIDER_CLASSES,
    KNOWN_REASONS,
    HostileNetwork,
    NetworkSettings,
    attack,
    audit_rows_from,
    gossip_post,
    model_update,
    resigned_as,
)
from tests.netutil import make_network
from tests.test_http import get, raw_exchange, running

# A few hundred inputs, every class; about 10 s of throwing, 15 s with the slowloris ones.
CI_COUNTS = {
    "random_bytes": 150,
    "truncated": 10,
    "bit_flips": 30,
    "empty": 3,
    "length_short": 6,
    "length_long": 4,
    "oversize": 3,
    "trickle": 2,
    "trickle_headers": 2,
    "bad_framing": 13,
    "expect": 4,
    "content_encoding": 7,
    "msgpack_bombs": 12,
    "outsider": 4,
    "replay": 8,
    "wrong_route": 15,
    "concurrent": 120,
    "upload_cap": 10,
    "unauth_16mb": 2,
}


async def test_an_unparseable_request_gets_a_typed_answer_that_echoes_nothing(
    tmp_path: Path,
) -> None:
    # aiohttp's own answer was text quoting these bytes, with "Server: Python/3.11 aiohttp/...".
    requests = [
        b"SENDERBYTES \x00\x01 not http\r\n\r\n",
        b"POST /gossip HTTP/1.1\r\nContent-Length: -1\r\nX-Echo: SENDERBYTES\r\n\r\n",
        b"GET /" + b"SENDERBYTES" * 800 + b" HTTP/1.1\r\n\r\n",
    ]
    async with running(tmp_path) as (node, api):
        for data in requests:
            received, closed = await raw_exchange(api.peer.port, data)
            head, _, body = received.partition(b"\r\n\r\n")
            assert head.startswith((b"HTTP/1.0 400 ", b"HTTP/1.1 400 ")) and closed, received
            assert body == b'{"reason": "bad_http"}'
            assert b"\r\nServer: murmur" in head and b"aiohttp" not in received
            assert b"SENDERBYTES" not in received
        assert node.rejected["bad_http"] == len(requests)


async def test_paths_and_methods_the_peer_listener_does_not_serve_are_counted(
    tmp_path: Path,
) -> None:
    async with running(tmp_path) as (node, api):
        for path in ("/status", "/metrics", "/gossip/", "/../status"):
            code, _, _ = await get(api.peer.address + path)
            assert code == 404, path
        async with aiohttp.ClientSession() as session:
            for method in ("PUT", "DELETE", "PATCH"):
                async with session.request(method, api.peer.address + "/gossip") as r:
                    assert r.status == 405
        assert node.rejected["not_found"] == 4
        assert node.rejected["method_not_allowed"] == 3
        _, _, body = await get(api.operator.address + "/metrics")
        assert b'murmur_messages_rejected_total{reason="not_found"} 4.0' in body
        # The operator listener's clients are the hospital's own: not counted as rejections.
        code, _, _ = await get(api.operator.address + "/nowhere")
        assert code == 404
        assert node.rejected["not_found"] == 4


# ---------------------------------------------------------------------------- real network


@pytest.mark.slow
async def test_a_training_network_takes_every_hostile_input_class(tmp_path: Path) -> None:
    # 3 training hospitals and an offline 4th: each round lasts its 2.5 s deadline, so the
    # network is still training while the inputs arrive (tests/hostile_inputs.NetworkSettings).
    settings = NetworkSettings(
        rounds=6,
        round_timeout_s=2.5,
        startup_timeout_s=6.0,
        body_timeout_s=1.5,
        idle_timeout_s=11.0,
    )
    net = HostileNetwork(tmp_path, settings)
    try:
        await net.start()
        result = await attack(net, CI_COUNTS, seed=1)
        statuses = await net.wait_done(90)
    finally:
        codes = await net.stop()
    classes = result.classes
    logs = net.logs()

    assert set(classes) == set(CI_COUNTS)
    # It trained all along: every class began before the last node finished its rounds.
    assert not any(c.after_training for c in classes.values()), {
        k: c.rounds for k, c in classes.items()
    }
    assert result.inputs >= 300
    assert all(c.sent >= CI_COUNTS[k] for k, c in classes.items()), {
        k: c.sent for k, c in classes.items()
    }
    # No crash: every node answered /health after every class, and stopped cleanly.
    assert all(c.crashes == 0 for c in classes.values()), logs
    assert codes == {name: 0 for name in net.names}, logs
    # Every node finished every round, and junk never cost an honest update its deadline.
    for name, status in statuses.items():
        assert [h["round"] for h in status["history"]] == list(range(1, settings.rounds + 1))
        assert all(h["missing"] == net.fake for h in status["history"]), (name, status["history"])
    # Every answer is typed, none is a 5xx but the documented 503, no junk was accepted.
    assert sum(c.untyped for c in classes.values()) == 0
    assert sum(c.http_5xx for c in classes.values()) == 0
    assert sum(c.accepted for c in classes.values()) == 0
    # ...and it is the refusal its class should get (bit flips may hit any check).
    assert {k: c.surprises() for k, c in classes.items() if c.surprises()} == {}
    for kind, c in classes.items():
        if kind != "trickle_headers":
            assert EXPECTED[kind] == {"*"} or set(c.reasons) & EXPECTED[kind], (kind, c.reasons)
    assert classes["concurrent"].busy_503 > 0  # 120 at once is past max_connections (64)
    assert classes["upload_cap"].reasons["too_many_uploads"] > 0
    assert classes["expect"].continued == 0  # the huge upload was never invited
    assert classes["trickle_headers"].closed_unasked == CI_COUNTS["trickle_headers"]
    assert classes["trickle_headers"].longest_s < settings.idle_timeout_s + 5
    # The nodes' own counters account for every input, reason by reason, with known codes.
    assert result.mismatches() == {}
    assert result.untyped_counted == []
    assert all(set(c) <= KNOWN_REASONS for c in result.counted.values())
    # (Each input is at least one count; only slowloris connections never form a request.)
    uncounted = CI_COUNTS["trickle_headers"]
    assert sum(sum(c.values()) for c in result.counted.values()) >= result.inputs - uncounted
    # Bounded memory and audit: no audit row per stranger's junk request, one summary per
    # round at most; the insider's refused requests, authenticated, are audited one row each.
    assert result.rss_growth_mb < 100, (result.rss_before, result.rss_after)
    neighbours = len(net.names) - 1
    insider = net.fake[0]
    for name, kinds in net.audit().items():
        before = result.audit_before[name]
        state_dir = net.net.node(name).state_dir
        from_insider = audit_rows_from(state_dir, insider)
        sent_by_insider = sum(
            1 for a in result.answers if a.target == name and a.kind in INSIDER_CLASSES
        )
        assert from_insider <= sent_by_insider, (name, from_insider, sent_by_insider)
        honest_rows = kinds.get("message_received", 0) - from_insider
        assert honest_rows <= settings.rounds * neighbours, (name, kinds)
        added = kinds.get("rejections", 0) - before.get("rejections", 0)
        assert 1 <= added <= settings.rounds + 1, (name, kinds)


# ---------------------------------------------------------------------------- issue #25 item 1


def in_process_node(tmp_path: Path) -> tuple[HospitalNode, dict[str, Any]]:
    """hospital_0 of a 3-hospital network (no DP) in this process, listeners on free ports;
    also returns the other members' identities, which the attacker holds."""
    from murmur.crypto.identity import load_identity

    net = make_network(tmp_path, "--nodes", "3", "--no-dp", "--aggregator", "mean")
    name = net.nodes[0].name
    net.edit_config(name, "node", listen="127.0.0.1:0")
    net.edit_config(name, "operator", listen="127.0.0.1:0")
    keys = {n.name: load_identity(tmp_path / "keys" / f"{n.name}.key") for n in net.nodes}
    return HospitalNode(load_config(net.node(name).config_path)), keys


async def test_an_envelope_re_signed_by_another_member_is_refused(tmp_path: Path) -> None:
    """Issue #25 item 1, fixed in protocol v4: a member that re-signs another member's envelope
    as its own (and signs its request as itself, as it can) is refused, typed, because the key
    wraps and the body are bound to the real sender (docs/protocol.md, "Encryption")."""
    node, keys = in_process_node(tmp_path)
    api = await start_api(node, operator_token(node.config))
    try:
        me, author, insider = keys["hospital_0"], keys["hospital_1"], keys["hospital_2"]
        update = model_update(get_state(node.model))
        original = build_envelope(update, author, [me.public_key, insider.public_key], 1)
        async with aiohttp.ClientSession() as session:

            async def post(body: bytes, sender: Any) -> tuple[int, str]:
                headers = request_headers(sender, me.public_key, "/gossip", body, "x")
                async with session.post(
                    api.peer.address + "/gossip", data=body, headers=headers
                ) as r:
                    return r.status, (await r.json())["reason"]

            forged = resigned_as(original, insider)
            assert await post(forged, insider) == (400, "decrypt_failed")
            assert await post(original, author) == (202, "accepted")  # the genuine one is fine
        assert node.rejected["decrypt_failed"] == 1
        assert node.state.peers["hospital_2"]["last_round"] == 0
    finally:
        await api.close()
        node.audit.close()


def test_gossip_post_frames_a_body_the_way_the_node_reads_it() -> None:
    data = gossip_post(b"abc", b"X-A: 1\r\n")
    head, _, body = data.partition(b"\r\n\r\n")
    assert body == b"abc"
    assert head.startswith(b"POST /gossip HTTP/1.1\r\n")
    assert b"Content-Length: 3" in head and b"Connection: close" in head and b"X-A: 1" in head
