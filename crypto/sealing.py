"""Encrypt a body once for many recipients, bound to its sender and to the header around it.

Sending one model to k neighbours must not cost k encryptions of the model. So the body is
encrypted once with a fresh random 32-byte key ``K`` (XChaCha20-Poly1305, IETF variant), and
only ``K`` is encrypted ("wrapped") for each recipient. Per extra recipient that is two X25519
scalar multiplications (tens of microseconds), independent of the model size.

Three bindings make the ciphertext belong to one sender and one header (protocol v4):

* **The wrap is authenticated by the sender's static key.** Each wrap is two ``crypto_box``
  layers (X25519 + XSalsa20-Poly1305): the inner one from a fresh ephemeral key pair to the
  recipient, the outer one from the *sender's* static X25519 key (derived from its Ed25519
  identity) to the recipient. Only the sender (or the recipient itself) can make a wrap that
  opens under the sender's public key, so an admitted peer that copies another's envelope
  and re-signs it under its own name gets an envelope whose wraps do not open.
  The inner, ephemeral layer keeps what the sender sent unreadable to someone who steals the
  sender's long-term key later (the ephemeral secret is discarded after sealing).
* **The header is the body's associated data.** The caller passes the bytes of the header
  (sender, round, recipients, ...: gossip/wire/format.py lays them out), so the body only decrypts
  under the header it was sealed with.
* **The key is committed.** ``key_commitment(K)`` = SHA-256 of a domain tag and ``K`` goes into
  what the sender signs; a recipient checks it before decrypting. XChaCha20-Poly1305 alone is
  not key-committing (a crafted ciphertext can decrypt under two keys to two plaintexts), so
  without it one signature could stand for two different models sent to two recipients.

The caller supplies a 24-byte random nonce (the envelope nonce). Reusing it for the body and
for every wrap layer is safe because each key it is used with meets it once: the body key is
fresh, each inner wrap key comes from a fresh ephemeral key and a distinct recipient, and the
outer key (sender-recipient, static) is used once per envelope with that envelope's random
192-bit nonce. Authenticity of the whole envelope is the signature's job (gossip/wire/);
nothing here is hand-rolled: libsodium through PyNaCl, one SHA-256.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache

import nacl.bindings
import nacl.exceptions
from murmur.crypto.identity import Identity
from nacl.public import Box, PrivateKey, PublicKey

BODY_KEY_BYTES = nacl.bindings.crypto_aead_xchacha20poly1305_ietf_KEYBYTES  # 32
NONCE_BYTES = nacl.bindings.crypto_aead_xchacha20poly1305_ietf_NPUBBYTES  # 24
TAG_BYTES = nacl.bindings.crypto_aead_xchacha20poly1305_ietf_ABYTES  # 16
BOX_TAG_BYTES = nacl.bindings.crypto_box_ZEROBYTES - nacl.bindings.crypto_box_BOXZEROBYTES  # 16
# K in two crypto_box layers: 32 + 16 (ephemeral -> recipient) + 16 (sender -> recipient)
WRAPPED_KEY_BYTES = BODY_KEY_BYTES + 2 * BOX_TAG_BYTES
EPHEMERAL_KEY_BYTES = nacl.bindings.crypto_box_PUBLICKEYBYTES  # 32
COMMITMENT_BYTES = 32
KEY_COMMITMENT_DOMAIN = b"murmur-body-key\x00"

_encrypt = nacl.bindings.crypto_aead_xchacha20poly1305_ietf_encrypt
_decrypt = nacl.bindings.crypto_aead_xchacha20poly1305_ietf_decrypt


class SealingError(Exception):
    """A wrapped key or a ciphertext failed authentication, or a key is unusable."""


@dataclass(frozen=True)
class WrappedKey:
    """A fresh body key, its commitment and its wraps (in recipient order)."""

    body_key: bytes = field(repr=False)
    commitment: bytes
    ephemeral_public_key: bytes
    wrapped_keys: tuple[bytes, ...]


@dataclass(frozen=True)
class SealedBody:
    """The body encrypted once, plus its key committed and wrapped for each recipient."""

    ephemeral_public_key: bytes
    wrapped_keys: tuple[bytes, ...]
    key_commitment: bytes
    ciphertext: bytes


@lru_cache(maxsize=4096)
def x25519_public_key(ed25519_public_key: bytes) -> PublicKey:
    """The X25519 key of an Ed25519 identity; cached because the conversion costs ~40 µs."""
    try:
        return PublicKey(nacl.bindings.crypto_sign_ed25519_pk_to_curve25519(ed25519_public_key))
    except (nacl.exceptions.CryptoError, TypeError, ValueError):
        raise SealingError(
            f"{ed25519_public_key.hex()} is not a valid Ed25519 public key"
        ) from None


def key_commitment(body_key: bytes) -> bytes:
    """SHA-256(``"murmur-body-key\\0"`` ‖ K): signed, so one signature fixes one body key."""
    return hashlib.sha256(KEY_COMMITMENT_DOMAIN + body_key).digest()


def wrap_new_key(sender: Identity, recipients: Sequence[bytes], nonce: bytes) -> WrappedKey:
    """A fresh body key wrapped for each Ed25519 public key in ``recipients``, from ``sender``."""
    if len(nonce) != NONCE_BYTES:
        raise ValueError(f"nonce must be {NONCE_BYTES} bytes")
    body_key = secrets.token_bytes(BODY_KEY_BYTES)
    ephemeral = PrivateKey.generate()
    wrapped = []
    for recipient in recipients:
        public = x25519_public_key(recipient)
        inner = Box(ephemeral, public).encrypt(body_key, nonce).ciphertext
        wrapped.append(Box(sender.x25519_private_key, public).encrypt(inner, nonce).ciphertext)
    return WrappedKey(
        body_key, key_commitment(body_key), ephemeral.public_key.encode(), tuple(wrapped)
    )


def encrypt_body(plaintext: bytes, body_key: bytes, nonce: bytes, associated_data: bytes) -> bytes:
    """XChaCha20-Poly1305 of ``plaintext`` under ``body_key``, bound to ``associated_data``."""
    return _encrypt(plaintext, associated_data, nonce, body_key)


def unwrap_key(
    identity: Identity,
    sender_public_key: bytes,
    ephemeral_public_key: bytes,
    wrapped_key: bytes,
    nonce: bytes,
    commitment: bytes,
) -> bytes:
    """The body key addressed to ``identity`` by ``sender_public_key`` (Ed25519), checked
    against the signed ``commitment``; ``SealingError`` if any layer or the commitment fails."""
    try:
        outer = Box(identity.x25519_private_key, x25519_public_key(sender_public_key))
        inner = outer.decrypt(wrapped_key, nonce)
        body_key = Box(identity.x25519_private_key, PublicKey(ephemeral_public_key)).decrypt(
            inner, nonce
        )
    except (nacl.exceptions.CryptoError, TypeError, ValueError, SealingError):
        raise SealingError(
            "the wrapped body key does not open with this node's key and the sender's"
        ) from None
    if not secrets.compare_digest(key_commitment(body_key), commitment):
        raise SealingError("the body key does not match the signed key commitment")
    return body_key


def decrypt_body(ciphertext: bytes, body_key: bytes, nonce: bytes, associated_data: bytes) -> bytes:
    """The plaintext, or ``SealingError`` if the ciphertext or the associated data differ."""
    try:
        return _decrypt(ciphertext, associated_data, nonce, body_key)
    except (nacl.exceptions.CryptoError, TypeError, ValueError):
        raise SealingError("the encrypted body failed authentication") from None


def seal(
    plaintext: bytes,
    sender: Identity,
    recipients: Sequence[bytes],
    nonce: bytes,
    associated_data: bytes,
) -> SealedBody:
    """Encrypt once and wrap the key for each recipient, when the associated data does not
    depend on the wraps (gossip/heads.py's receipts answer; envelopes use the steps above,
    because their associated data is the whole header, wraps included)."""
    key = wrap_new_key(sender, recipients, nonce)
    ciphertext = encrypt_body(plaintext, key.body_key, nonce, associated_data)
    return SealedBody(key.ephemeral_public_key, key.wrapped_keys, key.commitment, ciphertext)


def unseal(
    identity: Identity,
    sender_public_key: bytes,
    sealed: SealedBody,
    wrapped_key: bytes,
    nonce: bytes,
    associated_data: bytes,
) -> bytes:
    """Open a body ``seal`` made for ``identity``; ``SealingError`` otherwise."""
    body_key = unwrap_key(
        identity,
        sender_public_key,
        sealed.ephemeral_public_key,
        wrapped_key,
        nonce,
        sealed.key_commitment,
    )
    return decrypt_body(sealed.ciphertext, body_key, nonce, associated_data)


# --------------------------------------------------------- one recipient, as map fields

# A body sealed to one recipient, as the fields of a msgpack map (gossip/heads.py's receipts
# answer, gossip/consensus_wire.py's messages): each field's size in bytes, 0 for any length.
SEALED_FIELDS: dict[str, int] = {
    "nonce": NONCE_BYTES,
    "ephemeral_key": EPHEMERAL_KEY_BYTES,
    "key_commitment": COMMITMENT_BYTES,
    "wrapped_key": WRAPPED_KEY_BYTES,
    "ciphertext": 0,
}


class SealedFieldsError(ValueError):
    """A sealed map's field is missing, not bytes, or of the wrong size (the caller's
    ``malformed``)."""


def seal_to_fields(
    plaintext: bytes, sender: Identity, recipient: bytes, associated_data: bytes
) -> dict[str, bytes]:
    """``plaintext`` sealed to ``recipient`` under a fresh nonce, as ``SEALED_FIELDS``."""
    nonce = secrets.token_bytes(NONCE_BYTES)
    sealed = seal(plaintext, sender, [recipient], nonce, associated_data)
    return {
        "nonce": nonce,
        "ephemeral_key": sealed.ephemeral_public_key,
        "key_commitment": sealed.key_commitment,
        "wrapped_key": sealed.wrapped_keys[0],
        "ciphertext": sealed.ciphertext,
    }


def unseal_fields(
    identity: Identity,
    sender_public_key: bytes,
    fields: Mapping[str, object],
    associated_data: bytes,
) -> bytes:
    """Open what ``seal_to_fields`` made for ``identity``: ``SealedFieldsError`` for a bad
    field, ``SealingError`` for one that does not open."""
    for name, size in SEALED_FIELDS.items():
        value = fields.get(name)
        if type(value) is not bytes or (size and len(value) != size):
            raise SealedFieldsError(
                f"'{name}' must be {size} bytes" if size else f"'{name}' must be bytes"
            )
    wrapped, nonce = fields["wrapped_key"], fields["nonce"]
    sealed = SealedBody(
        fields["ephemeral_key"], (wrapped,), fields["key_commitment"], fields["ciphertext"]
    )  # type: ignore[arg-type]
    return unseal(identity, sender_public_key, sealed, wrapped, nonce, associated_data)  # type: ignore[arg-type]
