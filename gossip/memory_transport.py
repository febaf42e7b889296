"""An in-memory transport: envelopes handed to the receiving node object by a direct call.

For simulation and tests, where many nodes run in one process (bench/byzantine.py's
in-process engine, tests that look inside nodes). It has the shape of every other transport
(`gossip.transport.Transport`), so the round loop, the receiver, the crypto and the audit
log run exactly as over HTTP; what it skips is the HTTP listener itself (node/api.py), whose
two checks before a body reaches the receiver it repeats: the size cap and that the request's
signer is admitted. Deployment never uses it: a hospital's peers are other processes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any, Protocol

from murmur.crypto.allowlist import Allowlist, Peer
from murmur.crypto.identity import Identity
from murmur.gossip.probe import Contact
from murmur.gossip.transport import SendResult
from murmur.gossip.wire import HTTP_STATUS, RejectReason, WireLimits
from murmur.node.audit import AuditError


class ReceivingNode(Protocol):
    """What a node offers its listener (node/served.py's `ServedNode` has all of it)."""

    limits: WireLimits
    allowlist: Allowlist

    async def receive(
        self, body: bytes, source: str | None = None, sender: Peer | None = None
    ) -> tuple[int, str, str]: ...

    def answer_probe(self, body: bytes, sender: bytes | None = None) -> tuple[int, str]: ...

    def answer_receipts_request(
        self, body: bytes, sender: bytes | None = None
    ) -> tuple[int, str, bytes]: ...

    def record_rejection(self, reason: str, detail: str, **where: Any) -> None: ...

    async def answer_consensus(self, body: bytes, sender: Peer) -> tuple[int, str]: ...


class MemoryTransport:
    """Delivers one node's envelopes by calling the receiving node's handler directly (no
    HTTP).

    It does what node/api.py does with a POST body: refuse it as too_large past the receiver's
    limit, refuse a request signer the receiver does not admit as unauthenticated (an
    outsider's envelope in the adversary mode), else hand the bytes to
    ``HospitalNode.receive`` as sent by the signer, whom a real listener would have
    authenticated.
    """

    def __init__(self, nodes_by_address: Mapping[str, ReceivingNode], identity: Identity) -> None:
        self.nodes = nodes_by_address
        self.identity = identity

    async def send(self, peer: Peer, envelope: bytes, signer: Identity | None = None) -> SendResult:
        node = self.nodes[peer.address]
        limit = node.limits.max_message_bytes
        if len(envelope) > limit:
            detail = f"{len(envelope)} bytes > limit {limit}"
            node.record_rejection("too_large", detail, sender=None, round_=None)
            return SendResult(
                peer.name, False, HTTP_STATUS[RejectReason.TOO_LARGE], "too_large", 0.0
            )
        sender = node.allowlist.by_key((signer or self.identity).public_key)
        if sender is None:
            node.record_rejection(
                "unauthenticated", "not admitted", sender=None, round_=None, why="unknown_sender"
            )
            return SendResult(peer.name, False, 401, "unauthenticated", 0.0)
        try:
            status, reason, _ = await node.receive(envelope, sender=sender)
        except AuditError:
            # The receiver stopped (its audit log closed) while this delivery was in flight,
            # as a test's crashed node does: to the sender that is a dropped connection.
            return SendResult(peer.name, False, None, "unreachable: receiver stopped", 0.0)
        await asyncio.sleep(0)  # let the receiver's collect() see it, as a real POST would
        return SendResult(peer.name, status == 202, status, reason, 0.0)

    async def send_all(
        self, peers: list[Peer], envelope: bytes, signer: Identity | None = None
    ) -> list[SendResult]:
        return [await self.send(p, envelope, signer) for p in peers]

    async def request_receipts(
        self, peer: Peer, request: bytes, max_bytes: int
    ) -> tuple[int | None, bytes]:
        """What POST /receipts answers (node/rollback.py), or no answer for a missing node."""
        node = self.nodes.get(peer.address)
        if node is None:
            return None, b""
        status, _, payload = node.answer_receipts_request(request, self.identity.public_key)
        return status, payload[: max_bytes + 1]

    async def probe(self, peer: Peer, probe: bytes, timeout_s: float) -> Contact:
        status, reason = self.nodes[peer.address].answer_probe(probe)
        return Contact.from_answer(status, reason, "", source="probe")

    async def post_consensus(self, peer: Peer, body: bytes) -> tuple[int | None, str]:
        """What POST /consensus answers (node/consensus_net.py), or no answer for a missing
        node; the sender is this transport's identity, as its Murmur-Auth would show."""
        node = self.nodes.get(peer.address)
        sender = node.allowlist.by_key(self.identity.public_key) if node is not None else None
        if node is None or sender is None:
            return None, "unreachable"
        return await node.answer_consensus(body, sender)
