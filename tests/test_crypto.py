"""Identities, key files, the allowlist and encrypt-once sealing (crypto/)."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import stat

import murmur.crypto.sealing as sealing
import nacl.bindings
import pytest
from murmur.crypto.allowlist import Allowlist, Peer
from murmur.crypto.identity import (
    IdentityError,
    fingerprint,
    generate_identity,
    keygen_command,
    load_identity,
    load_public_key,
    save_identity,
    verify_signature,
)
from murmur.crypto.sealing import SealingError, seal, unseal


def mode_of(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


# --- identities and key files --------------------------------------------------------------


def test_save_and_load_round_trip(tmp_path):
    identity = generate_identity("hospital_a")
    private_path, public_path = save_identity(identity, tmp_path / "keys")
    assert private_path.name == "hospital_a.key" and public_path.name == "hospital_a.pub"
    assert mode_of(private_path) == 0o600
    assert mode_of(public_path) == 0o644

    loaded = load_identity(private_path)
    assert loaded.name == "hospital_a"
    assert loaded.public_key == identity.public_key
    assert load_public_key(public_path) == identity.public_key
    assert load_public_key(str(public_path)) == identity.public_key
    assert load_public_key(identity.public_key.hex()) == identity.public_key
    assert public_path.read_text().split() == [identity.public_key.hex(), "hospital_a"]
    # The seed is in the private file and nowhere in the public one.
    seed_hex = identity.signing_key.encode().hex()
    assert seed_hex in private_path.read_text()
    assert seed_hex not in public_path.read_text()


def test_refuses_to_overwrite_without_force(tmp_path):
    first = generate_identity("hospital_a")
    private_path, _ = save_identity(first, tmp_path)
    with pytest.raises(FileExistsError, match="--force"):
        save_identity(generate_identity("hospital_a"), tmp_path)
    assert load_identity(private_path).public_key == first.public_key

    second = generate_identity("hospital_a")
    save_identity(second, tmp_path, force=True)
    assert load_identity(private_path).public_key == second.public_key
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_force_overwrite_tightens_a_loose_existing_file(tmp_path):
    private_path = tmp_path / "hospital_a.key"
    private_path.write_text("old")
    private_path.chmod(0o644)
    save_identity(generate_identity("hospital_a"), tmp_path, force=True)
    assert mode_of(private_path) == 0o600


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644, 0o660])
def test_load_refuses_group_or_world_readable_key(tmp_path, mode):
    private_path, _ = save_identity(generate_identity("hospital_a"), tmp_path)
    private_path.chmod(mode)
    with pytest.raises(IdentityError) as excinfo:
        load_identity(private_path)
    assert f"chmod 600 {private_path}" in str(excinfo.value)


def test_load_identity_errors_name_the_problem(tmp_path):
    with pytest.raises(IdentityError, match="murmur keygen"):
        load_identity(tmp_path / "missing.key")
    _, public_path = save_identity(generate_identity("hospital_a"), tmp_path)
    public_path.chmod(0o600)
    with pytest.raises(IdentityError, match="not a murmur private key file"):
        load_identity(public_path)
    garbage = tmp_path / "garbage.key"
    garbage.write_bytes(b"\xff\xfe not toml [[[")
    garbage.chmod(0o600)
    with pytest.raises(IdentityError, match="not a murmur private key file"):
        load_identity(garbage)


def test_invalid_names_are_refused(tmp_path):
    for name in ["", "../etc", "a b", "x" * 65, "-lead"]:
        with pytest.raises(IdentityError, match="invalid node name"):
            generate_identity(name)


def test_load_public_key_rejects_bad_input(tmp_path):
    with pytest.raises(IdentityError, match="neither"):
        load_public_key("not-a-key")
    with pytest.raises(IdentityError, match="not a valid Ed25519 public key"):
        load_public_key("00" * 32)  # the identity point has small order
    text_file = tmp_path / "peer.pub"
    text_file.write_text("hello world\n")
    with pytest.raises(IdentityError, match="must start with 64 hex"):
        load_public_key(text_file)


def test_fingerprint_is_short_stable_and_distinct():
    a, b = generate_identity("a"), generate_identity("b")
    assert a.fingerprint == fingerprint(a.public_key)
    assert len(a.fingerprint) == 39 and a.fingerprint.count(":") == 7
    assert a.fingerprint != b.fingerprint


def test_keygen_command_prints_fingerprint_and_refuses_overwrite(tmp_path, capsys):
    assert keygen_command("hospital_a", tmp_path) == 0
    out = capsys.readouterr().out
    identity = load_identity(tmp_path / "hospital_a.key")
    assert identity.fingerprint in out
    assert str(tmp_path / "hospital_a.key") in out and str(tmp_path / "hospital_a.pub") in out

    assert keygen_command("hospital_a", tmp_path) == 1
    assert "--force" in capsys.readouterr().err
    assert load_identity(tmp_path / "hospital_a.key").public_key == identity.public_key

    assert keygen_command("hospital_a", tmp_path, force=True) == 0
    assert load_identity(tmp_path / "hospital_a.key").public_key != identity.public_key


def test_sign_and_verify():
    alice, bob = generate_identity("alice"), generate_identity("bob")
    signature = alice.sign(b"message")
    assert len(signature) == 64
    assert verify_signature(alice.public_key, b"message", signature)
    assert not verify_signature(alice.public_key, b"messagE", signature)
    assert not verify_signature(bob.public_key, b"message", signature)
    assert not verify_signature(b"short", b"message", signature)
    assert not verify_signature(alice.public_key, b"message", signature[:-1])


# --- allowlist --------------------------------------------------------------------------------


def test_allowlist_lookup():
    a, b = generate_identity("a"), generate_identity("b")
    peers = [
        Peer("a", "http://127.0.0.1:9001", a.public_key),
        Peer("b", "http://h:2", b.public_key),
    ]
    allowlist = Allowlist(peers)
    assert allowlist.by_key(a.public_key) == peers[0]
    assert allowlist.by_name("b") == peers[1]
    assert allowlist.by_key(generate_identity("c").public_key) is None
    assert allowlist.by_name("c") is None
    assert a.public_key in allowlist and len(allowlist) == 2
    assert [p.name for p in allowlist] == ["a", "b"]


def test_allowlist_refuses_duplicates():
    a, b = generate_identity("a"), generate_identity("b")
    with pytest.raises(ValueError, match="twice"):
        Allowlist([Peer("a", "http://x:1", a.public_key), Peer("a", "http://x:2", b.public_key)])
    with pytest.raises(ValueError, match="same public key"):
        Allowlist([Peer("a", "http://x:1", a.public_key), Peer("b", "http://x:2", a.public_key)])


def test_peer_validates_its_fields():
    key = generate_identity("a").public_key
    with pytest.raises(ValueError, match="Ed25519"):
        Peer("a", "http://x:1", key[:31])
    with pytest.raises(ValueError, match="not a valid Ed25519"):
        Peer("a", "http://x:1", bytes(32))
    with pytest.raises(ValueError, match="address"):
        Peer("a", "", key)
    with pytest.raises(ValueError, match="invalid node name"):
        Peer("a b", "http://x:1", key)


def test_allowlist_from_config_accepts_hex_and_pub_files(tmp_path):
    a, b = generate_identity("a"), generate_identity("b")
    save_identity(b, tmp_path / "keys")
    allowlist = Allowlist.from_config(
        [
            {"name": "a", "address": "http://x:1", "public_key": a.public_key.hex()},
            {"name": "b", "address": "http://x:2", "public_key": "keys/b.pub"},
        ],
        base_dir=tmp_path,
    )
    assert allowlist.by_name("a").public_key == a.public_key
    assert allowlist.by_name("b").public_key == b.public_key
    with pytest.raises(ValueError, match="lacks address"):
        Allowlist.from_config([{"name": "a", "public_key": a.public_key.hex()}])
    with pytest.raises(ValueError, match="peer 'c'"):
        Allowlist.from_config([{"name": "c", "address": "http://x:3", "public_key": "nope.pub"}])


# --- sealing ------------------------------------------------------------------------------------


AD = b"the header this body belongs to"


def test_seal_once_open_by_every_recipient_and_nobody_else():
    sender = generate_identity("sender")
    recipients = [generate_identity(f"r{i}") for i in range(3)]
    outsider = generate_identity("outsider")
    nonce = os.urandom(sealing.NONCE_BYTES)
    plaintext = os.urandom(1000)
    sealed = seal(plaintext, sender, [r.public_key for r in recipients], nonce, AD)

    assert len(sealed.ciphertext) == len(plaintext) + sealing.TAG_BYTES
    assert len(sealed.wrapped_keys) == 3 and len(set(sealed.wrapped_keys)) == 3
    assert all(len(w) == sealing.WRAPPED_KEY_BYTES == 64 for w in sealed.wrapped_keys)
    for recipient, wrapped in zip(recipients, sealed.wrapped_keys, strict=True):
        assert unseal(recipient, sender.public_key, sealed, wrapped, nonce, AD) == plaintext
    with pytest.raises(SealingError, match="wrapped body key"):
        unseal(outsider, sender.public_key, sealed, sealed.wrapped_keys[0], nonce, AD)


def test_the_wrap_is_bound_to_the_sender_and_the_body_to_its_header():
    """An admitted peer that copies someone else's sealed body cannot present it as its own:
    the wrap does not open under another sender's key, and the body does not decrypt under
    another header (docs/protocol.md, "Encryption")."""
    alice, mallory, bob = (generate_identity(n) for n in ("alice", "mallory", "bob"))
    nonce = os.urandom(sealing.NONCE_BYTES)
    sealed = seal(b"alice's model", alice, [bob.public_key], nonce, AD)
    wrapped = sealed.wrapped_keys[0]
    with pytest.raises(SealingError, match="wrapped body key"):
        unseal(bob, mallory.public_key, sealed, wrapped, nonce, AD)
    key = sealing.unwrap_key(
        bob, alice.public_key, sealed.ephemeral_public_key, wrapped, nonce, sealed.key_commitment
    )
    assert sealing.decrypt_body(sealed.ciphertext, key, nonce, AD) == b"alice's model"
    with pytest.raises(SealingError, match="failed authentication"):
        sealing.decrypt_body(sealed.ciphertext, key, nonce, AD.replace(b"header", b"HEADER"))


def test_the_body_key_is_committed():
    """One commitment admits one key: a wrap of another key is refused before decrypting,
    so one signed envelope can only ever decrypt to one plaintext."""
    alice, bob = generate_identity("alice"), generate_identity("bob")
    nonce = os.urandom(sealing.NONCE_BYTES)
    first = seal(b"model one", alice, [bob.public_key], nonce, AD)
    second = seal(b"model two", alice, [bob.public_key], nonce, AD)
    assert first.key_commitment != second.key_commitment
    assert len(first.key_commitment) == sealing.COMMITMENT_BYTES
    with pytest.raises(SealingError, match="key commitment"):
        sealing.unwrap_key(
            bob,
            alice.public_key,
            second.ephemeral_public_key,
            second.wrapped_keys[0],
            nonce,
            first.key_commitment,
        )
    key = sealing.unwrap_key(
        bob,
        alice.public_key,
        first.ephemeral_public_key,
        first.wrapped_keys[0],
        nonce,
        first.key_commitment,
    )
    assert sealing.key_commitment(key) == first.key_commitment
    assert first.key_commitment == hashlib.sha256(b"murmur-body-key\x00" + key).digest()


def test_the_wrap_is_two_crypto_boxes_ephemeral_then_static():
    """The documented construction, recomputed with libsodium's crypto_box directly."""
    alice, bob = generate_identity("alice"), generate_identity("bob")
    nonce = os.urandom(sealing.NONCE_BYTES)
    wrapped = sealing.wrap_new_key(alice, [bob.public_key], nonce)
    bob_x_secret = nacl.bindings.crypto_sign_ed25519_sk_to_curve25519(
        bob.signing_key.encode() + bob.public_key
    )
    alice_x_public = nacl.bindings.crypto_sign_ed25519_pk_to_curve25519(alice.public_key)
    inner = nacl.bindings.crypto_box_open_easy(
        wrapped.wrapped_keys[0], nonce, alice_x_public, bob_x_secret
    )
    body_key = nacl.bindings.crypto_box_open_easy(
        inner, nonce, wrapped.ephemeral_public_key, bob_x_secret
    )
    assert body_key == wrapped.body_key and len(body_key) == 32


def test_unseal_detects_tampering():
    sender, recipient = generate_identity("s"), generate_identity("r")
    nonce = os.urandom(sealing.NONCE_BYTES)
    sealed = seal(b"secret weights", sender, [recipient.public_key], nonce, AD)
    wrapped = sealed.wrapped_keys[0]
    tampered = dataclasses.replace(
        sealed, ciphertext=bytes([sealed.ciphertext[0] ^ 1]) + sealed.ciphertext[1:]
    )
    with pytest.raises(SealingError, match="failed authentication"):
        unseal(recipient, sender.public_key, tampered, wrapped, nonce, AD)
    with pytest.raises(SealingError):
        unseal(recipient, sender.public_key, sealed, wrapped, bytes(sealing.NONCE_BYTES), AD)
    with pytest.raises(SealingError):
        no_ephemeral = dataclasses.replace(sealed, ephemeral_public_key=bytes(32))
        unseal(recipient, sender.public_key, no_ephemeral, wrapped, nonce, AD)


def test_body_is_encrypted_once_whatever_the_number_of_recipients(monkeypatch):
    calls = []
    real_encrypt = sealing._encrypt

    def counting_encrypt(message, aad, nonce, key):
        calls.append(len(message))
        return real_encrypt(message, aad, nonce, key)

    monkeypatch.setattr(sealing, "_encrypt", counting_encrypt)
    recipients = [generate_identity(f"r{i}").public_key for i in range(8)]
    seal(b"x" * 10_000, generate_identity("s"), recipients, os.urandom(sealing.NONCE_BYTES), AD)
    assert calls == [10_000]


def test_a_replaced_key_is_fsynced_then_renamed_then_its_directory_fsynced(tmp_path, monkeypatch):
    """Issue #25 item 6: a key written with force replaces the old one durably: after a
    power cut the directory holds the new key, never the old one back or none."""
    from tests.test_rollback import assert_durable_replace, record_syscalls

    save_identity(generate_identity("hospital_a"), tmp_path)
    events = record_syscalls(monkeypatch)
    private_path, public_path = save_identity(generate_identity("hospital_a"), tmp_path, force=True)
    assert_durable_replace(events, private_path)
    assert_durable_replace(events, public_path)
