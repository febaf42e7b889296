"""The messages of the protocol-abuse attacks (gossip/attacks.py): each one a receiver must
refuse with its reason code, and framing evidence no key can make verify.

For tests and demos only, like the rest of the attack suite: replays need no builder (the
attacker resends envelopes it kept); the rest are built here from the attacker's own honest
envelope or update.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from murmur.crypto.identity import Identity, generate_identity
from murmur.gossip.receipts import AuditHead, EquivocationProof, Receipt
from murmur.gossip.wire import (
    DEFAULT_MAX_PROOFS,
    PROTOCOL_VERSION,
    ModelUpdate,
    build_envelope,
    peek_envelope,
)


def forged_evidence(
    victims: Sequence[bytes], round_: int, rng: np.random.Generator
) -> tuple[list[Receipt], list[EquivocationProof]]:
    """Framing attempts: for each victim key, a receipt and a proof claiming it equivocated in
    round ``round_``, with made-up digests and signatures (no key can make them verify)."""

    def fake(victim: bytes) -> Receipt:
        return Receipt(
            PROTOCOL_VERSION,
            "update",
            victim,
            round_,
            AuditHead(int(rng.integers(1, 2**31)), rng.bytes(32), 0, 0.0),
            rng.bytes(32),
            rng.bytes(64),
        )

    receipts = [fake(v) for v in victims]
    proofs = [EquivocationProof.of(fake(v), fake(v)) for v in victims[:DEFAULT_MAX_PROOFS]]
    return receipts, proofs


def outsider_envelope(
    update: ModelUpdate,
    recipients: Sequence[bytes],
    round_: int,
    *,
    outsider: Identity | None = None,
    study: bytes | None = None,
) -> bytes:
    """A well-formed, correctly signed envelope from a key nobody admitted (``unknown_sender``).
    ``study``: the attacked network's study, so that it is refused for who sent it."""
    return build_envelope(
        update, outsider or generate_identity("outsider"), recipients, round_, study=study
    )


def impersonated_envelope(envelope: bytes, own_key: bytes, victim_key: bytes) -> bytes:
    """The attacker's own envelope with an admitted neighbour's key as the sender.

    The sender field is the first occurrence of the attacker's key in the envelope (it comes
    before the recipients), so swapping it keeps the encoding canonical. Posted with the
    attacker's own request signature it is refused as ``sender_mismatch``; handed over
    directly, as ``bad_signature`` (the envelope was signed by the attacker's key).
    """
    if len(own_key) != 32 or len(victim_key) != 32:
        raise ValueError("public keys are 32 bytes")
    if peek_envelope(envelope).sender != own_key:
        raise ValueError("the envelope does not carry the attacker's key as its sender")
    at = envelope.find(own_key)
    return envelope[:at] + victim_key + envelope[at + len(own_key) :]


def oversize_message(limit: int) -> bytes:
    """One byte over the receiver's message limit (``too_large`` before it is read)."""
    return b"\x00" * (limit + 1)


def malformed_messages(envelope: bytes, rng: np.random.Generator) -> list[bytes]:
    """Bytes that must be refused as ``malformed`` (not an envelope) or ``bad_signature``.

    Random garbage, a truncated envelope, and an envelope with one body bit flipped (it still
    decodes, but its body no longer matches what was signed).
    """
    garbage = rng.integers(0, 256, size=200, dtype=np.uint8).tobytes()
    truncated = envelope[: max(1, len(envelope) // 2)]
    flipped = bytearray(envelope)
    flipped[-1] ^= 0x01
    return [garbage, truncated, bytes(flipped)]
