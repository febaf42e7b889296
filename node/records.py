"""Peer records on the wire: `POST /records` (HTTP or relay) takes a neighbour's bundle of
signed records (gossip/peer_records.py), and `exchange_records` sends this node's own record
and those it holds to every neighbour, at start and every `RECORD_INTERVAL_S`.

Each record is checked on its own (signature of its owner, allowlisted key, expiry, newer
than the one held); a refused one is counted as `record_<why>` and logged (rate-limited),
and the rest of the bundle is still taken.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from aiohttp import web
from murmur.crypto.allowlist import Peer
from murmur.gossip.peer_records import PeerRecord, RecordError, decode_records, encode_records
from murmur.gossip.transport import RecordsTransport

if TYPE_CHECKING:
    from murmur.node.node import HospitalNode

log = logging.getLogger("murmur.records")

RECORD_INTERVAL_S = 30.0
RECORD_TTL_S = 24 * 3600.0


def answer_records(node: HospitalNode, body: bytes, sender: Peer) -> tuple[int, str]:
    """Offer every record in ``body`` to the node's book: (HTTP status, reason code)."""
    now = time.time()
    try:
        raw = decode_records(body)
    except RecordError as exc:
        node.record_rejection(
            f"record_{exc.why}", str(exc), sender=None, round_=None, source=sender.name
        )
        return 400, f"record_{exc.why}"
    for obj in raw:
        try:
            node.record_book.offer(PeerRecord.from_json(obj), now)
        except RecordError as exc:
            if exc.why != "not_newer":  # the normal case for a record gossiped twice
                node.record_rejection(
                    f"record_{exc.why}", str(exc), sender=None, round_=None, source=sender.name
                )
    return 202, "accepted"


async def records_route(request: web.Request) -> web.Response:
    """`POST /records`, added with node.api.add_peer_route (authenticated, size-capped)."""
    from murmur.node.api import NODE_KEY, authenticated_peer, read_peer_body

    body = await read_peer_body(request)
    if isinstance(body, web.Response):
        return body
    status, reason = answer_records(request.app[NODE_KEY], body, authenticated_peer(request))
    return web.json_response({"reason": reason}, status=status)


def own_record(node: HospitalNode, now: float) -> PeerRecord | None:
    """This node's record: `[node] advertise` addresses and its relays' names (None when it
    has neither: nothing to announce)."""
    config = node.config
    relays = [r.name for r in config.relays]
    if not config.node.advertise and not relays:
        return None
    return PeerRecord.make(node.identity, list(config.node.advertise), relays, now, RECORD_TTL_S)


async def exchange_records(
    node: HospitalNode, transport: RecordsTransport, stop: asyncio.Event
) -> None:
    """Until ``stop``: send the own record and every held one to each neighbour."""
    while not stop.is_set():
        now = time.time()
        records = node.record_book.held(now)
        own = own_record(node, now)
        if own is not None:
            records.append(own)
        if records:
            body = encode_records(records)
            async with asyncio.TaskGroup() as group:
                for peer in node.peers:
                    group.create_task(transport.post_records(peer, body))
        try:
            async with asyncio.timeout(RECORD_INTERVAL_S):
                await stop.wait()
        except TimeoutError:
            pass
