"""Request authentication: who sent an HTTP request to a peer listener, proven from its
headers alone, before a byte of its body is read.

Why: before protocol v4 a node learnt who sent a POST only from the envelope's signature,
i.e. after reading, hashing and parsing the whole body. A 16 MB envelope naming an admitted
sender cost tens of milliseconds of event-loop CPU before it was refused as ``bad_signature``,
so a few dozen requests a second held a core. Now every POST to a peer listener carries one
``Murmur-Auth`` header (docs/protocol.md, "Request authentication"): a small signed statement
"I, sender S, send this request for path P to recipient R at time T, nonce N, with a body of
L bytes hashing to H". The listener checks it (allowlisted sender, addressed to this node,
fresh, nonce unused, L equal to Content-Length, signature) before it invites or reads the
body, and after reading it checks that the body hashes to H. A stranger's request therefore
costs one header parse and at most one Ed25519 verification (~60 µs), whatever its size.

The layout (194 bytes, big-endian integers, sent as standard base64 with padding, 260
characters):

| bytes | field |
|---|---|
| 2 | version, ``4`` |
| 32 | sender's Ed25519 public key |
| 32 | recipient's Ed25519 public key |
| 8 | timestamp_ms, the sender's clock, milliseconds since the Unix epoch |
| 16 | nonce, random |
| 8 | body_length, the exact number of body bytes |
| 32 | body_sha256, SHA-256 of the body bytes |
| 64 | Ed25519 signature (``crypto_sign_detached``) of ``"murmur-request-auth\\0"`` ‖ uint8
  length of the path ‖ the path (ASCII, e.g. ``/gossip``) ‖ the 130 bytes above |

Signing the path keeps a header made for ``/receipts`` from being used on ``/gossip``; naming
the recipient keeps one made for one neighbour from being replayed to another; the nonce
(remembered for the timestamp window) keeps it from being replayed to the same one.

Pure: no I/O; ``now`` is passed in or read from the clock. Signatures are libsodium's
Ed25519 through ``crypto.identity``; nothing here is hand-rolled cryptography.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import secrets
import struct
import time
from collections import Counter
from dataclasses import dataclass, field
from enum import StrEnum

from murmur.crypto.allowlist import Allowlist, Peer
from murmur.crypto.identity import Identity, verify_signature
from murmur.gossip.wire import PROTOCOL_VERSION

AUTH_HEADER = "Murmur-Auth"
AUTH_VERSION = PROTOCOL_VERSION
AUTH_DOMAIN = b"murmur-request-auth\x00"
AUTH_NONCE_BYTES = 16
_FIELDS = struct.Struct(">H32s32sQ16sQ32s")
AUTH_BYTES = _FIELDS.size + 64  # 194
AUTH_TEXT_CHARS = 4 * ((AUTH_BYTES + 2) // 3)  # 260
MAX_UINT63 = 2**63 - 1
# Nonces remembered per sender (those older than the window are forgotten first); past this
# the oldest go, and nothing older than them is accepted any more.
MAX_NONCES_PER_SENDER = 4096


class AuthFailure(StrEnum):
    """Why a request's authentication failed. The wire answer is always the one code
    ``unauthenticated``; these precise reasons go only to the node's own counters and log."""

    MISSING = "missing"
    MALFORMED = "malformed"
    UNSUPPORTED_VERSION = "unsupported_version"
    WRONG_RECIPIENT = "wrong_recipient"
    UNKNOWN_SENDER = "unknown_sender"
    REVOKED_KEY = "revoked_key"
    STALE = "stale"
    LENGTH_MISMATCH = "length_mismatch"
    BAD_SIGNATURE = "bad_signature"
    REPLAY = "replay"


class AuthError(Exception):
    """A request whose ``Murmur-Auth`` header does not authenticate it."""

    def __init__(self, why: AuthFailure, detail: str) -> None:
        super().__init__(f"{why}: {detail}")
        self.why = AuthFailure(why)
        self.detail = detail


def _path_bytes(path: str) -> bytes:
    raw = path.encode("ascii")
    if not raw.startswith(b"/") or len(raw) > 255:
        raise ValueError(f"a request path is 1-255 ASCII bytes starting with '/', not {path!r}")
    return raw


@dataclass(frozen=True)
class RequestAuth:
    """One ``Murmur-Auth`` header's content (module docstring)."""

    sender: bytes
    recipient: bytes
    timestamp_ms: int
    nonce: bytes
    body_length: int
    body_sha256: bytes
    signature: bytes = b""

    def _fields(self) -> bytes:
        return _FIELDS.pack(
            AUTH_VERSION,
            self.sender,
            self.recipient,
            self.timestamp_ms,
            self.nonce,
            self.body_length,
            self.body_sha256,
        )

    def signed_message(self, path: str) -> bytes:
        """What the signature is over: domain, the path, then the 130 field bytes."""
        raw = _path_bytes(path)
        return AUTH_DOMAIN + bytes([len(raw)]) + raw + self._fields()

    @classmethod
    def make(
        cls,
        identity: Identity,
        recipient: bytes,
        path: str,
        body: bytes,
        now: float | None = None,
    ) -> RequestAuth:
        """The signed header for sending ``body`` to ``path`` of the node ``recipient``."""
        timestamp_ms = int((time.time() if now is None else now) * 1000)
        if not 0 <= timestamp_ms <= MAX_UINT63:
            raise ValueError(f"timestamp {now!r} is out of range")
        unsigned = cls(
            identity.public_key,
            recipient,
            timestamp_ms,
            secrets.token_bytes(AUTH_NONCE_BYTES),
            len(body),
            hashlib.sha256(body).digest(),
        )
        signature = identity.sign(unsigned.signed_message(path))
        return dataclasses.replace(unsigned, signature=signature)

    def encode(self) -> str:
        """The header value: standard base64 (with padding) of the 194 bytes."""
        return base64.b64encode(self._fields() + self.signature).decode("ascii")

    @classmethod
    def decode(cls, text: str) -> RequestAuth:
        """Parse a header value strictly (``AuthError``); the signature is not checked here."""
        if len(text) != AUTH_TEXT_CHARS:
            raise AuthError(
                AuthFailure.MALFORMED, f"the header is {AUTH_TEXT_CHARS} characters of base64"
            )
        try:
            raw = base64.b64decode(text.encode("ascii"), validate=True)
        except (binascii.Error, UnicodeEncodeError, ValueError):
            raise AuthError(AuthFailure.MALFORMED, "the header is not base64") from None
        if len(raw) != AUTH_BYTES or base64.b64encode(raw).decode("ascii") != text:
            raise AuthError(AuthFailure.MALFORMED, "the header is not canonical base64")
        version, sender, recipient, timestamp_ms, nonce, length, digest = _FIELDS.unpack_from(raw)
        if version != AUTH_VERSION:
            raise AuthError(
                AuthFailure.UNSUPPORTED_VERSION,
                f"request auth version {version}; this node speaks {AUTH_VERSION}",
            )
        if timestamp_ms > MAX_UINT63 or length > MAX_UINT63:
            raise AuthError(AuthFailure.MALFORMED, "timestamp_ms and body_length are < 2**63")
        return cls(sender, recipient, timestamp_ms, nonce, length, digest, raw[_FIELDS.size :])

    def verify(self, path: str) -> bool:
        """Whether the signature is the sender's over this header for ``path``."""
        try:
            message = self.signed_message(path)
        except (UnicodeEncodeError, ValueError):
            return False
        return verify_signature(self.sender, message, self.signature)


def request_headers(
    identity: Identity,
    recipient: bytes,
    path: str,
    body: bytes,
    content_type: str,
    now: float | None = None,
) -> dict[str, str]:
    """The headers of a POST of ``body`` to ``path`` of the node whose key is ``recipient``:
    ``Content-Type`` and the signed ``Murmur-Auth``. Every sender uses this one function
    (gossip/transport.py, the benchmarks, tests that post raw bytes)."""
    auth = RequestAuth.make(identity, recipient, path, body, now)
    return {"Content-Type": content_type, AUTH_HEADER: auth.encode()}


class RequestAuthenticator:
    """Checks ``Murmur-Auth`` headers addressed to one node and remembers their nonces.

    Cheap checks first: structure, recipient, allowlist, clock, length, then the one
    signature verification, then the nonce. Only authenticated requests are remembered, so
    only admitted senders occupy memory (at most ``max_nonces`` each).
    """

    def __init__(
        self,
        own_key: bytes,
        allowlist: Allowlist,
        window_s: float,
        max_nonces: int = MAX_NONCES_PER_SENDER,
    ) -> None:
        if not window_s > 0 or max_nonces < 2:
            raise ValueError("window_s must be positive and max_nonces at least 2")
        self.own_key = own_key
        self.allowlist = allowlist
        self.window_s = window_s
        self.max_nonces = max_nonces
        self._seen: dict[bytes, dict[bytes, int]] = {}
        self._floor_ms: dict[bytes, int] = {}

    def check(
        self,
        header: str | None,
        path: str,
        content_length: int | None,
        now: float | None = None,
    ) -> tuple[Peer, RequestAuth]:
        """The admitted peer that sent this request and its header; ``AuthError`` otherwise.
        On success the nonce is recorded, so the same header is refused next time."""
        if header is None:
            raise AuthError(AuthFailure.MISSING, f"no {AUTH_HEADER} header")
        auth = RequestAuth.decode(header)
        if auth.recipient != self.own_key:
            raise AuthError(AuthFailure.WRONG_RECIPIENT, "the request is addressed to another node")
        peer = self.allowlist.by_key(auth.sender)
        if peer is None and self.allowlist.is_revoked(auth.sender):
            raise AuthError(
                AuthFailure.REVOKED_KEY,
                f"sender key {auth.sender.hex()[:16]}... was revoked by the consortium",
            )
        if peer is None:
            raise AuthError(
                AuthFailure.UNKNOWN_SENDER,
                f"sender key {auth.sender.hex()[:16]}... is not on the allowlist",
            )
        now = time.time() if now is None else now
        skew = auth.timestamp_ms / 1000 - now
        if abs(skew) > self.window_s:
            raise AuthError(
                AuthFailure.STALE,
                f"{peer.name}'s timestamp is {skew:+.0f} s from this node's clock "
                f"(window ±{self.window_s:.0f} s)",
            )
        if content_length is None or content_length != auth.body_length:
            raise AuthError(
                AuthFailure.LENGTH_MISMATCH,
                f"Content-Length {content_length} is not the signed body length {auth.body_length}",
            )
        if not auth.verify(path):
            raise AuthError(AuthFailure.BAD_SIGNATURE, f"not a valid signature by {peer.name}")
        self._remember(auth, now)
        return peer, auth

    def _remember(self, auth: RequestAuth, now: float) -> None:
        sender = auth.sender
        seen = self._seen.setdefault(sender, {})
        if auth.nonce in seen or auth.timestamp_ms <= self._floor_ms.get(sender, -1):
            raise AuthError(AuthFailure.REPLAY, "this request was already received")
        seen[auth.nonce] = auth.timestamp_ms
        if len(seen) <= self.max_nonces:
            return
        horizon = int((now - self.window_s) * 1000)
        for nonce in [n for n, t in seen.items() if t < horizon]:
            del seen[nonce]  # its timestamp can no longer pass the window check
        if len(seen) > self.max_nonces:
            # Still full of fresh nonces: forget the older half, and refuse anything not
            # newer than what was forgotten (it could be one of those).
            by_age = sorted(seen.items(), key=lambda item: item[1])
            cut = by_age[: len(by_age) // 2]
            for nonce, _ in cut:
                del seen[nonce]
            self._floor_ms[sender] = max(self._floor_ms.get(sender, -1), cut[-1][1])

    def remembered(self, sender: bytes) -> int:
        """How many nonces of ``sender`` are remembered (for tests and /status)."""
        return len(self._seen.get(sender, {}))


# --------------------------------------------------------------------------- per-peer limits


@dataclass(frozen=True)
class PeerAllowance:
    """What one authenticated peer may send (docs/config.md, ``[peer_listener]``).

    ``max_bodies``: requests of one peer being read or processed at once. The rate is a token
    bucket of ``burst`` requests, refilled by ``per_round`` for every round this node
    advances and by ``per_second`` of wall time: an honest peer sends about one envelope a
    round (plus the occasional receipts request or probe), however fast rounds go, while a
    peer that floods gets ``per_round`` bodies a round and ``per_second`` a second, whatever
    it claims.
    """

    max_bodies: int = 2
    burst: float = 16.0
    per_round: float = 4.0
    per_second: float = 0.5

    def __post_init__(self) -> None:
        if self.max_bodies < 1 or self.burst < 1 or self.per_round < 0 or self.per_second < 0:
            raise ValueError("a peer allowance needs max_bodies >= 1, burst >= 1, rates >= 0")


@dataclass
class _Bucket:
    tokens: float
    at: float
    round: int


@dataclass
class PeerLimiter:
    """Per-peer concurrency and rate, applied to authenticated requests before their body."""

    allowance: PeerAllowance = field(default_factory=PeerAllowance)
    active: Counter[str] = field(default_factory=Counter)
    _buckets: dict[str, _Bucket] = field(default_factory=dict)

    def busy(self, peer: str) -> bool:
        """Whether ``peer`` already has ``max_bodies`` requests in progress."""
        return self.active[peer] >= self.allowance.max_bodies

    def take(self, peer: str, now: float, round_: int) -> bool:
        """Spend one request of ``peer``'s allowance at time ``now`` (monotonic seconds) while
        this node is at round ``round_``; False when none is left."""
        a = self.allowance
        bucket = self._buckets.get(peer)
        if bucket is None:
            bucket = self._buckets[peer] = _Bucket(a.burst, now, round_)
        refill = a.per_second * max(0.0, now - bucket.at)
        refill += a.per_round * max(0, round_ - bucket.round)
        bucket.tokens = min(a.burst, bucket.tokens + refill)
        bucket.at, bucket.round = now, max(bucket.round, round_)
        if bucket.tokens < 1:
            return False
        bucket.tokens -= 1
        return True

    def acquire(self, peer: str) -> bool:
        """Take one of ``peer``'s ``max_bodies`` slots (False if none is free); the caller
        releases it when the request has been handled."""
        if self.busy(peer):
            return False
        self.active[peer] += 1
        return True

    def release(self, peer: str) -> None:
        self.active[peer] -= 1
        if self.active[peer] <= 0:
            del self.active[peer]
