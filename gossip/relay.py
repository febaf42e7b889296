"""Relayed requests: the same signed requests as over HTTP, carried by a NATS broker.

Why: a hospital whose firewall passes only outbound connections cannot be reached on a port,
but it can dial out to a broker that any member hosts. The broker only carries bytes: every
envelope is sealed to its recipient and signed by its sender, and every relayed request
carries the same `Murmur-Auth` header (gossip/auth.py) as an HTTP one, so the receiver makes
the same checks whoever carried it; the broker can neither read nor forge, and a broker that
drops, delays, reorders or duplicates can only cost a round's contribution, never corrupt
one (the replay guard drops copies, the timestamp window refuses what was held too long).

**Identity.** A hospital authenticates to the broker with an NATS user nkey whose seed *is*
its murmur Ed25519 seed (`nkey_seed`): one identity, no second PKI. Its public nkey
(`nkey_of`) is what `murmur relay config` writes into the broker's user list.

**Subjects** (U_X is hospital X's public nkey; the broker's permissions, `relay_permissions`,
let X publish only with its own U_X in the sender position and subscribe only under its own):

| subject | carries | stored? |
|---|---|---|
| `murmur.to.U_R.from.U_S` | S's envelopes for R that R did not take live | stream `IN_U_R` |
| `murmur.live.U_R.from.U_S` | S's envelopes (first), probes, receipt requests | no |
| `murmur.reply.U_S.from.U_R.ID` | R's answer to S's request ID | no |
| `murmur.reply.U_S.inbox.>` | S's NATS inbox (JetStream acks, fetches) | no |

**Envelopes: live first, stored when nobody took them.** An envelope is first published as
plain NATS messages on R's live subject, with R's answer subject as the NATS reply
subject: if R is not subscribed (offline, reconnecting), the broker at once answers there
with a "no responders" status, and the same frames go into JetStream for R to fetch when it
is back. If R is subscribed but gives no answer within half the send timeout (a message
lost between broker and R, R killed while handling it), the frames are stored too. So an
envelope reaches R whether it is up or not, as before; what changed is that one that R is
up to take costs no JetStream write, acknowledgement per chunk and fetch (docs/
performance.md, "Relays"). A copy that R receives twice (live, and stored after a slow
answer) carries the same `Murmur-Auth` nonce, so R's replay guard refuses the second.

**Frames.** One request travels as one NATS message, or as `count` chunks when its body is
longer than the broker's max payload (1 MB by default). Headers: `Murmur-Auth` (of the whole
body), `Murmur-Path`, `Content-Type`, `Murmur-Id` (random, 32 hex), `Murmur-Chunk`
(`index/count`). The answer is one message with `Murmur-Status` and the answer body.

Pure except for ``RelayTransport``, which talks to a ``RelayLink`` (gossip/nats_link.py is
the NATS one; tests use an in-memory one that misbehaves on purpose).
"""

from __future__ import annotations

import asyncio
import base64
import logging
import re
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

import nkeys
from murmur.crypto.allowlist import Peer
from murmur.crypto.identity import Identity
from murmur.gossip.auth import request_headers
from murmur.gossip.heads import REQUEST_CONTENT_TYPE
from murmur.gossip.probe import PROBE_CONTENT_TYPE, Contact, parse_answer
from murmur.gossip.transport import (
    ENVELOPE_CONTENT_TYPE,
    GOVERNANCE_CONTENT_TYPE,
    MAX_REPLY_BYTES,
    RECORDS_CONTENT_TYPE,
    SendResult,
    reply_reason,
)

log = logging.getLogger("murmur.relay")

PATHS = ("/gossip", "/probe", "/receipts", "/records", "/approvals", "/governance")
STORED_PATHS = ("/gossip",)  # kept by JetStream for a recipient that is offline
# Of the send timeout, how long an envelope offered live may go unanswered before it is
# also stored (the answer may still come; the stored copy is then refused as a replay).
LIVE_ANSWER_SHARE = 0.5
CONSUMER = "inbox"
# Room left in each NATS message for the headers (auth, path, id, chunk).
HEADER_ROOM = 2048
_ID = re.compile(r"^[0-9a-f]{32}$")
_CHUNK = re.compile(r"^(\d{1,6})/(\d{1,6})$")
_TOKEN = re.compile(r"^U[A-Z2-7]{55}$")


class FrameError(ValueError):
    """A relayed message that is not a well-formed frame (reason code ``bad_frame``)."""


# ------------------------------------------------------------------------- identities


def nkey_seed(identity: Identity) -> bytes:
    """The NATS user seed ("SU...") of ``identity``: its own Ed25519 seed, nkey-encoded."""
    return bytes(nkeys.encode_seed(identity.signing_key.encode(), nkeys.PREFIX_BYTE_USER))


def nkey_of(public_key: bytes) -> str:
    """The NATS user public nkey ("U...") of a murmur Ed25519 public key.

    The nkeys package derives this only from a seed, so for a peer's public key the same
    encoding is applied here (prefix byte, key, CRC-16 from nkeys, base32);
    tests/test_relay.py checks it against nkeys' own for a seed.
    """
    if len(public_key) != 32:
        raise ValueError("an Ed25519 public key is 32 bytes")
    raw = bytearray([nkeys.PREFIX_BYTE_USER]) + public_key
    raw += nkeys.crc16(raw).to_bytes(2, "little")
    return base64.b32encode(bytes(raw)).decode().rstrip("=")


def stored_subject(recipient: str, sender: str) -> str:
    return f"murmur.to.{recipient}.from.{sender}"


def live_subject(recipient: str, sender: str) -> str:
    return f"murmur.live.{recipient}.from.{sender}"


def reply_subject(asker: str, answerer: str, message_id: str) -> str:
    return f"murmur.reply.{asker}.from.{answerer}.{message_id}"


def inbox_prefix(own: str) -> str:
    return f"murmur.reply.{own}.inbox"


def stream_name(own: str) -> str:
    return f"IN_{own}"


def relay_permissions(own: str) -> dict[str, dict[str, list[str]]]:
    """What hospital ``own`` may do on the broker: publish as itself only (its nkey in the
    sender position), subscribe only under its own name, and read its own stream."""
    stream = stream_name(own)
    return {
        "publish": {
            "allow": [
                stored_subject("*", own),
                live_subject("*", own),
                f"murmur.reply.*.from.{own}.*",
                f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{CONSUMER}",
                f"$JS.ACK.{stream}.{CONSUMER}.>",
            ]
        },
        "subscribe": {"allow": [live_subject(own, "*"), f"murmur.reply.{own}.>"]},
    }


def sender_of(subject: str) -> str | None:
    """The sender token of a `murmur.to|live.R.from.S` subject (set by the broker's
    permissions, so it is who published), None if the subject is not one."""
    parts = subject.split(".")
    if (
        len(parts) == 5
        and parts[0] == "murmur"
        and parts[1] in ("to", "live")
        and parts[3] == "from"
    ):
        return parts[4] if _TOKEN.match(parts[4]) else None
    return None


# ------------------------------------------------------------------------------ frames


@dataclass(frozen=True)
class Frame:
    """One relayed message: a whole request, or chunk ``index`` of ``count`` of one."""

    path: str
    auth: str
    content_type: str
    message_id: str
    index: int
    count: int
    payload: bytes | memoryview  # a view into the body when made by ``frames``

    def headers(self) -> dict[str, str]:
        return {
            "Murmur-Auth": self.auth,
            "Murmur-Path": self.path,
            "Content-Type": self.content_type,
            "Murmur-Id": self.message_id,
            "Murmur-Chunk": f"{self.index}/{self.count}",
        }

    @classmethod
    def parse(cls, headers: Mapping[str, str] | None, payload: bytes) -> Frame:
        """Read a frame from a NATS message; ``FrameError`` naming what is wrong."""
        if not headers:
            raise FrameError("no headers")
        path = headers.get("Murmur-Path", "")
        if path not in PATHS:
            raise FrameError(f"unknown path {path[:40]!r}")
        message_id = headers.get("Murmur-Id", "")
        if not _ID.match(message_id):
            raise FrameError("bad Murmur-Id")
        chunk = _CHUNK.match(headers.get("Murmur-Chunk", ""))
        if chunk is None:
            raise FrameError("bad Murmur-Chunk")
        index, count = int(chunk.group(1)), int(chunk.group(2))
        if not 0 <= index < count:
            raise FrameError(f"chunk {index} of {count}")
        return cls(
            path,
            headers.get("Murmur-Auth", ""),
            headers.get("Content-Type", ""),
            message_id,
            index,
            count,
            bytes(payload),
        )


def frames(path: str, auth: str, content_type: str, body: bytes, max_payload: int) -> list[Frame]:
    """``body`` as frames of at most ``max_payload`` bytes of payload each (at least one).

    The payloads are views into ``body``, not copies: the same envelope is framed once per
    neighbour, and a copy of each chunk cost a relayed round about 5-20 ms of the event
    loop at 1M parameters and 8 neighbours (docs/performance.md, "Relays")."""
    size = max(1, max_payload)
    view = memoryview(body)
    pieces = [view[i : i + size] for i in range(0, len(body), size)] or [view]
    message_id = secrets.token_hex(16)
    return [
        Frame(path, auth, content_type, message_id, i, len(pieces), piece)
        for i, piece in enumerate(pieces)
    ]


def answer_headers(status: int) -> dict[str, str]:
    return {"Murmur-Status": str(status)}


def parse_status(headers: Mapping[str, str] | None) -> int | None:
    text = (headers or {}).get("Murmur-Status", "")
    return int(text) if text.isdigit() and len(text) == 3 else None


def is_no_responders(headers: Mapping[str, str] | None) -> bool:
    """Whether a message on an answer subject is the broker's "no responders" status (NATS
    sends `NATS/1.0 503` to the reply subject of a message nobody was subscribed to)."""
    return (headers or {}).get("Status") == "503" and "Murmur-Status" not in (headers or {})


# ---------------------------------------------------------------------- sending side


class RelayLink(Protocol):
    """A connection to one broker, as ``RelayTransport`` uses it."""

    @property
    def max_payload(self) -> int: ...

    async def publish(
        self,
        subject: str,
        payload: bytes | memoryview,
        headers: dict[str, str],
        *,
        stored: bool,
        reply: str | None = None,
    ) -> bool:
        """Hand one message to the broker; True once it took it (for ``stored``: once
        JetStream acknowledged storing it). ``reply`` (plain messages only): the NATS reply
        subject, where the broker says "no responders" if nobody is subscribed to
        ``subject``. Never raises for network trouble."""
        ...


@dataclass
class _Waiting:
    peer_token: str
    answer: asyncio.Future[tuple[int, bytes]]
    # Set when the broker says nobody took the live copy (see is_no_responders).
    unheard: asyncio.Future[None]


class RelayTransport:
    """Sends this node's requests to peers through one relay (``Transport``-shaped).

    An answer is correlated by the request's id in the reply subject, and accepted only from
    the peer that was asked (its nkey is in the subject, set by the broker's permissions).
    A request nobody answers within the timeout is a failed send with no status: for an
    envelope, the broker still holds it (it went live first, and into JetStream once the
    broker said nobody took it or half the timeout passed) and the peer receives it when it
    returns.
    """

    def __init__(
        self,
        name: str,
        identity: Identity,
        link: RelayLink,
        send_timeout_s: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.name = name
        self.identity = identity
        self.own = nkey_of(identity.public_key)
        self.link = link
        self.send_timeout_s = send_timeout_s
        self.clock = clock
        self._waiting: dict[str, _Waiting] = {}

    def on_answer(self, subject: str, headers: Mapping[str, str] | None, payload: bytes) -> None:
        """An answer arrived on `murmur.reply.<own>.from.<peer>.<id>`."""
        parts = subject.split(".")
        if len(parts) != 6 or parts[2] != self.own or parts[3] != "from":
            return
        waiting = self._waiting.get(parts[5])
        if waiting is None or waiting.peer_token != parts[4]:
            return  # late, unknown, or not for the peer asked: nothing waits for it
        if is_no_responders(headers):
            # Only the broker (or the peer itself, hurting only itself) can put it here.
            if not waiting.unheard.done():
                waiting.unheard.set_result(None)
            return
        status = parse_status(headers)
        if status is not None and not waiting.answer.done():
            waiting.answer.set_result((status, bytes(payload[: MAX_REPLY_BYTES + 1])))

    async def _request(
        self,
        peer: Peer,
        path: str,
        body: bytes,
        content_type: str,
        timeout_s: float,
        signer: Identity | None = None,
    ) -> tuple[int | None, bytes, str]:
        """(status, answer, failure) of one relayed request; status None: no answer."""
        headers = request_headers(
            signer or self.identity, peer.public_key, path, body, content_type, self.clock()
        )
        recipient = nkey_of(peer.public_key)
        stored = path in STORED_PATHS
        parts = frames(
            path,
            headers["Murmur-Auth"],
            content_type,
            body,
            self.link.max_payload - HEADER_ROOM,
        )
        message_id = parts[0].message_id
        loop = asyncio.get_running_loop()
        waiting = _Waiting(recipient, loop.create_future(), loop.create_future())
        self._waiting[message_id] = waiting
        kept = False  # whether JetStream holds a copy
        try:
            async with asyncio.timeout(timeout_s):
                live = live_subject(recipient, self.own)
                reply = reply_subject(self.own, recipient, message_id) if stored else None
                if not await self._publish(live, parts, stored=False, reply=reply):
                    return None, b"", f"relay {self.name} did not take it"
                if stored and not await self._answered_live(waiting, timeout_s):
                    if not await self._publish(
                        stored_subject(recipient, self.own), parts, stored=True
                    ):
                        return None, b"", f"relay {self.name} did not store it"
                    kept = True
                status, answer = await waiting.answer
                return status, answer, ""
        except TimeoutError:
            where = "stored at" if kept else "sent through"
            return None, b"", f"no answer in {timeout_s:g} s ({where} relay {self.name})"
        finally:
            del self._waiting[message_id]

    async def _publish(
        self, subject: str, parts: list[Frame], *, stored: bool, reply: str | None = None
    ) -> bool:
        """All chunks at once: the broker's acknowledgements overlap instead of adding up,
        and the receiver reassembles in any order."""
        taken = await asyncio.gather(
            *(
                self.link.publish(subject, f.payload, f.headers(), stored=stored, reply=reply)
                for f in parts
            )
        )
        return all(taken)

    @staticmethod
    async def _answered_live(waiting: _Waiting, timeout_s: float) -> bool:
        """Whether the peer answered the live copy (True), or the broker said nobody took
        it or no answer came within ``LIVE_ANSWER_SHARE`` of the timeout (False: store it)."""
        await asyncio.wait(
            [waiting.answer, waiting.unheard],
            timeout=LIVE_ANSWER_SHARE * timeout_s,
            return_when=asyncio.FIRST_COMPLETED,
        )
        return waiting.answer.done()

    async def send(self, peer: Peer, envelope: bytes, signer: Identity | None = None) -> SendResult:
        start = time.monotonic()
        status, answer, failure = await self._request(
            peer, "/gossip", envelope, ENVELOPE_CONTENT_TYPE, self.send_timeout_s, signer
        )
        seconds = time.monotonic() - start
        if status is None:
            return SendResult(peer.name, False, None, f"unreachable: {failure}", seconds)
        ok = status == 202
        return SendResult(peer.name, ok, status, reply_reason(answer, ok, status), seconds)

    async def send_all(
        self, peers: list[Peer], envelope: bytes, signer: Identity | None = None
    ) -> list[SendResult]:
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(self.send(p, envelope, signer)) for p in peers]
        return [t.result() for t in tasks]

    async def probe(self, peer: Peer, probe: bytes, timeout_s: float) -> Contact:
        status, answer, failure = await self._request(
            peer, "/probe", probe, PROBE_CONTENT_TYPE, timeout_s
        )
        if status is None:
            return Contact.from_answer(None, failure, "", source="probe")
        reason, detail = parse_answer(status, answer.decode("utf-8", "replace"))
        return Contact.from_answer(status, reason, detail, source="probe")

    async def post_records(
        self, peer: Peer, body: bytes, path: str = "/records"
    ) -> tuple[int | None, str]:
        status, answer, failure = await self._request(
            peer, path, body, RECORDS_CONTENT_TYPE, self.send_timeout_s
        )
        if status is None:
            return None, failure
        return status, reply_reason(answer, status == 202, status)

    async def post_governance(
        self, peer: Peer, body: bytes, max_bytes: int
    ) -> tuple[int | None, bytes]:
        """A membership exchange (node/governance.py) through the relay; live, not stored:
        a peer that is away gets the next exchange instead."""
        status, answer, _ = await self._request(
            peer, "/governance", body, GOVERNANCE_CONTENT_TYPE, self.send_timeout_s
        )
        if status is None:
            return None, b""
        return status, answer[: max_bytes + 1]

    async def request_receipts(
        self, peer: Peer, request: bytes, max_bytes: int
    ) -> tuple[int | None, bytes]:
        status, answer, _ = await self._request(
            peer, "/receipts", request, REQUEST_CONTENT_TYPE, self.send_timeout_s
        )
        return status, answer[: max_bytes + 1]
