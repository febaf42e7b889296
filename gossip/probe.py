"""The neighbour probe: "are you up, and will you take my envelopes?", asked before a round.

Why: a node must not spend privacy budget on a round it cannot share (docs/protocol.md,
"Rounds"). `/health` only says a peer's process answers; it cannot say whether the peer has
this node on its allowlist, and a hospital that nobody admitted used to learn that only from
its audit log, after training. So a node asks each neighbour it lacks fresh evidence about
with a small signed probe, and the neighbour answers with the verdict its envelope opener
would reach on this sender: admitted, or the refusal reason. Since protocol v4 the probe's
HTTP request is authenticated first, like every POST (`Murmur-Auth`, gossip/auth.py), so a
neighbour that does not admit us (or sees our clock beyond its window) answers
`401 unauthenticated` without reading the probe; the sender's transport tells a skewed clock
from a missing admission by the answer's HTTP `Date` (gossip/transport.py, ClockWatch).

A probe is 162 bytes, fixed layout (big-endian integers):

| bytes | field |
|---|---|
| 8 | ASCII `MRMPROBE` |
| 2 | version, `1` |
| 32 | sender's Ed25519 public key |
| 32 | recipient's Ed25519 public key |
| 8 | sender's clock, milliseconds since the Unix epoch |
| 16 | random nonce |
| 64 | Ed25519 signature of `murmur-probe` + one zero byte + the 98 bytes above |

The signature proves the asker holds the key it claims, so a probe cannot be used to learn
whether some other hospital is admitted; the recipient key and the timestamp window keep a
captured probe from being replayed to another node or much later. A probe changes nothing
on the receiver, so it needs no replay memory. The answer is not signed: a forged
"admitted" can at worst make a node train one round whose sends then fail, and the failed
sends count as evidence at the next round's check.
"""

from __future__ import annotations

import json
import os
import struct
import time
from dataclasses import dataclass
from enum import StrEnum

from murmur.crypto.allowlist import Allowlist, Peer
from murmur.crypto.identity import Identity, verify_signature
from murmur.gossip.wire import RejectReason, WireError

PROBE_MAGIC = b"MRMPROBE"
PROBE_VERSION = 1
PROBE_CONTENT_TYPE = "application/x-murmur-probe"
_DOMAIN = b"murmur-probe\x00"
_SIGNED = struct.Struct(">8sH32s32sQ16s")
PROBE_BYTES = _SIGNED.size + 64

# Reason codes with which a peer refused an envelope after authenticating its sender: the
# peer admits us (the envelope was merely late, early or repeated, or a compressed delta
# against a base it does not hold: the sender's next envelope is a keyframe).
_AUTHENTICATED_REFUSALS = frozenset(
    {"old_round", "duplicate", "too_far_ahead", "replay", "unknown_base"}
)
# Refusals of the sender itself: the peer does not admit us (or cannot tell it is us).
_ADMISSION_REFUSALS = frozenset(
    {
        "unauthenticated",
        "unknown_sender",
        "wrong_recipient",
        "bad_signature",
        "stale",
        "sender_mismatch",
    }
)
# Refusals of an envelope's content, which a probe cannot check (the two nodes disagree on the
# model or the limits): a probe's "admitted" must not hide them, or the node would train a
# round, be refused, probe, train again... Only a send that succeeds clears them.
_CONTENT_REFUSALS = frozenset(
    {
        "malformed",
        "too_large",
        "unsupported_version",
        "unsupported_kind",
        "decrypt_failed",
        "unsupported_dtype",
        "shape_mismatch",
        "non_finite",
        "bad_receipt",
        "unsupported_codec",
    }
)


def build_probe(identity: Identity, recipient: bytes, *, now: float | None = None) -> bytes:
    """A signed probe from `identity` to the node whose public key is `recipient`."""
    timestamp_ms = int((time.time() if now is None else now) * 1000)
    signed = _SIGNED.pack(
        PROBE_MAGIC, PROBE_VERSION, identity.public_key, recipient, timestamp_ms, os.urandom(16)
    )
    return signed + identity.sign(_DOMAIN + signed)


def check_probe(
    data: bytes,
    own_key: bytes,
    allowlist: Allowlist,
    *,
    timestamp_window_s: float,
    now: float | None = None,
) -> Peer:
    """The admitted peer that sent probe `data`, or WireError with the reason an envelope
    from that sender would get (the same codes and HTTP statuses as `POST /gossip`)."""
    if len(data) != PROBE_BYTES:
        raise WireError(
            RejectReason.MALFORMED, f"a probe is {PROBE_BYTES} bytes, this one {len(data)}"
        )
    magic, version, sender, recipient, timestamp_ms, _ = _SIGNED.unpack_from(data)
    if magic != PROBE_MAGIC:
        raise WireError(RejectReason.MALFORMED, "not a murmur probe (wrong magic bytes)")
    if version != PROBE_VERSION:
        raise WireError(
            RejectReason.UNSUPPORTED_VERSION,
            f"probe version {version}; this node speaks {PROBE_VERSION}",
        )
    peer = allowlist.by_key(sender)
    if peer is None:
        raise WireError(
            RejectReason.UNKNOWN_SENDER,
            f"sender key {sender.hex()[:16]}... is not on the allowlist",
        )
    if recipient != own_key:
        raise WireError(RejectReason.WRONG_RECIPIENT, "the probe is addressed to another node")
    skew = timestamp_ms / 1000 - (time.time() if now is None else now)
    if abs(skew) > timestamp_window_s:
        raise WireError(
            RejectReason.STALE,
            f"timestamp is {skew:+.0f} s from this node's clock "
            f"(window ±{timestamp_window_s:.0f} s)",
        )
    if not verify_signature(sender, _DOMAIN + data[: _SIGNED.size], data[_SIGNED.size :]):
        raise WireError(RejectReason.BAD_SIGNATURE, f"not a valid signature by {peer.name}")
    return peer


class Reach(StrEnum):
    """What this node last learnt about whether a neighbour takes its envelopes."""

    UNKNOWN = "unknown"  # not asked yet
    ADMITTED = "admitted"  # it authenticated us: it takes our envelopes
    REFUSED = "refused"  # it answered, but refuses us (the detail says why)
    UNREACHABLE = "unreachable"  # no answer in time


@dataclass(frozen=True)
class Contact:
    """The last evidence about one neighbour: a probe's answer or an envelope's send result."""

    reach: Reach
    detail: str  # for people: "HTTP 403 unknown_sender: ...", "ClientConnectorError"
    source: str  # "probe" or "send"
    at: float | None  # Unix time of the evidence; None for UNKNOWN
    reason: str = ""  # the peer's reason code, when it answered

    @staticmethod
    def unknown() -> Contact:
        return Contact(Reach.UNKNOWN, "not asked yet", "none", None)

    @property
    def only_a_send_clears(self) -> bool:
        """A send refused for its content: a later probe answer does not replace it."""
        return (
            self.source == "send"
            and self.reach is Reach.REFUSED
            and self.reason in _CONTENT_REFUSALS
        )

    @staticmethod
    def from_answer(status: int | None, reason: str, detail: str, *, source: str) -> Contact:
        """Classify a peer's answer (HTTP status and reason code; status None: no answer)."""
        now = time.time()
        reason, detail = _printable(reason), _printable(detail)
        if status is None:
            return Contact(Reach.UNREACHABLE, reason.removeprefix("unreachable: "), source, now)
        if source == "probe":
            admitted = status == 200 and reason == "admitted"
        else:
            admitted = status == 202 or reason in _AUTHENTICATED_REFUSALS
        if admitted:
            return Contact(Reach.ADMITTED, reason, source, now, reason)
        if status == 404 and source == "probe":
            detail = "no /probe route: it runs an older murmur; upgrade it"
        text = f"HTTP {status} {reason}" + (f": {detail}" if detail else "")
        return Contact(Reach.REFUSED, text, source, now, reason)

    def describe(self) -> str:
        """Why this neighbour does or does not count, in a few words."""
        if self.reach is Reach.REFUSED and self.reason in _ADMISSION_REFUSALS:
            return f"not admitting us ({self.detail})"
        if self.reach is Reach.REFUSED:
            return f"refusing our envelopes ({self.detail})"
        if self.reach is Reach.UNREACHABLE:
            return f"unreachable ({self.detail})"
        if self.reach is Reach.UNKNOWN:
            return "not asked yet"
        return "admits us"


def _printable(text: str, limit: int = 300) -> str:
    """A peer's words, safe for one log line: no control characters, bounded length."""
    return "".join(c if c.isprintable() else " " for c in text[:limit])


def parse_answer(status: int, text: str) -> tuple[str, str]:
    """(reason, detail) from a probe answer's JSON body, tolerating a body that is not."""
    try:
        body = json.loads(text)
    except ValueError:
        body = None
    if not isinstance(body, dict):
        return f"http_{status}", f"not a murmur answer: {text[:100]!r}"
    return str(body.get("reason", "")), str(body.get("detail", ""))
