"""A hospital's identity: one Ed25519 key pair, its files on disk and its fingerprint.

Every node has exactly one long-term key. It signs envelopes and audit records (Ed25519) and,
converted to X25519 by libsodium, receives the per-envelope body keys (see crypto/sealing.py).
One key per node means one thing to distribute, pin in peers' allowlists and protect.

File formats (also in docs/protocol.md):

* ``NAME.key`` (mode 0600): TOML with ``format = "murmur-ed25519-seed-v1"``, ``name`` and
  ``seed`` (the 32-byte Ed25519 seed as 64 lowercase hex characters).
* ``NAME.pub``: one line, ``<64 hex characters of the public key> <name>``.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import stat
import sys
import tomllib
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import nacl.bindings
import nacl.exceptions
from nacl.public import PrivateKey
from nacl.signing import SigningKey, VerifyKey

PUBLIC_KEY_BYTES = 32
SIGNATURE_BYTES = 64
PRIVATE_KEY_FORMAT = "murmur-ed25519-seed-v1"
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_HEX_KEY_PATTERN = re.compile(r"[0-9a-fA-F]{64}")
_MAX_KEY_FILE_BYTES = 64 * 1024


class IdentityError(ValueError):
    """A key, key file or node name is unusable; the message says why and how to fix it."""


def check_name(name: str) -> str:
    """Node names become file names and log fields, so they are restricted to a safe alphabet."""
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise IdentityError(
            f"invalid node name {name!r}: use 1-64 characters from A-Z a-z 0-9 _ . - "
            "starting with a letter or digit (for example hospital_a)"
        )
    return name


def check_public_key(public_key: bytes) -> bytes:
    """Reject anything that is not a usable Ed25519 public key.

    Besides the length, the key must convert to X25519 (libsodium refuses small-order and
    non-canonical points), so that encrypting to an admitted peer can never fail later.
    """
    if not isinstance(public_key, bytes) or len(public_key) != PUBLIC_KEY_BYTES:
        raise IdentityError(f"an Ed25519 public key is {PUBLIC_KEY_BYTES} raw bytes")
    try:
        nacl.bindings.crypto_sign_ed25519_pk_to_curve25519(public_key)
    except nacl.exceptions.CryptoError:
        raise IdentityError(
            f"{public_key.hex()} is not a valid Ed25519 public key; "
            "copy the key again from the peer's .pub file"
        ) from None
    return public_key


def fingerprint(public_key: bytes) -> str:
    """Short human-comparable form of a public key: 128 bits of SHA-256, in groups of four hex.

    Operators read fingerprints to each other when admitting a peer, so they must be short;
    128 bits keeps finding a second key with the same fingerprint out of reach.
    """
    digest = hashlib.sha256(public_key).hexdigest()[:32]
    return ":".join(digest[i : i + 4] for i in range(0, 32, 4))


def verify_signature(public_key: bytes, message: bytes, signature: bytes) -> bool:
    """True when ``signature`` is a valid Ed25519 signature of ``message`` by ``public_key``."""
    try:
        VerifyKey(public_key).verify(message, signature)
    except (nacl.exceptions.CryptoError, ValueError, TypeError):
        return False
    return True


@dataclass(frozen=True, eq=False)
class Identity:
    """A node's name and Ed25519 signing key; derived keys are computed once and cached."""

    name: str
    signing_key: SigningKey = field(repr=False)

    @cached_property
    def public_key(self) -> bytes:
        """The 32-byte Ed25519 public key, the node's identity on the wire and in allowlists."""
        return self.signing_key.verify_key.encode()

    @cached_property
    def fingerprint(self) -> str:
        return fingerprint(self.public_key)

    @cached_property
    def x25519_private_key(self) -> PrivateKey:
        """The X25519 key derived from the signing key; it unwraps envelope body keys."""
        return self.signing_key.to_curve25519_private_key()

    def sign(self, data: bytes) -> bytes:
        """The 64-byte detached Ed25519 signature of ``data``."""
        return self.signing_key.sign(data).signature


def generate_identity(name: str) -> Identity:
    return Identity(check_name(name), SigningKey.generate())


def identity_paths(name: str, out_dir: str | Path) -> tuple[Path, Path]:
    """Where ``save_identity`` puts the private and public key files of ``name``."""
    directory = Path(out_dir)
    return directory / f"{check_name(name)}.key", directory / f"{name}.pub"


def _private_key_text(identity: Identity) -> str:
    seed = identity.signing_key.encode().hex()
    return (
        "# murmur node private key. Keep it secret: mode 0600, never share or commit it.\n"
        f'format = "{PRIVATE_KEY_FORMAT}"\n'
        f'name = "{identity.name}"\n'
        f'seed = "{seed}"\n'
    )


def _public_key_text(identity: Identity) -> str:
    return f"{identity.public_key.hex()} {identity.name}\n"


def _write_file(path: Path, text: str, mode: int, force: bool) -> None:
    """Write ``text`` with permissions ``mode`` from the first byte on.

    Without ``force`` the file is created with O_EXCL, so an existing key is never replaced.
    With ``force`` a temporary file is written and renamed over the old one: ``os.open`` only
    applies ``mode`` to new files, and a rename also means no reader sees a half-written key.
    """
    target = path
    if force:
        path = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.fchmod(fd, mode)  # the umask may have removed bits we want, never added any
        os.write(fd, text.encode("utf-8"))
        os.fsync(fd)
    finally:
        os.close(fd)
    if force:
        os.replace(path, target)
    # The new name (created or renamed) survives a power cut only once its directory is
    # fsynced: otherwise the old key, or none, could come back (node/durable.py does the same).
    dir_fd = os.open(target.parent, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def save_identity(
    identity: Identity, out_dir: str | Path, force: bool = False
) -> tuple[Path, Path]:
    """Write ``NAME.key`` (0600) and ``NAME.pub`` (0644) into ``out_dir``.

    Refuses to overwrite either file unless ``force`` is true, because overwriting a key
    silently locks the node out of every peer's allowlist.
    """
    private_path, public_path = identity_paths(identity.name, out_dir)
    private_path.parent.mkdir(parents=True, exist_ok=True)
    if not force:
        for path in (private_path, public_path):
            if path.exists():
                raise FileExistsError(
                    f"{path} already exists; pass --force to replace it "
                    "(peers that admitted the old key will reject the new one)"
                )
    try:
        _write_file(private_path, _private_key_text(identity), 0o600, force)
        _write_file(public_path, _public_key_text(identity), 0o644, force)
    except FileExistsError as exc:
        raise FileExistsError(
            f"{exc.filename} appeared while writing keys; pass --force to replace it"
        ) from None
    return private_path, public_path


def load_identity(path: str | Path) -> Identity:
    """Read a private key file, refusing one that group or others could read."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        raise IdentityError(
            f"private key file {path} does not exist; create one with "
            f"`murmur keygen --name NAME --out {path.parent}`"
        ) from None
    with os.fdopen(fd, "rb") as handle:
        # fstat the open file, not the path, so the check applies to what is actually read.
        info = os.fstat(handle.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise IdentityError(f"private key {path} is not a regular file")
        mode = stat.S_IMODE(info.st_mode)
        if mode & 0o077:
            raise IdentityError(
                f"private key file {path} has mode {mode:04o}, so other users can read it; "
                f"fix it with: chmod 600 {path}"
            )
        raw = handle.read(_MAX_KEY_FILE_BYTES + 1)
    if len(raw) > _MAX_KEY_FILE_BYTES:
        raise IdentityError(f"{path} is too large to be a murmur private key file")
    try:
        document = tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise IdentityError(f"{path} is not a murmur private key file: {exc}") from None
    if document.get("format") != PRIVATE_KEY_FORMAT:
        raise IdentityError(
            f"{path} is not a murmur private key file (expected format = "
            f'"{PRIVATE_KEY_FORMAT}"); did you pass the .pub file?'
        )
    seed = document.get("seed")
    if not isinstance(seed, str) or not _HEX_KEY_PATTERN.fullmatch(seed):
        raise IdentityError(f"{path}: 'seed' must be 64 hex characters")
    name = document.get("name")
    try:
        check_name(name)
    except IdentityError as exc:
        raise IdentityError(f"{path}: {exc}") from None
    return Identity(name, SigningKey(bytes.fromhex(seed)))


def load_public_key(text_or_path: str | Path) -> bytes:
    """A peer's 32-byte public key from 64 hex characters or from a ``.pub`` file path."""
    if isinstance(text_or_path, str) and _HEX_KEY_PATTERN.fullmatch(text_or_path.strip()):
        return check_public_key(bytes.fromhex(text_or_path.strip()))
    path = Path(text_or_path)
    try:
        with path.open("rb") as handle:
            raw = handle.read(_MAX_KEY_FILE_BYTES)
    except OSError:
        raise IdentityError(
            f"{str(text_or_path)!r} is neither 64 hex characters of an Ed25519 public key "
            "nor a readable .pub file"
        ) from None
    tokens = raw.decode("utf-8", errors="replace").split()
    if not tokens or not _HEX_KEY_PATTERN.fullmatch(tokens[0]):
        raise IdentityError(
            f"{path} is not a murmur public key file: it must start with 64 hex characters"
        )
    return check_public_key(bytes.fromhex(tokens[0]))


def keygen_command(name: str, out_dir: str | Path, force: bool = False) -> int:
    """``murmur keygen``: create and save a key pair, print where it went; returns exit code."""
    try:
        identity = generate_identity(name)
        private_path, public_path = save_identity(identity, out_dir, force=force)
    except (IdentityError, OSError) as exc:
        print(f"murmur keygen: {exc}", file=sys.stderr)
        return 1
    print(f"fingerprint: {identity.fingerprint}")
    print(f"private key: {private_path} (mode 0600, keep it secret)")
    print(f"public key:  {public_path} (give it to peers for their allowlists)")
    print(f"public key hex: {identity.public_key.hex()}")
    return 0
