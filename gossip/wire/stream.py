"""Streamed envelopes: a large update signed over the digests of fixed-size chunks and
encrypted chunk by chunk, so that a receiver checks everything but the tensors after the
first bytes, and never holds the encrypted message whole (docs/protocol.md, "Streamed
envelopes").

Why: a whole envelope (format.py) is verified only once all of it has arrived and been
hashed, and opening it holds the ciphertext and the plaintext at once, so a node that
receives k models of 100 MB holds 2k copies of 100 MB before it can say `bad_signature`.
A streamed envelope puts what the signature covers first: a header with every field of a
whole envelope (the body excepted), the body's length, the chunk size and the SHA-256 of
every encrypted chunk, signed. A receiver verifies that header (size, allowlist, sender,
recipient, timestamp, replay, signature, key unwrap) before it reads a byte past it, then
checks each chunk against its signed digest and decrypts it as it arrives, into the body
buffer or, on a node that spools large models (gossip/spool.py), straight into the spooled
model.

The construction (nothing hand-rolled: libsodium through PyNaCl, SHA-256 from hashlib):

* the body key K, its commitment and its wraps are a whole envelope's (crypto/sealing.py);
* chunk i (``chunk_bytes`` of the plaintext body, the last one shorter) is
  XChaCha20-Poly1305 under K with nonce ``nonce[:16] ‖ uint64(i)`` and the stream's
  associated data (every header field but the digests and the signature). K is fresh per
  message, so every (key, nonce) pair is used once; the nonce binds each chunk to its place,
  the associated data binds it to this header;
* the header signs ``SHA-256(chunk_digests)``, the digest list's digest, which is also the
  message's ``body_sha256`` (the same at sender and every recipient). So a chunk altered,
  swapped for another message's, moved, dropped or added changes what was signed.

A flat list of digests, not a Merkle tree: the receiver reads the chunks in order and holds
the whole list from the header on (32 bytes a chunk: 6.4 KB for 100 MB in 512 KiB chunks),
so a tree would only add levels to check. SHA-256 rather than BLAKE2b: it is what the rest
of the protocol uses and it hashes faster on this CPU (docs/protocol.md, "Digest choice").

The receipt of a streamed envelope is a whole envelope's (gossip/receipts.py): same signed
digest layout, with this format's ``rest_digest``, so equivocation proofs and rollback
checks treat both alike. A header is told from a whole envelope by its first byte (a msgpack
map of 14 entries, ``0x8e``, where a whole envelope is a map of 12, ``0x8c``).
"""

from __future__ import annotations

import bisect
import dataclasses
import hashlib
import math
import secrets
import struct
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import msgpack
import numpy as np
from murmur.crypto.identity import Identity, verify_signature
from murmur.crypto.sealing import (
    COMMITMENT_BYTES,
    EPHEMERAL_KEY_BYTES,
    NONCE_BYTES,
    TAG_BYTES,
    SealingError,
    decrypt_body,
    encrypt_body,
    unwrap_key,
)
from murmur.gossip.receipts import DIGEST_BYTES, KEY_BYTES, SIGNATURE_BYTES, signed_digest
from murmur.gossip.spool import SpooledModel
from murmur.gossip.wire.format import (
    _DECODE_GUARD_ITEMS,
    MAX_UINT63,
    PROTOCOL_VERSION,
    STREAM_CHUNK_BYTES,
    STREAM_MAX_CHUNKS,
    EnvelopeInfo,
    RejectReason,
    WireError,
    WireLimits,
    _RawEnvelope,
    _recipient_bytes,
)
from murmur.gossip.wire.parse import (
    BodyStart,
    _parse_body_start,
    _parse_recipients,
    _unique_map,
)

if TYPE_CHECKING:
    from murmur.gossip.wire.format import OpenedEnvelope
    from murmur.gossip.wire.opener import EnvelopeOpener

STREAM_FIELDS = (
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
    "body_length",
    "chunk_bytes",
    "chunk_digests",
    "signature",
)
STREAM_MARK = 0x80 | len(STREAM_FIELDS)  # the fixmap header byte a streamed envelope starts with
WHOLE_MARK = 0x8C  # a whole envelope's: a fixmap of 12 (format.ENVELOPE_FIELDS)
# A sender streams a body longer than this (build_envelope's ``stream_above``); a shorter one
# travels as a whole envelope, byte for byte what it was before streams existed.
STREAM_ABOVE_BYTES = 1 << 20
# 512 KiB of plaintext a chunk: its ciphertext and framing fit a NATS message (1 MiB), and a
# receiver holds one or two of them per message in flight.
DEFAULT_CHUNK_BYTES = STREAM_CHUNK_BYTES
MIN_CHUNK_BYTES = 4096
MAX_CHUNK_BYTES = 4 << 20
MAX_CHUNKS = STREAM_MAX_CHUNKS
# The header's size bound: the fixed fields and 64 recipients fit in 8 KiB, then 32 bytes a
# chunk. A receiver refuses a header that does not end within it.
MAX_STREAM_HEADER_BYTES = 8192 + DIGEST_BYTES * MAX_CHUNKS
# What the listener reads first, before it knows whether the header is complete.
FIRST_READ_BYTES = 64 << 10
STREAM_REST_DOMAIN = b"murmur-stream-rest\x00"
STREAM_AD_DOMAIN = b"murmur-stream-body\x00"
_FLOAT32 = np.dtype("<f4")
_U64 = struct.Struct(">Q")
_U32 = struct.Struct(">I")


@dataclass(frozen=True)
class StreamHeader:
    """A streamed envelope's header: the whole-envelope fields (``envelope.body`` empty)
    plus the body's plaintext length, the chunk size and the chunks' digests."""

    envelope: _RawEnvelope
    body_length: int
    chunk_bytes: int
    chunk_digests: bytes

    @property
    def chunk_count(self) -> int:
        return len(self.chunk_digests) // DIGEST_BYTES

    def chunk_wire_bytes(self, index: int) -> int:
        """Bytes of encrypted chunk ``index`` on the wire (plaintext + 16-byte tag)."""
        plain = min(self.chunk_bytes, self.body_length - index * self.chunk_bytes)
        return plain + TAG_BYTES

    def digest(self, index: int) -> bytes:
        return self.chunk_digests[index * DIGEST_BYTES : (index + 1) * DIGEST_BYTES]

    @property
    def chunks_sha256(self) -> bytes:
        """SHA-256 of the digest list: signed, and the message's ``body_sha256``."""
        return hashlib.sha256(self.chunk_digests).digest()

    def rest_digest(self) -> bytes:
        """The stream's ``rest_digest`` (docs/protocol.md, "Streamed envelopes")."""
        e = self.envelope
        parts = [
            STREAM_REST_DOMAIN,
            _U64.pack(e.timestamp_ms),
            e.nonce,
            e.ephemeral_key,
            e.key_commitment,
            *_recipient_bytes(e),
            _U64.pack(self.body_length),
            _U32.pack(self.chunk_bytes),
            self.chunks_sha256,
        ]
        return hashlib.sha256(b"".join(parts)).digest()

    def signed_digest(self) -> bytes:
        e = self.envelope
        return signed_digest(
            e.version, e.kind, e.sender, e.round, e.head_digest, self.rest_digest()
        )

    def associated_data(self) -> bytes:
        """Every chunk's AEAD associated data: the header but the digests and the signature."""
        e = self.envelope
        kind = e.kind.encode("utf-8")
        return b"".join(
            [
                STREAM_AD_DOMAIN,
                struct.pack(">HB", e.version, len(kind)),
                kind,
                e.sender,
                _U64.pack(e.round),
                e.head_digest,
                _U64.pack(e.timestamp_ms),
                e.nonce,
                e.ephemeral_key,
                e.key_commitment,
                *_recipient_bytes(e),
                _U64.pack(self.body_length),
                _U32.pack(self.chunk_bytes),
            ]
        )

    def encode(self) -> bytes:
        """The canonical encoding of the header (a msgpack map, fields in STREAM_FIELDS order)."""
        e = self.envelope
        values = (
            e.version,
            e.kind,
            e.sender,
            e.round,
            e.head_digest,
            e.timestamp_ms,
            e.nonce,
            e.ephemeral_key,
            e.key_commitment,
            [list(pair) for pair in e.recipients],
            self.body_length,
            self.chunk_bytes,
            self.chunk_digests,
            e.signature,
        )
        parts = [msgpack.Packer().pack_map_header(len(STREAM_FIELDS))]
        for name, value in zip(STREAM_FIELDS, values, strict=True):
            parts += [msgpack.packb(name), msgpack.packb(value)]
        return b"".join(parts)

    def wire_length(self, header_bytes: int) -> int:
        """The whole streamed envelope's length, given its header's."""
        return header_bytes + self.body_length + TAG_BYTES * self.chunk_count


def is_streamed(data: Any) -> bool:
    """Whether ``data`` (bytes-like) starts as a streamed envelope does."""
    try:
        view = memoryview(data).cast("B")
    except TypeError:
        return False
    return view.nbytes > 0 and view[0] == STREAM_MARK


def chunk_nonce(nonce: bytes, index: int) -> bytes:
    """Chunk ``index``'s nonce: the envelope nonce's first 16 bytes, then uint64(index)."""
    return nonce[:16] + _U64.pack(index)


def choose_chunk_bytes(body_length: int, chunk_bytes: int | None = None) -> int:
    """The chunk size: ``chunk_bytes`` (default 512 KiB), raised so that the body needs at
    most MAX_CHUNKS chunks."""
    size = DEFAULT_CHUNK_BYTES if chunk_bytes is None else chunk_bytes
    if not MIN_CHUNK_BYTES <= size <= MAX_CHUNK_BYTES:
        raise ValueError(f"chunk_bytes must be in [{MIN_CHUNK_BYTES}, {MAX_CHUNK_BYTES}]")
    size = max(size, -(-body_length // MAX_CHUNKS))
    if size > MAX_CHUNK_BYTES:
        raise ValueError(f"a body of {body_length} bytes is too large to stream")
    return size


def _plain_chunks(parts: Iterable[Any], size: int) -> Iterator[bytes]:
    """The concatenation of ``parts`` (bytes-like) cut into ``size``-byte pieces (the last
    shorter), each one copy of its bytes: the body is never joined whole."""
    pending = bytearray()
    for part in parts:
        view = memoryview(part).cast("B")
        while view:
            if not pending and len(view) >= size:
                yield bytes(view[:size])
                view = view[size:]
                continue
            take = view[: size - len(pending)]
            pending += take
            view = view[len(take) :]
            if len(pending) == size:
                yield bytes(pending)
                pending = bytearray()
    if pending:
        yield bytes(pending)


def seal_streamed(
    parts: Sequence[Any],
    unsigned: _RawEnvelope,
    body_key: bytes,
    sender: Identity,
    chunk_bytes: int | None = None,
) -> bytes:
    """A streamed envelope of the body ``parts`` (concatenated), for the header ``unsigned``
    (a whole envelope's fields, unsigned) whose body key is ``body_key``."""
    body_length = sum(memoryview(p).nbytes for p in parts)
    if body_length < 1:
        raise ValueError("a streamed body is not empty")
    size = choose_chunk_bytes(body_length, chunk_bytes)
    draft = StreamHeader(unsigned, body_length, size, b"")
    associated = draft.associated_data()
    chunks, digests = [], []
    for index, plain in enumerate(_plain_chunks(parts, size)):
        ciphertext = encrypt_body(plain, body_key, chunk_nonce(unsigned.nonce, index), associated)
        chunks.append(ciphertext)
        digests.append(hashlib.sha256(ciphertext).digest())
    header = dataclasses.replace(draft, chunk_digests=b"".join(digests))
    signature = sender.sign(header.signed_digest())
    header = dataclasses.replace(
        header, envelope=dataclasses.replace(unsigned, signature=signature)
    )
    return b"".join([header.encode(), *chunks])


# --------------------------------------------------------------------------- parsing


def _malformed(detail: str) -> WireError:
    return WireError(RejectReason.MALFORMED, detail)


def _bin(value: Any, name: str, size: int) -> bytes:
    if type(value) is not bytes or len(value) != size:
        raise _malformed(f"'{name}' must be {size} bytes of msgpack bin")
    return value


def _uint(value: Any, name: str, high: int = MAX_UINT63) -> int:
    if type(value) is not int or not 0 <= value <= high:
        raise _malformed(f"'{name}' must be an integer in [0, {high}]")
    return value


def parse_stream_header(
    data: Any, limits: WireLimits, max_message_bytes: int
) -> tuple[StreamHeader, int] | None:
    """The header at the start of ``data`` and its length in bytes; None while ``data``
    holds only part of it. ``WireError`` for a header that is not canonical and well-formed
    (``malformed``, ``unsupported_version``) or that declares more than ``max_message_bytes``
    (``too_large``). Nothing here is authenticated yet."""
    head = bytes(memoryview(data).cast("B")[:MAX_STREAM_HEADER_BYTES])
    items = max(_DECODE_GUARD_ITEMS, limits.max_recipients)
    unpacker = msgpack.Unpacker(
        raw=False,
        strict_map_key=True,
        use_list=True,
        object_pairs_hook=_unique_map,
        max_str_len=limits.max_string_bytes,
        max_bin_len=DIGEST_BYTES * MAX_CHUNKS,
        max_array_len=items,
        max_map_len=items,
        max_ext_len=0,
        max_buffer_size=MAX_STREAM_HEADER_BYTES,
    )
    unpacker.feed(head)
    try:
        obj = unpacker.unpack()
    except msgpack.OutOfData:
        if len(head) >= MAX_STREAM_HEADER_BYTES:
            raise _malformed(
                f"no stream header ends within {MAX_STREAM_HEADER_BYTES} bytes"
            ) from None
        return None
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise _malformed(f"the stream header is not valid msgpack: {exc}") from None
    end = unpacker.tell()
    header = _stream_header(obj, limits)
    if header.encode() != head[:end]:
        raise _malformed(
            "the stream header is not in canonical encoding (field order, shortest integer "
            "and length forms; see docs/protocol.md)"
        )
    total = header.wire_length(end)
    if total > max_message_bytes:
        raise WireError(
            RejectReason.TOO_LARGE,
            f"the stream declares {total} bytes, over the limit of {max_message_bytes}",
        )
    return header, end


def _stream_header(obj: Any, limits: WireLimits) -> StreamHeader:
    """Check a decoded header's fields, as _parse_envelope does a whole envelope's."""
    if not isinstance(obj, dict):
        raise _malformed("a stream header is a msgpack map")
    version = obj.get("version")
    if type(version) is int and version != PROTOCOL_VERSION:
        raise WireError(
            RejectReason.UNSUPPORTED_VERSION,
            f"protocol version {version}; this node speaks version {PROTOCOL_VERSION}",
        )
    if set(obj) != set(STREAM_FIELDS):
        missing = sorted(set(STREAM_FIELDS) - set(obj))
        extra = sorted(map(str, set(obj) - set(STREAM_FIELDS)))
        raise _malformed(f"stream header fields missing {missing}, unexpected {extra}")
    if type(version) is not int:
        raise _malformed("'version' must be an integer")
    kind = obj["kind"]
    if type(kind) is not str or len(kind.encode("utf-8")) > 255:
        raise _malformed("'kind' must be a string of at most 255 bytes")
    pairs = _parse_recipients(obj["recipients"], limits)
    body_length = _uint(obj["body_length"], "body_length")
    chunk_bytes = _uint(obj["chunk_bytes"], "chunk_bytes", MAX_CHUNK_BYTES)
    if body_length < 1 or chunk_bytes < MIN_CHUNK_BYTES:
        raise _malformed(
            f"'body_length' must be at least 1 and 'chunk_bytes' at least {MIN_CHUNK_BYTES}"
        )
    count = math.ceil(body_length / chunk_bytes)
    if count > MAX_CHUNKS:
        raise WireError(RejectReason.TOO_LARGE, f"{count} chunks is over the limit of {MAX_CHUNKS}")
    digests = _bin(obj["chunk_digests"], "chunk_digests", DIGEST_BYTES * count)
    envelope = _RawEnvelope(
        version=version,
        kind=kind,
        sender=_bin(obj["sender"], "sender", KEY_BYTES),
        round=_uint(obj["round"], "round"),
        head_digest=_bin(obj["head_digest"], "head_digest", DIGEST_BYTES),
        timestamp_ms=_uint(obj["timestamp_ms"], "timestamp_ms"),
        nonce=_bin(obj["nonce"], "nonce", NONCE_BYTES),
        ephemeral_key=_bin(obj["ephemeral_key"], "ephemeral_key", EPHEMERAL_KEY_BYTES),
        key_commitment=_bin(obj["key_commitment"], "key_commitment", COMMITMENT_BYTES),
        recipients=tuple(pairs),
        signature=_bin(obj["signature"], "signature", SIGNATURE_BYTES),
        body=b"",
    )
    return StreamHeader(envelope, body_length, chunk_bytes, digests)


def peek_stream(data: Any, limits: WireLimits, max_message_bytes: int) -> EnvelopeInfo:
    """``peek_envelope`` for a streamed envelope: its unauthenticated header."""
    parsed = parse_stream_header(data, limits, max_message_bytes)
    if parsed is None:
        raise _malformed("the stream ends inside its header")
    header, _ = parsed
    e = header.envelope
    return EnvelopeInfo(
        kind=e.kind,
        sender=e.sender,
        recipients=tuple(key for key, _ in e.recipients),
        round=e.round,
        timestamp=e.timestamp_ms / 1000,
        nonce=e.nonce,
        body_sha256=header.chunks_sha256.hex(),
    )


# --------------------------------------------------------------------------- opening


class StreamOpening:
    """Opening one envelope as its bytes arrive (sans I/O: the caller reads, this checks).

    Feed it the message's bytes in order (``feed``), reading at most ``wants()`` at a time,
    then call ``finish`` for the verified (not yet accepted) ``OpenedEnvelope``. Every
    refusal is a ``WireError`` with the envelope's reason codes, raised as soon as the bytes
    fed show it: everything the header decides (size, allowlist, sender, recipient,
    timestamp, replay, signature, key) once the header is in, before a chunk is read; the
    body header (study, codec, tensor names, shapes and dtypes, length) once the chunks
    holding it are in. ``length`` is the number of bytes that will come (the request's
    Content-Length): a header that declares another is refused before any chunk.

    A whole envelope (first byte ``0x8c``) is collected and opened with
    ``EnvelopeOpener.verify`` at ``finish``: a receiver takes both forms on one path.
    Memory: the header, one chunk being assembled, and the decrypted body: in one buffer,
    or, on a node that spools its neighbours' models, written to the spool as each chunk
    is decrypted (an uncompressed float32 model; a compressed one needs the sender's base).
    """

    def __init__(
        self,
        opener: EnvelopeOpener,
        length: int,
        now: float | None = None,
        sender: bytes | None = None,
    ) -> None:
        self._opener = opener
        self._now = now
        self._sender = sender
        self.length = length
        if length > opener.max_message_bytes:
            raise WireError(
                RejectReason.TOO_LARGE,
                f"{length} bytes is over the limit of {opener.max_message_bytes}",
            )
        self.consumed = 0
        self._buffer = bytearray()
        self._whole: list[bytes] | None = None
        self.header: StreamHeader | None = None
        self._index = 0  # the next chunk
        # The decrypted body: first `_pending` until its header is checked, then either
        # `_plain` (all of it in memory) or, for a spooling node's uncompressed float32
        # model, `_spooled` (its tensors written to the node's spool as they come; the body
        # header, parsed, is in `_start`).
        self._pending = bytearray()
        self._start: BodyStart | None = None
        self._plain: bytearray | None = None
        self._spooled: SpooledModel | None = None
        self._ranges: list[tuple[int, int, int]] = []  # body start, end, spool byte offset
        self._body_key = b""
        self._associated = b""
        self._peer: Any = None
        self.signed: tuple[bytes, int, bytes] | None = None

    @property
    def streamed(self) -> bool:
        return self.header is not None

    def wants(self) -> int:
        """How many bytes to read next (0: all of them have been fed)."""
        left = self.length - self.consumed
        if left <= 0:
            return 0
        if self._whole is not None:
            return left
        if self.header is None:
            room = MAX_STREAM_HEADER_BYTES - len(self._buffer)
            return min(left, room if self._buffer else FIRST_READ_BYTES)
        if self._index >= self.header.chunk_count:
            return left  # more than the header declares: finish refuses it
        return min(left, self.header.chunk_wire_bytes(self._index) - len(self._buffer))

    def feed(self, data: Any) -> None:
        """Take the next bytes of the message; ``WireError`` as soon as they show a refusal."""
        view = memoryview(data).cast("B")
        if self.consumed + len(view) > self.length:
            raise _malformed(f"more than the {self.length} bytes announced")
        self.consumed += len(view)
        # A bytes piece that is exactly one unit is used as it is, not copied.
        whole_piece = type(data) is bytes
        if self._whole is not None:
            self._whole.append(data if whole_piece else bytes(view))
            return
        if self.header is None:
            if not self._buffer and view and view[0] != STREAM_MARK:
                self._whole = [data if whole_piece else bytes(view)]
                return
            view = self._feed_header(view)
            if self.header is None:
                return
        while view:
            if self._index >= self.header.chunk_count:
                raise _malformed(
                    f"bytes after the last of the {self.header.chunk_count} chunks the header "
                    "declares"
                )
            need = self.header.chunk_wire_bytes(self._index) - len(self._buffer)
            if not self._buffer and len(view) >= need:
                untouched = whole_piece and len(view) == need == len(data)
                self._take_chunk(data if untouched else view[:need])
                view = view[need:]
                continue
            piece = view[:need]
            self._buffer += piece
            view = view[len(piece) :]
            if len(self._buffer) == self.header.chunk_wire_bytes(self._index):
                chunk, self._buffer = self._buffer, bytearray()
                self._take_chunk(bytes(chunk))

    def _feed_header(self, view: memoryview) -> memoryview:
        """Add bytes to the header; once it is complete, run every header check and return
        the bytes after it (chunk bytes)."""
        opener = self._opener
        held = len(self._buffer)
        self._buffer += view[: MAX_STREAM_HEADER_BYTES - held]
        parsed = parse_stream_header(self._buffer, opener.limits, opener.max_message_bytes)
        if parsed is None:
            if len(view) > MAX_STREAM_HEADER_BYTES - held:
                raise _malformed(f"no stream header ends within {MAX_STREAM_HEADER_BYTES} bytes")
            return view[len(view) :]
        header, end = parsed
        declared = header.wire_length(end)
        if declared != self.length:
            raise _malformed(
                f"the stream header declares {declared} bytes; the message has {self.length}"
            )
        self._begin(header)
        self.header = header
        self._buffer = bytearray()
        return view[end - held :]

    def _begin(self, header: StreamHeader) -> None:
        """The header's checks, cheap first: as a whole envelope's steps 3 to 10."""
        opener = self._opener
        envelope = header.envelope
        peer, wrapped_key = opener._check_header(envelope, self._now, self._sender)
        opener.replay.check(envelope.sender, envelope.round, envelope.nonce)
        if not verify_signature(envelope.sender, header.signed_digest(), envelope.signature):
            raise WireError(RejectReason.BAD_SIGNATURE, f"not a valid signature by {peer.name}")
        self.signed = (envelope.sender, envelope.round, envelope.nonce)
        try:
            self._body_key = unwrap_key(
                opener.identity,
                envelope.sender,
                envelope.ephemeral_key,
                wrapped_key,
                envelope.nonce,
                envelope.key_commitment,
            )
        except SealingError as exc:
            raise WireError(RejectReason.DECRYPT_FAILED, str(exc), self.signed) from None
        self._peer = peer
        self._associated = header.associated_data()

    def _take_chunk(self, ciphertext: bytes | memoryview) -> None:
        """Check chunk ``_index`` against its signed digest, decrypt it into the body."""
        header, index = self.header, self._index
        assert header is not None
        if not secrets.compare_digest(hashlib.sha256(ciphertext).digest(), header.digest(index)):
            # Not what the sender signed (altered, swapped or moved): as a whole envelope's
            # altered body, `bad_signature`, and not recorded against the sender.
            raise WireError(
                RejectReason.BAD_SIGNATURE,
                f"chunk {index} of {header.chunk_count} is not the one {self._peer.name} signed",
            )
        try:
            plain = decrypt_body(
                ciphertext if type(ciphertext) is bytes else bytes(ciphertext),
                self._body_key,
                chunk_nonce(header.envelope.nonce, index),
                self._associated,
            )
        except SealingError as exc:
            raise WireError(
                RejectReason.DECRYPT_FAILED, f"chunk {index}: {exc}", self.signed
            ) from None
        self._index += 1
        try:
            if self._start is None:
                self._pending += plain
                self._check_body_start()
            else:
                self._store(index * header.chunk_bytes, plain)
        except WireError as error:
            error.signed = self.signed
            raise

    def _check_body_start(self) -> None:
        """The body header's checks as soon as the chunks holding it are in; then where the
        body goes (memory, or the spool), and what came so far goes there."""
        opener, header = self._opener, self.header
        assert header is not None
        start = _parse_body_start(
            self._pending, header.body_length, opener._spec, opener.limits, opener.study
        )
        if start is None:
            return
        self._start = start
        slots = start.layout.values()
        if (
            opener.spool is not None
            and start.encoding is None
            and all(slot[0] == _FLOAT32 for slot in slots)
        ):
            spec = opener._spec
            self._spooled = SpooledModel.reserve(((n, spec[n][0]) for n in spec), opener.spool)
            self._ranges = sorted(
                (begin, begin + 4 * math.prod(shape), self._spooled.byte_offset(name))
                for name, (_, shape, begin) in start.layout.items()
            )
        else:
            self._plain = bytearray(header.body_length)
        pending, self._pending = self._pending, bytearray()
        self._store(0, pending)

    def _store(self, offset: int, plain: bytes | bytearray) -> None:
        """Plaintext bytes ``offset:offset + len(plain)`` of the body, where they go."""
        if self._plain is not None:
            self._plain[offset : offset + len(plain)] = plain
            return
        assert self._spooled is not None
        view, end = memoryview(plain), offset + len(plain)
        first = bisect.bisect_right(self._ranges, (offset, math.inf, 0)) - 1
        for begin, stop, at in self._ranges[max(first, 0) :]:
            if begin >= end:
                break
            low, high = max(begin, offset), min(stop, end)
            if low < high:
                self._spooled.write_bytes(at + low - begin, view[low - offset : high - offset])

    def finish(self) -> OpenedEnvelope:
        """The verified envelope, once every byte has been fed; ``WireError`` otherwise."""
        if self._whole is not None:
            if self.consumed != self.length:
                raise _malformed(f"the message ended after {self.consumed} of {self.length} bytes")
            data, self._whole = b"".join(self._whole), None
            return self._opener.verify(data, self._now, self._sender)
        header = self.header
        if header is None:
            raise _malformed(f"the message ended inside its stream header ({self.consumed} bytes)")
        if self._index < header.chunk_count:
            raise _malformed(
                f"the stream ended after {self._index} of its {header.chunk_count} chunks"
            )
        if self.consumed != self.length:
            raise _malformed(f"bytes after the last of the {header.chunk_count} chunks")
        if self._spooled is not None:
            spooled, self._spooled = self._spooled, None
            return self._opener._verified_spooled(
                header.envelope,
                self._peer,
                self._start,
                spooled,
                header.chunks_sha256,
                header.rest_digest(),
                self.signed,
            )
        plain, self._plain = self._plain, None
        return self._opener._verified_body(
            header.envelope,
            self._peer,
            plain,
            header.chunks_sha256,
            header.rest_digest(),
            self.signed,
        )
