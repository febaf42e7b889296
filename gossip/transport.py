"""Sending envelopes to peers over HTTP, with a timeout on every wait.

One aiohttp ClientSession per node keeps connections to neighbours alive across rounds, so a
round costs one request per neighbour and no TCP handshakes. A failed or slow send is reported,
never raised: a dead neighbour must not stop a node.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import aiohttp

from crypto.allowlist import Peer
from gossip.heads import REQUEST_CONTENT_TYPE


@dataclass(frozen=True)
class SendResult:
    peer: str
    ok: bool
    status: int | None  # HTTP status, None when no answer came
    reason: str  # "accepted", the receiver's reason code, or the local failure
    seconds: float


class PeerTransport:
    """The node's HTTP client for its neighbours."""

    def __init__(self, *, send_timeout_s: float) -> None:
        self.send_timeout_s = send_timeout_s
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> PeerTransport:
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=64, keepalive_timeout=60),
            timeout=aiohttp.ClientTimeout(total=self.send_timeout_s),
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("PeerTransport used outside 'async with'")
        return self._session

    async def send(self, peer: Peer, envelope: bytes) -> SendResult:
        """POST one envelope to a peer's /gossip; never raises for network trouble."""
        start = time.monotonic()
        try:
            async with self.session.post(
                f"{peer.address.rstrip('/')}/gossip",
                data=envelope,
                headers={"Content-Type": "application/x-murmur-envelope"},
            ) as response:
                body = await response.json(content_type=None)
                reason = (
                    str(body.get("reason", "accepted")) if isinstance(body, dict) else "accepted"
                )
                ok = response.status == 202
                return SendResult(peer.name, ok, response.status, reason, time.monotonic() - start)
        except TimeoutError:
            return SendResult(peer.name, False, None, "timeout", time.monotonic() - start)
        except (aiohttp.ClientError, OSError, ValueError) as exc:
            return SendResult(
                peer.name,
                False,
                None,
                f"unreachable: {type(exc).__name__}",
                time.monotonic() - start,
            )

    async def send_all(self, peers: list[Peer], envelope: bytes) -> list[SendResult]:
        """Send the same envelope to every peer concurrently."""
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(self.send(peer, envelope)) for peer in peers]
        return [t.result() for t in tasks]

    async def request_receipts(
        self, peer: Peer, request: bytes, max_bytes: int
    ) -> tuple[int | None, bytes]:
        """POST a receipts request to a peer's /receipts (gossip/heads.py): (HTTP status, at
        most ``max_bytes + 1`` bytes of the answer), or (None, b"") when no answer came within
        ``send_timeout_s``. Never raises for network trouble."""
        try:
            async with self.session.post(
                f"{peer.address.rstrip('/')}/receipts",
                data=request,
                headers={"Content-Type": REQUEST_CONTENT_TYPE},
            ) as response:
                data = b""
                while len(data) <= max_bytes:  # one read(n) may return fewer bytes
                    chunk = await response.content.read(max_bytes + 1 - len(data))
                    if not chunk:
                        break
                    data += chunk
                return response.status, data
        except (TimeoutError, aiohttp.ClientError, OSError, ValueError):
            return None, b""

    async def is_up(self, peer: Peer) -> bool:
        """Whether a peer answers /health right now (one short request)."""
        try:
            async with self.session.get(
                f"{peer.address.rstrip('/')}/health", timeout=aiohttp.ClientTimeout(total=1.0)
            ) as response:
                return response.status == 200
        except (TimeoutError, aiohttp.ClientError, OSError):
            return False
