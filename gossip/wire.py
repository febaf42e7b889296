"""The envelope: how one model update travels, signed and encrypted, from one node to others.

docs/protocol.md is the specification; this module is its reference implementation. In short:
an envelope is a msgpack map in one canonical encoding whose ``body`` is the update encrypted
once (crypto/sealing.py) and whose ``signature`` is Ed25519 over the SHA-256 of a fixed binary
layout of (domain, version, kind, sender, round, head_digest, rest_digest), ``head_digest``
being the SHA-256 of the sender's audit head (its audit log position and privacy spend, whose
56 bytes travel encrypted in the body) and ``rest_digest`` the SHA-256 of every other field plus
the SHA-256 of the body. That split lets a small receipt (gossip/receipts.py) prove what a
sender signed, and how far its log and ledger had got, without the envelope.

Opening is strict and ordered from cheap to expensive: size, structure, allowlist, recipient,
timestamp and replay checks all happen before the body is hashed, the signature checked, the
body decrypted and its tensors validated against the receiver's model. Every rejection is one
``WireError`` carrying a ``RejectReason``; no other exception escapes ``EnvelopeOpener.open``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import secrets
import struct
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import msgpack
import numpy as np

from crypto.allowlist import Allowlist, Peer
from crypto.identity import Identity, verify_signature
from crypto.sealing import (
    EPHEMERAL_KEY_BYTES,
    NONCE_BYTES,
    TAG_BYTES,
    WRAPPED_KEY_BYTES,
    SealingError,
    seal,
    unseal,
    x25519_public_key,
)
from gossip.receipts import (
    DIGEST_BYTES,
    KEY_BYTES,
    MAX_PROOF_BYTES,
    MAX_ROUND,
    SIGNATURE_BYTES,
    AuditHead,
    EquivocationProof,
    Receipt,
    ReceiptError,
    no_audit_head,
    signed_digest,
)

PROTOCOL_VERSION = 3
KINDS = frozenset({"update"})
ENVELOPE_FIELDS = (
    "version",
    "kind",
    "sender",
    "round",
    "head_digest",
    "timestamp_ms",
    "nonce",
    "ephemeral_key",
    "recipients",
    "signature",
    "body",
)
BODY_FIELDS = ("tensors", "metrics", "receipts", "proofs", "audit_head")
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
}


class WireError(Exception):
    """An envelope was rejected; ``reason`` is machine-readable, ``detail`` is for people."""

    def __init__(self, reason: RejectReason, detail: str) -> None:
        super().__init__(reason, detail)
        self.reason = RejectReason(reason)
        self.detail = detail

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
    proofs it learned since its last envelope. There is no sample count: no receiver needs
    one, and it would tell every neighbour the size of the hospital's training set.
    """

    tensors: dict[str, np.ndarray]
    metrics: dict[str, float] = field(default_factory=dict)
    receipts: list[Receipt] = field(default_factory=list)
    proofs: list[EquivocationProof] = field(default_factory=list)


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


@dataclass(frozen=True)
class OpenedEnvelope:
    """A verified, decrypted update.

    ``update.tensors`` are read-only views of the decrypted body (copy before changing them in
    place). ``body_sha256`` is the hex SHA-256 of the encrypted body: the same for every
    recipient and for the sender (``peek_envelope``), so audit logs on both ends can be joined.
    ``receipt`` is the standalone evidence of what the sender signed (gossip/receipts.py),
    including ``receipt.head``, the sender's signed audit head.
    """

    sender: Peer
    round: int
    kind: str
    timestamp: float
    nonce: bytes
    update: ModelUpdate
    body_sha256: str
    receipt: Receipt

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
    recipients: tuple[tuple[bytes, bytes], ...]
    signature: bytes
    body: bytes


# ---------------------------------------------------------------------------------------------
# Model specs and sizes


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
    (64 KiB for the header and metrics, 512 bytes per tensor, 96 bytes per recipient): large
    enough for any honest envelope, small enough that nobody can make us buffer more.
    """
    tensor_bytes = sum(
        math.prod(shape) * WIRE_DTYPES[dtype].itemsize
        for shape, dtype in _normalize_spec(spec).values()
    )
    return tensor_bytes + 512 * len(spec) + 96 * max_recipients + 64 * 1024


# ---------------------------------------------------------------------------------------------
# Canonical bytes


def _bin_header(length: int) -> bytes:
    """The msgpack header of a bin object of ``length`` bytes, in its shortest form."""
    if length < 2**8:
        return bytes((0xC4, length))
    if length < 2**16:
        return b"\xc5" + length.to_bytes(2, "big")
    if length < 2**32:
        return b"\xc6" + length.to_bytes(4, "big")
    raise ValueError("msgpack bin objects are limited to 4 GiB")


def _rest_digest(envelope: _RawEnvelope, body_sha256: bytes) -> bytes:
    """SHA-256 of everything signed besides (version, kind, sender, round, head_digest):
    docs/protocol.md, "What the signature covers".

    A fixed big-endian layout, not msgpack, so that a second implementation cannot disagree
    about what was signed. The body enters through its own SHA-256, which is therefore the
    only pass over the large bytes and doubles as the update's ``body_sha256``.
    """
    parts = [
        struct.pack(">Q", envelope.timestamp_ms),
        envelope.nonce,
        envelope.ephemeral_key,
        struct.pack(">H", len(envelope.recipients)),
    ]
    for public_key, wrapped_key in envelope.recipients:
        parts += [public_key, wrapped_key]
    parts.append(body_sha256)
    return hashlib.sha256(b"".join(parts)).digest()


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
        [list(pair) for pair in envelope.recipients],
        envelope.signature,
    )
    parts = [msgpack.Packer().pack_map_header(len(ENVELOPE_FIELDS))]
    for name, value in zip(ENVELOPE_FIELDS[:-1], values, strict=True):
        parts += [msgpack.packb(name), msgpack.packb(value)]
    parts += [msgpack.packb("body"), _bin_header(len(envelope.body))]
    return b"".join(parts)


# ---------------------------------------------------------------------------------------------
# Building


def _wire_array(name: str, array: np.ndarray) -> tuple[str, np.ndarray]:
    """The wire dtype name and a C-contiguous little-endian version of ``array``."""
    if not isinstance(array, np.ndarray):
        raise TypeError(f"tensor {name!r} must be a numpy array, not {type(array).__name__}")
    dtype_name = array.dtype.name
    if dtype_name not in WIRE_DTYPES:
        raise ValueError(
            f"tensor {name!r} has dtype {array.dtype}; the wire carries {sorted(WIRE_DTYPES)}"
        )
    return dtype_name, np.require(array, dtype=WIRE_DTYPES[dtype_name], requirements="C")


def _encode_body(update: ModelUpdate, head: AuditHead | None = None) -> bytes:
    """The body plaintext: uint32 header length, msgpack header, raw tensor bytes in order.

    Keeping the tensor bytes outside msgpack lets the receiver view them inside the decrypted
    body without another copy; the sender still assembles the body in one copy (one join).
    ``head`` (default: no audit log) is the sender's audit head, whose digest it signs.
    """
    if not isinstance(update, ModelUpdate):
        raise TypeError("build_envelope needs a ModelUpdate")
    head = no_audit_head() if head is None else head
    if not isinstance(head, AuditHead):
        raise TypeError("the audit head must be a gossip.receipts.AuditHead")
    metrics = {}
    for key, value in update.metrics.items():
        if (
            not isinstance(key, str)
            or isinstance(value, bool)
            or not isinstance(value, int | float)
        ):
            raise TypeError(f"metrics must map str to a number, got {key!r}: {value!r}")
        metrics[key] = float(value)
    if len(update.receipts) > DEFAULT_MAX_RECEIPTS or len(update.proofs) > DEFAULT_MAX_PROOFS:
        raise ValueError(
            f"an update carries at most {DEFAULT_MAX_RECEIPTS} receipts and "
            f"{DEFAULT_MAX_PROOFS} proofs"
        )
    tensors, data = [], []
    for name, array in update.tensors.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"tensor names must be non-empty strings, got {name!r}")
        if len(name.encode("utf-8")) > DEFAULT_MAX_STRING_BYTES:
            raise ValueError(
                f"tensor name {name[:40]!r}... is over {DEFAULT_MAX_STRING_BYTES} bytes"
            )
        dtype_name, array = _wire_array(name, array)
        tensors.append([name, dtype_name, list(array.shape)])
        data.append(array.reshape(-1).view(np.uint8).data)
    header = msgpack.packb(
        {
            "tensors": tensors,
            "metrics": metrics,
            "receipts": [receipt.encode() for receipt in update.receipts],
            "proofs": [proof.encode() for proof in update.proofs],
            "audit_head": head.encode(),
        }
    )
    return b"".join([_BODY_HEADER_LENGTH.pack(len(header)), header, *data])


def _check_recipients(recipients: Sequence[bytes]) -> tuple[bytes, ...]:
    recipients = tuple(recipients)
    if not 1 <= len(recipients) <= DEFAULT_MAX_RECIPIENTS:
        raise ValueError(f"an envelope needs 1 to {DEFAULT_MAX_RECIPIENTS} recipients")
    for key in recipients:
        if not isinstance(key, bytes) or len(key) != KEY_BYTES:
            raise ValueError("recipients are 32-byte Ed25519 public keys (Peer.public_key)")
        try:
            x25519_public_key(key)
        except SealingError as exc:
            raise ValueError(str(exc)) from None
    if len(set(recipients)) != len(recipients):
        raise ValueError("recipients must be distinct")
    return recipients


def _seal_envelope(
    body: bytes,
    sender: Identity,
    recipients: Sequence[bytes],
    round: int,
    *,
    head_digest: bytes | None = None,
    kind: str = "update",
    now: float | None = None,
) -> bytes:
    """Encrypt an already encoded body and sign the envelope around it.

    ``head_digest`` must be the digest of the audit head inside ``body`` (default: that of
    ``no_audit_head()``); receivers refuse an envelope whose body head does not match it.
    """
    head_digest = no_audit_head().digest() if head_digest is None else head_digest
    if type(head_digest) is not bytes or len(head_digest) != DIGEST_BYTES:
        raise ValueError(f"head_digest must be {DIGEST_BYTES} bytes")
    if kind not in KINDS:
        raise ValueError(f"unknown message kind {kind!r}; kinds are {sorted(KINDS)}")
    if type(round) is not int or not 0 <= round <= MAX_UINT63:
        raise ValueError(f"round must be an int in [0, 2**63), got {round!r}")
    recipients = _check_recipients(recipients)
    timestamp_ms = int((time.time() if now is None else now) * 1000)
    if not 0 <= timestamp_ms <= MAX_UINT63:
        raise ValueError(f"timestamp {now!r} is out of range")
    nonce = secrets.token_bytes(NONCE_BYTES)
    sealed = seal(body, recipients, nonce)
    unsigned = _RawEnvelope(
        version=PROTOCOL_VERSION,
        kind=kind,
        sender=sender.public_key,
        round=round,
        head_digest=head_digest,
        timestamp_ms=timestamp_ms,
        nonce=nonce,
        ephemeral_key=sealed.ephemeral_public_key,
        recipients=tuple(zip(recipients, sealed.wrapped_keys, strict=True)),
        signature=b"",
        body=sealed.ciphertext,
    )
    digest = _signed_digest(unsigned, hashlib.sha256(sealed.ciphertext).digest())
    signed = dataclasses.replace(unsigned, signature=sender.sign(digest))
    return b"".join((_envelope_prefix(signed), sealed.ciphertext))


def build_envelope(
    update: ModelUpdate,
    sender: Identity,
    recipients: Sequence[bytes],
    round: int,
    *,
    head: AuditHead | None = None,
    kind: str = "update",
    now: float | None = None,
) -> bytes:
    """One envelope carrying ``update`` to every key in ``recipients``.

    The body is serialized, encrypted and hashed once whatever the number of recipients; send
    the same bytes to each of them. ``head`` is the sender's signed audit head (a node passes
    its own; ``None`` means a sender without audit log or ledger: all zero). ``now`` is Unix
    time in seconds (default: the clock). Raises ``ValueError``/``TypeError`` for an update
    that cannot be sent.
    """
    head = no_audit_head() if head is None else head
    return _seal_envelope(
        _encode_body(update, head),
        sender,
        recipients,
        round,
        head_digest=head.digest(),
        kind=kind,
        now=now,
    )


# ---------------------------------------------------------------------------------------------
# Parsing


def _unique_map(pairs: list[tuple[Any, Any]]) -> dict[Any, Any]:
    """msgpack map hook that refuses duplicate keys instead of keeping the last one."""
    result = dict(pairs)
    if len(result) != len(pairs):
        raise ValueError("duplicate key in a msgpack map")
    return result


def _unpack(data: Any, what: str, limits: WireLimits, max_bin_len: int) -> Any:
    """msgpack.unpackb with explicit limits; any decoding failure becomes ``malformed``.

    msgpack's item limits only keep decoding memory small (a few thousand items of at least
    one byte each); the WireLimits checks after decoding give the precise reasons.
    """
    items = max(_DECODE_GUARD_ITEMS, limits.max_recipients, limits.max_tensors, limits.max_metrics)
    try:
        return msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            use_list=True,
            object_pairs_hook=_unique_map,
            max_str_len=limits.max_string_bytes,
            max_bin_len=max_bin_len,
            max_array_len=items,
            max_map_len=items,
            max_ext_len=0,
        )
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise WireError(RejectReason.MALFORMED, f"{what} is not valid msgpack: {exc}") from None


def _malformed(detail: str) -> WireError:
    return WireError(RejectReason.MALFORMED, detail)


def _require_bin(value: Any, name: str, size: int) -> bytes:
    if type(value) is not bytes or len(value) != size:
        raise _malformed(f"'{name}' must be {size} bytes of msgpack bin")
    return value


def _require_uint63(value: Any, name: str) -> int:
    if type(value) is not int or not 0 <= value <= MAX_UINT63:
        raise _malformed(f"'{name}' must be an integer in [0, 2**63)")
    return value


def _parse_envelope(data: Any, limits: WireLimits, max_message_bytes: int) -> _RawEnvelope:
    """Decode and check the structure and canonical encoding of an envelope; nothing else."""
    try:
        view = memoryview(data).cast("B")
    except TypeError:
        raise _malformed(f"an envelope is bytes, not {type(data).__name__}") from None
    size = view.nbytes
    if size > max_message_bytes:
        raise WireError(
            RejectReason.TOO_LARGE, f"{size} bytes is over the limit of {max_message_bytes}"
        )
    obj = _unpack(view, "the envelope", limits, max_bin_len=max_message_bytes)
    if not isinstance(obj, dict):
        raise _malformed("an envelope is a msgpack map")
    version = obj.get("version")
    if type(version) is int and version != PROTOCOL_VERSION:
        raise WireError(
            RejectReason.UNSUPPORTED_VERSION,
            f"protocol version {version}; this node speaks version {PROTOCOL_VERSION}",
        )
    if set(obj) != set(ENVELOPE_FIELDS):
        missing = sorted(set(ENVELOPE_FIELDS) - set(obj))
        extra = sorted(map(str, set(obj) - set(ENVELOPE_FIELDS)))
        raise _malformed(f"envelope fields missing {missing}, unexpected {extra}")
    if type(version) is not int:
        raise _malformed("'version' must be an integer")
    if type(obj["kind"]) is not str:
        raise _malformed("'kind' must be a string")
    recipients = obj["recipients"]
    if type(recipients) is not list or not recipients:
        raise _malformed("'recipients' must be a non-empty array")
    if len(recipients) > limits.max_recipients:
        raise WireError(
            RejectReason.TOO_LARGE,
            f"{len(recipients)} recipients is over the limit of {limits.max_recipients}",
        )
    pairs = []
    for entry in recipients:
        if type(entry) is not list or len(entry) != 2:
            raise _malformed("each recipient is an array [public_key, wrapped_key]")
        pairs.append(
            (
                _require_bin(entry[0], "recipients[].public_key", KEY_BYTES),
                _require_bin(entry[1], "recipients[].wrapped_key", WRAPPED_KEY_BYTES),
            )
        )
    if len({key for key, _ in pairs}) != len(pairs):
        raise _malformed("a recipient appears twice")
    body = obj["body"]
    if type(body) is not bytes or len(body) < TAG_BYTES:
        raise _malformed(f"'body' must be msgpack bin of at least {TAG_BYTES} bytes")
    envelope = _RawEnvelope(
        version=version,
        kind=obj["kind"],
        sender=_require_bin(obj["sender"], "sender", KEY_BYTES),
        round=_require_uint63(obj["round"], "round"),
        head_digest=_require_bin(obj["head_digest"], "head_digest", DIGEST_BYTES),
        timestamp_ms=_require_uint63(obj["timestamp_ms"], "timestamp_ms"),
        nonce=_require_bin(obj["nonce"], "nonce", NONCE_BYTES),
        ephemeral_key=_require_bin(obj["ephemeral_key"], "ephemeral_key", EPHEMERAL_KEY_BYTES),
        recipients=tuple(pairs),
        signature=_require_bin(obj["signature"], "signature", SIGNATURE_BYTES),
        body=body,
    )
    if len(envelope.kind.encode("utf-8")) > 255:
        raise _malformed("'kind' is longer than 255 bytes")
    prefix = _envelope_prefix(envelope)
    if size != len(prefix) + len(body) or view[: len(prefix)] != prefix:
        raise _malformed(
            "the envelope is not in canonical encoding (field order, shortest integer and "
            "length forms; see docs/protocol.md)"
        )
    return envelope


def _parse_body(
    plaintext: bytes, spec: dict[str, tuple[tuple[int, ...], str]], limits: WireLimits
) -> tuple[ModelUpdate, AuditHead]:
    """Decode the decrypted body and check it against the receiver's model.

    The tensors become read-only numpy views of ``plaintext``: no copy of the model is made.
    Returns the update and the sender's audit head (not yet checked against the signature).
    """
    if len(plaintext) < _BODY_HEADER_LENGTH.size:
        raise _malformed("the body is shorter than its header length field")
    (header_length,) = _BODY_HEADER_LENGTH.unpack_from(plaintext)
    data_start = _BODY_HEADER_LENGTH.size + header_length
    if data_start > len(plaintext):
        raise _malformed(f"the body header claims {header_length} bytes; the body is shorter")
    header = _unpack(
        memoryview(plaintext)[_BODY_HEADER_LENGTH.size : data_start],
        "the body header",
        limits,
        max_bin_len=MAX_PROOF_BYTES,
    )
    if not isinstance(header, dict) or set(header) != set(BODY_FIELDS):
        raise _malformed(f"the body header must be a map with exactly {list(BODY_FIELDS)}")
    entries = header["tensors"]
    if type(entries) is not list:
        raise _malformed("'tensors' must be an array")
    if len(entries) > limits.max_tensors:
        raise WireError(
            RejectReason.TOO_LARGE,
            f"{len(entries)} tensors is over the limit of {limits.max_tensors}",
        )
    layout: dict[str, tuple[np.dtype, tuple[int, ...], int]] = {}
    offset = data_start
    for entry in entries:
        name, dtype, shape = _check_tensor_entry(entry, spec, limits)
        if name in layout:
            raise _malformed(f"tensor {name!r} appears twice")
        layout[name] = (dtype, shape, offset)
        offset += math.prod(shape) * dtype.itemsize
    missing = [name for name in spec if name not in layout]
    if missing:
        raise WireError(RejectReason.SHAPE_MISMATCH, f"the update lacks tensors {missing[:5]}")
    if offset != len(plaintext):
        raise _malformed(
            f"the body carries {len(plaintext) - data_start} tensor bytes; "
            f"the shapes in its header need {offset - data_start}"
        )
    try:
        head = AuditHead.decode(header["audit_head"])
    except ReceiptError as exc:
        raise _malformed(f"'audit_head': {exc}") from None
    metrics = header["metrics"]
    if type(metrics) is not dict:
        raise _malformed("'metrics' must be a map")
    if len(metrics) > limits.max_metrics:
        raise WireError(
            RejectReason.TOO_LARGE,
            f"{len(metrics)} metrics is over the limit of {limits.max_metrics}",
        )
    for key, value in metrics.items():
        if type(key) is not str or type(value) not in (float, int):
            raise _malformed("'metrics' must map strings to numbers")
        if not math.isfinite(value):
            raise WireError(RejectReason.NON_FINITE, f"metric {key!r} is {value}")
    receipts = _parse_list(header["receipts"], "receipts", limits.max_receipts, Receipt.decode)
    proofs = _parse_list(header["proofs"], "proofs", limits.max_proofs, EquivocationProof.decode)
    tensors = {}
    for name in spec:
        dtype, shape, start = layout[name]
        array = np.frombuffer(plaintext, dtype, math.prod(shape), start).reshape(shape)
        if not np.isfinite(array).all():
            raise WireError(RejectReason.NON_FINITE, f"tensor {name!r} contains NaN or infinity")
        tensors[name] = array
    update = ModelUpdate(
        tensors=tensors,
        metrics={key: float(value) for key, value in metrics.items()},
        receipts=receipts,
        proofs=proofs,
    )
    return update, head


def _parse_list(value: Any, name: str, limit: int, decode: Any) -> list[Any]:
    """Decode the body's ``receipts`` or ``proofs``: an array of bin, each one well-formed.

    Only the structure is checked here (``bad_receipt`` otherwise); whether the signatures
    inside are valid is the node's business: an invalid receipt is evidence against nobody.
    """
    if type(value) is not list:
        raise WireError(RejectReason.BAD_RECEIPT, f"'{name}' must be an array of msgpack bin")
    if len(value) > limit:
        raise WireError(RejectReason.TOO_LARGE, f"{len(value)} {name} is over the limit of {limit}")
    decoded = []
    for index, item in enumerate(value):
        if type(item) is not bytes:
            raise WireError(RejectReason.BAD_RECEIPT, f"{name}[{index}] is not msgpack bin")
        try:
            decoded.append(decode(item))
        except ReceiptError as exc:
            raise WireError(RejectReason.BAD_RECEIPT, f"{name}[{index}]: {exc}") from None
    return decoded


def _check_tensor_entry(
    entry: Any, spec: dict[str, tuple[tuple[int, ...], str]], limits: WireLimits
) -> tuple[str, np.dtype, tuple[int, ...]]:
    """Check one ``[name, dtype, shape]`` header entry against the receiver's model."""
    if type(entry) is not list or len(entry) != 3:
        raise _malformed("each tensor in the body header is an array [name, dtype, shape]")
    name, dtype_name, shape = entry
    if type(name) is not str or type(dtype_name) is not str:
        raise _malformed("a tensor's name and dtype are strings")
    if type(shape) is not list or len(shape) > limits.max_dims:
        raise _malformed(f"tensor {name!r}: shape must be an array of at most {limits.max_dims}")
    if any(type(d) is not int or not 0 <= d <= MAX_UINT63 for d in shape):
        raise _malformed(f"tensor {name!r}: shape entries must be non-negative integers")
    if dtype_name not in limits.allowed_dtypes:
        raise WireError(
            RejectReason.UNSUPPORTED_DTYPE,
            f"tensor {name!r} has dtype {dtype_name!r}; allowed: {sorted(limits.allowed_dtypes)}",
        )
    if name not in spec:
        raise WireError(RejectReason.SHAPE_MISMATCH, f"the model has no tensor {name!r}")
    expected_shape, expected_dtype = spec[name]
    if dtype_name != expected_dtype:
        raise WireError(
            RejectReason.UNSUPPORTED_DTYPE,
            f"tensor {name!r} is {dtype_name}; this model expects {expected_dtype}",
        )
    if tuple(shape) != expected_shape:
        raise WireError(
            RejectReason.SHAPE_MISMATCH,
            f"tensor {name!r} has shape {tuple(shape)}; this model expects {expected_shape}",
        )
    return name, WIRE_DTYPES[dtype_name], expected_shape


# ---------------------------------------------------------------------------------------------
# Replay protection


class ReplayGuard:
    """Remembers ``(sender, round, nonce)`` of accepted envelopes so none is accepted twice.

    Memory is bounded: per sender only the newest ``round_window`` rounds are kept, envelopes
    for older rounds are refused as ``stale`` (they can no longer be checked), and at most
    ``max_per_round`` envelopes per sender and round are accepted (``rate_limited``). Only
    authenticated envelopes are recorded, so only admitted peers occupy memory, and a peer
    that jumps ahead in rounds only shuts out its own older messages.
    """

    STATE_VERSION = 1

    def __init__(self, round_window: int = 32, max_per_round: int = 16) -> None:
        if round_window < 1 or max_per_round < 1:
            raise ValueError("round_window and max_per_round must be at least 1")
        self.round_window = round_window
        self.max_per_round = max_per_round
        self._newest: dict[bytes, int] = {}
        self._seen: dict[bytes, dict[int, set[bytes]]] = {}

    def check(self, sender: bytes, round: int, nonce: bytes) -> None:
        """Raise ``WireError`` if this envelope must not be accepted; record nothing."""
        newest = self._newest.get(sender)
        if newest is not None and round <= newest - self.round_window:
            raise WireError(
                RejectReason.STALE,
                f"round {round} is older than the replay window (newest round {newest})",
            )
        nonces = self._seen.get(sender, {}).get(round, ())
        if nonce in nonces:
            raise WireError(
                RejectReason.REPLAY, f"this envelope was already accepted (round {round})"
            )
        if len(nonces) >= self.max_per_round:
            raise WireError(
                RejectReason.RATE_LIMITED,
                f"already {len(nonces)} envelopes from this sender in round {round}",
            )

    def record(self, sender: bytes, round: int, nonce: bytes) -> None:
        """Remember an authenticated envelope (checking it first) and forget old rounds."""
        self.check(sender, round, nonce)
        rounds = self._seen.setdefault(sender, {})
        rounds.setdefault(round, set()).add(nonce)
        if round > self._newest.get(sender, -1):
            self._newest[sender] = round
            oldest_kept = round - self.round_window + 1
            for old in [r for r in rounds if r < oldest_kept]:
                del rounds[old]

    def to_state(self) -> dict[str, Any]:
        """Plain JSON/msgpack-able state for the node's checkpoint."""
        return {
            "version": self.STATE_VERSION,
            "round_window": self.round_window,
            "max_per_round": self.max_per_round,
            "senders": {
                sender.hex(): {
                    "newest_round": self._newest[sender],
                    "rounds": {
                        str(r): sorted(n.hex() for n in nonces) for r, nonces in rounds.items()
                    },
                }
                for sender, rounds in self._seen.items()
            },
        }

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> ReplayGuard:
        """Rebuild from ``to_state()``; ``ValueError`` if the state is not one."""
        try:
            if state["version"] != cls.STATE_VERSION:
                raise ValueError(f"unknown replay state version {state['version']!r}")
            guard = cls(int(state["round_window"]), int(state["max_per_round"]))
            for sender_hex, entry in state["senders"].items():
                sender = bytes.fromhex(sender_hex)
                guard._newest[sender] = int(entry["newest_round"])
                guard._seen[sender] = {
                    int(r): {bytes.fromhex(n) for n in nonces}
                    for r, nonces in entry["rounds"].items()
                }
        except (KeyError, TypeError, AttributeError, ValueError) as exc:
            raise ValueError(f"not a ReplayGuard state: {exc!r}") from None
        return guard


# ---------------------------------------------------------------------------------------------
# Opening


class EnvelopeOpener:
    """Verifies, decrypts and validates envelopes addressed to one node.

    ``spec`` is the receiver's model (name -> (shape, dtype)); updates that do not match it
    are refused. The opener keeps the replay guard, so use one opener per node.
    """

    def __init__(
        self,
        identity: Identity,
        allowlist: Allowlist,
        spec: ModelSpec,
        limits: WireLimits | None = None,
        replay: ReplayGuard | None = None,
    ) -> None:
        self.identity = identity
        self.allowlist = allowlist
        self.limits = limits if limits is not None else WireLimits()
        self.replay = replay if replay is not None else ReplayGuard()
        self._spec = _normalize_spec(spec)
        for name, (_, dtype) in self._spec.items():
            if dtype not in self.limits.allowed_dtypes:
                raise ValueError(
                    f"the model's tensor {name!r} is {dtype}, which WireLimits.allowed_dtypes "
                    f"({sorted(self.limits.allowed_dtypes)}) refuses"
                )
        self.max_message_bytes = self.limits.max_message_bytes or default_max_message_bytes(
            spec, self.limits.max_recipients
        )

    def open(self, data: bytes, now: float | None = None) -> OpenedEnvelope:
        """The verified update in ``data``, or ``WireError``; ``now`` is Unix time in seconds."""
        envelope = _parse_envelope(data, self.limits, self.max_message_bytes)
        if envelope.kind not in KINDS:
            raise WireError(
                RejectReason.UNSUPPORTED_KIND, f"unknown message kind {envelope.kind!r}"
            )
        sender = self.allowlist.by_key(envelope.sender)
        if sender is None:
            raise WireError(
                RejectReason.UNKNOWN_SENDER,
                f"sender key {envelope.sender.hex()[:16]}... is not on the allowlist",
            )
        wrapped_key = dict(envelope.recipients).get(self.identity.public_key)
        if wrapped_key is None:
            raise WireError(RejectReason.WRONG_RECIPIENT, "this node is not among the recipients")
        now = time.time() if now is None else now
        skew = envelope.timestamp_ms / 1000 - now
        if abs(skew) > self.limits.timestamp_window_s:
            raise WireError(
                RejectReason.STALE,
                f"timestamp is {skew:+.0f} s from this node's clock "
                f"(window ±{self.limits.timestamp_window_s:.0f} s)",
            )
        self.replay.check(envelope.sender, envelope.round, envelope.nonce)

        body_sha256 = hashlib.sha256(envelope.body).digest()
        rest_digest = _rest_digest(envelope, body_sha256)
        digest = signed_digest(
            envelope.version,
            envelope.kind,
            envelope.sender,
            envelope.round,
            envelope.head_digest,
            rest_digest,
        )
        if not verify_signature(envelope.sender, digest, envelope.signature):
            raise WireError(RejectReason.BAD_SIGNATURE, f"not a valid signature by {sender.name}")
        self.replay.record(envelope.sender, envelope.round, envelope.nonce)
        try:
            plaintext = unseal(
                self.identity, envelope.ephemeral_key, wrapped_key, envelope.body, envelope.nonce
            )
        except SealingError as exc:
            raise WireError(RejectReason.DECRYPT_FAILED, str(exc)) from None
        update, head = _parse_body(plaintext, self._spec, self.limits)
        if head.digest() != envelope.head_digest:
            raise _malformed(
                f"the audit head in the body is not the one {sender.name} signed "
                "(its digest differs from head_digest)"
            )
        return OpenedEnvelope(
            sender=sender,
            round=envelope.round,
            kind=envelope.kind,
            timestamp=envelope.timestamp_ms / 1000,
            nonce=envelope.nonce,
            update=update,
            body_sha256=body_sha256.hex(),
            receipt=Receipt(
                version=envelope.version,
                kind=envelope.kind,
                sender=envelope.sender,
                round=envelope.round,
                head=head,
                rest_digest=rest_digest,
                signature=envelope.signature,
            ),
        )


def peek_envelope(data: bytes, limits: WireLimits | None = None) -> EnvelopeInfo:
    """Read an envelope's header WITHOUT verifying it (logs, the sender's own audit record).

    Raises ``WireError`` if the bytes are not a well-formed envelope. Nothing returned here
    is authenticated; use ``EnvelopeOpener.open`` to accept an update.
    """
    limits = limits if limits is not None else WireLimits()
    envelope = _parse_envelope(data, limits, limits.max_message_bytes or _MAX_BIN_BYTES)
    return EnvelopeInfo(
        kind=envelope.kind,
        sender=envelope.sender,
        recipients=tuple(key for key, _ in envelope.recipients),
        round=envelope.round,
        timestamp=envelope.timestamp_ms / 1000,
        nonce=envelope.nonce,
        body_sha256=hashlib.sha256(envelope.body).hexdigest(),
    )
