"""Opening envelopes: every check from cheap to expensive (`EnvelopeOpener`), and reading an
envelope's header unverified (`peek_envelope`)."""

from __future__ import annotations

import contextlib
import hashlib
import math
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np
from murmur.crypto.allowlist import Allowlist, Peer
from murmur.crypto.identity import Identity, verify_signature
from murmur.crypto.sealing import (
    SealingError,
    decrypt_body,
    unwrap_key,
)
from murmur.gossip.compression import reconstruct
from murmur.gossip.receipts import (
    AuditHead,
    Receipt,
    signed_digest,
)
from murmur.gossip.spool import SpooledModel
from murmur.gossip.wire.compressed import BodyEncoding
from murmur.gossip.wire.format import (
    _MAX_BIN_BYTES,
    MAX_UINT63,
    EnvelopeInfo,
    ModelSpec,
    ModelUpdate,
    OpenedEnvelope,
    RejectReason,
    WireError,
    WireLimits,
    _body_associated_data,
    _normalize_spec,
    _RawEnvelope,
    _rest_digest,
    default_max_message_bytes,
    is_update_kind,
    study_kind,
)
from murmur.gossip.wire.parse import (
    BodyStart,
    _body_fields,
    _parse_body,
    _parse_envelope,
)
from murmur.gossip.wire.replay import (
    ReplayGuard,
)
from murmur.gossip.wire.stream import StreamOpening, is_streamed, peek_stream


class EnvelopeOpener:
    """Verifies, decrypts and validates envelopes addressed to one node.

    ``spec`` is the receiver's model (name -> (shape, dtype)); updates that do not match it
    are refused. The opener keeps the replay guard, so use one opener per node.

    ``open`` does everything in one call. A node that opens envelopes off its event loop
    splits it: ``verify`` (pure: it reads the replay guard but changes nothing, so it may run
    in a worker thread) and then, back on the loop, ``accept`` for the result or
    ``note_failure`` for the ``WireError`` (each records the envelope in the replay guard if
    its signature verified; ``accept`` re-checks it, so of two concurrent copies one wins).

    ``spool``: a folder (gossip/spool.py) in which every opened model is kept on disk instead
    of in memory, the compressed senders' bases included; None keeps them in memory. A node
    spools models of ``spool.SPOOL_MIN_BYTES`` or more. ``OSError`` if writing there fails.
    """

    def __init__(
        self,
        identity: Identity,
        allowlist: Allowlist,
        spec: ModelSpec,
        limits: WireLimits | None = None,
        replay: ReplayGuard | None = None,
        study: bytes | None = None,
        spool: Path | None = None,
    ) -> None:
        self.identity = identity
        self.spool = spool
        self.study = study  # the manifest hash of the study this opener takes, or None
        self.kind = study_kind(study)  # the one envelope kind it takes (format.study_kind)
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
        # Each sender's base for compressed deltas: (state id, the model reconstructed from
        # its last accepted compressed envelope). Bounded by the allowlist, one model each.
        self.bases: dict[bytes, tuple[bytes, Mapping[str, np.ndarray]]] = {}

    def open(
        self, data: bytes, now: float | None = None, sender: bytes | None = None
    ) -> OpenedEnvelope:
        """The verified update in ``data``, or ``WireError``; ``now`` is Unix time in seconds.

        ``sender``: the public key the transport authenticated the request with (the HTTP
        request signature, gossip/auth.py); the envelope must be that sender's own
        (``sender_mismatch`` otherwise). None when the caller delivers envelopes itself.
        """
        try:
            opened = self.verify(data, now, sender)
        except WireError as error:
            self.note_failure(error)
            raise
        return self.accept(opened)

    def accept(self, opened: OpenedEnvelope) -> OpenedEnvelope:
        """Record a verified envelope in the replay guard (``WireError`` if, meanwhile, the
        same envelope or too many of its sender's were recorded). A compressed envelope's
        model becomes its sender's base for the next delta; an uncompressed one clears it."""
        sender = opened.receipt.sender
        self.replay.record(sender, opened.round, opened.nonce)
        if opened.state_id is None:
            self.bases.pop(sender, None)
        else:
            self.bases[sender] = (opened.state_id, opened.update.tensors)
        return opened

    def note_failure(self, error: WireError) -> None:
        """Record a refused envelope whose signature had verified, so that it counts against
        its sender's replay and rate limits as an accepted one does."""
        if error.signed is not None:
            with contextlib.suppress(WireError):
                self.replay.record(*error.signed)

    def verify(
        self, data: bytes, now: float | None = None, sender: bytes | None = None
    ) -> OpenedEnvelope:
        """``open`` without recording anything: the verified update, or ``WireError``.

        ``data`` is a whole envelope or a streamed one (gossip/wire/stream.py), told apart
        by its first byte; a node's listener opens large messages as they arrive instead
        (``begin_stream``)."""
        if is_streamed(data):
            opening = self.begin_stream(memoryview(data).nbytes, now, sender)
            opening.feed(data)
            return opening.finish()
        envelope = _parse_envelope(data, self.limits, self.max_message_bytes)
        peer, wrapped_key = self._check_header(envelope, now, sender)
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
            raise WireError(RejectReason.BAD_SIGNATURE, f"not a valid signature by {peer.name}")
        signed = (envelope.sender, envelope.round, envelope.nonce)
        plaintext = self._decrypt(envelope, wrapped_key, signed)
        return self._verified_body(envelope, peer, plaintext, body_sha256, rest_digest, signed)

    def begin_stream(
        self, length: int, now: float | None = None, sender: bytes | None = None
    ) -> StreamOpening:
        """Open a message of ``length`` bytes as they arrive (``StreamOpening``: feed it,
        then ``finish`` it for what ``verify`` returns); ``WireError`` if it is too large."""
        return StreamOpening(self, length, now, sender)

    def _verified_body(
        self,
        envelope: _RawEnvelope,
        peer: Peer,
        plaintext: bytes | bytearray,
        body_sha256: bytes,
        rest_digest: bytes,
        signed: tuple[bytes, int, bytes],
    ) -> OpenedEnvelope:
        """The update in the decrypted body of an authenticated envelope (whole or streamed):
        parsed against this node's study and model, reconstructed or spooled, its audit head
        checked against the signed one."""
        try:
            update, head, encoding = _parse_body(plaintext, self._spec, self.limits, self.study)
        except WireError as error:
            error.signed = signed
            raise
        if encoding is not None:
            update.tensors = self._reconstruct(envelope.sender, encoding, update.tensors, signed)
        elif self.spool is not None:
            # the tensors were views of the plaintext, which goes with them
            update.tensors = SpooledModel.of(update.tensors, self.spool)
        return self._opened(envelope, peer, update, head, encoding, body_sha256, rest_digest)

    def _verified_spooled(
        self,
        envelope: _RawEnvelope,
        peer: Peer,
        start: BodyStart,
        spooled: SpooledModel,
        body_sha256: bytes,
        rest_digest: bytes,
        signed: tuple[bytes, int, bytes],
    ) -> OpenedEnvelope:
        """``_verified_body`` for a streamed body whose uncompressed tensors were written to
        the spool as they were decrypted (gossip/wire/stream.py): the same checks, the
        tensors' finiteness read back from the spool a block at a time."""
        try:
            metrics, receipts, proofs, head, noise = _body_fields(start.header, self.limits)
            for name in self._spec:
                _check_finite(spooled, name)
        except WireError as error:
            error.signed = signed
            raise
        update = ModelUpdate(
            tensors=spooled, metrics=metrics, receipts=receipts, proofs=proofs, noise=noise
        )
        return self._opened(envelope, peer, update, head, None, body_sha256, rest_digest)

    def _opened(
        self,
        envelope: _RawEnvelope,
        peer: Peer,
        update: ModelUpdate,
        head: AuditHead,
        encoding: BodyEncoding | None,
        body_sha256: bytes,
        rest_digest: bytes,
    ) -> OpenedEnvelope:
        """The opened envelope, once its body's audit head is the signed one."""
        signed = (envelope.sender, envelope.round, envelope.nonce)
        if head.digest() != envelope.head_digest:
            raise WireError(
                RejectReason.MALFORMED,
                f"the audit head in the body is not the one {peer.name} signed "
                "(its digest differs from head_digest)",
                signed,
            )
        return OpenedEnvelope(
            sender=peer,
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
            state_id=None if encoding is None else encoding.state_id,
        )

    def _reconstruct(
        self,
        sender: bytes,
        encoding: BodyEncoding,
        deltas: dict[str, np.ndarray],
        signed: tuple[bytes, int, bytes],
    ) -> Mapping[str, np.ndarray]:
        """The sender's model: its deltas added to the base they name (`unknown_base` if this
        node does not hold that base: it missed or refused the message that made it, or
        restarted; the sender's next message is then a keyframe). Reads, never changes,
        ``bases``: `accept` records the result. One tensor at a time, so that a spooled
        model is written as it is made."""
        base = None
        if encoding.base is not None:
            held = self.bases.get(sender)
            if held is None or held[0] != encoding.base:
                raise WireError(
                    RejectReason.UNKNOWN_BASE,
                    f"a delta against base {encoding.base.hex()[:12]}..., which this node does "
                    "not hold from that sender",
                    signed,
                )
            base = held[1]

        def tensors() -> Iterator[tuple[str, np.ndarray]]:
            for name, delta in deltas.items():
                with np.errstate(over="ignore", invalid="ignore"):
                    array = reconstruct(None if base is None else {name: base[name]}, {name: delta})
                if not np.isfinite(array[name]).all():
                    raise WireError(
                        RejectReason.NON_FINITE, f"tensor {name!r} is NaN or infinity", signed
                    )
                yield name, array[name]

        if self.spool is None:
            return dict(tensors())
        return SpooledModel(tensors(), self.spool)

    def _check_header(
        self, envelope: _RawEnvelope, now: float | None, sender: bytes | None
    ) -> tuple[Peer, bytes]:
        """The cheap checks, before anything is hashed: kind, allowlist, the authenticated
        sender, this node among the recipients, the timestamp window, the study (its kind).
        Returns the sender's peer entry and this node's wrapped key."""
        if not is_update_kind(envelope.kind):
            raise WireError(
                RejectReason.UNSUPPORTED_KIND, f"unknown message kind {envelope.kind!r}"
            )
        peer = self.allowlist.by_key(envelope.sender)
        if peer is None:
            raise WireError(
                RejectReason.UNKNOWN_SENDER,
                f"sender key {envelope.sender.hex()[:16]}... is not on the allowlist",
            )
        if sender is not None and sender != envelope.sender:
            posted_by = self.allowlist.by_key(sender)
            raise WireError(
                RejectReason.SENDER_MISMATCH,
                f"{posted_by.name if posted_by else sender.hex()[:16]} posted an envelope "
                f"signed as {peer.name}",
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
        if envelope.kind != self.kind:
            # Another study's update (or one without a study where this node runs one, or
            # the reverse): refused before anything is hashed; the kind is signed, so a
            # kind rewritten in transit would fail the signature anyway.
            raise WireError(
                RejectReason.UNKNOWN_STUDY,
                f"the envelope is of kind {envelope.kind!r}; this node takes {self.kind!r} "
                "(the study it approved)",
            )
        return peer, wrapped_key

    def _decrypt(
        self, envelope: _RawEnvelope, wrapped_key: bytes, signed: tuple[bytes, int, bytes]
    ) -> bytes:
        """The decrypted body of a whole envelope whose signature verified."""
        try:
            body_key = unwrap_key(
                self.identity,
                envelope.sender,
                envelope.ephemeral_key,
                wrapped_key,
                envelope.nonce,
                envelope.key_commitment,
            )
            return decrypt_body(
                envelope.body, body_key, envelope.nonce, _body_associated_data(envelope)
            )
        except SealingError as exc:
            raise WireError(RejectReason.DECRYPT_FAILED, str(exc), signed) from None


_FINITE_BLOCK = 1 << 20  # entries read back at a time


def _check_finite(model: SpooledModel, name: str) -> None:
    """``non_finite`` unless every entry of the spooled tensor ``name`` is finite."""
    start = model.byte_offset(name) // 4
    stop = start + math.prod(model.shape(name))
    for low in range(start, stop, _FINITE_BLOCK):
        if not np.isfinite(model.read_flat(low, min(low + _FINITE_BLOCK, stop))).all():
            raise WireError(RejectReason.NON_FINITE, f"tensor {name!r} contains NaN or infinity")


def peek_envelope(data: bytes, limits: WireLimits | None = None) -> EnvelopeInfo:
    """Read an envelope's header WITHOUT verifying it (logs, the sender's own audit record).

    Raises ``WireError`` if the bytes are not a well-formed envelope. Nothing returned here
    is authenticated; use ``EnvelopeOpener.open`` to accept an update.
    """
    limits = limits if limits is not None else WireLimits()
    if is_streamed(data):
        return peek_stream(data, limits, limits.max_message_bytes or MAX_UINT63)
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
