"""The node's two listeners (node/api.py): the peer listener serves only /gossip, /receipts
and /health, authenticates every POST from its headers, and holds up against strangers; the
operator listener keeps /status, /metrics and the dashboard to the operator. Real listeners
on free loopback ports, one node in this process."""

from __future__ import annotations

import asyncio
import contextlib
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
from aiohttp import web
from murmur.crypto.allowlist import Peer
from murmur.crypto.identity import Identity, generate_identity, load_identity
from murmur.gossip.auth import AUTH_HEADER, request_headers
from murmur.gossip.transport import PeerTransport
from murmur.gossip.wire import ModelUpdate, build_envelope
from murmur.models.params import get_state
from murmur.node.api import NodeApi, operator_token, start_api
from murmur.node.operator_api import OperatorTokenError, load_operator_token

from tests.netutil import build_node
from tests.test_wire import resign

TOKEN = "t0k3n-" + "x" * 40


@asynccontextmanager
async def running(
    tmp_path: Path, nodes: int = 2, **sections: dict[str, Any]
) -> AsyncIterator[tuple[Any, NodeApi]]:
    node = build_node(tmp_path, nodes, **sections)
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
    code, _, reply = await post_full(url, body, headers, source)
    return code, reply


async def post_full(
    url: str, body: bytes, headers: dict[str, str] | None = None, source: str | None = None
) -> tuple[int, dict[str, str], Any]:
    connector = aiohttp.TCPConnector(local_addr=(source, 0)) if source else None
    async with (
        aiohttp.ClientSession(connector=connector) as session,
        session.post(
            url, data=body, headers=headers or {}, timeout=aiohttp.ClientTimeout(total=10)
        ) as r,
    ):
        return r.status, dict(r.headers), await r.json()


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
# ---------------------------------------------------------------------------- what peers get


def _template() -> dict[str, np.ndarray]:
    from murmur.models.nets import build_model

    return get_state(build_model("logreg", (30,), 0))


def peer_identity(tmp_path: Path, index: int = 1) -> Identity:
    """hospital_INDEX's key, an admitted peer of the node under test (hospital_0)."""
    return load_identity(tmp_path / "keys" / f"hospital_{index}.key")


def auth_for(
    node: Any, sender: Identity, body: bytes, path: str = "/gossip", **kwargs: Any
) -> dict[str, str]:
    """What gossip/transport.py sends: Content-Type and the signed Murmur-Auth header."""
    return request_headers(
        sender, node.identity.public_key, path, body, "application/x-murmur-envelope", **kwargs
    )


def auth_line(node: Any, sender: Identity, body: bytes, **kwargs: Any) -> bytes:
    """The Murmur-Auth header as a raw request line, for tests that write raw HTTP."""
    value = auth_for(node, sender, body, **kwargs)[AUTH_HEADER]
    return f"{AUTH_HEADER}: {value}\r\n".encode()


async def test_replies_to_peers_carry_the_reason_code_only(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    async with running(tmp_path) as (node, api):
        me = node.identity.public_key
        url = api.peer.address + "/gossip"
        mallory = generate_identity("mallory")
        outsider = build_envelope(ModelUpdate(_template()), mallory, [me], 1)
        code, reply = await post(url, outsider, auth_for(node, mallory, outsider))
        # Not "unknown_sender", and certainly not "sender key 1a2b... is not on the allowlist".
        assert (code, reply) == (401, {"reason": "unauthenticated"})
        peer = peer_identity(tmp_path)
        stale = build_envelope(ModelUpdate(_template()), peer, [me], 1, now=time.time() - 3600)
        code, reply = await post(url, stale, auth_for(node, peer, stale, now=time.time() - 3600))
        # Not "timestamp is -3600 s from this node's clock".
        assert (code, reply) == (401, {"reason": "unauthenticated"})
        # An admitted peer, authenticated, is told precisely what is wrong with its envelope.
        code, reply = await post(url, stale, auth_for(node, peer, stale))
        assert (code, reply) == (400, {"reason": "stale"})
        # The details stay in the node's own log and counters.
        logged = caplog.text
        assert "is not on the allowlist" in logged and "from this node's clock" in logged
        assert node.state.unauthenticated == {"unknown_sender": 1, "stale": 1}
        assert node.rejected["unauthenticated"] == 2 and node.rejected["stale"] == 1


async def test_every_unauthenticated_post_is_refused_401_with_one_code(tmp_path: Path) -> None:
    """Issue #25 items 4 and 9: whatever is wrong with a request's Murmur-Auth, the answer is
    `401 unauthenticated` and nothing else; the node counts the precise reason."""
    async with running(tmp_path, nodes=3) as (node, api):
        url = api.peer.address + "/gossip"
        peer = peer_identity(tmp_path)
        body = b"an envelope would be here"
        good = auth_for(node, peer, body)
        replayed = dict(good)
        assert await post(url, body, good) == (400, {"reason": "malformed"})  # authenticated
        header = good[AUTH_HEADER]
        flipped = header[:-8] + ("A" if header[-8] != "A" else "B") + header[-7:]
        to_other = request_headers(
            peer, peer_identity(tmp_path, 2).public_key, "/gossip", body, "x"
        )
        cases = {
            "missing": {},
            "malformed": {AUTH_HEADER: "not base64 at all"},
            "bad_signature": {AUTH_HEADER: flipped},
            "wrong_recipient": to_other,
            "unknown_sender": auth_for(node, generate_identity("mallory"), body),
            "stale": auth_for(node, peer, body, now=time.time() + 400),
            "replay": replayed,
            "length_mismatch": auth_for(node, peer, body + b"!"),
        }
        for why, headers in cases.items():
            code, headers_back, reply = await post_full(url, body, headers)
            assert (code, reply) == (401, {"reason": "unauthenticated"}), why
            assert headers_back["WWW-Authenticate"] == AUTH_HEADER
        # A header made for another path does not authenticate this one either.
        for_receipts = auth_for(node, peer, body, path="/receipts")
        assert (await post(url, body, for_receipts))[0] == 401
    assert node.state.unauthenticated == {**dict.fromkeys(cases, 1), "bad_signature": 2}
    assert node.rejected["unauthenticated"] == len(cases) + 1


async def test_an_insider_re_signing_another_peers_envelope_over_http_is_refused(
    tmp_path: Path,
) -> None:
    """Issue #25 item 1, the reviewer's attack exactly: hospital_2 (admitted) captures
    hospital_1's envelope to this node off the wire, puts its own key in the sender field,
    signs it, and posts it with a valid request signature of its own. Before v4 the node took
    hospital_1's model as hospital_2's. Now: 400 decrypt_failed, counted and audited under
    hospital_2, and hospital_1's genuine envelope is still accepted."""
    async with running(tmp_path, nodes=3) as (node, api):
        url = api.peer.address + "/gossip"
        victim, insider = peer_identity(tmp_path, 1), peer_identity(tmp_path, 2)
        genuine = build_envelope(ModelUpdate(_template()), victim, [node.identity.public_key], 1)
        stolen = resign(genuine, signer=insider, sender=insider.public_key)
        assert await post(url, stolen, auth_for(node, insider, stolen)) == (
            400,
            {"reason": "decrypt_failed"},
        )
        assert node.rejected["decrypt_failed"] == 1
        record = node.audit.last(1)[0]
        assert record.kind == "message_received" and record.fields["sender"] == "hospital_2"
        assert record.fields["reason"] == "decrypt_failed" and not record.fields["accepted"]
        # Posting the genuine envelope under its own name is not possible either.
        assert await post(url, genuine, auth_for(node, insider, genuine)) == (
            403,
            {"reason": "sender_mismatch"},
        )
        assert await post(url, genuine, auth_for(node, victim, genuine)) == (
            202,
            {"reason": "accepted"},
        )
        assert node.state.peers["hospital_2"]["last_round"] == 0  # it never passed as a sender


async def test_a_body_that_is_not_the_signed_one_is_refused(tmp_path: Path) -> None:
    async with running(tmp_path) as (node, api):
        url = api.peer.address + "/gossip"
        peer = peer_identity(tmp_path)
        signed_for = b"A" * 100
        code, reply = await post(url, b"B" * 100, auth_for(node, peer, signed_for))
        assert (code, reply) == (400, {"reason": "body_mismatch"})
        assert node.rejected["body_mismatch"] == 1


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


async def test_expect_100_continue_is_refused_from_the_headers_before_the_body(
    tmp_path: Path,
) -> None:
    async with running(tmp_path) as (node, api):
        peer = peer_identity(tmp_path)
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
        # Within the limit, but without a request signature (or with a bad one): refused from
        # the headers too, never invited.
        small = head.replace(b"1000000000", b"16")
        bad = auth_line(node, generate_identity("mallory"), b"0123456789abcdef")
        for extra in (b"", bad):
            received, _ = await raw_exchange(api.peer.port, small[:-2] + extra + b"\r\n", 2)
            assert received.startswith(b"HTTP/1.1 401 ") and b"100 Continue" not in received
            assert received.endswith(b'{"reason": "unauthenticated"}')
        # Signed by an admitted peer: invited (then refused for what it is).
        body = b"0123456789abcdef"
        reader, writer = await asyncio.open_connection("127.0.0.1", api.peer.port)
        try:
            writer.write(small[:-2] + auth_line(node, peer, body) + b"\r\n")
            async with asyncio.timeout(5):
                assert await reader.readuntil(b"\r\n\r\n") == b"HTTP/1.1 100 Continue\r\n\r\n"
                writer.write(body)
                answer = await reader.read(4096)
        finally:
            writer.close()
        assert answer.startswith(b"HTTP/1.1 400 ") and answer.endswith(b'{"reason": "malformed"}')
        assert node.state.unauthenticated == {"missing": 1, "unknown_sender": 1}


async def test_a_16_mb_stranger_is_refused_without_reading_its_body(tmp_path: Path) -> None:
    """Issue #25 item 4: a large POST without a valid Murmur-Auth is answered 401 at once and
    the connection closed after at most LINGER_BYTES more: the sender cannot push its 16 MB
    through (a node that read it all would let the whole upload complete)."""
    async with running(tmp_path, gossip={"max_message_bytes": 32 * 2**20}) as (node, api):
        size = 16 * 2**20
        head = b"POST /gossip HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: %d\r\n\r\n" % size
        reader, writer = await asyncio.open_connection("127.0.0.1", api.peer.port)
        sent = 0

        async def upload() -> None:
            nonlocal sent
            writer.write(head)
            chunk = b"\x00" * 2**20
            with contextlib.suppress(ConnectionError):
                for _ in range(size // len(chunk)):
                    writer.write(chunk)
                    await writer.drain()
                    sent += len(chunk)

        try:
            async with asyncio.timeout(20):
                uploading = asyncio.create_task(upload())
                answer = await reader.readuntil(b"}")  # read while sending, as aiohttp does
                await uploading
        finally:
            writer.close()
        assert sent < size, "the node read the whole unauthenticated body"
        assert answer.startswith(b"HTTP/1.1 401 ") and b'{"reason": "unauthenticated"}' in answer
        assert node.rejected["unauthenticated"] == 1


async def test_a_connection_reads_little_until_a_request_on_it_is_authenticated(
    tmp_path: Path,
) -> None:
    """Issue #25 item 4: a peer-listener connection reads at most FIRST_READ_BYTES at a time
    until a request on it authenticates, so a stranger's body is not pulled in with its
    headers (and the TCP window not opened for more of it); an authenticated peer's
    connection reads at asyncio's usual size for the rest of its life."""
    from murmur.node.listener import FIRST_READ_BYTES

    async with running(tmp_path) as (node, api):
        peer = peer_identity(tmp_path)
        body = b"x" * 1000
        head = b"POST /gossip HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 1000\r\n"
        stranger = await asyncio.open_connection("127.0.0.1", api.peer.port)
        member = await asyncio.open_connection("127.0.0.1", api.peer.port)
        try:
            stranger[1].write(head)  # headers not finished: nothing decided yet
            member[1].write(head + auth_line(node, peer, body) + b"\r\n" + body)
            async with asyncio.timeout(5):
                answer = await member[0].readuntil(b"}")
            assert b'{"reason": "malformed"}' in answer  # authenticated, read, then opened
            sizes = sorted(
                h.transport.max_size  # type: ignore[union-attr]
                for h in api.peer._runner.server.connections  # type: ignore[union-attr]
            )
            assert sizes == [FIRST_READ_BYTES, 256 * 1024]
            assert FIRST_READ_BYTES < 256 * 1024
        finally:
            for _, writer in (stranger, member):
                writer.close()


async def test_a_chunked_body_is_refused_before_it_is_read(tmp_path: Path) -> None:
    """A request signature states the exact body length, which must be the Content-Length:
    a chunked body (no length) is refused from the headers, before a chunk is read."""
    async with running(tmp_path) as (node, api):
        chunk = b"4000\r\n" + b"a" * 0x4000 + b"\r\n"
        body = b"a" * 0x4000
        head = b"POST /gossip HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n"
        signed = auth_line(node, peer_identity(tmp_path), body)
        received, closed = await raw_exchange(api.peer.port, head + signed + b"\r\n" + chunk)
        assert received.startswith(b"HTTP/1.1 401 ") and closed, received
        assert received.endswith(b'{"reason": "unauthenticated"}')
        assert node.state.unauthenticated == {"length_mismatch": 1}


async def test_a_trickling_upload_is_cut_at_the_body_timeout(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    async with running(tmp_path, peer_listener={"body_timeout_s": 1.0}) as (node, api):
        reader, writer = await asyncio.open_connection("127.0.0.1", api.peer.port)
        signed = auth_line(node, peer_identity(tmp_path), b"x" * 1000)
        writer.write(
            b"POST /gossip HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 1000\r\n"
            + signed
            + b"\r\n"
        )

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


async def start_upload(node: Any, sender: Identity, source: str, port: int) -> Connection:
    """An authenticated upload of 100 bytes of which only 2 are sent: it holds its slots."""
    connection = await connect_from(source, port)
    connection[1].write(
        b"POST /gossip HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100\r\n"
        + auth_line(node, sender, b"a" * 100)
        + b"\r\nab"
    )
    await connection[1].drain()
    return connection


async def test_the_per_address_caps_hold(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    limits = {"max_connections": 10, "max_connections_per_address": 2, "max_uploads_per_address": 1}
    async with running(tmp_path, peer_listener=limits) as (node, api):
        port = api.peer.port
        peer = peer_identity(tmp_path)
        # One upload in progress from 127.0.0.1 (its body is not finished)...
        _, upload = await start_upload(node, peer, "127.0.0.1", port)
        await asyncio.sleep(0.2)
        # ...so a second one from the same address is refused before its body is read,
        code, reply = await post(
            api.peer.address + "/gossip", b"junk", auth_for(node, peer, b"junk")
        )
        assert (code, reply) == (429, {"reason": "too_many_uploads"})
        # and one from another address is not.
        url = f"http://127.0.0.1:{port}/gossip"
        code, reply = await post(url, b"junk", auth_for(node, peer, b"junk"), source="127.0.0.2")
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
        assert (code, reply) == (401, {"reason": "unauthenticated"})
        assert node.rejected["aborted_upload"] == 1  # the first upload, when it hung up
        assert node.rejected["too_many_connections"] == 1
    no_traceback_logged(caplog)


async def test_an_authenticated_peer_has_few_bodies_in_flight_and_a_bounded_rate(
    tmp_path: Path,
) -> None:
    """Issue #25 item 4: after authentication, per peer: at most `peer_max_bodies` requests
    at once (from any addresses) and a token bucket of requests (`peer_burst`, refilled per
    round and per second), each refusal typed and counted."""
    limits = {"peer_max_bodies": 2, "peer_burst": 4, "peer_requests_per_s": 0}
    async with running(tmp_path, peer_listener=limits) as (node, api):
        port = api.peer.port
        peer = peer_identity(tmp_path)
        url = f"http://127.0.0.1:{port}/gossip"
        held = [await start_upload(node, peer, f"127.0.0.{i}", port) for i in (2, 3)]
        await asyncio.sleep(0.2)
        code, reply = await post(url, b"junk", auth_for(node, peer, b"junk"), source="127.0.0.4")
        assert (code, reply) == (429, {"reason": "too_many_peer_uploads"})
        for _, writer in held:
            writer.close()
        await asyncio.sleep(0.3)
        # Two of the four tokens went to the held uploads (a busy refusal spends none).
        for source in ("127.0.0.5", "127.0.0.6"):
            code, reply = await post(url, b"junk", auth_for(node, peer, b"junk"), source=source)
            assert (code, reply) == (400, {"reason": "malformed"})
        code, reply = await post(url, b"junk", auth_for(node, peer, b"junk"), source="127.0.0.6")
        assert (code, reply) == (429, {"reason": "peer_rate_limited"})
        # Each round this node advances gives the peer peer_requests_per_round (4) more.
        node.inbox.advance_to(node.inbox.current_round + 1)
        code, reply = await post(url, b"junk", auth_for(node, peer, b"junk"), source="127.0.0.7")
        assert (code, reply) == (400, {"reason": "malformed"})
        assert node.rejected["too_many_peer_uploads"] == 1
        assert node.rejected["peer_rate_limited"] == 1


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
                    assert r.status == 401
        elapsed = time.monotonic() - started
        assert node.audit.counts_by_kind() == before  # nothing per junk request
        node.summarise_rejections(1)
        after = node.audit.counts_by_kind()
        assert after.pop("rejections") == 1
        assert after == before
        record = node.audit.last(1)[0]
        assert record.kind == "rejections" and record.round == 1
        assert record.fields["reasons"] == {"unauthenticated": 1000}
        assert record.fields["total"] == 1000
        assert record.fields["top_sources"] == [{"source": "127.0.0.1", "count": 1000}]
        node.summarise_rejections(2)  # nothing new: no record
        assert node.audit.counts_by_kind()["rejections"] == 1
        assert node.rejected["unauthenticated"] == 1000
    lines = [r for r in caplog.records if "rejected message" in r.getMessage()]
    # One line per reason per 10 s interval (the last says how many it held back).
    assert 1 <= len(lines) <= 2 + elapsed / 10, len(lines)
    no_traceback_logged(caplog)


async def test_an_authenticated_rejection_is_still_audited_one_record_each(tmp_path: Path) -> None:
    async with running(tmp_path) as (node, api):
        me = node.identity.public_key
        peer = peer_identity(tmp_path)
        first = build_envelope(ModelUpdate(_template()), peer, [me], 1)
        second = build_envelope(ModelUpdate(_template()), peer, [me], 1)
        url = api.peer.address + "/gossip"
        assert await post(url, first, auth_for(node, peer, first)) == (202, {"reason": "accepted"})
        assert await post(url, second, auth_for(node, peer, second)) == (
            409,
            {"reason": "duplicate"},
        )
        record = node.audit.last(1)[0]
        assert record.kind == "message_received"
        assert record.fields["sender"] == "hospital_1"
        assert record.fields["accepted"] is False and record.fields["reason"] == "duplicate"


async def test_a_transport_with_a_skewed_clock_says_so_loudly(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Issue #25 item 9: a node whose clock is beyond the window has every request refused as
    `unauthenticated`; its transport measures the skew from the peer's HTTP Date and logs an
    ERROR naming it, once per interval however many sends fail."""
    caplog.set_level(logging.WARNING, logger="murmur.transport")
    async with running(tmp_path) as (node, api):
        me = Peer("hospital_0", api.peer.address, node.identity.public_key)
        sender = peer_identity(tmp_path)
        envelope = build_envelope(ModelUpdate(_template()), sender, [me.public_key], 1)
        ahead = 600.0
        async with PeerTransport(
            identity=sender, send_timeout_s=10, clock=lambda: time.time() + ahead
        ) as transport:
            results = [await transport.send(me, envelope) for _ in range(3)]
        assert [(r.status, r.reason) for r in results] == [(401, "unauthenticated")] * 3
        assert abs(transport.clock.skews["hospital_0"] + ahead) < 3
    errors = [r for r in caplog.records if "CLOCK SKEW" in r.getMessage()]
    assert len(errors) == 1 and errors[0].levelno == logging.ERROR
    assert "-600 s" in errors[0].getMessage() or "-599 s" in errors[0].getMessage()
    assert node.state.unauthenticated == {"stale": 3}


async def test_a_replay_across_a_restart_delivers_the_one_signed_update_once(
    tmp_path: Path,
) -> None:
    """Issue #25 item 9, the argument of docs/protocol.md "Why it is saved only with the
    checkpoint": a node that crashed after accepting an envelope (no checkpoint since) forgets
    it, and the captured request played to it again after the restart is the sender's one
    signed update for the round, taken once, into an inbox that had lost it; a second copy is
    refused, nobody is accused of equivocating, and an old capture is stale."""
    from murmur.node.node import HospitalNode

    node = build_node(tmp_path)
    api = await start_api(node, None)
    peer = peer_identity(tmp_path)
    envelope = build_envelope(ModelUpdate(_template()), peer, [node.identity.public_key], 1)
    captured = auth_for(node, peer, envelope)  # an eavesdropper records header and body
    old_capture = auth_for(node, peer, envelope, now=time.time() - 301)
    try:
        assert await post(api.peer.address + "/gossip", envelope, captured) == (
            202,
            {"reason": "accepted"},
        )
    finally:
        await api.close()
        node.audit.close()  # killed: no checkpoint after it
    restarted = HospitalNode(node.config)
    api = await start_api(restarted, None)
    try:
        url = api.peer.address + "/gossip"
        assert restarted.next_round == 1 and restarted.replay.to_state()["senders"] == {}
        assert await post(url, envelope, captured) == (202, {"reason": "accepted"})
        assert await post(url, envelope, captured) == (401, {"reason": "unauthenticated"})
        fresh = auth_for(restarted, peer, envelope)  # the sender itself posting it again
        assert await post(url, envelope, fresh) == (409, {"reason": "replay"})
        assert await post(url, envelope, old_capture) == (401, {"reason": "unauthenticated"})
        assert restarted.state.unauthenticated == {"replay": 1, "stale": 1}
        collected = await restarted.inbox.collect(1, ["hospital_1"], 0.1, restarted.stop)
        assert list(collected.messages) == ["hospital_1"]  # one update, the signed one
        assert collected.messages["hospital_1"].envelope.receipt.verify()
        assert restarted.trust.proven() == {}  # the same signed digest: no equivocation
    finally:
        await api.close()
        restarted.audit.close()


async def test_the_refusal_benchmark_measures_a_cheap_refusal(tmp_path: Path) -> None:
    """bench/wire.py --refusal (issue #25 item 4): refusing a 16 MB stranger costs the event
    loop about a millisecond (protocol v3: 29-38 ms here), every answer a 401."""
    from bench.wire import refusal_cpu

    measured = await asyncio.to_thread(refusal_cpu, 16 * 2**20, 3)
    assert measured["answers"] == ["HTTP/1.1 401 Unauthorized"]
    for key in ("missing", "bad", "missing_expect", "bad_expect"):
        assert 0 < measured[key] < 8.0, (key, measured)


async def test_a_new_peer_route_gets_authentication_and_the_limits_from_add_peer_route(
    tmp_path: Path,
) -> None:
    """The helper every peer route that takes a body uses (/gossip, /receipts, /probe):
    `add_peer_route` gives it the request authentication, before the body, with its own body
    limit, and the handler learns the authenticated sender from `authenticated_peer`."""
    from aiohttp.test_utils import TestClient, TestServer
    from murmur.node.api import add_peer_route, authenticated_peer, build_peer_app, read_peer_body

    node = build_node(tmp_path)
    seen: list[tuple[str, bytes]] = []

    async def example(request: web.Request) -> web.Response:
        body = await read_peer_body(request)
        if isinstance(body, web.Response):
            return body
        seen.append((authenticated_peer(request).name, body))
        return web.json_response({"reason": "accepted"})

    async def careless(request: web.Request) -> web.Response:
        seen.append(("careless", b""))  # a handler that never calls read_peer_body
        return web.json_response({"reason": "accepted"})

    app = build_peer_app(node)
    add_peer_route(app, "/example", example, 100)
    add_peer_route(app, "/careless", careless, 100)
    peer = peer_identity(tmp_path)
    try:
        async with TestClient(TestServer(app)) as client:
            body = b"p" * 100

            async def answer(data: bytes, headers: dict[str, str]) -> tuple[int, str]:
                response = await client.post("/example", data=data, headers=headers)
                return response.status, (await response.json())["reason"]

            assert await answer(body, {}) == (401, "unauthenticated")
            assert await answer(body, auth_for(node, peer, body)) == (401, "unauthenticated")
            signed = auth_for(node, peer, body, path="/example")
            assert await answer(body, signed) == (200, "accepted")
            longer = body + b"p"
            assert await answer(longer, auth_for(node, peer, longer, path="/example")) == (
                413,
                "too_large",
            )
            # Authentication is the route's, not the handler's: it runs before any handler.
            response = await client.post("/careless", data=body)
            assert response.status == 401
        assert seen == [("hospital_1", body)]
        assert node.state.unauthenticated == {"missing": 2, "bad_signature": 1}
    finally:
        node.audit.close()


async def test_a_probe_is_authenticated_like_every_post(tmp_path: Path) -> None:
    """POST /probe (gossip/probe.py): a stranger's probe is `401 unauthenticated` before it is
    read; an admitted peer's is `200 admitted`; a peer posting another's probe is refused."""
    from murmur.gossip.probe import PROBE_CONTENT_TYPE, build_probe

    async with running(tmp_path, nodes=3) as (node, api):
        url = api.peer.address + "/probe"
        me = node.identity.public_key
        one, two = peer_identity(tmp_path, 1), peer_identity(tmp_path, 2)
        mallory = generate_identity("mallory")

        def signed(sender: Identity, body: bytes) -> dict[str, str]:
            return request_headers(sender, me, "/probe", body, PROBE_CONTENT_TYPE)

        probe = build_probe(one, me)
        assert await post(url, probe) == (401, {"reason": "unauthenticated"})
        strangers = build_probe(mallory, me)
        assert await post(url, strangers, signed(mallory, strangers)) == (
            401,
            {"reason": "unauthenticated"},
        )
        assert await post(url, probe, signed(one, probe)) == (200, {"reason": "admitted"})
        assert await post(url, probe, signed(two, probe)) == (403, {"reason": "sender_mismatch"})
        assert node.state.unauthenticated == {"missing": 1, "unknown_sender": 1}
