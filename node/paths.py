"""How this node reaches its peers and how they reach it: the transports it opens for a run.

One function, ``open_transport``, builds them from the config: HTTP(S) for peers with an
address (client TLS from node/tls.py), a NATS connection per `[[relays]]` entry
(gossip/relay.py) that also delivers what peers send this node through that relay, and the
``RoutedTransport`` (gossip/routing.py) the round loop sees. Everything is closed when the
`async with` ends. Meanwhile the node's signed peer record and those it holds are sent
to every neighbour (node/records.py), and sends follow the newest records (gossip/routing.py).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from murmur.gossip.routing import RoutedTransport
from murmur.gossip.transport import PeerTransport
from murmur.node.background import running
from murmur.node.governance import exchange_governance
from murmur.node.records import exchange_records
from murmur.node.tls import client_tls

if TYPE_CHECKING:
    from murmur.node.node import HospitalNode


@contextlib.asynccontextmanager
async def open_transport(node: HospitalNode) -> AsyncIterator[RoutedTransport]:
    """The node's transport for one run, with its relay connections up (or reconnecting)."""
    config = node.config
    async with contextlib.AsyncExitStack() as stack:
        direct = await stack.enter_async_context(
            PeerTransport(
                identity=node.identity,
                send_timeout_s=config.gossip.send_timeout_s,
                timestamp_window_s=config.gossip.timestamp_window_s,
                tls=client_tls(config),
                on_clock=node.clock_report,
            )
        )
        relays = {}
        if config.relays:
            from murmur.node.relay_inbox import open_relays  # imports nats only when used

            relays = await stack.enter_async_context(open_relays(node))
        transport = RoutedTransport(direct, relays, node.record_book)
        stop = asyncio.Event()
        background = [exchange_records(node, transport, stop)]
        if node.governance is not None:
            background.append(exchange_governance(node, transport, stop))
        async with running(*background):
            try:
                yield transport
            finally:
                stop.set()
