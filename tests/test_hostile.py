"""Hostile inputs against the peer listener (issue #25 item 6).

The fast tests here pin down two refusals the hostile-input suite found untyped or uncounted;
one node in this process, real listeners on loopback.
"""

from __future__ import annotations

from pathlib import Path

import aiohttp

from tests.test_http import get, raw_exchange, running


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
