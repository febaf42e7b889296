"""`POST /probe`: a neighbour asks whether this node takes its envelopes (gossip/probe.py).

Its own module, so that it moves with the peer-facing routes whatever shape node/api.py takes.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from aiohttp import web

from gossip.probe import PROBE_BYTES

if TYPE_CHECKING:
    from node.node import HospitalNode


def probe_handler(node: HospitalNode) -> Callable[[web.Request], Awaitable[web.Response]]:
    """The aiohttp handler answering probes for `node`; reads at most one probe's bytes."""

    async def probe(request: web.Request) -> web.Response:
        if request.content_length is not None and request.content_length > PROBE_BYTES:
            detail = f"{request.content_length} bytes; a probe is {PROBE_BYTES}"
            return web.json_response({"reason": "too_large", "detail": detail}, status=413)
        body = b""
        while len(body) <= PROBE_BYTES:  # one byte more than a probe is enough to refuse it
            chunk = await request.content.read(PROBE_BYTES + 1 - len(body))
            if not chunk:
                break
            body += chunk
        status, answer = node.answer_probe(body)
        return web.json_response(answer, status=status)

    return probe
