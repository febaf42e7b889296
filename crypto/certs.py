"""The Ed25519 key inside a TLS certificate, for pinning a peer to its allowlisted key.

A murmur node's TLS certificate is for its own Ed25519 identity key (node/tls.py), so "is
this the peer I meant?" is "is the certificate's key the one on the allowlist?". Parsing is
the `cryptography` package's; nothing here is hand-rolled.
"""

from __future__ import annotations

import ssl

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey


def certificate_key(der: bytes) -> bytes | None:
    """The raw 32-byte Ed25519 key of a DER certificate, None if it is not an Ed25519 one."""
    try:
        key = x509.load_der_x509_certificate(der).public_key()
    except ValueError:
        return None
    if not isinstance(key, Ed25519PublicKey):
        return None
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def server_key_matches(ssl_object: ssl.SSLObject | None, expected: bytes) -> bool:
    """Whether the TLS peer's certificate is for ``expected`` (the allowlisted key)."""
    if ssl_object is None:
        return False
    der = ssl_object.getpeercert(binary_form=True)
    return der is not None and certificate_key(der) == expected
