"""Peer records on the wire: `POST /records` (HTTP or relay) takes a neighbour's bundle of
signed records (gossip/peer_records.py), and `exchange_records` sends this node's own record
and those it holds to every neighbour, at start and every `RECORD_INTERVAL_S`.

Each record is checked on its own (signature of its owner, allowlisted key, expiry, newer
than the one held); a refused one is counted as `record_<why>` and logged (rate-limited),
and the rest of the bundle is still taken.

The records held are kept in the state directory (`peer_records.json`, written atomically
after each bundle that changed the book), so a node restarted while a peer has moved still
reaches it where its newest record says, before any neighbour has gossiped it again. The
file is not trusted: at start every record in it is offered to the book like a received
one (owner's signature, allowlist, expiry), so editing it can at most bring back an older
record its owner signed, which the owner's next record replaces.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING

from aiohttp import web
from murmur.crypto.allowlist import Peer
from murmur.gossip.peer_records import (
    PeerRecord,
    RecordBook,
    RecordError,
    decode_records,
    encode_records,
)
from murmur.gossip.transport import RecordsTransport
from murmur.node.durable import atomic_write

if TYPE_CHECKING:
    from murmur.node.node import HospitalNode

log = logging.getLogger("murmur.records")

RECORD_INTERVAL_S = 30.0
RECORD_TTL_S = 24 * 3600.0
RECORDS_FILE = "peer_records.json"


def load_saved_records(book: RecordBook, state_dir: Path) -> int:
    """Offer the records saved in ``state_dir`` to ``book``; how many it took. A missing,
    unreadable or malformed file, or a record that no longer passes, is skipped (logged)."""
    path = state_dir / RECORDS_FILE
    if not path.exists():
        return 0
    try:
        raw = decode_records(path.read_bytes())
    except (OSError, RecordError) as exc:
        log.warning("%s is not a records file (%s): starting without saved records", path, exc)
        return 0
    now, taken = time.time(), 0
    for obj in raw:
        try:
            book.offer(PeerRecord.from_json(obj), now)
            taken += 1
        except RecordError as exc:
            log.info("saved peer record not kept: %s", exc)
    return taken


def save_records(book: RecordBook, state_dir: Path) -> None:
    atomic_write(state_dir / RECORDS_FILE, encode_records(book.held(time.time())))


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
    changed = False
    for obj in raw:
        try:
            node.record_book.offer(PeerRecord.from_json(obj), now)
            changed = True
        except RecordError as exc:
            if exc.why != "not_newer":  # the normal case for a record gossiped twice
                node.record_rejection(
                    f"record_{exc.why}", str(exc), sender=None, round_=None, source=sender.name
                )
    if changed:
        try:
            save_records(node.record_book, node.state_dir)
        except OSError as exc:  # the book in memory still has them; the next bundle retries
            log.warning("could not save peer records: %s", exc)
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
