"""Requests that peers sent this node through a relay: the peer listener's checks, without
a port.

Why here and not in the broker: the broker is not trusted. Whatever it hands over is checked
as node/api.py checks a POST: the declared size against the path's limit before anything is
buffered, the `Murmur-Auth` header (admitted sender, addressed to this node, fresh, nonce
unused, signature) before a chunk is kept, the sender in the header equal to the sender the
broker's permissions put in the subject, and the whole body's SHA-256 against the signed one.
Only then is it handed to the node (`receive`, `answer_probe`, `answer_receipts_request`),
and the answer goes back to the asker's reply subject.

A request larger than the broker's max payload arrives as chunks (gossip/relay.py, frames),
possibly reordered or duplicated; they are reassembled per (sender, id), a bounded number at
a time per sender, and dropped when incomplete after `ASSEMBLY_TIMEOUT_S` (counted as
`incomplete`). A duplicated request, or a chunk of one already handled, is refused by the
nonce check (`unauthenticated`, why `replay`). One ``RelayInbox`` serves every relay of the
node, so a copy that came through a second relay is caught the same way, and each peer's
requests draw on the same per-peer allowance as on the peer listener (`peer_rate_limited`).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from murmur.crypto.allowlist import Peer
from murmur.gossip.auth import (
    AuthError,
    PeerAllowance,
    PeerLimiter,
    RequestAuth,
    RequestAuthenticator,
)
from murmur.gossip.heads import REQUEST_BYTES
from murmur.gossip.peer_records import MAX_RECORDS_BYTES
from murmur.gossip.probe import PROBE_BYTES
from murmur.gossip.relay import Frame, FrameError, RelayTransport, nkey_of
from murmur.node.background import running
from murmur.node.governance import MAX_GOVERNANCE_BYTES
from murmur.node.studies.approvals import MAX_APPROVALS_BODY_BYTES

if TYPE_CHECKING:
    from murmur.gossip.nats_link import NatsLink
    from murmur.node.node import HospitalNode

log = logging.getLogger("murmur.relay")

ASSEMBLY_TIMEOUT_S = 60.0
MAX_ASSEMBLIES_PER_SENDER = 4
HASH_INLINE_BYTES = 64 * 1024


@dataclass
class _Assembly:
    auth: str
    peer: Peer
    request: RequestAuth
    count: int
    started: float
    chunks: dict[int, bytes] = field(default_factory=dict)


@dataclass(frozen=True)
class Answer:
    status: int
    body: bytes


class RelayInbox:
    """Checks and hands over what relays deliver to one node."""

    def __init__(self, node: HospitalNode, allowance: PeerAllowance | None = None) -> None:
        """``allowance``: each peer's request rate, as on the peer listener (the node's
        `[peer_listener]`); None only for tests of the checks alone."""
        self.node = node
        self.limiter = PeerLimiter(allowance) if allowance is not None else None
        self.authenticator = RequestAuthenticator(
            node.identity.public_key, node.allowlist, node.limits.timestamp_window_s
        )
        self.limits = {
            "/gossip": node.limits.max_message_bytes,
            "/probe": PROBE_BYTES,
            "/receipts": REQUEST_BYTES,
            "/records": MAX_RECORDS_BYTES,
            "/approvals": MAX_APPROVALS_BODY_BYTES,
            "/governance": MAX_GOVERNANCE_BYTES,
        }
        self._tokens = {nkey_of(p.public_key): p for p in node.allowlist}
        self._assemblies: dict[tuple[str, str], _Assembly] = {}

    def _refuse(self, relay: str, reason: str, detail: str, why: str | None = None) -> None:
        self.node.record_rejection(
            reason, detail, sender=None, round_=None, source=f"relay {relay}", why=why
        )

    async def handle(
        self, relay: str, sender_token: str, headers: Mapping[str, str] | None, payload: bytes
    ) -> tuple[str, Answer] | None:
        """One delivered message from the sender the broker names: (message id, answer) once
        a whole request has been handled, None while chunks are missing or when refused."""
        self._expire(relay)
        try:
            frame = Frame.parse(headers, payload)
        except FrameError as exc:
            self._refuse(relay, "bad_frame", str(exc))
            return None
        key = (sender_token, frame.message_id)
        assembly = self._assemblies.get(key)
        if assembly is None:
            assembly = self._start(relay, sender_token, frame)
            if assembly is None:
                return None
        elif frame.auth != assembly.auth or frame.count != assembly.count:
            self._refuse(relay, "bad_frame", "a chunk does not match its request's first chunk")
            return None
        assembly.chunks.setdefault(frame.index, frame.payload)  # a repeated chunk is a no-op
        if len(assembly.chunks) < assembly.count:
            self._assemblies[key] = assembly
            return None
        self._assemblies.pop(key, None)
        body = b"".join(assembly.chunks[i] for i in range(assembly.count))
        if len(body) <= HASH_INLINE_BYTES:
            digest = hashlib.sha256(body).digest()
        else:  # as the peer listener does: hashlib releases the GIL on large buffers
            digest = await asyncio.to_thread(lambda: hashlib.sha256(body).digest())
        if len(body) != assembly.request.body_length or digest != assembly.request.body_sha256:
            self._refuse(
                relay, "body_mismatch", f"the body is not the one {assembly.peer.name} signed for"
            )
            return None
        answer = await self._dispatch(relay, frame.path, body, assembly.peer)
        return frame.message_id, answer

    def _start(self, relay: str, sender_token: str, frame: Frame) -> _Assembly | None:
        """Authenticate a request from its first chunk to arrive, before keeping any."""
        limit = self.limits[frame.path]
        try:
            declared = RequestAuth.decode(frame.auth).body_length
        except AuthError as exc:
            self._refuse(relay, "unauthenticated", exc.detail, why=exc.why.value)
            return None
        if declared > limit:
            self._refuse(relay, "too_large", f"{declared} bytes > limit {limit}")
            return None
        pending = sum(1 for token, _ in self._assemblies if token == sender_token)
        if pending >= MAX_ASSEMBLIES_PER_SENDER:
            self._refuse(relay, "too_many_uploads", f"{pending} chunked requests in progress")
            return None
        try:
            peer, request = self.authenticator.check(frame.auth, frame.path, declared)
        except AuthError as exc:
            self._refuse(relay, "unauthenticated", f"{exc.why}: {exc.detail}", why=exc.why.value)
            return None
        if self._tokens.get(sender_token) is not peer:
            self._refuse(
                relay,
                "unauthenticated",
                f"signed by {peer.name} but published by another relay user",
                why="sender_mismatch",
            )
            return None
        if self.limiter is not None and not self.limiter.take(
            peer.name, time.monotonic(), self.node.current_round
        ):
            self._refuse(relay, "peer_rate_limited", f"{peer.name} is over its request allowance")
            return None
        return _Assembly(frame.auth, peer, request, frame.count, time.monotonic())

    def _expire(self, relay: str) -> None:
        now = time.monotonic()
        for key, assembly in list(self._assemblies.items()):
            if now - assembly.started > ASSEMBLY_TIMEOUT_S:
                del self._assemblies[key]
                self._refuse(
                    relay,
                    "incomplete",
                    f"{assembly.peer.name}'s request had {len(assembly.chunks)} of "
                    f"{assembly.count} chunks after {ASSEMBLY_TIMEOUT_S:g} s",
                )

    async def _dispatch(self, relay: str, path: str, body: bytes, peer: Peer) -> Answer:
        node = self.node
        if path == "/gossip":
            status, reason, _ = await node.receive(body, source=f"relay {relay}", sender=peer)
            return Answer(status, json.dumps({"reason": reason}).encode())
        if path == "/probe":
            status, reason = node.answer_probe(body, peer.public_key)
            return Answer(status, json.dumps({"reason": reason}).encode())
        if path == "/records":
            from murmur.node.records import answer_records

            status, reason = answer_records(node, body, peer)
            return Answer(status, json.dumps({"reason": reason}).encode())
        if path == "/approvals":
            status, reason = node.answer_approvals(body, peer)
            return Answer(status, json.dumps({"reason": reason}).encode())
        if path == "/governance":
            from murmur.node.governance import answer as answer_governance

            status, payload = answer_governance(node, body, peer.name)
            return Answer(status, payload)
        status, _, payload = node.answer_receipts_request(body, peer.public_key)
        return Answer(status, payload)


@contextlib.asynccontextmanager
async def open_relays(node: HospitalNode) -> AsyncIterator[dict[str, RelayTransport]]:
    """Connect to every `[[relays]]` broker (retrying in the background while one is down),
    deliver what comes through them to one ``RelayInbox``, and yield a ``RelayTransport``
    per relay name for sending."""
    from murmur.gossip.nats_link import NatsLink  # nats is imported only by nodes with relays

    config = node.config
    listener = config.peer_listener
    inbox = RelayInbox(
        node,
        PeerAllowance(
            max_bodies=listener.peer_max_bodies,
            burst=listener.peer_burst,
            per_round=listener.peer_requests_per_round,
            per_second=listener.peer_requests_per_s,
        ),
    )
    async with contextlib.AsyncExitStack() as stack:
        links: list[NatsLink] = []
        transports: dict[str, RelayTransport] = {}
        for relay in config.relays:
            link = NatsLink(
                relay.name,
                relay.url,
                node.identity,
                connect_timeout_s=relay.connect_timeout_s,
                ca_file=relay.ca_file,
            )
            transport = RelayTransport(
                relay.name, node.identity, link, config.gossip.send_timeout_s
            )
            links.append(await stack.enter_async_context(link))
            transports[relay.name] = transport
        async with running(*(link.serve(inbox, transports[link.name]) for link in links)):
            try:
                await _first_connection(links, max(r.connect_timeout_s for r in config.relays))
                yield transports
            finally:
                for link in links:
                    link.stop()


async def _first_connection(links: list[NatsLink], timeout_s: float) -> None:
    """Wait (at most ``timeout_s``) until every relay is connected, so that the first
    requests of the run (the rollback check, the first probes) can go through them; a relay
    still down by then is retried in the background and logged by its link."""
    end = time.monotonic() + timeout_s
    while not all(link.connected for link in links) and time.monotonic() < end:
        await asyncio.sleep(0.05)
