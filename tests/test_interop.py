"""An independent implementation of docs/protocol.md (version 5), written from the document
alone: msgpack, hashlib, base64, struct and PyNaCl's libsodium bindings, nothing from
gossip/ or crypto/. It builds an envelope and its Murmur-Auth header, and a real node's peer
listener accepts them; it opens an envelope the node's own code built; its receipt is the
node's, byte for byte. If the document and the code ever disagree, this fails."""

from __future__ import annotations

import base64
import hashlib
import os
import struct
import time
import tomllib
from pathlib import Path
from typing import Any

import aiohttp
import msgpack
import nacl.bindings as sodium
import numpy as np

from tests.netutil import build_node

VERSION = 5
N_FEATURES = 30  # the breast-cancer data set of the test network


# --------------------------------------------------------------------------- keys (the doc's
# "From the seed to every key": the key file holds the seed)


def keys_from_file(path: Path) -> dict[str, bytes]:
    seed = bytes.fromhex(tomllib.loads(path.read_text())["seed"])
    pk, sk = sodium.crypto_sign_seed_keypair(seed)
    return {
        "pk": pk,
        "sk": sk,  # 64 bytes: seed ‖ pk
        "x_pk": sodium.crypto_sign_ed25519_pk_to_curve25519(pk),
        "x_sk": sodium.crypto_sign_ed25519_sk_to_curve25519(sk),
    }


def sign(message: bytes, sk: bytes) -> bytes:
    return sodium.crypto_sign(message, sk)[:64]  # crypto_sign_detached


def x25519(ed25519_pk: bytes) -> bytes:
    return sodium.crypto_sign_ed25519_pk_to_curve25519(ed25519_pk)


# --------------------------------------------------------------------------- the envelope


def recipient_bytes(recipients: list[tuple[bytes, bytes]]) -> bytes:
    return struct.pack(">H", len(recipients)) + b"".join(k + w for k, w in recipients)


def build(sender: dict[str, bytes], recipient_pk: bytes, round_: int, tensors: list) -> bytes:
    """Envelope, steps 1-4 of "Encryption", "Envelope encoding", "What the signature covers"."""
    head = bytes(56)  # no audit log: seq 0, zero hash, 0 steps, epsilon +0.0
    head_digest = hashlib.sha256(b"murmur-envelope-head\x00" + head).digest()
    header = msgpack.packb(
        {
            "tensors": [[name, "float32", list(a.shape)] for name, a in tensors],
            "metrics": {},
            "receipts": [],
            "proofs": [],
            "audit_head": head,
        }
    )
    plaintext = struct.pack(">I", len(header)) + header
    plaintext += b"".join(a.astype("<f4").tobytes() for _, a in tensors)

    nonce = os.urandom(24)
    key = os.urandom(32)
    commitment = hashlib.sha256(b"murmur-body-key\x00" + key).digest()
    e_pk, e_sk = sodium.crypto_box_keypair()
    inner = sodium.crypto_box_easy(key, nonce, x25519(recipient_pk), e_sk)
    wrapped = sodium.crypto_box_easy(inner, nonce, x25519(recipient_pk), sender["x_sk"])
    assert (len(inner), len(wrapped)) == (48, 64)
    recipients = [(recipient_pk, wrapped)]
    timestamp_ms = int(time.time() * 1000)
    kind = b"update"
    ad = (
        b"murmur-envelope-body\x00"
        + struct.pack(">HB", VERSION, len(kind))
        + kind
        + sender["pk"]
        + struct.pack(">Q", round_)
        + head_digest
        + struct.pack(">Q", timestamp_ms)
        + nonce
        + e_pk
        + commitment
        + recipient_bytes(recipients)
    )
    body = sodium.crypto_aead_xchacha20poly1305_ietf_encrypt(plaintext, ad, nonce, key)
    rest = hashlib.sha256(
        struct.pack(">Q", timestamp_ms)
        + nonce
        + e_pk
        + commitment
        + recipient_bytes(recipients)
        + hashlib.sha256(body).digest()
    ).digest()
    signed = hashlib.sha256(
        b"murmur-envelope\x00"
        + struct.pack(">HB", VERSION, len(kind))
        + kind
        + sender["pk"]
        + struct.pack(">Q", round_)
        + head_digest
        + rest
    ).digest()
    return msgpack.packb(
        {
            "version": VERSION,
            "kind": "update",
            "sender": sender["pk"],
            "round": round_,
            "head_digest": head_digest,
            "timestamp_ms": timestamp_ms,
            "nonce": nonce,
            "ephemeral_key": e_pk,
            "key_commitment": commitment,
            "recipients": [list(r) for r in recipients],
            "signature": sign(signed, sender["sk"]),
            "body": body,
        }
    )


def auth_header(sender: dict[str, bytes], recipient_pk: bytes, path: str, body: bytes) -> str:
    """ "Request authentication (`Murmur-Auth`)"."""
    fields = struct.pack(
        ">H32s32sQ16sQ32s",
        VERSION,
        sender["pk"],
        recipient_pk,
        int(time.time() * 1000),
        os.urandom(16),
        len(body),
        hashlib.sha256(body).digest(),
    )
    message = b"murmur-request-auth\x00" + bytes([len(path)]) + path.encode() + fields
    value = base64.b64encode(fields + sign(message, sender["sk"])).decode()
    assert len(value) == 260
    return value


def open_envelope(data: bytes, me: dict[str, bytes]) -> tuple[dict[str, Any], bytes, bytes]:
    """The receiving side of the same sections: (fields, plaintext, receipt bytes)."""
    fields = msgpack.unpackb(data)
    assert list(fields) == [
        "version", "kind", "sender", "round", "head_digest", "timestamp_ms", "nonce",
        "ephemeral_key", "key_commitment", "recipients", "signature", "body",
    ]  # fmt: skip
    assert msgpack.packb(fields) == data  # canonical
    kind = fields["kind"].encode()
    recipients = [(k, w) for k, w in fields["recipients"]]
    rest = hashlib.sha256(
        struct.pack(">Q", fields["timestamp_ms"])
        + fields["nonce"]
        + fields["ephemeral_key"]
        + fields["key_commitment"]
        + recipient_bytes(recipients)
        + hashlib.sha256(fields["body"]).digest()
    ).digest()
    prefix = struct.pack(">HB", fields["version"], len(kind)) + kind + fields["sender"]
    prefix += struct.pack(">Q", fields["round"])
    signed = hashlib.sha256(b"murmur-envelope\x00" + prefix + fields["head_digest"] + rest)
    sodium.crypto_sign_open(fields["signature"] + signed.digest(), fields["sender"])
    wrapped = dict(recipients)[me["pk"]]
    nonce = fields["nonce"]
    inner = sodium.crypto_box_open_easy(wrapped, nonce, x25519(fields["sender"]), me["x_sk"])
    key = sodium.crypto_box_open_easy(inner, nonce, fields["ephemeral_key"], me["x_sk"])
    assert hashlib.sha256(b"murmur-body-key\x00" + key).digest() == fields["key_commitment"]
    ad = b"murmur-envelope-body\x00" + prefix + fields["head_digest"]
    ad += struct.pack(">Q", fields["timestamp_ms"]) + nonce + fields["ephemeral_key"]
    ad += fields["key_commitment"] + recipient_bytes(recipients)
    plaintext = sodium.crypto_aead_xchacha20poly1305_ietf_decrypt(fields["body"], ad, nonce, key)
    length = struct.unpack(">I", plaintext[:4])[0]
    head = msgpack.unpackb(plaintext[4 : 4 + length])["audit_head"]
    receipt = prefix + head + rest + fields["signature"]
    return fields, plaintext, receipt


# --------------------------------------------------------------------------- against the node


async def test_an_independent_encoder_following_the_document_is_accepted(tmp_path: Path) -> None:
    from murmur.node.api import start_api  # the node under test (everything above is independent)

    node = build_node(tmp_path)
    api = await start_api(node, None)
    try:
        alice = keys_from_file(tmp_path / "keys" / "hospital_1.key")
        bob_pk = node.identity.public_key
        rng = np.random.default_rng(0)
        weight = rng.standard_normal((1, N_FEATURES)).astype(np.float32)
        bias = np.array([0.25], np.float32)
        # The bias first: the order of the tensor entries is not checked, their names are.
        tensors = [("linear.bias", bias), ("linear.weight", weight)]
        data = build(alice, bob_pk, 1, tensors)
        headers = {
            "Content-Type": "application/x-murmur-envelope",
            "Murmur-Auth": auth_header(alice, bob_pk, "/gossip", data),
        }
        async with (
            aiohttp.ClientSession() as session,
            session.post(f"{api.peer.address}/gossip", data=data, headers=headers) as response,
        ):
            assert (response.status, await response.json()) == (202, {"reason": "accepted"})
        record = node.audit.last(1)[0]
        assert record.kind == "message_received" and record.fields["accepted"] is True
        assert record.fields["sender"] == "hospital_1"
        # The node's receipt of it is 201 bytes, as the document says for kind "update".
        assert len(bytes.fromhex(record.fields["receipt"])) == 201
        # The node's opener, called directly, decodes exactly these tensors.
        second = build(alice, bob_pk, 2, tensors)
        opened = node.opener.open(second, sender=alice["pk"])
        np.testing.assert_array_equal(opened.update.tensors["linear.weight"], weight)
        np.testing.assert_array_equal(opened.update.tensors["linear.bias"], bias)
        assert list(opened.update.tensors) == ["linear.weight", "linear.bias"]  # model order
    finally:
        await api.close()
        node.audit.close()


def test_an_independent_decoder_opens_what_the_node_builds(tmp_path: Path) -> None:
    """The other direction: the node's build_envelope and request header, read back with the
    document's layouts only (the receipt compared with the node's own, byte for byte)."""
    from murmur.gossip.auth import request_headers  # the code under test
    from murmur.gossip.wire import EnvelopeOpener, ModelUpdate, build_envelope
    from murmur.models.params import get_state

    node = build_node(tmp_path)
    try:
        alice = keys_from_file(tmp_path / "keys" / "hospital_1.key")
        state = get_state(node.model)
        data = build_envelope(ModelUpdate(state), node.identity, [alice["pk"]], 3)
        fields, plaintext, receipt = open_envelope(data, alice)
        assert fields["version"] == VERSION and fields["round"] == 3
        length = struct.unpack(">I", plaintext[:4])[0]
        header = msgpack.unpackb(plaintext[4 : 4 + length])
        assert set(header) == {"tensors", "metrics", "receipts", "proofs", "audit_head"}
        assert [t[0] for t in header["tensors"]] == ["linear.weight", "linear.bias"]
        assert header["tensors"][0][1:] == ["float32", [1, N_FEATURES]]
        raw = plaintext[4 + length :]
        weight = np.frombuffer(raw[: 4 * N_FEATURES], "<f4").reshape(1, N_FEATURES)
        np.testing.assert_array_equal(weight, state["linear.weight"])
        assert len(raw) == 4 * (N_FEATURES + 1)
        # The node's opener, as hospital_1, makes the same receipt.
        from murmur.crypto.allowlist import Allowlist, Peer
        from murmur.crypto.identity import load_identity

        admits_the_node = Allowlist([Peer("hospital_0", "http://x", node.identity.public_key)])
        as_alice = EnvelopeOpener(
            load_identity(tmp_path / "keys" / "hospital_1.key"), admits_the_node, node.spec
        )
        assert as_alice.open(data).receipt.encode() == receipt and len(receipt) == 201
        # And the node's request header verifies with the document's message layout.
        value = request_headers(node.identity, alice["pk"], "/gossip", data, "x")["Murmur-Auth"]
        raw_header = base64.b64decode(value, validate=True)
        fields_130, signature = raw_header[:130], raw_header[130:]
        version, sender, recipient, _, _, body_length, digest = struct.unpack(
            ">H32s32sQ16sQ32s", fields_130
        )
        assert (version, sender, recipient) == (VERSION, node.identity.public_key, alice["pk"])
        assert (body_length, digest) == (len(data), hashlib.sha256(data).digest())
        message = b"murmur-request-auth\x00" + bytes([7]) + b"/gossip" + fields_130
        assert sodium.crypto_sign_open(signature + message, sender) == message
    finally:
        node.audit.close()


def test_the_x25519_keys_are_the_documented_derivation(tmp_path: Path) -> None:
    """ "From the seed to every key": the X25519 secret is the clamped first half of
    SHA-512(seed), and the node uses exactly these keys."""
    from murmur.crypto.identity import load_identity

    node = build_node(tmp_path)
    node.audit.close()
    path = tmp_path / "keys" / "hospital_1.key"
    keys = keys_from_file(path)
    seed = bytes.fromhex(tomllib.loads(path.read_text())["seed"])
    scalar = bytearray(hashlib.sha512(seed).digest()[:32])
    scalar[0] &= 248
    scalar[31] &= 127
    scalar[31] |= 64
    assert keys["x_sk"] == bytes(scalar)
    assert sodium.crypto_scalarmult_base(keys["x_sk"]) == keys["x_pk"]
    identity = load_identity(path)
    assert identity.public_key == keys["pk"] and keys["sk"] == seed + keys["pk"]
    assert identity.x25519_private_key.encode() == keys["x_sk"]
    assert identity.x25519_private_key.public_key.encode() == keys["x_pk"]
