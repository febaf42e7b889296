"""The envelope format: protocol constants, rejection reasons, the message types, the
limits, model specs and message sizes, and the canonical bytes that are hashed and signed
(docs/protocol.md is the specification)."""

from __future__ import annotations

import hashlib
import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum

import msgpack
import numpy as np
from murmur.crypto.allowlist import Peer
from murmur.gossip.compression import CODECS
from murmur.gossip.noise_claims import NoiseClaim
from murmur.gossip.receipts import (
    MAX_ROUND,
    AuditHead,
    EquivocationProof,
    Receipt,
    signed_digest,
)

PROTOCOL_VERSION = 5
UPDATE_KIND = "update"
KINDS = frozenset({UPDATE_KIND})
STUDY_KIND_HEX = 16  # hex digits of the study id in a study's envelope kind
ENVELOPE_FIELDS = (
    "version",
    "kind",
    "sender",
    "round",
    "head_digest",
    "timestamp_ms",
    "nonce",
    "ephemeral_key",
    "key_commitment",
    "recipients",
    "signature",
    "body",
)
BODY_FIELDS = ("tensors", "metrics", "receipts", "proofs", "audit_head")
STUDY_FIELD = "study"
"""The optional body field naming the study (the 32-byte manifest hash) an update belongs to:
present exactly when the sender runs a study (docs/governance.md); inside the signed and
encrypted body, so it is authenticated and only recipients learn it."""
STUDY_ID_BYTES = 32


def study_kind(study: bytes | None) -> str:
    """The envelope kind of an update of ``study``: ``update@<first 16 hex of its id>``, or
    ``update`` for a node without a study. The kind is in the signed digest and in every
    receipt, so a sender's envelopes of two studies are two (kind, round) slots: one key can
    sign round r of each study without that being an equivocation (gossip/receipts.py), and
    their heads are never compared as a rollback (gossip/heads.py)."""
    if study is None:
        return UPDATE_KIND
    return f"{UPDATE_KIND}@{study.hex()[:STUDY_KIND_HEX]}"


def is_update_kind(kind: str) -> bool:
    """``update`` or ``update@`` and 16 lowercase hex digits (docs/protocol.md)."""
    if kind == UPDATE_KIND:
        return True
    prefix, at, tail = kind.partition("@")
    return (
        prefix == UPDATE_KIND
        and at == "@"
        and len(tail) == STUDY_KIND_HEX
        and all(c in "0123456789abcdef" for c in tail)
    )


# A compressed body has one more field (gossip/compression.py; docs/protocol.md, "Compressed
# tensors"); an uncompressed body has exactly BODY_FIELDS, as before compression existed.
BODY_ENCODING_FIELD = "encoding"
WIRE_DTYPES: dict[str, np.dtype] = {
    "float16": np.dtype("<f2"),
    "float32": np.dtype("<f4"),
    "float64": np.dtype("<f8"),
}
MAX_UINT63 = MAX_ROUND  # the largest round, timestamp or dimension on the wire
DEFAULT_MAX_RECIPIENTS = 64
DEFAULT_MAX_STRING_BYTES = 256
DEFAULT_MAX_RECEIPTS = 64
DEFAULT_MAX_PROOFS = 16
_MAX_BIN_BYTES = 2**32 - 1  # msgpack's own limit on one bin object
_DECODE_GUARD_ITEMS = 4096
_BODY_HEADER_LENGTH = struct.Struct(">I")
BODY_AD_DOMAIN = b"murmur-envelope-body\x00"
# A streamed envelope's default chunk (plaintext bytes) and most chunks (gossip/wire/stream.py)
STREAM_CHUNK_BYTES = 512 << 10
STREAM_MAX_CHUNKS = 4096

# A model spec says what the receiver expects: tensor name -> (shape, dtype string).
ModelSpec = Mapping[str, tuple[tuple[int, ...], str]]


class RejectReason(StrEnum):
    """Why an envelope was refused. The values are the reason codes of docs/protocol.md."""

    MALFORMED = "malformed"
    TOO_LARGE = "too_large"
    UNSUPPORTED_VERSION = "unsupported_version"
    UNSUPPORTED_KIND = "unsupported_kind"
    UNKNOWN_SENDER = "unknown_sender"
    WRONG_RECIPIENT = "wrong_recipient"
    STALE = "stale"
    REPLAY = "replay"
    RATE_LIMITED = "rate_limited"
    BAD_SIGNATURE = "bad_signature"
    DECRYPT_FAILED = "decrypt_failed"
    UNSUPPORTED_DTYPE = "unsupported_dtype"
    SHAPE_MISMATCH = "shape_mismatch"
    NON_FINITE = "non_finite"
    BAD_RECEIPT = "bad_receipt"
    SENDER_MISMATCH = "sender_mismatch"
    UNKNOWN_STUDY = "unknown_study"
    UNSUPPORTED_CODEC = "unsupported_codec"
    UNKNOWN_BASE = "unknown_base"


HTTP_STATUS: dict[RejectReason, int] = {
    RejectReason.MALFORMED: 400,
    RejectReason.TOO_LARGE: 413,
    RejectReason.UNSUPPORTED_VERSION: 400,
    RejectReason.UNSUPPORTED_KIND: 400,
    RejectReason.UNKNOWN_SENDER: 403,
    RejectReason.WRONG_RECIPIENT: 421,
    RejectReason.STALE: 400,
    RejectReason.REPLAY: 409,
    RejectReason.RATE_LIMITED: 429,
    RejectReason.BAD_SIGNATURE: 403,
    RejectReason.DECRYPT_FAILED: 400,
    RejectReason.UNSUPPORTED_DTYPE: 422,
    RejectReason.SHAPE_MISMATCH: 422,
    RejectReason.NON_FINITE: 422,
    RejectReason.BAD_RECEIPT: 400,
    RejectReason.SENDER_MISMATCH: 403,
    RejectReason.UNKNOWN_STUDY: 409,
    RejectReason.UNSUPPORTED_CODEC: 422,
    RejectReason.UNKNOWN_BASE: 409,
}


class WireError(Exception):
    """An envelope was rejected; ``reason`` is machine-readable, ``detail`` is for people.

    ``signed`` is the envelope's ``(sender, round, nonce)`` when the refusal came after its
    signature verified (it still counts against the sender's replay and rate limits), else
    None.
    """

    def __init__(
        self, reason: RejectReason, detail: str, signed: tuple[bytes, int, bytes] | None = None
    ) -> None:
        super().__init__(reason, detail)
        self.reason = RejectReason(reason)
        self.detail = detail
        self.signed = signed

    @property
    def http_status(self) -> int:
        return HTTP_STATUS[self.reason]

    def __str__(self) -> str:
        return f"{self.reason}: {self.detail}"


@dataclass
class ModelUpdate:
    """What a node shares: its model tensors and optional metrics.

    ``receipts`` and ``proofs`` ride along so that equivocation is caught (gossip/receipts.py):
    the receipts of the envelopes the sender accepted in its previous round, and equivocation
    proofs it learned since its last envelope. There is no sample count field; ``noise``,
    the sender's DP noise parameters (gossip/noise_claims.py, None without DP), implies its
    training-set size (B / q), which its neighbours already learn to within a batch from its
    signed step count (docs/privacy.md).
    """

    tensors: dict[str, np.ndarray]
    metrics: dict[str, float] = field(default_factory=dict)
    receipts: list[Receipt] = field(default_factory=list)
    proofs: list[EquivocationProof] = field(default_factory=list)
    noise: NoiseClaim | None = None


@dataclass(frozen=True)
class WireLimits:
    """Bounds on what a receiver decodes; ``max_message_bytes=None`` derives it from the model."""

    max_message_bytes: int | None = None
    max_tensors: int = 1024
    max_dims: int = 8
    max_recipients: int = DEFAULT_MAX_RECIPIENTS
    max_metrics: int = 64
    max_string_bytes: int = DEFAULT_MAX_STRING_BYTES
    max_receipts: int = DEFAULT_MAX_RECEIPTS
    max_proofs: int = DEFAULT_MAX_PROOFS
    allowed_dtypes: frozenset[str] = frozenset({"float32"})
    timestamp_window_s: float = 300.0
    # The tensor codecs this receiver decodes (gossip/compression.py); "none" is float32.
    accepted_codecs: frozenset[str] = frozenset({"none"})

    def __post_init__(self) -> None:
        for name in ("max_tensors", "max_dims", "max_recipients", "max_metrics", "max_receipts"):
            if getattr(self, name) < 1:
                raise ValueError(f"WireLimits.{name} must be at least 1")
        if self.max_proofs < 0:
            raise ValueError("WireLimits.max_proofs must be at least 0")
        if self.max_message_bytes is not None and self.max_message_bytes < 1:
            raise ValueError("WireLimits.max_message_bytes must be positive (or None)")
        if self.max_string_bytes < 16:
            raise ValueError("WireLimits.max_string_bytes must be at least 16")
        unknown = set(self.allowed_dtypes) - set(WIRE_DTYPES)
        if unknown:
            raise ValueError(
                f"WireLimits.allowed_dtypes has {sorted(unknown)}; "
                f"choose from {sorted(WIRE_DTYPES)}"
            )
        if not self.timestamp_window_s > 0:
            raise ValueError("WireLimits.timestamp_window_s must be positive")
        unknown = set(self.accepted_codecs) - set(CODECS)
        if unknown:
            raise ValueError(
                f"WireLimits.accepted_codecs has {sorted(unknown)}; choose from {list(CODECS)}"
            )


@dataclass(frozen=True)
class OpenedEnvelope:
    """A verified, decrypted update.

    ``update.tensors`` are read-only views of the decrypted body (copy before changing them in
    place). ``body_sha256`` is the hex SHA-256 of the encrypted body: the same for every
    recipient and for the sender (``peek_envelope``), so audit logs on both ends can be joined.
    ``receipt`` is the standalone evidence of what the sender signed (gossip/receipts.py),
    including ``receipt.head``, the sender's signed audit head. ``state_id`` is set for a
    compressed update: the id under which the receiver keeps the reconstructed model as this
    sender's base for its next delta (gossip/compression.py).
    """

    sender: Peer
    round: int
    kind: str
    timestamp: float
    nonce: bytes
    update: ModelUpdate
    body_sha256: str
    receipt: Receipt
    state_id: bytes | None = None

    @property
    def head(self) -> AuditHead:
        """The sender's signed audit head (its log position and privacy spend)."""
        return self.receipt.head


@dataclass(frozen=True)
class EnvelopeInfo:
    """The unauthenticated header of an envelope, for logs and the sender's own audit record."""

    kind: str
    sender: bytes
    recipients: tuple[bytes, ...]
    round: int
    timestamp: float
    nonce: bytes
    body_sha256: str


@dataclass(frozen=True)
class _RawEnvelope:
    """An envelope whose structure has been checked but nothing else."""

    version: int
    kind: str
    sender: bytes
    round: int
    head_digest: bytes
    timestamp_ms: int
    nonce: bytes
    ephemeral_key: bytes
    key_commitment: bytes
    recipients: tuple[tuple[bytes, bytes], ...]
    signature: bytes
    body: bytes


def _normalize_spec(spec: ModelSpec) -> dict[str, tuple[tuple[int, ...], str]]:
    """Validate a spec and name its dtypes the way the wire does ("float32", ...)."""
    normalized = {}
    for name, entry in spec.items():
        try:
            shape, dtype = entry
            shape = tuple(int(d) for d in shape)
            wire_dtype = np.dtype(dtype).name
        except (TypeError, ValueError):
            raise ValueError(f"model spec entry {name!r} must be (shape, dtype string)") from None
        if wire_dtype not in WIRE_DTYPES or any(d < 0 for d in shape):
            raise ValueError(
                f"model spec entry {name!r}: shape {shape} / dtype {dtype!r} cannot go on the "
                f"wire (dtypes: {sorted(WIRE_DTYPES)})"
            )
        normalized[name] = (shape, wire_dtype)
    return normalized


def default_max_message_bytes(spec: ModelSpec, max_recipients: int = DEFAULT_MAX_RECIPIENTS) -> int:
    """Largest envelope a receiver of this model should accept.

    The tensors dominate, so the limit is their exact size plus generous fixed allowances
    (64 KiB for the header and metrics, 512 bytes per tensor, 128 bytes per recipient, whose
    entry takes 101, and 48 per chunk the body would take as a streamed envelope: its tag
    and digest, gossip/wire/stream.py): large enough for any honest envelope, small enough
    that nobody can make us buffer more.
    """
    tensor_bytes = sum(
        math.prod(shape) * WIRE_DTYPES[dtype].itemsize
        for shape, dtype in _normalize_spec(spec).values()
    )
    chunks = min(STREAM_MAX_CHUNKS, math.ceil(tensor_bytes / STREAM_CHUNK_BYTES))
    return tensor_bytes + 512 * len(spec) + 128 * max_recipients + 64 * 1024 + 48 * chunks


def _bin_header(length: int) -> bytes:
    """The msgpack header of a bin object of ``length`` bytes, in its shortest form."""
    if length < 2**8:
        return bytes((0xC4, length))
    if length < 2**16:
        return b"\xc5" + length.to_bytes(2, "big")
    if length < 2**32:
        return b"\xc6" + length.to_bytes(4, "big")
    raise ValueError("msgpack bin objects are limited to 4 GiB")


def _recipient_bytes(envelope: _RawEnvelope) -> list[bytes]:
    """Recipient count (uint16), then each recipient's public key and wrapped key."""
    parts = [struct.pack(">H", len(envelope.recipients))]
    for public_key, wrapped_key in envelope.recipients:
        parts += [public_key, wrapped_key]
    return parts


def _rest_digest(envelope: _RawEnvelope, body_sha256: bytes) -> bytes:
    """SHA-256 of everything signed besides (version, kind, sender, round, head_digest):
    docs/protocol.md, "What the signature covers".

    A fixed big-endian layout, not msgpack, so that a second implementation cannot disagree
    about what was signed. The body enters through its own SHA-256, which is therefore the
    only pass over the large bytes and doubles as the update's ``body_sha256``; the key
    commitment enters so that one signature fixes one body key, hence one plaintext.
    """
    parts = [
        struct.pack(">Q", envelope.timestamp_ms),
        envelope.nonce,
        envelope.ephemeral_key,
        envelope.key_commitment,
        *_recipient_bytes(envelope),
        body_sha256,
    ]
    return hashlib.sha256(b"".join(parts)).digest()


def _body_associated_data(envelope: _RawEnvelope) -> bytes:
    """The body's AEAD associated data: every header field but the signature and the body,
    in one fixed layout (docs/protocol.md, "Encryption"). A body copied into an envelope with
    another sender, round or recipient list does not decrypt."""
    kind = envelope.kind.encode("utf-8")
    return b"".join(
        [
            BODY_AD_DOMAIN,
            struct.pack(">HB", envelope.version, len(kind)),
            kind,
            envelope.sender,
            struct.pack(">Q", envelope.round),
            envelope.head_digest,
            struct.pack(">Q", envelope.timestamp_ms),
            envelope.nonce,
            envelope.ephemeral_key,
            envelope.key_commitment,
            *_recipient_bytes(envelope),
        ]
    )


def _signed_digest(envelope: _RawEnvelope, body_sha256: bytes) -> bytes:
    """The 32 bytes the sender signs: the second level over ``_rest_digest``."""
    return signed_digest(
        envelope.version,
        envelope.kind,
        envelope.sender,
        envelope.round,
        envelope.head_digest,
        _rest_digest(envelope, body_sha256),
    )


def _envelope_prefix(envelope: _RawEnvelope) -> bytes:
    """The canonical encoding of everything up to the body bytes, which come last.

    Building the envelope as prefix + ciphertext costs one copy of the ciphertext; comparing
    a received envelope's first bytes with this prefix proves it is canonically encoded
    without re-encoding the body.
    """
    values = (
        envelope.version,
        envelope.kind,
        envelope.sender,
        envelope.round,
        envelope.head_digest,
        envelope.timestamp_ms,
        envelope.nonce,
        envelope.ephemeral_key,
        envelope.key_commitment,
        [list(pair) for pair in envelope.recipients],
        envelope.signature,
    )
    parts = [msgpack.Packer().pack_map_header(len(ENVELOPE_FIELDS))]
    for name, value in zip(ENVELOPE_FIELDS[:-1], values, strict=True):
        parts += [msgpack.packb(name), msgpack.packb(value)]
    parts += [msgpack.packb("body"), _bin_header(len(envelope.body))]
    return b"".join(parts)
