"""Secure summation with pairwise additive masks (Bonawitz et al. 2017, without self-masks).

Why: the pooled evaluation (models/pooled_eval.py) needs the sum of every hospital's score
histogram, and no hospital may learn another's. Each pair of hospitals (i, j) that share a mask
derives the same 32-byte seed from their X25519 shared secret; both expand it to the same
pseudo-random vector, which i adds and j subtracts (the one with the smaller public key adds).
Summed over everybody, every mask cancels, and the total is exact because the arithmetic is
integer arithmetic modulo 2**64 (numpy's uint64 wraps). One masked vector on its own is
uniformly random to anyone who lacks at least one of its seeds.

Nothing here is hand-rolled: the shared key is libsodium's `crypto_box_beforenm` (X25519 then
HSalsa20, through PyNaCl's `Box.shared_key`) of the Ed25519 identities' X25519 keys, the per
session seed is keyed BLAKE2b of that key (`nacl.hash.blake2b` with a personalisation string),
and the mask stream is libsodium's `randombytes_buf_deterministic` (ChaCha20) of the seed.

Sessions: a seed is bound to a session label (study, what is summed, an attempt counter). Masks
must never be reused for two different inputs (the difference of two masked vectors under one
mask is the difference of the inputs), so every evaluation attempt takes a fresh label.

Dropout: if a hospital set up masks but never delivers its masked vector, the survivors' total
still holds their masks with it. Each survivor then reveals its pairwise seed with the dropped
hospital (`reveal_seed`), and whoever sums removes those masks (`dropout_correction`).
Revealing seed(i, d) exposes only d's masks, never i's input. A masked vector that arrives
after its sender was declared dropped must be refused (`SecureSum.add` does), since with the
revealed seeds it could be unmasked. Without self-masks a hospital whose every mask partner
colludes with the summer is exposed; with masks along every pair of a complete graph, that
needs all other hospitals to collude.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import nacl.encoding
import nacl.hash
import nacl.utils
import numpy as np
from murmur.crypto.identity import Identity
from murmur.crypto.sealing import x25519_public_key
from nacl.public import Box

SEED_BYTES = 32
_PERSON = b"murmur-ssum-v1\x00\x00"  # BLAKE2b personalisation: exactly 16 bytes
MASK_DTYPE = np.dtype("<u8")


class SecureSumError(ValueError):
    """A secure sum cannot be completed as asked (missing parties, a late vector, ...)."""


def pair_seed(identity: Identity, peer_public_key: bytes, session: bytes) -> bytes:
    """The 32-byte seed ``identity`` and the peer both derive for ``session``.

    Keyed BLAKE2b of (session, both public keys in order) under their X25519 shared key.
    """
    if peer_public_key == identity.public_key:
        raise SecureSumError("a hospital shares no mask with itself")
    shared = Box(identity.x25519_private_key, x25519_public_key(peer_public_key)).shared_key()
    low, high = sorted((identity.public_key, peer_public_key))
    message = len(session).to_bytes(4, "big") + session + low + high
    return nacl.hash.blake2b(
        message,
        digest_size=SEED_BYTES,
        key=shared,
        person=_PERSON,
        encoder=nacl.encoding.RawEncoder,
    )


def mask_stream(seed: bytes, length: int) -> np.ndarray:
    """``length`` pseudo-random uint64 values from ``seed`` (libsodium ChaCha20)."""
    if len(seed) != SEED_BYTES:
        raise SecureSumError(f"a mask seed is {SEED_BYTES} bytes, got {len(seed)}")
    raw = nacl.utils.randombytes_deterministic(8 * length, seed, encoder=nacl.encoding.RawEncoder)
    return np.frombuffer(raw, dtype=MASK_DTYPE).astype(np.uint64)


def _signed(stream: np.ndarray, own_key: bytes, peer_key: bytes) -> np.ndarray:
    """+stream for the smaller key of the pair, -stream (mod 2**64) for the larger."""
    return stream if own_key < peer_key else (np.uint64(0) - stream)


def mask_vector(
    identity: Identity, partners: Iterable[bytes], session: bytes, length: int
) -> np.ndarray:
    """The sum of this hospital's signed pairwise masks with every partner."""
    total = np.zeros(length, dtype=np.uint64)
    for peer in partners:
        stream = mask_stream(pair_seed(identity, peer, session), length)
        total += _signed(stream, identity.public_key, peer)
    return total


def masked(
    identity: Identity, values: np.ndarray, partners: Iterable[bytes], session: bytes
) -> np.ndarray:
    """``values`` (uint64) plus this hospital's masks: what it sends."""
    vector = np.asarray(values)
    if vector.dtype != np.uint64 or vector.ndim != 1:
        raise SecureSumError(
            f"secure sums take one uint64 vector, got {vector.dtype} {vector.shape}"
        )
    return vector + mask_vector(identity, partners, session, len(vector))


def reveal_seed(identity: Identity, dropped_public_key: bytes, session: bytes) -> bytes:
    """What a survivor discloses so that its mask with a dropped hospital can be removed."""
    return pair_seed(identity, dropped_public_key, session)


def dropout_correction(revealed: Mapping[tuple[bytes, bytes], bytes], length: int) -> np.ndarray:
    """The survivors' leftover masks with dropped hospitals, from (survivor, dropped) -> seed;
    subtract it from the survivors' total."""
    total = np.zeros(length, dtype=np.uint64)
    for (survivor, dropped), seed in revealed.items():
        total += _signed(mask_stream(seed, length), survivor, dropped)
    return total


@dataclass
class SecureSum:
    """One summing party's view of a session: who masks with whom, what has arrived.

    ``partners`` maps each hospital's public key to the keys it masks with (symmetric: a
    graph's edges). The summer adds masked vectors, declares the missing ones dropped, takes
    the survivors' revealed seeds, and then has the exact total of the survivors' inputs.
    """

    partners: Mapping[bytes, Sequence[bytes]]
    length: int
    received: dict[bytes, np.ndarray] = field(default_factory=dict)
    dropped: set[bytes] = field(default_factory=set)
    revealed: dict[tuple[bytes, bytes], bytes] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for party, others in self.partners.items():
            for other in others:
                if party not in self.partners.get(other, ()):
                    raise SecureSumError("mask partners must be symmetric (a graph's edges)")

    def add(self, party: bytes, vector: np.ndarray) -> None:
        if party not in self.partners:
            raise SecureSumError("a masked vector from a hospital outside the session")
        if party in self.dropped:
            raise SecureSumError(
                "a masked vector after its sender was declared dropped is refused (its "
                "partners' seeds with it are revealed, so it could be unmasked)"
            )
        if party in self.received:
            raise SecureSumError("a second masked vector from one hospital")
        array = np.asarray(vector)
        if array.dtype != np.uint64 or array.shape != (self.length,):
            raise SecureSumError(f"a masked vector is uint64 ({self.length},)")
        self.received[party] = array

    def declare_dropped(self) -> list[tuple[bytes, bytes]]:
        """Mark every party without a vector as dropped; returns the (survivor, dropped)
        pairs whose seeds must be revealed."""
        self.dropped |= set(self.partners) - set(self.received)
        return self._needed()

    def _needed(self) -> list[tuple[bytes, bytes]]:
        return [
            (survivor, gone)
            for gone in sorted(self.dropped)
            for survivor in self.partners[gone]
            if survivor in self.received
        ]

    def reveal(self, survivor: bytes, dropped: bytes, seed: bytes) -> None:
        if survivor not in self.received or dropped not in self.dropped:
            raise SecureSumError("a revealed seed must be a survivor's with a dropped hospital")
        self.revealed[(survivor, dropped)] = seed

    def total(self) -> np.ndarray:
        """The survivors' exact sum; refuses while a needed seed is missing."""
        missing = set(self._needed()) - set(self.revealed)
        absent = set(self.partners) - set(self.received) - self.dropped
        if missing or absent:
            raise SecureSumError(
                f"cannot unmask yet: {len(missing)} revealed seeds missing, "
                f"{len(absent)} vectors neither received nor declared dropped"
            )
        total = np.zeros(self.length, dtype=np.uint64)
        for vector in self.received.values():
            total += vector
        return total - dropout_correction(self.revealed, self.length)
