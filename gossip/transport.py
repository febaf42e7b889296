"""Sending envelopes to peers over HTTP, with a timeout on every wait.

One aiohttp ClientSession per node keeps connections to neighbours alive between sends (for
less than the receivers' idle timeout, so it is the sender that closes them). A failed or slow
send is reported, never raised: a dead neighbour must not stop a node.

A peer's reply is a reason code, so it is read with a small bound: a peer (or whatever answers
at its address) that replies with more is a failed send `oversize_reply`, and the rest is never
read. Redirects are never followed: an envelope goes to the address in the allowlist or
nowhere, and a 3xx is a failed send `redirect`.

Every POST carries the signed `Murmur-Auth` header (gossip/auth.py), made by the one function
`gossip.auth.request_headers`, so a receiver can refuse strangers before it reads a body.
Every reply's HTTP `Date` is compared with this node's clock (`ClockWatch`): a node whose
clock is off by more than the receivers' timestamp window has every request refused as
`unauthenticated`, and says so loudly, with the measured skew, instead of failing silently.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import logging
import re
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol

import aiohttp
import yarl
from murmur.crypto.allowlist import Peer
from murmur.crypto.certs import server_key_matches
from murmur.crypto.identity import Identity
from murmur.gossip.auth import request_headers
from murmur.gossip.heads import REQUEST_CONTENT_TYPE
from murmur.gossip.probe import PROBE_CONTENT_TYPE, Contact, parse_answer

log = logging.getLogger("murmur.transport")

ENVELOPE_CONTENT_TYPE = "application/x-murmur-envelope"
RECORDS_CONTENT_TYPE = "application/json"
GOVERNANCE_CONTENT_TYPE = "application/x-murmur-governance"
CONSENSUS_CONTENT_TYPE = "application/x-murmur-consensus"

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


class Transport(Protocol):
    """What the round loop needs from whatever carries its bytes to a neighbour.

    ``PeerTransport`` (HTTP(S) to the peer's address, below), ``RelayTransport`` (through a
    NATS broker, gossip/relay.py) and ``RoutedTransport`` (picks between them per peer,
    gossip/routing.py) all have this shape; the round loop and aggregation see only it, so a
    further transport (QUIC keyed by the Ed25519 key, say) is one more class like these.
    Every method reports failure in its result and never raises for network trouble.
    """

    async def send(
        self, peer: Peer, envelope: bytes, signer: Identity | None = None
    ) -> SendResult: ...

    async def send_all(
        self, peers: list[Peer], envelope: bytes, signer: Identity | None = None
    ) -> list[SendResult]: ...

    async def request_receipts(
        self, peer: Peer, request: bytes, max_bytes: int
    ) -> tuple[int | None, bytes]: ...

    async def probe(self, peer: Peer, probe: bytes, timeout_s: float) -> Contact: ...


class RecordsTransport(Transport, Protocol):
    """A transport that also carries signed peer records (node/records.py), as the three
    above do; the round loop itself never needs it."""

    async def post_records(
        self, peer: Peer, body: bytes, path: str = "/records"
    ) -> tuple[int | None, str]: ...


class TlsKeyMismatch(aiohttp.ClientConnectionError):
    """The TLS server's certificate is not for the allowlisted key of the peer at that
    address (or not an Ed25519 certificate at all)."""


class PinningConnector(aiohttp.TCPConnector):
    """aiohttp's connector, checking each new TLS connection's certificate key against the
    allowlisted key for its address before a byte of the request is sent on it."""

    def __init__(self, pins: dict[tuple[str, int], bytes], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._pins = pins

    async def _create_connection(self, req: Any, traces: Any, timeout: Any) -> Any:
        protocol = await super()._create_connection(req, traces, timeout)
        if req.url.scheme == "https":
            expected = self._pins.get((req.url.host or "", req.url.port or 443))
            transport = protocol.transport
            ssl_object = transport.get_extra_info("ssl_object") if transport else None
            if expected is None or not server_key_matches(ssl_object, expected):
                protocol.close()
                log.error(
                    "TLS: the server at %s does not hold the allowlisted key for that address "
                    "(certificate key mismatch); nothing was sent to it",
                    req.url.origin(),
                )
                raise TlsKeyMismatch("tls_key_mismatch")
        return protocol


class OversizeReply(Exception):
    """The reply was longer than MAX_REPLY_BYTES (it was not read to the end)."""


# Replies that mean "your request was not authentic" (gossip/auth.py; a v3 peer says stale).
_AUTH_REFUSALS = frozenset({"unauthenticated", "stale"})


class ClockState(StrEnum):
    """How a peer's clock stands against this node's, as far as this node can tell."""

    OK = "ok"  # within half the timestamp window
    DRIFTING = "drifting"  # past half the window: still accepted, not for long
    REFUSED = "refused"  # the peer refuses this node's requests, and the skew is the cause


@dataclass(frozen=True)
class ClockReading:
    """One reply's verdict on a peer's clock: `skew_s` is the peer's clock minus this
    node's; `changed` says whether `state` differs from this peer's previous one (a peer
    not heard from yet counts as `ok`), which is when an operator should be told."""

    peer: str
    skew_s: float
    state: ClockState
    changed: bool


@dataclass
class ClockWatch:
    """This node's clock against its peers', from the `Date` header of their replies.

    A peer's `Date` has one-second resolution and the reply takes a moment to arrive, so the
    skew is known to about a second, plenty against a window of minutes. When a peer refuses
    a request as `unauthenticated` (or `stale`) while its clock is beyond the window from
    ours, that is the cause (`ClockState.REFUSED`), and it is logged as an ERROR naming the
    skew; a skew past half the window (`DRIFTING`) is a WARNING before anything fails. Each at
    most once per `interval_s` per peer, so a node that stays skewed does not flood its log.
    Every reading goes to `on_reading` (the node shows it in /status and audits each change
    of state, node/clock.py). A peer leaves `DRIFTING` only once its skew is back below half
    the window by a margin, so a skew that hovers at the threshold is not a change per reply.
    """

    window_s: float
    interval_s: float = 60.0
    on_reading: Callable[[ClockReading], None] | None = None
    skews: dict[str, float] = field(default_factory=dict)
    states: dict[str, ClockState] = field(default_factory=dict)
    _last_logged: dict[tuple[str, str], float] = field(default_factory=dict)

    def observe(
        self, peer: str, date: str | None, reason: str, received_at: float
    ) -> ClockReading | None:
        """Note one reply of ``peer`` (its `Date` header, its reason code), received at
        ``received_at`` (this node's Unix time); None when the reply had no usable `Date`."""
        skew = _date_skew(date, received_at)
        if skew is None:
            return None
        self.skews[peer] = skew
        refused = reason in _AUTH_REFUSALS
        state = self._state(peer, skew, refused)
        reading = ClockReading(peer, skew, state, state is not self.states.get(peer, ClockState.OK))
        self.states[peer] = state
        if state is ClockState.REFUSED:
            self._log(
                peer,
                "error",
                "CLOCK SKEW: %s refused this node's request (%s) and its clock (HTTP Date) is "
                "%+.0f s from this node's, beyond the ±%.0f s timestamp window: every envelope "
                "this node sends is refused. Fix the clock (NTP) of whichever node is wrong; "
                "skews seen now: %s",
                peer,
                reason,
                skew,
                self.window_s,
                self._summary(),
            )
        elif refused:
            self._log(
                peer,
                "refused",
                "%s refused this node's request as %s with clocks %+.0f s apart (within the "
                "±%.0f s window): it does not admit this node's key, or holds another key for "
                "it (compare fingerprints)",
                peer,
                reason,
                skew,
                self.window_s,
            )
        elif state is ClockState.DRIFTING:
            self._log(
                peer,
                "warning",
                "clock skew: %s's clock (HTTP Date) is %+.0f s from this node's; past ±%.0f s "
                "every request is refused",
                peer,
                skew,
                self.window_s,
            )
        if self.on_reading is not None:
            self.on_reading(reading)
        return reading

    def _state(self, peer: str, skew: float, refused: bool) -> ClockState:
        if refused and abs(skew) > self.window_s - 1.0:
            return ClockState.REFUSED
        half = self.window_s / 2
        if self.states.get(peer) is ClockState.DRIFTING:
            half -= max(1.0, 0.05 * self.window_s)  # hysteresis: leave it only clearly back
        return ClockState.DRIFTING if abs(skew) > half else ClockState.OK

    def _summary(self) -> str:
        return ", ".join(f"{name} {skew:+.0f} s" for name, skew in sorted(self.skews.items()))

    def _log(self, peer: str, kind: str, message: str, *args: object) -> None:
        now = time.monotonic()
        last = self._last_logged.get((peer, kind))
        if last is not None and now - last < self.interval_s:
            return
        self._last_logged[(peer, kind)] = now
        level = logging.ERROR if kind == "error" else logging.WARNING
        log.log(level, message, *args)


def _date_skew(date: str | None, received_at: float) -> float | None:
    """Peer clock minus ours, in seconds, from an HTTP `Date` (None if absent or unparsable).
    The `Date` is truncated to the second, so its middle is the best estimate."""
    if not date:
        return None
    try:
        parsed = email.utils.parsedate_to_datetime(date)
    except (TypeError, ValueError, IndexError):
        return None
    if parsed.tzinfo is None:
        return None
    return parsed.timestamp() + 0.5 - received_at


class PeerTransport:
    """The node's HTTP client for its neighbours; it signs every request as ``identity``."""

    def __init__(
        self,
        *,
        identity: Identity,
        send_timeout_s: float,
        timestamp_window_s: float = 300.0,
        max_reply_bytes: int = MAX_REPLY_BYTES,
        clock: Callable[[], float] = time.time,
        tls: ssl.SSLContext | None = None,
        on_clock: Callable[[ClockReading], None] | None = None,
    ) -> None:
        self.identity = identity
        # For https:// peers: presents this node's certificate; the server's is pinned to
        # the peer's allowlisted key (`PinningConnector`), not checked against a CA.
        self.tls = tls
        self._pins: dict[tuple[str, int], bytes] = {}
        self.clock_now = clock  # this node's clock: it signs requests and reads peers' Date
        self.send_timeout_s = send_timeout_s
        self.max_reply_bytes = max_reply_bytes
        self.clock = ClockWatch(timestamp_window_s, on_reading=on_clock)
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> PeerTransport:
        self._session = aiohttp.ClientSession(
            connector=PinningConnector(
                self._pins, limit=64, keepalive_timeout=KEEPALIVE_S, ssl=self.tls or True
            ),
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

    def _url(self, peer: Peer, path: str) -> str:
        """The peer's URL for ``path``; for https, its key is what the server must hold."""
        url = f"{peer.address.rstrip('/')}{path}"
        if url.startswith("https://"):
            parsed = yarl.URL(url)
            self._pins[(parsed.host or "", parsed.port or 443)] = peer.public_key
        return url

    def headers(
        self, peer: Peer, path: str, body: bytes, content_type: str, signer: Identity | None = None
    ) -> dict[str, str]:
        """The headers of a POST of ``body`` to ``peer``'s ``path``, signed by this node (or
        by ``signer``: the adversary mode's outsiders)."""
        return request_headers(
            signer or self.identity, peer.public_key, path, body, content_type, self.clock_now()
        )

    def _observe(self, peer: Peer, response: aiohttp.ClientResponse, reason: str) -> None:
        """Compare the peer's clock with ours (``ClockWatch``) from the reply's `Date`."""
        self.clock.observe(peer.name, response.headers.get("Date"), reason, self.clock_now())

    async def send(self, peer: Peer, envelope: bytes, signer: Identity | None = None) -> SendResult:
        """POST one envelope to a peer's /gossip; never raises for network trouble."""
        start = time.monotonic()
        try:
            async with self.session.post(
                self._url(peer, "/gossip"),
                data=envelope,
                headers=self.headers(peer, "/gossip", envelope, ENVELOPE_CONTENT_TYPE, signer),
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
                reason = reply_reason(body, ok, response.status)
                self._observe(peer, response, reason)
                return SendResult(peer.name, ok, response.status, reason, time.monotonic() - start)
        except TimeoutError:
            return SendResult(peer.name, False, None, "timeout", time.monotonic() - start)
        except TlsKeyMismatch:
            return SendResult(peer.name, False, None, "tls_key_mismatch", time.monotonic() - start)
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

    async def send_all(
        self, peers: list[Peer], envelope: bytes, signer: Identity | None = None
    ) -> list[SendResult]:
        """Send the same envelope to every peer concurrently (each request signed for its
        recipient)."""
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(self.send(peer, envelope, signer)) for peer in peers]
        return [t.result() for t in tasks]

    async def request_receipts(
        self, peer: Peer, request: bytes, max_bytes: int
    ) -> tuple[int | None, bytes]:
        """POST a receipts request to a peer's /receipts (gossip/heads.py): (HTTP status, at
        most ``max_bytes + 1`` bytes of the answer), or (None, b"") when no answer came within
        ``send_timeout_s``. Never raises for network trouble."""
        try:
            async with self.session.post(
                self._url(peer, "/receipts"),
                data=request,
                headers=self.headers(peer, "/receipts", request, REQUEST_CONTENT_TYPE),
                allow_redirects=False,
            ) as response:
                data = b""
                while len(data) <= max_bytes:  # one read(n) may return fewer bytes
                    chunk = await response.content.read(max_bytes + 1 - len(data))
                    if not chunk:
                        break
                    data += chunk
                reason = "accepted" if response.status == 200 else reply_reason(data, False, 0)
                self._observe(peer, response, reason)
                return response.status, data
        except (TimeoutError, aiohttp.ClientError, OSError, ValueError):
            return None, b""

    async def post_records(
        self, peer: Peer, body: bytes, path: str = "/records"
    ) -> tuple[int | None, str]:
        """POST signed records to a peer: peer records (gossip/peer_records.py) to /records,
        study approvals (node/studies/) to /approvals: (status, reason code), (None, why)
        without an answer. Never raises for network trouble."""
        return await self._post_for_reason(peer, path, body, RECORDS_CONTENT_TYPE)

    async def _post_for_reason(
        self, peer: Peer, path: str, body: bytes, content_type: str
    ) -> tuple[int | None, str]:
        """POST ``body`` and read the answer's reason code (202 is taken)."""
        try:
            async with self.session.post(
                self._url(peer, path),
                data=body,
                headers=self.headers(peer, path, body, content_type),
                allow_redirects=False,
            ) as response:
                reply = await self._read_reply(response)
                return response.status, reply_reason(reply, response.status == 202, response.status)
        except OversizeReply:
            return None, "oversize_reply"
        except (TimeoutError, aiohttp.ClientError, OSError, ValueError) as exc:
            return None, type(exc).__name__

    async def post_governance(
        self, peer: Peer, body: bytes, max_bytes: int
    ) -> tuple[int | None, bytes]:
        """POST a membership exchange (node/governance.py) to a peer's /governance: (HTTP
        status, at most ``max_bytes + 1`` bytes of the answer), or (None, b"") without an
        answer. Never raises for network trouble."""
        try:
            async with self.session.post(
                self._url(peer, "/governance"),
                data=body,
                headers=self.headers(peer, "/governance", body, GOVERNANCE_CONTENT_TYPE),
                allow_redirects=False,
            ) as response:
                data = await response.content.read(max_bytes + 1)
                return response.status, data
        except (TimeoutError, aiohttp.ClientError, OSError, ValueError):
            return None, b""

    async def post_consensus(
        self, peer: Peer, body: bytes, path: str = "/consensus"
    ) -> tuple[int | None, str]:
        """POST one sealed consensus message (gossip/consensus_wire.py) to a peer: (status,
        reason code), or (None, why) without an answer. Never raises for network trouble."""
        return await self._post_for_reason(peer, path, body, CONSENSUS_CONTENT_TYPE)

    async def probe(self, peer: Peer, probe: bytes, timeout_s: float) -> Contact:
        """POST a signed probe (gossip/probe.py) to a peer's /probe: does it take our
        envelopes? Never raises for network trouble; the answer is read within the same
        bound as a send's reply, and a redirect is a refusal, never followed."""
        try:
            async with self.session.post(
                self._url(peer, "/probe"),
                data=probe,
                headers=self.headers(peer, "/probe", probe, PROBE_CONTENT_TYPE),
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
                self._observe(peer, response, reason)
                return Contact.from_answer(response.status, reason, detail, source="probe")
        except TimeoutError:
            return Contact.from_answer(None, f"no answer in {timeout_s:g} s", "", source="probe")
        except TlsKeyMismatch:
            return Contact.from_answer(None, "tls_key_mismatch", "", source="probe")
        except (aiohttp.ClientError, OSError, ValueError) as exc:
            return Contact.from_answer(None, type(exc).__name__, "", source="probe")


def reply_reason(body: bytes, ok: bool, status: int) -> str:
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
