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
from gossip.probe import PROBE_CONTENT_TYPE, Contact, parse_answer


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

    async def probe(self, peer: Peer, probe: bytes, timeout_s: float) -> Contact:
        """POST a signed probe (gossip/probe.py) to a peer's /probe: does it take our
        envelopes? Never raises for network trouble; reads at most 4 KiB of answer."""
        try:
            async with self.session.post(
                f"{peer.address.rstrip('/')}/probe",
                data=probe,
                headers={"Content-Type": PROBE_CONTENT_TYPE},
                timeout=aiohttp.ClientTimeout(total=timeout_s),
            ) as response:
                text = (await response.content.read(4096)).decode("utf-8", "replace")
                reason, detail = parse_answer(response.status, text)
                return Contact.from_answer(response.status, reason, detail, source="probe")
        except TimeoutError:
            return Contact.from_answer(None, f"no answer in {timeout_s:g} s", "", source="probe")
        except (aiohttp.ClientError, OSError, ValueError) as exc:
            return Contact.from_answer(None, type(exc).__name__, "", source="probe")
