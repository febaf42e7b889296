"""Per-peer choice of path: directly to its address, through its relays, or both.

A peer in the config has an `address` (reached over HTTP(S), gossip/transport.py), `relays`
(reached through NATS brokers, gossip/relay.py), or both. ``RoutedTransport`` has the same
shape as either (``gossip.transport.Transport``), so the round loop does not know which
path an envelope took.

With both, the direct path is tried first; only when it gives no answer at all (the peer's
port is unreachable or timed out) is the same request sent through the relays, each of them
at once. An answer that is a refusal is final: the peer is there and said no, and asking it
again through a relay would only be refused again. Several relays are asked concurrently and
the first answer that admits wins; a copy that arrives through a second relay is dropped by
the receiver's replay guard (each copy carries its own signed nonce, so it is the envelope's
own duplicate check that drops it, counted as `duplicate`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Coroutine, Iterable, Mapping
from typing import Any, TypeVar

from murmur.crypto.allowlist import Peer
from murmur.crypto.identity import Identity
from murmur.gossip.peer_records import RecordBook
from murmur.gossip.probe import Contact, Reach
from murmur.gossip.transport import SendResult, Transport

T = TypeVar("T")


class RoutedTransport:
    """Direct when the peer has an address, else (or when that fails) through its relays."""

    def __init__(
        self,
        direct: Transport | None,
        relays: Mapping[str, Transport],
        book: RecordBook | None = None,
    ) -> None:
        self.direct = direct
        self.relays = dict(relays)
        # Signed peer records (gossip/peer_records.py): where a peer says it is now.
        self.book = book

    def _where(self, peer: Peer) -> Peer:
        return self.book.current(peer, time.time()) if self.book is not None else peer

    def _relays_of(self, peer: Peer) -> list[Transport]:
        return [self.relays[name] for name in peer.relays if name in self.relays]

    async def send(self, peer: Peer, envelope: bytes, signer: Identity | None = None) -> SendResult:
        peer = self._where(peer)
        first: SendResult | None = None
        if peer.address and self.direct is not None:
            first = await self.direct.send(peer, envelope, signer)
            if first.status is not None:
                return first
        relays = self._relays_of(peer)
        if not relays:
            return first or SendResult(peer.name, False, None, "no_route", 0.0)
        results = await _all(r.send(peer, envelope, signer) for r in relays)
        return next((x for x in results if x.ok), None) or _best_failure(results)

    async def send_all(
        self, peers: list[Peer], envelope: bytes, signer: Identity | None = None
    ) -> list[SendResult]:
        return await _all(self.send(peer, envelope, signer) for peer in peers)

    async def request_receipts(
        self, peer: Peer, request: bytes, max_bytes: int
    ) -> tuple[int | None, bytes]:
        peer = self._where(peer)
        if peer.address and self.direct is not None:
            status, body = await self.direct.request_receipts(peer, request, max_bytes)
            if status is not None:
                return status, body
        answers = await _all(
            r.request_receipts(peer, request, max_bytes) for r in self._relays_of(peer)
        )
        return next((a for a in answers if a[0] == 200), None) or next(
            (a for a in answers if a[0] is not None), (None, b"")
        )

    async def probe(self, peer: Peer, probe: bytes, timeout_s: float) -> Contact:
        peer = self._where(peer)
        first: Contact | None = None
        if peer.address and self.direct is not None:
            first = await self.direct.probe(peer, probe, timeout_s)
            if first.reach is not Reach.UNREACHABLE:
                return first
        relays = self._relays_of(peer)
        if not relays:
            return first or Contact.from_answer(None, "no route", "", source="probe")
        contacts = await _all(r.probe(peer, probe, timeout_s) for r in relays)
        return next((c for c in contacts if c.reach is Reach.ADMITTED), None) or next(
            (c for c in contacts if c.reach is not Reach.UNREACHABLE), contacts[0]
        )

    async def post_records(
        self, peer: Peer, body: bytes, path: str = "/records"
    ) -> tuple[int | None, str]:
        peer = self._where(peer)
        if peer.address and self.direct is not None:
            status, reason = await self.direct.post_records(peer, body, path)
            if status is not None:
                return status, reason
        answers = await _all(r.post_records(peer, body, path) for r in self._relays_of(peer))
        return next((a for a in answers if a[0] is not None), (None, "no route"))

    async def post_governance(
        self, peer: Peer, body: bytes, max_bytes: int
    ) -> tuple[int | None, bytes]:
        """Directly when the peer has an address, else (or when that fails) through each of
        its relays; the first answer counts."""
        peer = self._where(peer)
        if peer.address and self.direct is not None:
            status, answer = await self.direct.post_governance(peer, body, max_bytes)
            if status is not None:
                return status, answer
        answers = await _all(
            r.post_governance(peer, body, max_bytes) for r in self._relays_of(peer)
        )
        return next((a for a in answers if a[0] is not None), (None, b""))

    async def post_consensus(self, peer: Peer, body: bytes) -> tuple[int | None, str]:
        """Direct only: the relays do not carry /consensus (docs/release.md)."""
        peer = self._where(peer)
        if not peer.address or self.direct is None:
            return None, "no route"
        return await self.direct.post_consensus(peer, body)


async def _all(calls: Iterable[Coroutine[Any, Any, T]]) -> list[T]:
    """Await every coroutine concurrently, in a TaskGroup (none of them raises)."""
    async with asyncio.TaskGroup() as group:
        tasks = [group.create_task(c) for c in calls]
    return [t.result() for t in tasks]


def _best_failure(results: list[SendResult]) -> SendResult:
    """The most telling failed result: a refusal (the peer answered) before no answer."""
    return next((x for x in results if x.status is not None), results[0])
