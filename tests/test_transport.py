"""Sending to peers (gossip/transport.py): a reply is read only up to a small bound, a
redirect is never followed, and both are failed sends in the sender's audit record.
Fake peers are aiohttp servers on free loopback ports."""

from __future__ import annotations

import asyncio
import email.utils
import logging
import tracemalloc
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from aiohttp import web
from murmur.crypto.allowlist import Peer
from murmur.crypto.identity import generate_identity
from murmur.gossip.probe import Reach
from murmur.gossip.transport import MAX_REPLY_BYTES, ClockWatch, PeerTransport

from tests.netutil import build_node

TEN_MB = 10 * 1024 * 1024
CHUNK = b"x" * 16384
SENDER = generate_identity("hospital_a")


@asynccontextmanager
async def serve(app: web.Application) -> AsyncIterator[str]:
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{site.port}"
    finally:
        await runner.cleanup()


def sending(**settings: object) -> PeerTransport:
    return PeerTransport(identity=SENDER, send_timeout_s=10, **settings)  # type: ignore[arg-type]


def peer_at(address: str) -> Peer:
    return Peer("hospital_b", address, generate_identity("hospital_b").public_key)


class StreamingPeer:
    """A peer that answers every envelope with 10 MB, in 16 KiB chunks."""

    def __init__(self, declare_length: bool) -> None:
        self.declare_length = declare_length
        self.finished = False
        self.app = web.Application()
        self.app.router.add_post("/gossip", self.gossip)

    async def gossip(self, request: web.Request) -> web.StreamResponse:
        await request.read()
        response = web.StreamResponse(status=202)
        if self.declare_length:
            response.content_length = TEN_MB
        await response.prepare(request)
        try:
            for _ in range(TEN_MB // len(CHUNK)):
                await response.write(CHUNK)
        except (ConnectionError, RuntimeError):
            return response  # the sender hung up: what it should do
        self.finished = True
        return response


@pytest.mark.parametrize("declare_length", [True, False], ids=["content-length", "chunked"])
async def test_a_10_mb_reply_is_a_failed_send_and_is_not_read(declare_length: bool) -> None:
    peer = StreamingPeer(declare_length)
    async with serve(peer.app) as address, sending() as transport:
        tracemalloc.start()
        try:
            result = await transport.send(peer_at(address), b"envelope")
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        await asyncio.sleep(0.2)  # let the peer's handler see the closed connection
    assert (result.ok, result.status, result.reason) == (False, 202, "oversize_reply")
    # Reading the whole reply would have held 10 MB; the bound is 64 KiB.
    assert peak < 2 * 1024 * 1024, peak
    assert not peer.finished  # the sender stopped reading and closed the connection


async def test_a_reply_at_the_bound_is_read() -> None:
    app = web.Application()

    async def gossip(request: web.Request) -> web.Response:
        await request.read()
        padding = " " * (MAX_REPLY_BYTES - len('{"reason": "accepted"}'))
        return web.Response(status=202, text='{"reason": "accepted"}' + padding)

    app.router.add_post("/gossip", gossip)
    async with serve(app) as address, sending() as transport:
        result = await transport.send(peer_at(address), b"envelope")
    assert (result.ok, result.reason) == (True, "accepted")


async def test_free_text_in_a_reply_is_not_taken_as_a_reason() -> None:
    app = web.Application()

    async def gossip(request: web.Request) -> web.Response:
        await request.read()
        return web.json_response({"reason": "see <a href=x>" + "A" * 5000}, status=400)

    app.router.add_post("/gossip", gossip)
    async with serve(app) as address, sending() as transport:
        result = await transport.send(peer_at(address), b"envelope")
    assert (result.ok, result.reason) == (False, "http_400")


class RedirectingPeer:
    """A peer address that answers 307 to an internal URL, which counts what reaches it."""

    def __init__(self, target: str = "") -> None:
        self.target = target
        self.received: list[bytes] = []
        self.app = web.Application()
        self.app.router.add_post("/gossip", self.redirect)
        self.app.router.add_post("/probe", self.redirect)
        self.app.router.add_post("/internal", self.internal)
        self.app.router.add_get("/internal", self.internal)

    async def redirect(self, request: web.Request) -> web.Response:
        raise web.HTTPTemporaryRedirect(self.target)

    async def internal(self, request: web.Request) -> web.Response:
        self.received.append(await request.read())
        return web.json_response({"reason": "accepted"}, status=202)


async def test_a_307_redirect_is_a_failed_send_and_never_followed() -> None:
    internal = RedirectingPeer()
    async with serve(internal.app) as internal_address:
        redirector = RedirectingPeer(f"{internal_address}/internal")
        async with (
            serve(redirector.app) as address,
            sending() as transport,
        ):
            result = await transport.send(peer_at(address), b"envelope")
            asked = await transport.probe(peer_at(address), b"probe", timeout_s=5)
    assert (result.ok, result.status, result.reason) == (False, 307, "redirect")
    assert asked.reach is Reach.REFUSED and asked.detail == "HTTP 307 redirect"  # not followed
    assert internal.received == [] and redirector.received == []


async def test_the_node_audits_redirects_and_oversize_replies_as_failed_sends(
    tmp_path: Path,
) -> None:
    internal = RedirectingPeer()
    streaming = StreamingPeer(declare_length=False)
    node = build_node(tmp_path)
    try:
        async with serve(internal.app) as internal_address, serve(streaming.app) as big:
            redirector = RedirectingPeer(f"{internal_address}/internal")
            async with (
                serve(redirector.app) as moved,
                sending() as transport,
            ):
                peers = [
                    Peer("moved", moved, generate_identity("moved").public_key),
                    Peer("big", big, generate_identity("big").public_key),
                ]
                await node.sender.send(1, transport, peers, b"envelope", "0" * 64)
        record = node.audit.last(1)[0]
        assert record.kind == "update_sent"
        assert record.fields["delivered"] == []
        assert record.fields["failed"] == {"moved": "redirect", "big": "oversize_reply"}
        assert internal.received == []
    finally:
        node.audit.close()


def test_the_clock_watch_tells_skew_from_not_being_admitted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Refused as unauthenticated with the clocks beyond the window: CLOCK SKEW (an error, once
    per interval); within it: the peer does not admit us; accepted but past half the window: a
    warning before anything fails; no usable Date: nothing."""
    caplog.set_level(logging.WARNING, logger="murmur.transport")
    watch = ClockWatch(window_s=300.0)
    now = 1_800_000_000.0
    ahead = email.utils.formatdate(now + 400, usegmt=True)
    for _ in range(3):
        watch.observe("b", ahead, "unauthenticated", now)
    assert [r.levelno for r in caplog.records] == [logging.ERROR]
    assert "CLOCK SKEW" in caplog.text and "+400 s" in caplog.text
    assert watch.skews["b"] == pytest.approx(400.5)
    caplog.clear()
    watch.observe("c", email.utils.formatdate(now + 5, usegmt=True), "unauthenticated", now)
    assert "does not admit this node's key" in caplog.text and "CLOCK SKEW" not in caplog.text
    caplog.clear()
    watch.observe("d", email.utils.formatdate(now - 200, usegmt=True), "accepted", now)
    assert "clock skew: d's clock" in caplog.text and "-200 s" in caplog.text
    caplog.clear()
    watch.observe("e", email.utils.formatdate(now + 10, usegmt=True), "accepted", now)
    for garbage in (None, "", "yesterday", "Mon, 99 Foo 2024 99:99:99"):
        watch.observe("f", garbage, "unauthenticated", now)
    assert caplog.text == "" and "f" not in watch.skews
