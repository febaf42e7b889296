"""Compressed tensors in a body: the ``encoding`` field, the five-element tensor entries and
their decoding, all checked strictly (docs/protocol.md, "Compressed tensors").

Why its own module: parse.py keeps the uncompressed layout it always had; everything a
compressed body adds is read here, and the codecs themselves are pure functions in
gossip/compression.py. A receiver reconstructs the model from the decoded deltas and the
sender's base in opener.py, because only the opener knows which bases it holds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from murmur.gossip.compression import (
    FORM_INT8,
    FORMS,
    STATE_ID_BYTES,
    CodecError,
    check_block,
    decode_tensor,
    payload_bytes,
)
from murmur.gossip.wire.format import (
    MAX_UINT63,
    RejectReason,
    WireError,
    WireLimits,
)

_ENCODING_KEYS = frozenset({"codec", "block", "base", "id"})


@dataclass(frozen=True)
class BodyEncoding:
    """A compressed body's ``encoding`` field: codec, int8 block, the base the deltas apply
    to (None for a keyframe) and the id of the model they make."""

    codec: str
    block: int
    base: bytes | None
    state_id: bytes


@dataclass(frozen=True)
class CompressedSlot:
    """Where one compressed tensor lies in the body, and how to decode it."""

    shape: tuple[int, ...]
    form: str
    k: int
    start: int
    size: int


def check_uncompressed(limits: WireLimits) -> None:
    """An uncompressed body is codec "none", which a receiver may refuse too."""
    if "none" not in limits.accepted_codecs:
        raise WireError(
            RejectReason.UNSUPPORTED_CODEC,
            f"uncompressed tensors; this node accepts {sorted(limits.accepted_codecs)}",
        )


def parse_encoding(value: Any, limits: WireLimits) -> BodyEncoding:
    """Check a body's ``encoding`` map: a known codec this receiver accepts, a valid block,
    16-byte ids."""
    if type(value) is not dict or set(value) != _ENCODING_KEYS:
        raise WireError(
            RejectReason.MALFORMED,
            f"'encoding' must be a map with exactly {sorted(_ENCODING_KEYS)}",
        )
    codec = value["codec"]
    if type(codec) is not str or codec not in FORMS:
        raise WireError(RejectReason.UNSUPPORTED_CODEC, f"unknown codec {str(codec)[:40]!r}")
    if codec not in limits.accepted_codecs:
        raise WireError(
            RejectReason.UNSUPPORTED_CODEC,
            f"codec {codec!r}; this node accepts {sorted(limits.accepted_codecs)}",
        )
    try:
        block = check_block(value["block"])
    except ValueError as exc:
        raise WireError(RejectReason.MALFORMED, str(exc)) from None
    base, state_id = value["base"], value["id"]
    if base is not None and (type(base) is not bytes or len(base) != STATE_ID_BYTES):
        raise WireError(RejectReason.MALFORMED, f"'base' must be nil or {STATE_ID_BYTES} bytes")
    if type(state_id) is not bytes or len(state_id) != STATE_ID_BYTES:
        raise WireError(RejectReason.MALFORMED, f"'id' must be {STATE_ID_BYTES} bytes")
    return BodyEncoding(codec, block, base, state_id)


def check_compressed_entry(
    entry: Any, encoding: BodyEncoding, shape: tuple[int, ...], start: int
) -> CompressedSlot:
    """Check the last two elements of a ``[name, dtype, shape, form, k]`` entry (the first
    three were checked as for an uncompressed tensor, ``shape`` being the model's): a form of
    the codec (a keyframe is dense int8), and ``k`` = n for dense int8, 0 <= k <= n else."""
    name, form, k = entry[0], entry[3], entry[4]
    n = math.prod(shape)
    allowed = {FORM_INT8} if encoding.base is None else FORMS[encoding.codec]
    if type(form) is not str or form not in allowed:
        raise WireError(
            RejectReason.MALFORMED,
            f"tensor {name!r}: form {str(form)[:40]!r} is not one of {sorted(allowed)} "
            f"for codec {encoding.codec!r}{' (a keyframe)' if encoding.base is None else ''}",
        )
    if type(k) is not int or not 0 <= k <= MAX_UINT63 or k > n or (form == FORM_INT8 and k != n):
        raise WireError(RejectReason.MALFORMED, f"tensor {name!r}: k = {k!r} for {n} entries")
    return CompressedSlot(shape, form, k, start, payload_bytes(form, n, k, encoding.block))


def decode_slot(plaintext: bytes, slot: CompressedSlot, name: str, block: int) -> np.ndarray:
    """The decoded (delta) tensor in ``slot``; ``WireError`` for any encoding fault."""
    n = math.prod(slot.shape)
    data = memoryview(plaintext)[slot.start : slot.start + slot.size]
    try:
        flat = decode_tensor(data, slot.form, n, slot.k, block)
    except CodecError as exc:
        raise WireError(RejectReason(exc.reason), f"tensor {name!r}: {exc.detail}") from None
    return flat.reshape(slot.shape)
