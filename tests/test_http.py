"""The node's two listeners (node/api.py): the peer listener serves only /gossip and /health
and holds up against strangers; the operator listener keeps /status, /metrics and the
dashboard to the operator. Real listeners on free loopback ports, one node in this process."""

from __future__ import annotations

import asyncio
import gzip
import logging
import time
import zlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest

from crypto.identity import generate_identity, load_identity
from gossip.wire import ModelUpdate, build_envelope
from models.params import get_state
from node.api import NodeApi, OperatorTokenError, load_operator_token, operator_token, start_api
from tests.netutil import build_node

TOKEN = "t0k3n-" + "x" * 40


@asynccontextmanager
async def running(tmp_path: Path, **sections: dict[str, Any]) -> AsyncIterator[tuple[Any, NodeApi]]:
    node = build_node(tmp_path, **sections)
    api = await start_api(node, operator_token(node.config))
    try:
        yield node, api
    finally:
        await api.close()
        node.audit.close()


async def get(url: str, **kwargs: Any) -> tuple[int, dict[str, str], bytes]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(url, timeout=aiohttp.ClientTimeout(total=10), **kwargs) as r,
    ):
        return r.status, dict(r.headers), await r.read()


async def post(
    url: str, body: bytes, headers: dict[str, str] | None = None, source: str | None = None
) -> tuple[int, Any]:
    connector = aiohttp.TCPConnector(local_addr=(source, 0)) if source else None
    async with (
        aiohttp.ClientSession(connector=connector) as session,
        session.post(
            url, data=body, headers=headers or {}, timeout=aiohttp.ClientTimeout(total=10)
        ) as r,
    ):
        return r.status, await r.json()


async def raw_exchange(port: int, data: bytes, timeout_s: float = 5.0) -> tuple[bytes, bool]:
    """Send raw bytes, then read until the server closes (True) or `timeout_s` passes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    return await _read_to_close(reader, writer, timeout_s)


Connection = tuple[asyncio.StreamReader, asyncio.StreamWriter]


async def read_to_close(conn: Connection, timeout_s: float = 5.0) -> tuple[bytes, bool]:
    """What a connection receives until the server closes it (True) or `timeout_s` passes."""
    return await _read_to_close(*conn, timeout_s)


async def _read_to_close(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, timeout_s: float
) -> tuple[bytes, bool]:
    received = b""
    closed = False
    try:
        async with asyncio.timeout(timeout_s):
            while chunk := await reader.read(65536):
                received += chunk
            closed = True
    except TimeoutError:
        pass
    finally:
        writer.close()
    return received, closed


def no_traceback_logged(caplog: pytest.LogCaptureFixture) -> None:
    for record in caplog.records:
        assert record.exc_info is None, record.getMessage()
        assert "Traceback" not in record.getMessage()


# ---------------------------------------------------------------------------- what is served


async def test_peer_listener_serves_gossip_and_health_only(tmp_path: Path) -> None:
    async with running(tmp_path) as (_, api):
        base = api.peer.address
        for path in ("/status", "/metrics", "/", "/audit", "/../status"):
            code, headers, body = await get(base + path)
            assert (code, body) == (404, b'{"reason": "not_found"}'), path
            assert headers["Server"] == "murmur"  # no aiohttp or Python version
        code, headers, body = await get(base + "/gossip")
        assert (code, body) == (405, b'{"reason": "method_not_allowed"}')
        assert headers["Allow"] == "POST"
        code, reply = await post(base + "/health", b"")
        assert (code, reply) == (405, {"reason": "method_not_allowed"})
        code, _, body = await get(base + "/health")
        # Liveness and nothing else: no name, no round, nothing learnt from the data.
        assert (code, body) == (200, b'{"ok": true}')


async def test_operator_listener_on_loopback_serves_status_metrics_and_dashboard(
    tmp_path: Path,
) -> None:
    async with running(tmp_path) as (_, api):
        base = api.operator.address
        assert api.operator.port != api.peer.port
        code, _, body = await get(base + "/status")
        assert code == 200 and b'"name": "hospital_0"' in body
        code, _, body = await get(base + "/metrics")
        assert code == 200 and b"murmur_round_completed" in body
        code, headers, body = await get(base + "/")
        assert code == 200 and headers["Content-Type"].startswith("text/html")
        for route in (b'get("/status")', b'get("/alerts")', b'get("/audit/recent?limit='):
            assert route in body
        assert "script-src 'sha256-" in headers["Content-Security-Policy"]
        code, _, _ = await get(base + "/gossip")
        assert code == 404  # peers' routes are not here either
        # No token on loopback: a page that points its own domain at 127.0.0.1 (DNS
        # rebinding) still cannot read the status, since its Host header is not loopback.
        code, _, body = await get(base + "/status", headers={"Host": "evil.example"})
        assert (code, body) == (421, b'{"reason": "not_loopback_host"}')
        code, _, _ = await get(base + "/status", headers={"Host": "localhost:1234"})
        assert code == 200


async def test_operator_token_missing_or_wrong_is_401_and_right_is_200(tmp_path: Path) -> None:
    token_file = tmp_path / "operator.token"
    token_file.write_text(TOKEN + "\n")
    token_file.chmod(0o600)
    async with running(tmp_path / "net", operator={"token_file": str(token_file)}) as (_, api):
        url = api.operator.address + "/status"
        code, headers, body = await get(url)
        assert (code, body) == (401, b'{"reason": "unauthorized"}')
        assert headers["WWW-Authenticate"].startswith("Bearer")
        for wrong in (f"Bearer {TOKEN}x", f"Bearer {TOKEN[:-1]}", f"Basic {TOKEN}", TOKEN):
            code, _, _ = await get(url, headers={"Authorization": wrong})
            assert code == 401, wrong
        code, _, body = await get(url, headers={"Authorization": f"Bearer {TOKEN}"})
        assert code == 200 and b'"round": 0' in body
        code, _, _ = await get(api.operator.address + "/metrics")
        assert code == 401
        # The dashboard's page is static (no node data); it sends the token with each fetch.
        code, _, body = await get(api.operator.address + "/")
        assert code == 200 and b"Authorization" in body


def test_token_file_with_loose_permissions_or_too_short_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "operator.token"
    path.write_text(TOKEN)
    path.chmod(0o644)
    with pytest.raises(OperatorTokenError, match=r"mode 0644.*chmod 600"):
        load_operator_token(path)
    path.chmod(0o600)
    assert load_operator_token(path) == TOKEN
    path.write_text("short")
    with pytest.raises(OperatorTokenError, match="at least 32 printable characters"):
        load_operator_token(path)
    with pytest.raises(OperatorTokenError, match="does not exist"):
        load_operator_token(tmp_path / "missing.token")


async def test_a_loose_token_file_stops_the_node_before_it_records_anything(
    tmp_path: Path,
) -> None:
    token_file = tmp_path / "operator.token"
    token_file.write_text(TOKEN)
    token_file.chmod(0o640)
    node = build_node(tmp_path / "net", operator={"token_file": str(token_file)})
    try:
        before = node.audit.counts_by_kind()
        with pytest.raises(OperatorTokenError, match="chmod 600"):
            await node.run()
        assert node.audit.counts_by_kind() == before  # no node_start
    finally:
        node.audit.close()


# ---------------------------------------------------------------------------- what peers get


def _template() -> dict[str, np.ndarray]:
    from models.nets import build_model

    return get_state(build_model("logreg", (30,), 0))


async def test_replies_to_peers_carry_the_reason_code_only(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    async with running(tmp_path) as (node, api):
        me = node.identity.public_key
        outsider = build_envelope(
            ModelUpdate(_template()), generate_identity("mallory"), [me], 1
        )
        code, reply = await post(api.peer.address + "/gossip", outsider)
        # Not "sender key 1a2b... is not on the allowlist".
        assert (code, reply) == (403, {"reason": "unknown_sender"})
        peer_key = tmp_path / "keys" / "hospital_1.key"
        stale = build_envelope(
            ModelUpdate(_template()),
            load_identity(peer_key),
            [me],
            1,
            now=time.time() - 3600,
        )
        code, reply = await post(api.peer.address + "/gossip", stale)
        # Not "timestamp is +3600 s from this node's clock".
        assert (code, reply) == (400, {"reason": "stale"})
        # The details stay in the node's own log.
        logged = caplog.text
        assert "is not on the allowlist" in logged and "from this node's clock" in logged


# ---------------------------------------------------------------------------- bodies


async def test_any_content_encoding_is_refused_415_and_counted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    async with running(tmp_path) as (_, api):
        url = api.peer.address + "/gossip"
        cases = [
            ("gzip", b"\x1f\x8b\x08\x00 not really gzip" * 20),
            ("deflate", b"\x78\x9c but this does not inflate" * 20),
            ("gzip", gzip.compress(b"\0" * 100_000)),  # valid, and still refused
            ("deflate", zlib.compress(b"\0" * 100_000)),
            ("identity", b"x"),
        ]
        for encoding, body in cases:
            code, reply = await post(url, body, {"Content-Encoding": encoding})
            assert (code, reply) == (415, {"reason": "unsupported_encoding"}), encoding
        code, _, body = await get(api.operator.address + "/status")
        assert b'"unsupported_encoding": 5' in body
        code, _, body = await get(api.operator.address + "/metrics")
        assert b'murmur_messages_rejected_total{reason="unsupported_encoding"} 5.0' in body
    no_traceback_logged(caplog)


async def test_a_malformed_request_is_one_counted_line_without_its_bytes(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    async with running(tmp_path) as (node, api):
        junk = b"POST /gossip HTTP/1.1\r\nX-Junk: " + b"SENDERBYTES\x01" * 600 + b"\r\n\r\n"
        for request in (b"SENDERBYTES \x00\x01" * 500 + b"\r\n\r\n", junk):
            received, closed = await raw_exchange(api.peer.port, request)
            assert received.startswith((b"HTTP/1.0 400 ", b"HTTP/1.1 400 ")) and closed, received
        assert node.rejected["bad_http"] == 2
    assert "SENDERBYTES" not in caplog.text
    no_traceback_logged(caplog)


async def test_expect_100_continue_with_oversize_length_is_refused_before_the_body(
    tmp_path: Path,
) -> None:
    async with running(tmp_path) as (node, api):
        head = (
            b"POST /gossip HTTP/1.1\r\nHost: 127.0.0.1\r\nExpect: 100-continue\r\n"
            b"Content-Length: 1000000000\r\n\r\n"
        )
        received, closed = await raw_exchange(api.peer.port, head)
        assert received.startswith(b"HTTP/1.1 413 "), received
        assert b"100 Continue" not in received  # the body was never invited
        assert received.endswith(b'{"reason": "too_large"}')
        assert closed
        assert node.rejected["too_large"] == 1
        # A body within the limit is still invited (then refused for what it is).
        reader, writer = await asyncio.open_connection("127.0.0.1", api.peer.port)
        try:
            writer.write(head.replace(b"1000000000", b"16"))
            async with asyncio.timeout(5):
                assert await reader.readuntil(b"\r\n\r\n") == b"HTTP/1.1 100 Continue\r\n\r\n"
                writer.write(b"0123456789abcdef")
                answer = await reader.read(4096)
        finally:
            writer.close()
        assert answer.startswith(b"HTTP/1.1 400 ") and answer.endswith(b'{"reason": "malformed"}')


async def test_a_chunked_body_past_the_limit_is_413(tmp_path: Path) -> None:
    async with running(tmp_path) as (node, api):
        limit = node.limits.max_message_bytes
        chunk = b"4000\r\n" + b"a" * 0x4000 + b"\r\n"
        head = b"POST /gossip HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\n"
        received, closed = await raw_exchange(api.peer.port, head + chunk * (limit // 0x4000 + 2))
        assert received.startswith(b"HTTP/1.1 413 ") and closed, received
        assert received.endswith(b'{"reason": "too_large"}')
        assert node.rejected["too_large"] == 1


async def test_a_trickling_upload_is_cut_at_the_body_timeout(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    async with running(tmp_path, peer_listener={"body_timeout_s": 1.0}) as (node, api):
        reader, writer = await asyncio.open_connection("127.0.0.1", api.peer.port)
        writer.write(b"POST /gossip HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 1000\r\n\r\n")

        async def trickle() -> None:  # one byte every 50 ms: 50 s for the whole body
            for _ in range(1000):
                writer.write(b"x")
                try:
                    await writer.drain()
                except ConnectionError:
                    return
                await asyncio.sleep(0.05)

        started = time.monotonic()
        try:
            async with asyncio.timeout(10), asyncio.TaskGroup() as group:
                sender = group.create_task(trickle())
                answer = await reader.read(4096)
                sender.cancel()
        finally:
            writer.close()
        elapsed = time.monotonic() - started
        assert answer.startswith(b"HTTP/1.1 408 "), answer
        assert answer.endswith(b'{"reason": "body_timeout"}')
        assert 0.9 <= elapsed < 4.0, elapsed
        assert node.rejected["body_timeout"] == 1
    no_traceback_logged(caplog)


async def test_idle_and_half_sent_connections_are_closed(tmp_path: Path) -> None:
    async with running(tmp_path, peer_listener={"idle_timeout_s": 1.0}) as (_, api):
        started = time.monotonic()
        received, closed = await raw_exchange(api.peer.port, b"", timeout_s=6)
        assert closed and received == b"" and time.monotonic() - started < 5
        # A request header that never ends is cut at the same deadline.
        started = time.monotonic()
        received, closed = await raw_exchange(api.peer.port, b"POST /gossip HTTP/1.1\r\nHo", 6)
        assert closed and time.monotonic() - started < 5


async def connect_from(source: str, port: int) -> Connection:
    """A connection to the listener from `source`, any address in 127.0.0.0/8."""
    return await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))


async def test_the_connection_cap_holds(tmp_path: Path) -> None:
    limits = {"max_connections": 3, "max_connections_per_address": 2}
    async with running(tmp_path, peer_listener=limits) as (node, api):
        port = api.peer.port
        held = [
            await connect_from("127.0.0.1", port),
            await connect_from("127.0.0.2", port),
            await connect_from("127.0.0.3", port),
        ]
        try:
            await asyncio.sleep(0.1)
            probe = await connect_from("127.0.0.4", port)  # a new address, but 3 are open
            received, closed = await read_to_close(probe)
            assert received.startswith(b"HTTP/1.1 503 ") and closed, received
            assert received.endswith(b'{"reason": "too_many_connections"}')
            assert node.rejected["too_many_connections"] == 1
        finally:
            for _, writer in held[1:]:
                writer.close()
        await asyncio.sleep(0.2)  # the server sees the two closes
        code, _, body = await get(api.peer.address + "/health")
        assert (code, body) == (200, b'{"ok": true}')
        held[0][1].close()


async def test_the_per_address_caps_hold(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    limits = {"max_connections": 10, "max_connections_per_address": 2, "max_uploads_per_address": 1}
    async with running(tmp_path, peer_listener=limits) as (node, api):
        port = api.peer.port
        # One upload in progress from 127.0.0.1 (its body is not finished)...
        _, upload = await connect_from("127.0.0.1", port)
        upload.write(b"POST /gossip HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100\r\n\r\nab")
        await upload.drain()
        await asyncio.sleep(0.2)
        # ...so a second one from the same address is refused before its body is read,
        code, reply = await post(api.peer.address + "/gossip", b"junk")
        assert (code, reply) == (429, {"reason": "too_many_uploads"})
        # and one from another address is not.
        code, reply = await post(f"http://127.0.0.1:{port}/gossip", b"junk", source="127.0.0.2")
        assert (code, reply) == (400, {"reason": "malformed"})
        # With the upload's, two connections from 127.0.0.1 are open: a third is refused.
        _, second = await connect_from("127.0.0.1", port)
        await asyncio.sleep(0.1)
        received, closed = await read_to_close(await connect_from("127.0.0.1", port))
        assert received.startswith(b"HTTP/1.1 503 ") and closed
        received, closed = await read_to_close(await connect_from("127.0.0.2", port), 0.5)
        assert received == b"" and not closed  # another address may still connect
        second.close()
        upload.close()
        await asyncio.sleep(0.3)
        code, reply = await post(api.peer.address + "/gossip", b"junk")
        assert (code, reply) == (400, {"reason": "malformed"})
        assert node.rejected["aborted_upload"] == 1  # the first upload, when it hung up
        assert node.rejected["too_many_connections"] == 1
    no_traceback_logged(caplog)


# ---------------------------------------------------------------------------- junk in bulk


async def test_junk_adds_one_audit_record_per_round_and_few_log_lines(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="murmur")
    async with running(tmp_path) as (node, api):
        before = node.audit.counts_by_kind()
        url = api.peer.address + "/gossip"
        rng = np.random.default_rng(0)
        started = time.monotonic()
        async with aiohttp.ClientSession() as session:
            for _ in range(1000):
                async with session.post(url, data=rng.bytes(64)) as r:
                    assert r.status == 400
        elapsed = time.monotonic() - started
        assert node.audit.counts_by_kind() == before  # nothing per junk request
        node.summarise_rejections(1)
        after = node.audit.counts_by_kind()
        assert after.pop("rejections") == 1
        assert after == before
        record = node.audit.last(1)[0]
        assert record.kind == "rejections" and record.round == 1
        assert record.fields["reasons"] == {"malformed": 1000}
        assert record.fields["total"] == 1000
        assert record.fields["top_sources"] == [{"source": "127.0.0.1", "count": 1000}]
        node.summarise_rejections(2)  # nothing new: no record
        assert node.audit.counts_by_kind()["rejections"] == 1
        assert node.rejected["malformed"] == 1000
    lines = [r for r in caplog.records if "rejected message" in r.getMessage()]
    # One line per reason per 10 s interval (the last says how many it held back).
    assert 1 <= len(lines) <= 2 + elapsed / 10, len(lines)
    no_traceback_logged(caplog)


async def test_an_authenticated_rejection_is_still_audited_one_record_each(tmp_path: Path) -> None:
    async with running(tmp_path) as (node, api):
        me = node.identity.public_key
        peer = load_identity(tmp_path / "keys" / "hospital_1.key")
        first = build_envelope(ModelUpdate(_template()), peer, [me], 1)
        second = build_envelope(ModelUpdate(_template()), peer, [me], 1)
        url = api.peer.address + "/gossip"
        assert await post(url, first) == (202, {"reason": "accepted"})
        assert await post(url, second) == (409, {"reason": "duplicate"})
        record = node.audit.last(1)[0]
        assert record.kind == "message_received"
        assert record.fields["sender"] == "hospital_1"
        assert record.fields["accepted"] is False and record.fields["reason"] == "duplicate"
