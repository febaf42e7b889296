"""Request authentication (gossip/auth.py): the Murmur-Auth layout of docs/protocol.md, every
refusal with its precise reason, bounded nonce memory, and the per-peer token bucket."""

from __future__ import annotations

import base64
import hashlib
import struct

import pytest
from murmur.crypto.allowlist import Allowlist, Peer
from murmur.crypto.identity import generate_identity
from murmur.gossip.auth import (
    AUTH_BYTES,
    AUTH_HEADER,
    AUTH_TEXT_CHARS,
    AUTH_VERSION,
    AuthError,
    AuthFailure,
    PeerAllowance,
    PeerLimiter,
    RequestAuth,
    RequestAuthenticator,
    request_headers,
)
from murmur.gossip.wire import PROTOCOL_VERSION

ALICE = generate_identity("alice")  # admitted sender
BOB = generate_identity("bob")  # the receiving node
MALLORY = generate_identity("mallory")  # not admitted
ALLOWLIST = Allowlist(
    [
        Peer("alice", "http://127.0.0.1:9000", ALICE.public_key),
        Peer("bob", "http://127.0.0.1:9001", BOB.public_key),
    ]
)
NOW = 1_800_000_000.0
BODY = b"an envelope, say"
LENGTH = len(BODY)


def authenticator(**kwargs: object) -> RequestAuthenticator:
    return RequestAuthenticator(BOB.public_key, ALLOWLIST, 300.0, **kwargs)  # type: ignore[arg-type]


def header(sender=ALICE, recipient=BOB, body=BODY, path="/gossip", now=NOW) -> str:
    return RequestAuth.make(sender, recipient.public_key, path, body, now).encode()


def why(value: str | None, path="/gossip", length=LENGTH, now=NOW, guard=None) -> AuthFailure:
    with pytest.raises(AuthError) as caught:
        (guard or authenticator()).check(value, path, length, now)
    return caught.value.why


def test_the_header_is_the_documented_layout_and_signature() -> None:
    """Recompute docs/protocol.md, "Request authentication", by hand."""
    value = header()
    assert len(value) == AUTH_TEXT_CHARS == 260
    raw = base64.b64decode(value, validate=True)
    assert len(raw) == AUTH_BYTES == 194
    version, sender, recipient, timestamp_ms, nonce, length, digest = struct.unpack(
        ">H32s32sQ16sQ32s", raw[:130]
    )
    assert version == AUTH_VERSION == PROTOCOL_VERSION == 5
    assert (sender, recipient) == (ALICE.public_key, BOB.public_key)
    assert timestamp_ms == int(NOW * 1000) and len(nonce) == 16
    assert (length, digest) == (len(BODY), hashlib.sha256(BODY).digest())
    message = b"murmur-request-auth\x00" + bytes([len(b"/gossip")]) + b"/gossip" + raw[:130]
    ALICE.signing_key.verify_key.verify(message, raw[130:])  # raises if it does not verify
    peer, auth = authenticator().check(value, "/gossip", len(BODY), NOW)
    assert peer.name == "alice" and auth.nonce == nonce
    headers = request_headers(ALICE, BOB.public_key, "/gossip", BODY, "application/x")
    assert headers["Content-Type"] == "application/x" and len(headers[AUTH_HEADER]) == 260


def test_every_refusal_has_its_precise_reason() -> None:
    good = header()
    flipped = base64.b64decode(good)
    flipped = base64.b64encode(flipped[:-1] + bytes([flipped[-1] ^ 1])).decode()
    raw = base64.b64decode(good)
    v3 = base64.b64encode(struct.pack(">H", 3) + raw[2:]).decode()
    assert why(None) == AuthFailure.MISSING
    assert why("") == AuthFailure.MALFORMED
    assert why("!" * 260) == AuthFailure.MALFORMED
    assert why(good[:-4] + "====") == AuthFailure.MALFORMED
    assert why(good.replace("=", "A")) in {AuthFailure.MALFORMED, AuthFailure.BAD_SIGNATURE}
    assert why(v3) == AuthFailure.UNSUPPORTED_VERSION
    assert why(header(recipient=ALICE)) == AuthFailure.WRONG_RECIPIENT
    assert why(header(sender=MALLORY)) == AuthFailure.UNKNOWN_SENDER
    assert why(good, now=NOW + 301) == AuthFailure.STALE
    assert why(good, now=NOW - 301) == AuthFailure.STALE
    assert why(good, length=len(BODY) + 1) == AuthFailure.LENGTH_MISMATCH
    assert why(good, length=None) == AuthFailure.LENGTH_MISMATCH  # chunked: no length
    assert why(flipped) == AuthFailure.BAD_SIGNATURE
    assert why(good, path="/receipts") == AuthFailure.BAD_SIGNATURE  # signed for /gossip
    assert why(good, path="/gössip") == AuthFailure.BAD_SIGNATURE
    guard = authenticator()
    guard.check(good, "/gossip", len(BODY), NOW + 299)  # within the window
    assert why(good, guard=guard) == AuthFailure.REPLAY


def test_only_authenticated_requests_are_remembered_and_memory_is_bounded() -> None:
    guard = authenticator(max_nonces=8)
    for _ in range(5):
        with pytest.raises(AuthError):
            guard.check(header(sender=MALLORY), "/gossip", len(BODY), NOW)
    assert guard.remembered(MALLORY.public_key) == 0
    headers = [header(now=NOW + i) for i in range(20)]
    for value in headers:
        guard.check(value, "/gossip", len(BODY), NOW + 20)
    assert guard.remembered(ALICE.public_key) <= 8
    # Forgotten nonces cannot come back: nothing at or before the newest forgotten timestamp
    # is accepted any more, while a fresh header still is.
    assert why(headers[0], now=NOW + 20, guard=guard) == AuthFailure.REPLAY
    assert why(headers[-1], now=NOW + 20, guard=guard) == AuthFailure.REPLAY
    guard.check(header(now=NOW + 21), "/gossip", len(BODY), NOW + 21)
    # Nonces whose timestamps have left the window are forgotten first (they can never pass
    # the clock check again), without raising the floor.
    later = authenticator(max_nonces=4)
    for i in range(4):
        later.check(header(now=NOW + i), "/gossip", len(BODY), NOW + i)
    assert later.remembered(ALICE.public_key) == 4
    later.check(header(now=NOW + 400), "/gossip", len(BODY), NOW + 400)
    assert later.remembered(ALICE.public_key) == 1  # the four old ones are gone
    later.check(header(now=NOW + 399), "/gossip", len(BODY), NOW + 401)  # and nothing floored


def test_the_peer_bucket_refills_per_round_and_per_second() -> None:
    limiter = PeerLimiter(PeerAllowance(max_bodies=2, burst=3, per_round=2, per_second=0.5))
    assert [limiter.take("alice", 0.0, 1) for _ in range(4)] == [True, True, True, False]
    assert limiter.take("bob", 0.0, 1)  # per peer
    assert not limiter.take("alice", 1.0, 1)  # half a token
    assert limiter.take("alice", 2.0, 1)  # one token after two seconds
    assert not limiter.take("alice", 2.0, 1)
    assert [limiter.take("alice", 2.0, 2) for _ in range(3)] == [True, True, False]
    assert [limiter.take("alice", 2.0, 50) for _ in range(4)] == [True, True, True, False]
    assert limiter.acquire("alice") and limiter.acquire("alice")
    assert limiter.busy("alice") and not limiter.acquire("alice")
    limiter.release("alice")
    assert not limiter.busy("alice") and limiter.acquire("alice")
    with pytest.raises(ValueError):
        PeerAllowance(max_bodies=0)
