"""Parsing untrusted bytes into an envelope's fields and a body's update: strict, bounded,
and refusing anything not in the one canonical encoding, before any signature is checked."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np
from murmur.crypto.sealing import (
    COMMITMENT_BYTES,
    EPHEMERAL_KEY_BYTES,
    NONCE_BYTES,
    TAG_BYTES,
    WRAPPED_KEY_BYTES,
)
from murmur.gossip.noise_claims import NOISE_FIELD, NoiseClaim, NoiseClaimError
from murmur.gossip.receipts import (
    DIGEST_BYTES,
    KEY_BYTES,
    MAX_PROOF_BYTES,
    SIGNATURE_BYTES,
    AuditHead,
    EquivocationProof,
    Receipt,
    ReceiptError,
)
from murmur.gossip.wire.compressed import (
    BodyEncoding,
    CompressedSlot,
    check_compressed_entry,
    check_uncompressed,
    decode_slot,
    parse_encoding,
)
from murmur.gossip.wire.format import (
    _BODY_HEADER_LENGTH,
    _DECODE_GUARD_ITEMS,
    BODY_ENCODING_FIELD,
    BODY_FIELDS,
    ENVELOPE_FIELDS,
    MAX_UINT63,
    PROTOCOL_VERSION,
    STUDY_FIELD,
    STUDY_ID_BYTES,
    WIRE_DTYPES,
    ModelUpdate,
    RejectReason,
    WireError,
    WireLimits,
    _envelope_prefix,
    _RawEnvelope,
)


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


def _parse_recipients(recipients: Any, limits: WireLimits) -> list[tuple[bytes, bytes]]:
    """The `recipients` array of an envelope or a stream header: (public key, wrapped key)
    pairs, at least one, at most the limit, no key twice."""
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
    return pairs


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
    pairs = _parse_recipients(obj["recipients"], limits)
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
        key_commitment=_require_bin(obj["key_commitment"], "key_commitment", COMMITMENT_BYTES),
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
    plaintext: bytes,
    spec: dict[str, tuple[tuple[int, ...], str]],
    limits: WireLimits,
    study: bytes | None = None,
) -> tuple[ModelUpdate, AuditHead, BodyEncoding | None]:
    """Decode the decrypted body and check it against the receiver's study and model.

    ``study``: the receiver's study (manifest hash), or None for a node without one; an
    update of another study (or with none, or one where none is expected) is
    ``unknown_study``, checked before the tensors, whose shapes are the study's.

    Uncompressed tensors become read-only numpy views of ``plaintext``: no copy of the model
    is made. Compressed ones (gossip/wire/compressed.py) are decoded into new arrays: the
    deltas the opener adds to the sender's base. Returns the update, the sender's audit head
    (not yet checked against the signature) and the body's encoding (None: uncompressed).
    """
    body_start = _parse_body_start(plaintext, len(plaintext), spec, limits, study)
    if body_start is None:
        raise _malformed("the body is shorter than its header")
    layout, encoding = body_start.layout, body_start.encoding
    metrics, receipts, proofs, head, noise = _body_fields(body_start.header, limits)
    tensors = {}
    for name in spec:
        slot = layout[name]
        if isinstance(slot, CompressedSlot):
            tensors[name] = decode_slot(plaintext, slot, name, encoding.block)
            continue
        dtype, shape, start = slot
        array = np.frombuffer(plaintext, dtype, math.prod(shape), start).reshape(shape)
        array.flags.writeable = False  # a streamed body is a bytearray
        if not np.isfinite(array).all():
            raise WireError(RejectReason.NON_FINITE, f"tensor {name!r} contains NaN or infinity")
        tensors[name] = array
    update = ModelUpdate(
        tensors=tensors, metrics=metrics, receipts=receipts, proofs=proofs, noise=noise
    )
    return update, head, encoding


@dataclass(frozen=True)
class BodyStart:
    """A body's header, checked against the receiver's study and model: the header map,
    where the tensor bytes start, each tensor's place (``_tensor_layout``) and the encoding
    (None: uncompressed)."""

    header: dict
    data_start: int
    layout: dict[str, Any]
    encoding: BodyEncoding | None


def _parse_body_start(
    prefix: Any,
    body_length: int,
    spec: dict[str, tuple[tuple[int, ...], str]],
    limits: WireLimits,
    study: bytes | None,
) -> BodyStart | None:
    """The checks of a body that need only its header, on its first ``len(prefix)`` bytes
    of ``body_length`` (all of a whole envelope's; a streamed envelope's decrypted chunks so
    far): None while the header is not all there, else the checked ``BodyStart``, or
    ``WireError``: study (``unknown_study``), codec, tensor entries against the model, and
    the body's length against what the shapes need (``malformed``)."""
    if len(prefix) < _BODY_HEADER_LENGTH.size:
        if body_length < _BODY_HEADER_LENGTH.size:
            raise _malformed("the body is shorter than its header length field")
        return None
    (header_length,) = _BODY_HEADER_LENGTH.unpack_from(prefix)
    data_start = _BODY_HEADER_LENGTH.size + header_length
    if data_start > body_length:
        raise _malformed(f"the body header claims {header_length} bytes; the body is shorter")
    if data_start > len(prefix):
        return None
    header, data_start = _body_header(memoryview(prefix)[:data_start], limits)
    _check_study(header.get(STUDY_FIELD), study)
    encoding = None
    if BODY_ENCODING_FIELD in header:
        encoding = parse_encoding(header[BODY_ENCODING_FIELD], limits)
    else:
        check_uncompressed(limits)
    layout, end = _tensor_layout(header["tensors"], spec, limits, encoding, data_start)
    if end != body_length:
        raise _malformed(
            f"the body carries {body_length - data_start} tensor bytes; "
            f"the shapes in its header need {end - data_start}"
        )
    return BodyStart(header, data_start, layout, encoding)


def _body_fields(
    header: dict, limits: WireLimits
) -> tuple[dict[str, float], list[Receipt], list[EquivocationProof], AuditHead, NoiseClaim | None]:
    """A checked body header's metrics, receipts, proofs, audit head and DP noise claim."""
    try:
        head = AuditHead.decode(header["audit_head"])
    except ReceiptError as exc:
        raise _malformed(f"'audit_head': {exc}") from None
    metrics = _parse_metrics(header["metrics"], limits)
    receipts = _parse_list(header["receipts"], "receipts", limits.max_receipts, Receipt.decode)
    proofs = _parse_list(header["proofs"], "proofs", limits.max_proofs, EquivocationProof.decode)
    noise = None
    if NOISE_FIELD in header:
        try:
            noise = NoiseClaim.decode(header[NOISE_FIELD])
        except NoiseClaimError as exc:
            raise _malformed(str(exc)) from None
    return metrics, receipts, proofs, head, noise


def _body_header(plaintext: bytes, limits: WireLimits) -> tuple[dict, int]:
    """The body's msgpack header, checked to have exactly its fields, and where data starts."""
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
    optional = {BODY_ENCODING_FIELD, STUDY_FIELD, NOISE_FIELD}
    if not isinstance(header, dict) or set(header) - optional != set(BODY_FIELDS):
        raise _malformed(
            f"the body header must be a map with exactly {list(BODY_FIELDS)} "
            f"(and '{BODY_ENCODING_FIELD}' when compressed, '{STUDY_FIELD}' for a study's update, "
            f"'{NOISE_FIELD}' under DP)"
        )
    return header, data_start


def _check_study(sent: Any, expected: bytes | None) -> None:
    """``unknown_study`` unless the update belongs to the receiver's study."""
    if sent is not None and (type(sent) is not bytes or len(sent) != STUDY_ID_BYTES):
        raise _malformed(f"{STUDY_FIELD!r} must be a {STUDY_ID_BYTES}-byte manifest hash")
    if sent == expected:
        return
    ours = expected.hex()[:16] + "..." if expected else "none"
    theirs = sent.hex()[:16] + "..." if sent else "none"
    raise WireError(
        RejectReason.UNKNOWN_STUDY,
        f"the update is for study {theirs}; this node runs only the study it approved ({ours})",
    )


def _tensor_layout(
    entries: Any,
    spec: dict[str, tuple[tuple[int, ...], str]],
    limits: WireLimits,
    encoding: BodyEncoding | None,
    data_start: int,
) -> tuple[dict[str, Any], int]:
    """Each tensor's place in the body (dtype, shape, offset, or a `CompressedSlot`) and the
    offset where the tensor bytes end; every model tensor present, none twice."""
    if type(entries) is not list:
        raise _malformed("'tensors' must be an array")
    if len(entries) > limits.max_tensors:
        raise WireError(
            RejectReason.TOO_LARGE,
            f"{len(entries)} tensors is over the limit of {limits.max_tensors}",
        )
    width = 3 if encoding is None else 5
    layout: dict[str, Any] = {}
    offset = data_start
    for entry in entries:
        if type(entry) is not list or len(entry) != width:
            raise _malformed(
                "each tensor in the body header is an array [name, dtype, shape"
                + ("]" if encoding is None else ", form, k] in a compressed body")
            )
        name, dtype, shape = _check_tensor_entry(entry[:3], spec, limits)
        if name in layout:
            raise _malformed(f"tensor {name!r} appears twice")
        if encoding is None:
            layout[name] = (dtype, shape, offset)
            offset += math.prod(shape) * dtype.itemsize
        else:
            slot = check_compressed_entry(entry, encoding, shape, offset)
            layout[name] = slot
            offset += slot.size
    missing = [name for name in spec if name not in layout]
    if missing:
        raise WireError(RejectReason.SHAPE_MISMATCH, f"the update lacks tensors {missing[:5]}")
    return layout, offset


def _parse_metrics(metrics: Any, limits: WireLimits) -> dict[str, float]:
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
    return {key: float(value) for key, value in metrics.items()}


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
