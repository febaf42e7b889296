"""The private pooled evaluation between hospitals: what each one sends, and the sum.

Each hospital scores its own test split with the agreed model, reduces the scores to a
histogram (models/pooled_eval.py), masks the histogram's integer vector with its pairwise
masks (crypto/secure_sum.py) and sends only that masked vector, signed, to the others. The
masked vectors of all hospitals sum to the pooled histogram; a dropped hospital's masks are
removed with the seeds its partners reveal. Nothing else about a patient leaves a hospital:
`hospital_share` is the only function here that sees scores, and it returns the share's bytes
and the hospital's own histogram, which stays with it (only its figures are published).

Share on the wire: msgpack {"v", "session", "sender", "vector"} followed by the sender's
Ed25519 signature over a domain string and those bytes; size-capped by the bin layout.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import msgpack
import numpy as np
from murmur.crypto.identity import Identity, verify_signature
from murmur.crypto.secure_sum import SecureSum, masked, reveal_seed
from murmur.models import pooled_eval as pe

SHARE_DOMAIN = b"murmur-pooled-share-v1\x00"
SHARE_VERSION = 1


class PooledError(ValueError):
    """A share refused, with a reason code (`why`)."""

    def __init__(self, why: str, detail: str) -> None:
        super().__init__(f"{why}: {detail}")
        self.why = why


def session_label(study: str, model_sha256: str, attempt: int = 0) -> bytes:
    """One label per evaluation attempt: masks are never reused for a second input."""
    return hashlib.sha256(f"{study}\x00{model_sha256}\x00{attempt}".encode()).digest()


def encode_share(identity: Identity, session: bytes, vector: np.ndarray) -> bytes:
    payload = msgpack.packb(
        {
            "v": SHARE_VERSION,
            "session": session,
            "sender": identity.public_key,
            "vector": np.ascontiguousarray(vector, dtype="<u8").tobytes(),
        },
        use_bin_type=True,
    )
    return payload + identity.sign(SHARE_DOMAIN + payload)


def decode_share(
    data: bytes, session: bytes, members: frozenset[bytes], length: int
) -> tuple[bytes, np.ndarray]:
    """(sender, masked vector) of a share, or PooledError: too large, malformed, bad
    signature, another session, not a member."""
    limit = 8 * length + 512
    if len(data) > limit:
        raise PooledError("too_large", f"{len(data)} bytes > {limit}")
    payload, signature = data[:-64], data[-64:]
    try:
        obj = msgpack.unpackb(payload, raw=False, max_bin_len=8 * length, max_map_len=8)
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as exc:
        raise PooledError("malformed", type(exc).__name__) from None
    if not isinstance(obj, dict) or set(obj) != {"v", "session", "sender", "vector"}:
        raise PooledError("malformed", "a share is a map of v, session, sender, vector")
    if obj["v"] != SHARE_VERSION:
        raise PooledError("unsupported_version", f"share version {obj['v']!r}")
    sender = obj["sender"]
    if not isinstance(sender, bytes) or sender not in members:
        raise PooledError("unknown_sender", "the sender is not a member of this evaluation")
    if not verify_signature(sender, SHARE_DOMAIN + payload, signature):
        raise PooledError("bad_signature", "the share's signature does not verify")
    if obj["session"] != session:
        raise PooledError("wrong_session", "a share of another evaluation")
    if not isinstance(obj["vector"], bytes) or len(obj["vector"]) != 8 * length:
        raise PooledError("malformed", f"the vector must be {length} uint64 values")
    return sender, np.frombuffer(obj["vector"], dtype="<u8").astype(np.uint64)


def hospital_share(
    identity: Identity,
    partners: Sequence[bytes],
    session: bytes,
    y_test: np.ndarray,
    p_test: np.ndarray,
    spec: pe.BinSpec,
) -> tuple[bytes, pe.ScoreHistogram]:
    """What a hospital sends (a masked, signed histogram vector) and its own histogram, which
    it keeps."""
    own = pe.score_histogram(y_test, p_test, spec)
    vector = masked(identity, pe.to_vector(own), partners, session)
    return encode_share(identity, session, vector), own


@dataclass(frozen=True)
class PooledOutcome:
    report: dict
    messages: list[bytes]  # every byte string that left a hospital, in order


def pooled_in_memory(
    hospitals: Sequence[tuple[str, Identity, np.ndarray, np.ndarray]],
    partners: Mapping[bytes, Sequence[bytes]],
    session: bytes,
    spec: pe.BinSpec,
    dropped: frozenset[str] = frozenset(),
) -> PooledOutcome:
    """Run one evaluation between hospitals (name, identity, test labels, agreed model's
    scores) in this process, as the nodes would over the wire: every share is encoded,
    decoded and summed; hospitals in ``dropped`` send nothing and their partners reveal
    their seeds with them. Returns the report and every message sent."""
    members = frozenset(identity.public_key for _, identity, _, _ in hospitals)
    length = pe.vector_length(spec)
    summer = SecureSum(partners, length)
    messages: list[bytes] = []
    own: dict[str, pe.ScoreHistogram] = {}
    by_key = {identity.public_key: identity for _, identity, _, _ in hospitals}
    for name, identity, y, p in hospitals:
        share, histogram = hospital_share(
            identity, partners[identity.public_key], session, y, p, spec
        )
        if name in dropped:
            continue
        own[name] = histogram
        messages.append(share)
        summer.add(*decode_share(share, session, members, length))
    for survivor, gone in summer.declare_dropped():
        seed = reveal_seed(by_key[survivor], gone, session)
        messages.append(seed)
        summer.reveal(survivor, gone, seed)
    pooled = pe.from_vector(summer.total(), spec)
    report = pe.pooled_report(own, pooled, spec)
    report["dropped"] = sorted(dropped)
    return PooledOutcome(report, messages)
