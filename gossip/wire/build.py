"""Building an envelope: the update encoded once, encrypted once for all recipients, signed
over its canonical header and the sender's audit head."""

from __future__ import annotations

import dataclasses
import hashlib
import secrets
import time
from collections.abc import Sequence

import msgpack
import numpy as np
from murmur.crypto.identity import Identity
from murmur.crypto.sealing import (
    NONCE_BYTES,
    SealingError,
    encrypt_body,
    wrap_new_key,
    x25519_public_key,
)
from murmur.gossip.compression import FORMS, STATE_ID_BYTES, CompressedTensors
from murmur.gossip.noise_claims import NOISE_FIELD, NoiseClaim
from murmur.gossip.receipts import (
    DIGEST_BYTES,
    KEY_BYTES,
    AuditHead,
    no_audit_head,
)
from murmur.gossip.wire.format import (
    _BODY_HEADER_LENGTH,
    BODY_ENCODING_FIELD,
    DEFAULT_MAX_PROOFS,
    DEFAULT_MAX_RECEIPTS,
    DEFAULT_MAX_RECIPIENTS,
    DEFAULT_MAX_STRING_BYTES,
    MAX_UINT63,
    PROTOCOL_VERSION,
    STUDY_FIELD,
    STUDY_ID_BYTES,
    WIRE_DTYPES,
    ModelUpdate,
    _body_associated_data,
    _envelope_prefix,
    _RawEnvelope,
    _signed_digest,
    is_update_kind,
    study_kind,
)
from murmur.gossip.wire.stream import STREAM_ABOVE_BYTES, seal_streamed


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


def _encode_body(
    update: ModelUpdate,
    head: AuditHead | None = None,
    compressed: CompressedTensors | None = None,
    study: bytes | None = None,
) -> bytes:
    """The body plaintext, joined (``_body_parts``)."""
    return b"".join(_body_parts(update, head, compressed, study))


def _body_parts(
    update: ModelUpdate,
    head: AuditHead | None = None,
    compressed: CompressedTensors | None = None,
    study: bytes | None = None,
) -> list[bytes | memoryview]:
    """The body plaintext, in pieces: uint32 header length, msgpack header, raw tensor
    bytes in order (views of the tensors: a streamed envelope never joins them).

    Keeping the tensor bytes outside msgpack lets the receiver view them inside the decrypted
    body without another copy; the sender still assembles the body in one copy (one join).
    ``head`` (default: no audit log) is the sender's audit head, whose digest it signs.
    ``compressed``: the model as compressed tensors (gossip/compression.py) instead of
    ``update.tensors``, which must then be empty.
    ``study``: the 32-byte manifest hash of the sender's study, or None (no field) without one.
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
    if compressed is None:
        tensors, data = _plain_tensors(update.tensors)
    elif update.tensors:
        raise ValueError("a compressed update carries its tensors in `compressed` only")
    else:
        tensors, data = _compressed_tensors(compressed)
    fields = {
        "tensors": tensors,
        "metrics": metrics,
        "receipts": [receipt.encode() for receipt in update.receipts],
        "proofs": [proof.encode() for proof in update.proofs],
        "audit_head": head.encode(),
    }
    if compressed is not None:
        fields[BODY_ENCODING_FIELD] = {
            "codec": compressed.codec,
            "block": compressed.block,
            "base": compressed.base,
            "id": compressed.state_id,
        }
    if study is not None:
        if type(study) is not bytes or len(study) != STUDY_ID_BYTES:
            raise ValueError(f"study must be the {STUDY_ID_BYTES}-byte manifest hash")
        fields[STUDY_FIELD] = study
    if update.noise is not None:
        if not isinstance(update.noise, NoiseClaim):
            raise TypeError("update.noise must be a gossip.noise_claims.NoiseClaim")
        fields[NOISE_FIELD] = update.noise.encode()
    header = msgpack.packb(fields)
    return [_BODY_HEADER_LENGTH.pack(len(header)), header, *data]


def _check_name(name: object) -> None:
    if not isinstance(name, str) or not name:
        raise ValueError(f"tensor names must be non-empty strings, got {name!r}")
    if len(name.encode("utf-8")) > DEFAULT_MAX_STRING_BYTES:
        raise ValueError(f"tensor name {name[:40]!r}... is over {DEFAULT_MAX_STRING_BYTES} bytes")


def _plain_tensors(arrays: dict[str, np.ndarray]) -> tuple[list, list]:
    """Header entries ``[name, dtype, shape]`` and the raw bytes of uncompressed tensors."""
    tensors, data = [], []
    for name, array in arrays.items():
        _check_name(name)
        dtype_name, array = _wire_array(name, array)
        tensors.append([name, dtype_name, list(array.shape)])
        data.append(array.reshape(-1).view(np.uint8).data)
    return tensors, data


def _compressed_tensors(compressed: CompressedTensors) -> tuple[list, list]:
    """Header entries ``[name, "float32", shape, form, k]`` and each encoding's byte parts."""
    if compressed.codec not in FORMS:
        raise ValueError(f"codec {compressed.codec!r} does not compress")
    if len(compressed.state_id) != STATE_ID_BYTES or (
        compressed.base is not None and len(compressed.base) != STATE_ID_BYTES
    ):
        raise ValueError(f"state ids are {STATE_ID_BYTES} bytes")
    tensors, data = [], []
    for name, (shape, encoded) in compressed.tensors.items():
        _check_name(name)
        tensors.append([name, "float32", list(shape), encoded.form, encoded.k])
        data += [np.ascontiguousarray(part).view(np.uint8).data for part in encoded.parts]
    return tensors, data


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


def _unsigned_header(
    sender: Identity,
    recipients: Sequence[bytes],
    round: int,
    head_digest: bytes | None,
    kind: str,
    now: float | None,
) -> tuple[_RawEnvelope, bytes]:
    """Every header field but the signature (checked), and the fresh body key it wraps."""
    head_digest = no_audit_head().digest() if head_digest is None else head_digest
    if type(head_digest) is not bytes or len(head_digest) != DIGEST_BYTES:
        raise ValueError(f"head_digest must be {DIGEST_BYTES} bytes")
    if not is_update_kind(kind):
        raise ValueError(f"unknown message kind {kind!r}; kinds are update and update@<study>")
    if type(round) is not int or not 0 <= round <= MAX_UINT63:
        raise ValueError(f"round must be an int in [0, 2**63), got {round!r}")
    recipients = _check_recipients(recipients)
    timestamp_ms = int((time.time() if now is None else now) * 1000)
    if not 0 <= timestamp_ms <= MAX_UINT63:
        raise ValueError(f"timestamp {now!r} is out of range")
    nonce = secrets.token_bytes(NONCE_BYTES)
    key = wrap_new_key(sender, recipients, nonce)
    unsigned = _RawEnvelope(
        version=PROTOCOL_VERSION,
        kind=kind,
        sender=sender.public_key,
        round=round,
        head_digest=head_digest,
        timestamp_ms=timestamp_ms,
        nonce=nonce,
        ephemeral_key=key.ephemeral_public_key,
        key_commitment=key.commitment,
        recipients=tuple(zip(recipients, key.wrapped_keys, strict=True)),
        signature=b"",
        body=b"",
    )
    return unsigned, key.body_key


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
    """Encrypt an already encoded body and sign the (whole) envelope around it.

    ``head_digest`` must be the digest of the audit head inside ``body`` (default: that of
    ``no_audit_head()``); receivers refuse an envelope whose body head does not match it.
    """
    unsigned, body_key = _unsigned_header(sender, recipients, round, head_digest, kind, now)
    ciphertext = encrypt_body(body, body_key, unsigned.nonce, _body_associated_data(unsigned))
    digest = _signed_digest(unsigned, hashlib.sha256(ciphertext).digest())
    signed = dataclasses.replace(unsigned, signature=sender.sign(digest), body=ciphertext)
    return b"".join((_envelope_prefix(signed), ciphertext))


def _seal_stream(
    parts: Sequence[bytes | memoryview],
    sender: Identity,
    recipients: Sequence[bytes],
    round: int,
    *,
    head_digest: bytes | None = None,
    kind: str = "update",
    now: float | None = None,
    chunk_bytes: int | None = None,
) -> bytes:
    """Encrypt an encoded body (in pieces) chunk by chunk and sign the streamed envelope
    around it (gossip/wire/stream.py); the same checks as ``_seal_envelope``."""
    unsigned, body_key = _unsigned_header(sender, recipients, round, head_digest, kind, now)
    return seal_streamed(parts, unsigned, body_key, sender, chunk_bytes)


def build_envelope(
    update: ModelUpdate,
    sender: Identity,
    recipients: Sequence[bytes],
    round: int,
    *,
    head: AuditHead | None = None,
    kind: str | None = None,
    now: float | None = None,
    compressed: CompressedTensors | None = None,
    study: bytes | None = None,
    stream_above: int | None = STREAM_ABOVE_BYTES,
    chunk_bytes: int | None = None,
) -> bytes:
    """One envelope carrying ``update`` to every key in ``recipients``.

    The body is serialized, encrypted and hashed once whatever the number of recipients; send
    the same bytes to each of them. ``head`` is the sender's signed audit head (a node passes
    its own; ``None`` means a sender without audit log or ledger: all zero). ``now`` is Unix
    time in seconds (default: the clock). Raises ``ValueError``/``TypeError`` for an update
    that cannot be sent. ``compressed``: the model compressed (gossip/compression.py), with
    ``update.tensors`` empty. ``study`` is the sender's study (its manifest's 32-byte SHA-256),
    which receivers require to be theirs; ``kind`` defaults to the study's
    (``study_kind``: ``update@<first 16 hex of the id>``, ``update`` without a study).

    A body longer than ``stream_above`` bytes (default 1 MiB; None: never) is sent as a
    streamed envelope (gossip/wire/stream.py) in chunks of ``chunk_bytes`` (default 512
    KiB), which receivers check as they arrive; a shorter one as a whole envelope, exactly
    as before streams existed.
    """
    head = no_audit_head() if head is None else head
    kind = study_kind(study) if kind is None else kind
    parts = _body_parts(update, head, compressed, study)
    length = sum(memoryview(part).nbytes for part in parts)
    if stream_above is not None and length > stream_above:
        return _seal_stream(
            parts,
            sender,
            recipients,
            round,
            head_digest=head.digest(),
            kind=kind,
            now=now,
            chunk_bytes=chunk_bytes,
        )
    return _seal_envelope(
        b"".join(parts),
        sender,
        recipients,
        round,
        head_digest=head.digest(),
        kind=kind,
        now=now,
    )
