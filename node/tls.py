"""TLS for the peer listener and its clients, keyed by the node's own Ed25519 identity.

Why one key: a hospital already publishes its Ed25519 public key for the allowlist. A
certificate for that same key (`murmur tls-selfsigned`) lets a client check that the server it
reached holds the allowlisted key, with no certificate authority and no second set of keys
to exchange: `server_key_matches` compares the server certificate's key with the peer's key
(key pinning). With `[tls] client_certs = true` the listener also demands a client
certificate, verified against the peers' own certificates (`peer_certs`), each of which must
be for an allowlisted key; so only admitted hospitals complete a handshake at all.

Certificates are built with the `cryptography` package and served by Python's `ssl`
(OpenSSL); nothing here is hand-rolled cryptography. TLS 1.3 only: Ed25519 certificates need
it, and every client is a murmur node.
"""

from __future__ import annotations

import datetime
import ipaddress
import logging
import secrets
import ssl
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.x509.oid import NameOID
from murmur.crypto.certs import certificate_key
from murmur.crypto.identity import Identity, _write_file, load_identity

if TYPE_CHECKING:
    from murmur.node.config import NodeConfig

log = logging.getLogger("murmur.tls")

DEFAULT_DAYS = 825


def selfsigned(identity: Identity, hosts: Iterable[str], days: int = DEFAULT_DAYS) -> bytes:
    """A PEM certificate for ``identity``'s own Ed25519 key, naming ``hosts`` (DNS names or
    IP addresses) as subject alternative names."""
    key = Ed25519PrivateKey.from_private_bytes(identity.signing_key.encode())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, identity.name or "murmur")])
    alt: list[x509.GeneralName] = []
    for host in hosts:
        try:
            alt.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            alt.append(x509.DNSName(host))
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(int.from_bytes(secrets.token_bytes(16), "big") >> 1)
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=days))
        # Its own trust anchor for the peers that pin it (client_certs), so a CA.
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
    )
    if alt:
        builder = builder.add_extension(x509.SubjectAlternativeName(alt), critical=False)
    cert = builder.sign(key, None)
    return cert.public_bytes(serialization.Encoding.PEM)


def private_key_pem(identity: Identity) -> bytes:
    """The identity's seed as an unencrypted PKCS#8 PEM, which `ssl` can load."""
    key = Ed25519PrivateKey.from_private_bytes(identity.signing_key.encode())
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def tls_selfsigned_command(key_file: Path, out_dir: Path, hosts: list[str], force: bool) -> int:
    """``murmur tls-selfsigned``: write NAME.crt and NAME.tls.key (0600, the same Ed25519 key
    as NAME.key in the PEM form `ssl` reads)."""
    identity = load_identity(key_file)
    out_dir.mkdir(parents=True, exist_ok=True)
    name = identity.name or key_file.stem
    cert_path, key_path = out_dir / f"{name}.crt", out_dir / f"{name}.tls.key"
    if not force and (cert_path.exists() or key_path.exists()):
        raise FileExistsError(f"{cert_path} or {key_path} exists; pass --force to replace them")
    _write_file(key_path, private_key_pem(identity).decode(), 0o600, force)
    _write_file(
        cert_path, selfsigned(identity, hosts or ["localhost", "127.0.0.1"]).decode(), 0o644, force
    )
    print(f"certificate: {cert_path} (give it to peers for [tls] peer_certs)")
    print(f"key:         {key_path} (mode 0600, keep it secret)")
    print(f"public key:  {identity.public_key.hex()} (the same key as {key_file})")
    return 0


def peer_listener_tls(config: NodeConfig) -> ssl.SSLContext | None:
    """The peer listener's server context, None without `[tls]`; warns about a waiver."""
    tls = config.tls
    if not tls.enabled:
        from murmur.node.config import is_loopback, split_listen

        host, _ = split_listen(config.node.listen)
        if tls.allow_plaintext and not is_loopback(host):
            log.warning(
                "PLAIN HTTP off loopback: the peer listener binds %s without TLS because "
                "[tls] allow_plaintext = true. Envelopes stay sealed and signed, but whoever "
                "is on the path sees who sends to whom, when and how much. Use this only "
                "behind a VPN or a TLS-terminating proxy.",
                host,
            )
        return None
    assert tls.cert is not None and tls.key is not None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    try:
        context.load_cert_chain(tls.cert, tls.key)
    except (ssl.SSLError, OSError) as exc:
        from murmur.node.config import ConfigError

        raise ConfigError(
            f"tls.cert/tls.key: cannot load {tls.cert} with {tls.key} ({exc}); fix: point them "
            "at a matching PEM certificate and key (murmur tls-selfsigned writes both)"
        ) from None
    if tls.client_certs:
        context.verify_mode = ssl.CERT_REQUIRED
        for path in tls.peer_certs or []:
            _check_peer_cert(path, config)
            context.load_verify_locations(cafile=str(path))
    return context


def _check_peer_cert(path: Path, config: NodeConfig) -> None:
    """A pinned client certificate must be for a key this node admits."""
    from murmur.crypto.identity import load_public_key
    from murmur.node.config import ConfigError

    try:
        cert = x509.load_pem_x509_certificate(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"tls.peer_certs: {path} is not a PEM certificate ({exc})") from None
    der = cert.public_bytes(serialization.Encoding.DER)
    admitted = {load_public_key(p.public_key or str(p.public_key_file)) for p in config.peers}
    if certificate_key(der) not in admitted:
        raise ConfigError(
            f"tls.peer_certs: {path} is not for the Ed25519 key of any [[peers]] entry; fix: "
            "list only the peers' own `murmur tls-selfsigned` certificates"
        )


def client_tls(config: NodeConfig) -> ssl.SSLContext:
    """The context for HTTPS to peers: the server's certificate is checked by key pinning
    (`server_key_matches`) rather than by a CA, and this node's own certificate is
    presented to listeners that demand one."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # pinned to the allowlisted key after the handshake
    if config.tls.enabled:
        assert config.tls.cert is not None and config.tls.key is not None
        context.load_cert_chain(config.tls.cert, config.tls.key)
    return context
