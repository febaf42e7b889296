"""Sending envelopes to peers over HTTP, with a timeout on every wait.

One aiohttp ClientSession per node keeps connections to neighbours alive between sends (for
less than the receivers' idle timeout, so it is the sender that closes them). A failed or slow
send is reported, never raised: a dead neighbour must not stop a node.

A peer's reply is a reason code, so it is read with a small bound: a peer (or whatever answers
at its address) that replies with more is a failed send `oversize_reply`, and the rest is never
read. Redirects are never followed: an envelope goes to the address in the allowlist or
nowhere, and a 3xx is a failed send `redirect`.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from dataclasses import dataclass

import aiohttp

from crypto.allowlist import Peer
from gossip.heads import REQUEST_CONTENT_TYPE
from gossip.probe import PROBE_CONTENT_TYPE, Contact, parse_answer

MAX_REPLY_BYTES = 64 * 1024
# Shorter than the receivers' default idle timeout (docs/config.md, [peer_listener]).
KEEPALIVE_S = 10.0
_REASON_CODE = re.compile(r"^[a-z][a-z0-9_]{0,47}$")


@dataclass(frozen=True)
class SendResult:
    peer: str
    ok: bool
    status: int | None  # HTTP status, None when no answer came
    reason: str  # "accepted", the receiver's reason code, or the local failure
    seconds: float


class OversizeReply(Exception):
    """The reply was longer than MAX_REPLY_BYTES (it was not read to the end)."""


class PeerTransport:
    """The node's HTTP client for its neighbours."""

    def __init__(self, *, send_timeout_s: float, max_reply_bytes: int = MAX_REPLY_BYTES) -> None:
        self.send_timeout_s = send_timeout_s
        self.max_reply_bytes = max_reply_bytes
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> PeerTransport:
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=64, keepalive_timeout=KEEPALIVE_S),
            timeout=aiohttp.ClientTimeout(total=self.send_timeout_s),
            # Replies are small JSON: nothing to inflate, and no inflating a peer's bytes.
            auto_decompress=False,
            # No library or Python version for whoever answers at a peer's address.
            headers={"Accept-Encoding": "identity", "User-Agent": "murmur"},
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
                allow_redirects=False,
            ) as response:
                seconds = time.monotonic() - start
                if 300 <= response.status < 400:
                    response.close()
                    return SendResult(peer.name, False, response.status, "redirect", seconds)
                try:
                    body = await self._read_reply(response)
                except OversizeReply:
                    response.close()  # drop the connection rather than read the rest
                    return SendResult(peer.name, False, response.status, "oversize_reply", seconds)
                ok = response.status == 202
                reason = _reason(body, ok, response.status)
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

    async def _read_reply(self, response: aiohttp.ClientResponse) -> bytes:
        """The reply body, read only while it stays within the bound."""
        length = response.content_length
        if length is not None and length > self.max_reply_bytes:
            raise OversizeReply
        body = bytearray()
        while chunk := await response.content.read(self.max_reply_bytes + 1 - len(body)):
            body += chunk
            if len(body) > self.max_reply_bytes:
                raise OversizeReply
        return bytes(body)

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

    async def probe(self, peer: Peer, probe: bytes, timeout_s: float) -> Contact:
        """POST a signed probe (gossip/probe.py) to a peer's /probe: does it take our
        envelopes? Never raises for network trouble; the answer is read within the same
        bound as a send's reply, and a redirect is a refusal, never followed."""
        try:
            async with self.session.post(
                f"{peer.address.rstrip('/')}/probe",
                data=probe,
                headers={"Content-Type": PROBE_CONTENT_TYPE},
                timeout=aiohttp.ClientTimeout(total=timeout_s),
                allow_redirects=False,
            ) as response:
                if 300 <= response.status < 400:
                    response.close()
                    return Contact.from_answer(response.status, "redirect", "", source="probe")
                try:
                    body = await self._read_reply(response)
                except OversizeReply:
                    response.close()
                    return Contact.from_answer(
                        response.status, "oversize_reply", "", source="probe"
                    )
                text = body.decode("utf-8", "replace")
                reason, detail = parse_answer(response.status, text)
                return Contact.from_answer(response.status, reason, detail, source="probe")
        except TimeoutError:
            return Contact.from_answer(None, f"no answer in {timeout_s:g} s", "", source="probe")
        except (aiohttp.ClientError, OSError, ValueError) as exc:
            return Contact.from_answer(None, type(exc).__name__, "", source="probe")


def _reason(body: bytes, ok: bool, status: int) -> str:
    """The receiver's reason code from its reply, if it is one; never free text from a peer
    (it goes into this node's audit record of the send)."""
    try:
        reply = json.loads(body)
    except ValueError:
        reply = None
    reason = reply.get("reason") if isinstance(reply, dict) else None
    if isinstance(reason, str) and _REASON_CODE.match(reason):
        return reason
    return "accepted" if ok else f"http_{status}"
