"""Compressing what a node shares: int8 quantisation and top-k sparsification of the update.

Why its own module: the codecs are pure functions of arrays, so the wire (gossip/wire/) and
the sharing step (node/sharing.py) meet here and nothing else; and because compression runs
on the model DP-SGD already released, it is post-processing and changes no privacy figure
(docs/privacy.md, "Compression").

Two codecs besides ``"none"`` (float32 as always):

* ``"int8"``: each tensor as int8 in [-127, 127] times one float32 scale per block of
  ``block`` values (``block = 0``: one scale per tensor), scale = max|x| / 127 of the block.
* ``"topk_int8"``: of each tensor, the ``ceil(fraction * n)`` entries of largest magnitude,
  their positions as a bitmap (or as sorted uint32 indices where those are smaller) and their
  values as int8 with per-block scales. Tensors of fewer than ``DENSE_BELOW`` entries (biases,
  a logistic regression's weights) go as dense int8: sparsifying them saves a few bytes
  against the message's fixed overhead and costs accuracy (a 13-weight model would move two
  weights a round).

What is compressed is the *update*: the difference between the model and the ``base``, the
model each receiver already reconstructed from this sender's previous message. A message
names its base by a 16-byte id that the message establishing it carried, and a receiver that
does not hold that base refuses the delta (``unknown_base``) instead of adding it to
something else. A message without a base (a *keyframe*) carries the whole model as int8; a
sender sends one first, and again after any neighbour did not take its previous message, so
a receiver that missed a round, or restarted, is back in step one round later.

Error feedback falls out of the base: the sender's `DeltaEncoder` keeps the reconstruction
its receivers hold, and each delta is taken against it, so what one round's quantisation or
sparsification dropped (model - base) is part of the next round's delta, never lost.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass

import numpy as np

CODECS: tuple[str, ...] = ("none", "int8", "topk_int8")
# The forms one tensor takes on the wire: dense int8, or top-k with a bitmap or index list.
FORM_INT8 = "int8"
FORM_BITMAP = "topk_bitmap"
FORM_INDEX = "topk_index"
FORMS: dict[str, frozenset[str]] = {
    "int8": frozenset({FORM_INT8}),
    "topk_int8": frozenset({FORM_INT8, FORM_BITMAP, FORM_INDEX}),
}
DENSE_BELOW = 4096
STATE_ID_BYTES = 16
MAX_BLOCK = 1 << 20
DEFAULT_BLOCK = 256
DEFAULT_FRACTION = 0.1
# The largest scale whose product with 127 is still a finite float32.
MAX_SCALE = float(np.finfo(np.float32).max) / 127.0

State = dict[str, np.ndarray]


class CodecError(ValueError):
    """An encoded tensor that cannot be decoded; ``reason`` is a wire reason code value
    ("malformed" or "non_finite")."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class CompressionSettings:
    """What a sender compresses with: the codec, the int8 block and top-k's fraction."""

    codec: str = "none"
    block: int = DEFAULT_BLOCK
    fraction: float = DEFAULT_FRACTION
    # top-k's warm-up: the first ``warmup`` deltas keep a larger share (``warmup_fraction``)
    warmup: int = 0

    def __post_init__(self) -> None:
        if self.codec not in CODECS:
            raise ValueError(f"unknown codec {self.codec!r}; codecs are {list(CODECS)}")
        check_block(self.block)
        if not 0 < self.fraction <= 1:
            raise ValueError(f"top-k fraction must be in (0, 1], got {self.fraction}")
        if type(self.warmup) is not int or self.warmup < 0:
            raise ValueError(f"top-k warm-up must be a whole number >= 0, got {self.warmup!r}")

    def warmup_fraction(self, delta: int) -> float:
        """The share top-k keeps in the sender's ``delta``-th delta (1 = the first after its
        first keyframe): during the warm-up it falls geometrically from dense towards
        ``fraction``, ``fraction ** (delta / (warmup + 1))``, then stays at ``fraction``.

        Why (Lin et al. 2018, "Deep Gradient Compression", warm-up training): the first
        rounds move the model most, and at 10 % a delta that large reaches the neighbours
        over many rounds through error feedback, so early in training they average in a
        model that lags far behind the sender's. Sending a larger share while the updates
        are large keeps that lag short; the steady-state message is unchanged.
        """
        if delta > self.warmup:
            return self.fraction
        return float(self.fraction ** (delta / (self.warmup + 1)))


def check_block(block: object) -> int:
    """``block`` if it is a valid int8 block size (0 = per tensor, else 1..MAX_BLOCK)."""
    if type(block) is not int or not 0 <= block <= MAX_BLOCK:
        raise ValueError(f"int8 block must be an integer in [0, {MAX_BLOCK}], got {block!r}")
    return block


def scale_count(n: int, block: int) -> int:
    """How many scales ``n`` int8 values carry: one per block, or one per tensor."""
    if n == 0:
        return 0
    return 1 if block == 0 else -(-n // block)


def quantize_int8(values: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    """(float32 scales, int8 values in [-127, 127]) for a flat float array."""
    flat = np.asarray(values, dtype=np.float32).reshape(-1)
    n = flat.size
    if n == 0:
        return np.zeros(0, np.float32), np.zeros(0, np.int8)
    size = n if block == 0 else block
    blocks = scale_count(n, block)
    padded = np.zeros(blocks * size, np.float32)
    padded[:n] = flat
    rows = padded.reshape(blocks, size)
    scales = (np.abs(rows).max(axis=1) / np.float32(127)).astype(np.float32)
    safe = np.where(scales > 0, scales, np.float32(1))
    quantized = np.clip(np.rint(rows / safe[:, None]), -127, 127).astype(np.int8)
    return scales, quantized.reshape(-1)[:n]


def dequantize_int8(scales: np.ndarray, quantized: np.ndarray, block: int) -> np.ndarray:
    """The float32 values of ``quantize_int8``'s output."""
    n = quantized.size
    out = quantized.astype(np.float32)
    if n == 0:
        return out
    if block == 0:
        out *= scales[0]
        return out
    whole = (n // block) * block
    out[:whole].reshape(-1, block)[...] *= scales[: n // block, None]
    if whole < n:
        out[whole:] *= scales[-1]
    return out


def top_k_count(n: int, fraction: float) -> int:
    """How many entries top-k keeps of a tensor of ``n``: at least one of a non-empty one."""
    return min(n, max(1 if n else 0, math.ceil(fraction * n)))


@dataclass(frozen=True)
class EncodedTensor:
    """One tensor on the wire: its form, its count of values ``k`` (n for dense int8) and
    its byte parts in wire order (scales, then bitmap or indices, then int8 values)."""

    form: str
    k: int
    parts: tuple[np.ndarray, ...]

    @property
    def nbytes(self) -> int:
        return sum(part.nbytes for part in self.parts)


def encode_int8(values: np.ndarray, block: int) -> EncodedTensor:
    scales, quantized = quantize_int8(values, block)
    return EncodedTensor(FORM_INT8, quantized.size, (scales, quantized))


def encode_top_k(values: np.ndarray, fraction: float, block: int) -> EncodedTensor:
    """The ``top_k_count`` largest-magnitude entries, positions in the smaller of a bitmap
    and a sorted uint32 index list, values as int8."""
    flat = np.asarray(values, dtype=np.float32).reshape(-1)
    n = flat.size
    k = top_k_count(n, fraction)
    if k == n:
        indices = np.arange(n, dtype=np.uint32)
    else:
        indices = np.sort(np.argpartition(np.abs(flat), n - k)[n - k :]).astype(np.uint32)
    scales, quantized = quantize_int8(flat[indices], block)
    if 4 * k < -(-n // 8):
        return EncodedTensor(FORM_INDEX, k, (scales, indices.astype("<u4"), quantized))
    mask = np.zeros(n, bool)
    mask[indices] = True
    return EncodedTensor(FORM_BITMAP, k, (scales, np.packbits(mask, bitorder="little"), quantized))


def payload_bytes(form: str, n: int, k: int, block: int) -> int:
    """The bytes one encoded tensor of ``n`` entries (``k`` kept) takes on the wire."""
    if form == FORM_INT8:
        return 4 * scale_count(n, block) + n
    positions = -(-n // 8) if form == FORM_BITMAP else 4 * k
    return 4 * scale_count(k, block) + positions + k


def decode_tensor(data: memoryview, form: str, n: int, k: int, block: int) -> np.ndarray:
    """The flat float32 values (dense, zeros where top-k dropped entries) of one encoded
    tensor whose ``payload_bytes`` are ``data``. Strict: every scale finite, >= 0 and small
    enough that 127 times it is finite; no int8 value -128 (the encoder never writes it);
    bitmaps with exactly ``k`` bits set and no padding bit; indices strictly increasing and
    below ``n``. Raises ``CodecError``."""
    if len(data) != payload_bytes(form, n, k, block):
        raise CodecError("malformed", f"{form} payload of {len(data)} bytes; expected more")
    count = n if form == FORM_INT8 else k
    n_scales = scale_count(count, block)
    scales = np.frombuffer(data, "<f4", n_scales, 0)
    if not np.isfinite(scales).all():
        raise CodecError("non_finite", "an int8 scale is NaN or infinity")
    if n_scales and (scales.min() < 0 or scales.max() > MAX_SCALE):
        raise CodecError("malformed", "an int8 scale is negative or out of range")
    offset = 4 * n_scales
    quantized = np.frombuffer(data, np.int8, count, len(data) - count)
    if count and quantized.min() == -128:
        raise CodecError("malformed", "an int8 value is -128 (the range is [-127, 127])")
    values = dequantize_int8(scales, quantized, block)
    if form == FORM_INT8:
        return values
    if form == FORM_BITMAP:
        bits = np.unpackbits(
            np.frombuffer(data, np.uint8, -(-n // 8), offset), bitorder="little"
        ).view(bool)
        if bits[n:].any():
            raise CodecError("malformed", "the top-k bitmap sets a bit past the tensor's end")
        indices = np.flatnonzero(bits[:n])
        if indices.size != k:
            raise CodecError("malformed", f"the top-k bitmap sets {indices.size} bits, not {k}")
    else:
        indices = np.frombuffer(data, "<u4", k, offset).astype(np.int64)
        if k and (indices[-1] >= n or (k > 1 and not (np.diff(indices) > 0).all())):
            raise CodecError(
                "malformed", "top-k indices must be strictly increasing and below the size"
            )
    dense = np.zeros(n, np.float32)
    dense[indices] = values
    return dense


@dataclass(frozen=True)
class CompressedTensors:
    """A compressed model update, ready for the wire (gossip/wire/build.py).

    ``base`` is the id of the model the deltas apply to (None: a keyframe, the tensors are
    the model itself), ``state_id`` the id of the model a receiver holds once it applied
    them. ``tensors`` maps each name to its shape and encoding, in the model's order.
    """

    codec: str
    block: int
    base: bytes | None
    state_id: bytes
    tensors: dict[str, tuple[tuple[int, ...], EncodedTensor]]


def reconstruct(base: State | None, deltas: State) -> State:
    """What a receiver holds after a message: base + delta (a keyframe: the delta itself).
    The sender calls the same function, so both ends hold bit-identical models."""
    out = {}
    for name, delta in deltas.items():
        value = np.asarray(delta if base is None else base[name] + delta, np.float32)
        value.flags.writeable = False
        out[name] = value
    return out


class DeltaEncoder:
    """The sender's compression state: the model its receivers hold (``base``, its id), which
    doubles as the error-feedback memory (model - base is what compression has not yet
    delivered), and whether the next message must be a keyframe.

    Not persisted: after a restart the first message is a keyframe.
    """

    def __init__(self, settings: CompressionSettings) -> None:
        if settings.codec == "none":
            raise ValueError("a DeltaEncoder needs a compressing codec")
        self.settings = settings
        self._base: State | None = None
        self._base_id: bytes | None = None
        self._deltas = 0  # deltas encoded since this encoder's first keyframe (the warm-up)

    @property
    def base(self) -> tuple[bytes, State] | None:
        """(id, model) of what every receiver holds from this sender, None before a keyframe."""
        return None if self._base_id is None else (self._base_id, self._base)

    def encode(self, state: State) -> tuple[CompressedTensors, State]:
        """The compressed message for ``state`` and the model receivers will hold after it
        (pass both to `delivered` once the send's outcome is known)."""
        settings = self.settings
        keyframe = self._base is None
        # A keyframe after a missed send does not restart the warm-up: it follows training.
        fraction = settings.fraction if keyframe else settings.warmup_fraction(self._deltas + 1)
        tensors: dict[str, tuple[tuple[int, ...], EncodedTensor]] = {}
        deltas: State = {}
        for name, value in state.items():
            array = np.asarray(value, dtype=np.float32)
            delta = array if keyframe else array - self._base[name]
            if keyframe or settings.codec == "int8" or array.size < DENSE_BELOW:
                encoded = encode_int8(delta, settings.block)
            else:
                encoded = encode_top_k(delta, fraction, settings.block)
            tensors[name] = (array.shape, encoded)
            deltas[name] = decode_encoded(encoded, array.size, settings.block).reshape(array.shape)
        if not keyframe:
            self._deltas += 1
        message = CompressedTensors(
            codec=settings.codec,
            block=settings.block,
            base=None if keyframe else self._base_id,
            state_id=secrets.token_bytes(STATE_ID_BYTES),
            tensors=tensors,
        )
        return message, reconstruct(self._base, deltas)

    def delivered(self, message: CompressedTensors, held: State, everyone: bool) -> None:
        """Record a send: if every neighbour took ``message``, they hold ``held`` and the next
        message is a delta against it; otherwise the next one is a keyframe."""
        if everyone:
            self._base, self._base_id = held, message.state_id
        else:
            self._base, self._base_id = None, None


def decode_encoded(encoded: EncodedTensor, n: int, block: int) -> np.ndarray:
    """Decode an `EncodedTensor` the sender still holds, through the receiver's code path."""
    data = b"".join(np.ascontiguousarray(part).view(np.uint8).data for part in encoded.parts)
    return decode_tensor(memoryview(data), encoded.form, n, encoded.k, block)
