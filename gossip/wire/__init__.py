"""The envelope: how one model update travels, signed and encrypted, from one node to others.

docs/protocol.md is the specification (version 4); this module is its reference
implementation. In short: an envelope is a msgpack map in one canonical encoding whose
``body`` is the update encrypted once (crypto/sealing.py: the header is its associated data,
its key is wrapped for each recipient by the sender's static key and committed) and whose
``signature`` is Ed25519 over the SHA-256 of a fixed binary layout of (domain, version, kind,
sender, round, head_digest, rest_digest), ``head_digest`` being the SHA-256 of the sender's
audit head (its audit log position and privacy spend, whose 56 bytes travel encrypted in the
body) and ``rest_digest`` the SHA-256 of every other field (the key commitment included) plus
the SHA-256 of the body. That split lets a small receipt (gossip/receipts.py) prove what a
sender signed, and how far its log and ledger had got, without the envelope; the commitment
makes one signature stand for one plaintext only.

Opening is strict and ordered from cheap to expensive: size, structure, allowlist, sender,
recipient, timestamp and replay checks all happen before the body is hashed, the signature
checked, the body decrypted and its tensors validated against the receiver's model. Every
rejection is one ``WireError`` carrying a ``RejectReason``; no other exception escapes
``EnvelopeOpener.open``.

The package, one concern a module (every name below imports from `gossip.wire`):
format.py (constants, reasons, message types, limits, canonical bytes), build.py
(`build_envelope`), parse.py (strict parsing of untrusted bytes), replay.py (`ReplayGuard`),
opener.py (`EnvelopeOpener`, `peek_envelope`), stream.py (streamed envelopes: a body over
1 MiB signed over its chunks' digests and encrypted chunk by chunk, `StreamOpening`).
"""

from __future__ import annotations

from murmur.gossip.wire.build import (
    _encode_body,
    _seal_envelope,
    build_envelope,
)
from murmur.gossip.wire.format import (
    BODY_AD_DOMAIN,
    BODY_FIELDS,
    DEFAULT_MAX_PROOFS,
    DEFAULT_MAX_RECEIPTS,
    DEFAULT_MAX_RECIPIENTS,
    DEFAULT_MAX_STRING_BYTES,
    ENVELOPE_FIELDS,
    HTTP_STATUS,
    KINDS,
    MAX_UINT63,
    PROTOCOL_VERSION,
    WIRE_DTYPES,
    ModelUpdate,
    OpenedEnvelope,
    RejectReason,
    WireError,
    WireLimits,
    _envelope_prefix,
    _signed_digest,
    default_max_message_bytes,
    is_update_kind,
    study_kind,
)
from murmur.gossip.wire.opener import (
    EnvelopeOpener,
    peek_envelope,
)
from murmur.gossip.wire.parse import (
    _parse_envelope,
)
from murmur.gossip.wire.replay import (
    ReplayGuard,
)
from murmur.gossip.wire.stream import (
    DEFAULT_CHUNK_BYTES,
    STREAM_ABOVE_BYTES,
    StreamOpening,
    is_streamed,
)

__all__ = [
    "BODY_AD_DOMAIN",
    "BODY_FIELDS",
    "DEFAULT_CHUNK_BYTES",
    "DEFAULT_MAX_PROOFS",
    "DEFAULT_MAX_RECEIPTS",
    "DEFAULT_MAX_RECIPIENTS",
    "DEFAULT_MAX_STRING_BYTES",
    "ENVELOPE_FIELDS",
    "HTTP_STATUS",
    "KINDS",
    "MAX_UINT63",
    "PROTOCOL_VERSION",
    "STREAM_ABOVE_BYTES",
    "WIRE_DTYPES",
    "EnvelopeOpener",
    "ModelUpdate",
    "OpenedEnvelope",
    "RejectReason",
    "ReplayGuard",
    "StreamOpening",
    "WireError",
    "WireLimits",
    "_encode_body",
    "_envelope_prefix",
    "_parse_envelope",
    "_seal_envelope",
    "_signed_digest",
    "build_envelope",
    "default_max_message_bytes",
    "is_streamed",
    "is_update_kind",
    "peek_envelope",
    "study_kind",
]
