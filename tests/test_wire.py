"""The envelope: round trip, and every rejection with its reason code (gossip/wire/)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import struct
import time

import msgpack
import numpy as np
import pytest
from murmur.crypto.allowlist import Allowlist, Peer
from murmur.crypto.identity import generate_identity
from murmur.gossip.receipts import (
    AuditHead,
    EquivocationProof,
    Receipt,
    ReceiptBook,
    ReceiptError,
    no_audit_head,
)
from murmur.gossip.wire import (
    HTTP_STATUS,
    PROTOCOL_VERSION,
    EnvelopeOpener,
    ModelUpdate,
    RejectReason,
    ReplayGuard,
    WireError,
    WireLimits,
    _encode_body,
    _envelope_prefix,
    _parse_envelope,
    _seal_envelope,
    _signed_digest,
    build_envelope,
    default_max_message_bytes,
    is_update_kind,
    peek_envelope,
    study_kind,
)
from murmur.models.nets import MODEL_NAMES, build_model
from murmur.models.params import get_state, model_spec, state_sha256

ALICE = generate_identity("alice")  # admitted sender
BOB = generate_identity("bob")  # admitted receiver
CAROL = generate_identity("carol")  # admitted receiver
DAVE = generate_identity("dave")  # admitted, an insider who is not always a recipient
MALLORY = generate_identity("mallory")  # not admitted
ALLOWLIST = Allowlist(
    Peer(identity.name, f"http://127.0.0.1:{9000 + i}", identity.public_key)
    for i, identity in enumerate([ALICE, BOB, CAROL, DAVE])
)
NOW = 1_800_000_000.0


def small_state(seed: int = 0) -> dict[str, np.ndarray]:
    """A few hundred bytes of tensors, so byte-by-byte tests stay fast."""
    rng = np.random.default_rng(seed)
    return {
        "layer.weight": rng.standard_normal((4, 8), dtype=np.float32),
        "layer.bias": rng.standard_normal(8, dtype=np.float32),
        "scale": np.array(1.5, dtype=np.float32),
    }


SPEC = {name: (array.shape, "float32") for name, array in small_state().items()}


def small_update(seed: int = 0, **changes) -> ModelUpdate:
    update = ModelUpdate(small_state(seed), metrics={"loss": 0.25, "auc": 0.8})
    return dataclasses.replace(update, **changes)


def valid_envelope(sender=ALICE, recipients=(BOB, CAROL), round=7, now=NOW, **changes) -> bytes:
    keys = [r.public_key for r in recipients]
    return build_envelope(small_update(**changes), sender, keys, round, now=now)


def opener(identity=BOB, **limits) -> EnvelopeOpener:
    return EnvelopeOpener(identity, ALLOWLIST, SPEC, WireLimits(**limits))


def reason_of(data, opener_=None, now=NOW) -> RejectReason:
    with pytest.raises(WireError) as excinfo:
        (opener_ or opener()).open(data, now=now)
    return excinfo.value.reason


def resign(data: bytes, signer=ALICE, **fields) -> bytes:
    """Re-encode a valid envelope with some header fields replaced, correctly signed."""
    raw = _parse_envelope(data, WireLimits(), len(data))
    raw = dataclasses.replace(raw, **fields)
    digest = _signed_digest(raw, hashlib.sha256(raw.body).digest())
    raw = dataclasses.replace(raw, signature=signer.sign(digest))
    return _envelope_prefix(raw) + raw.body


def envelope_with_body(body: bytes, sender=ALICE, recipients=(BOB,), round=7) -> bytes:
    """A correctly signed and encrypted envelope around arbitrary body bytes."""
    return _seal_envelope(body, sender, [r.public_key for r in recipients], round, now=NOW)


# --- round trip ---------------------------------------------------------------------------------


def test_round_trip_for_every_recipient():
    data = valid_envelope()
    state = small_state()
    for receiver in (BOB, CAROL):
        opened = opener(receiver).open(data, now=NOW + 5)
        assert opened.sender == ALLOWLIST.by_name("alice")
        assert (opened.round, opened.kind, opened.timestamp) == (7, "update", NOW)
        assert opened.head == no_audit_head()
        assert opened.update.metrics == {"loss": 0.25, "auc": 0.8}
        assert list(opened.update.tensors) == list(state)
        for name, array in state.items():
            received = opened.update.tensors[name]
            assert received.dtype == np.float32 and received.shape == array.shape
            np.testing.assert_array_equal(received, array)
            assert not received.flags.writeable
        assert opened.body_sha256 == peek_envelope(data).body_sha256
        assert len(opened.nonce) == 24


def test_body_sha256_is_the_same_for_all_recipients_and_identifies_the_update():
    data = valid_envelope()
    expected = hashlib.sha256(msgpack.unpackb(data)["body"]).hexdigest()
    assert opener(BOB).open(data, now=NOW).body_sha256 == expected
    assert (
        opener(BOB).open(data, now=NOW).body_sha256 == opener(CAROL).open(data, now=NOW).body_sha256
    )
    assert peek_envelope(data).body_sha256 != peek_envelope(valid_envelope()).body_sha256


def test_weights_are_not_readable_on_the_wire():
    state = small_state()
    data = valid_envelope()
    for array in state.values():
        assert array.tobytes() not in data


def test_big_endian_zero_size_and_scalar_tensors_round_trip():
    state = {"be": np.arange(6, dtype=">f4").reshape(2, 3), "empty": np.zeros((0, 3), np.float32)}
    spec = {"be": ((2, 3), "float32"), "empty": ((0, 3), "<f4")}
    data = build_envelope(ModelUpdate(state), ALICE, [BOB.public_key], 0, now=NOW)
    opened = EnvelopeOpener(BOB, ALLOWLIST, spec).open(data, now=NOW)
    np.testing.assert_array_equal(opened.update.tensors["be"], np.arange(6).reshape(2, 3))
    assert opened.update.tensors["empty"].shape == (0, 3)


def test_peek_reads_the_header_without_verifying():
    info = peek_envelope(valid_envelope(round=3))
    assert info.sender == ALICE.public_key
    assert info.recipients == (BOB.public_key, CAROL.public_key)
    assert (info.round, info.kind, info.timestamp) == (3, "update", NOW)
    with pytest.raises(WireError):
        peek_envelope(b"\x00garbage")


# --- every byte matters ----------------------------------------------------------------------


def test_every_single_byte_flip_is_rejected():
    data = valid_envelope()
    receiver = opener()
    reasons = set()
    for position in range(len(data)):
        for mask in (0x01, 0x80, 0xFF):
            mutated = bytearray(data)
            mutated[position] ^= mask
            reasons.add(reason_of(bytes(mutated), receiver))
    assert {RejectReason.MALFORMED, RejectReason.BAD_SIGNATURE} <= reasons
    assert receiver.open(data, now=NOW).update.metrics["loss"] == 0.25  # nothing was recorded


def test_every_truncation_and_extension_is_rejected():
    data = valid_envelope()
    receiver = opener()
    for length in range(len(data)):
        assert reason_of(data[:length], receiver) in {
            RejectReason.MALFORMED,
            RejectReason.BAD_SIGNATURE,
        }
    assert reason_of(data + b"\x00", receiver) == RejectReason.MALFORMED
    assert reason_of(data + data, receiver) == RejectReason.MALFORMED


def test_non_canonical_encoding_is_rejected():
    data = valid_envelope()
    fields = msgpack.unpackb(data)
    reordered = dict(reversed(list(fields.items())))
    assert reason_of(msgpack.packb(reordered)) == RejectReason.MALFORMED
    # round 7 as uint64 instead of a positive fixint: same value, different bytes
    prefix = _envelope_prefix(_parse_envelope(data, WireLimits(), len(data)))
    key = msgpack.packb("round")
    at = prefix.index(key) + len(key)
    assert data[at] == 7
    padded = data[:at] + b"\xcf" + (7).to_bytes(8, "big") + data[at + 1 :]
    assert msgpack.unpackb(padded)["round"] == 7
    assert reason_of(padded) == RejectReason.MALFORMED


# --- reason codes ---------------------------------------------------------------------------


def test_valid_signature_from_a_key_not_on_the_allowlist_is_rejected():
    data = valid_envelope(sender=MALLORY)
    assert reason_of(data) == RejectReason.UNKNOWN_SENDER
    # Mallory even names Alice as sender and signs with her own key: bad signature.
    assert reason_of(resign(data, signer=MALLORY, sender=ALICE.public_key)) == (
        RejectReason.BAD_SIGNATURE
    )


def test_bad_signature():
    data = valid_envelope()
    signature = msgpack.unpackb(data)["signature"]
    at = data.index(signature)
    flipped = data[:at] + bytes([data[at] ^ 1]) + data[at + 1 :]
    assert reason_of(flipped) == RejectReason.BAD_SIGNATURE
    body_flipped = data[:-1] + bytes([data[-1] ^ 1])
    assert reason_of(body_flipped) == RejectReason.BAD_SIGNATURE
    # a correctly signed envelope whose round was changed afterwards
    assert reason_of(resign(data, round=8, signer=MALLORY)) == RejectReason.BAD_SIGNATURE


def test_replay_is_rejected_and_survives_a_checkpoint():
    data = valid_envelope()
    receiver = opener()
    receiver.open(data, now=NOW)
    assert reason_of(data, receiver) == RejectReason.REPLAY

    state = json.loads(json.dumps(receiver.replay.to_state()))
    restored = EnvelopeOpener(BOB, ALLOWLIST, SPEC, replay=ReplayGuard.from_state(state))
    assert reason_of(data, restored) == RejectReason.REPLAY
    restored.open(valid_envelope(), now=NOW)  # a fresh envelope for the same round is fine


def test_wrong_recipient():
    data = valid_envelope(recipients=(CAROL,))
    assert reason_of(data, opener(BOB)) == RejectReason.WRONG_RECIPIENT
    opener(CAROL).open(data, now=NOW)


def test_oversize_is_rejected_before_decoding():
    data = valid_envelope()
    assert reason_of(data, opener(max_message_bytes=len(data) - 1)) == RejectReason.TOO_LARGE
    opener(max_message_bytes=len(data)).open(data, now=NOW)


def test_default_size_limit_follows_the_model_size():
    limit = default_max_message_bytes(SPEC)
    assert limit >= len(valid_envelope())
    tensor_bytes = sum(a.nbytes for a in small_state().values())
    assert limit - tensor_bytes < 128 * 1024
    big = {"layer.weight": np.zeros((4, 8), np.float32), "padding": np.zeros(40_000, np.float32)}
    data = build_envelope(ModelUpdate(big), ALICE, [BOB.public_key], 1, now=NOW)
    assert reason_of(data) == RejectReason.TOO_LARGE


def test_too_many_recipients_tensors_or_metrics():
    data = valid_envelope(recipients=(BOB, CAROL, ALICE))
    assert reason_of(data, opener(max_recipients=2)) == RejectReason.TOO_LARGE
    assert reason_of(valid_envelope(), opener(max_tensors=2)) == RejectReason.TOO_LARGE
    assert reason_of(valid_envelope(), opener(max_metrics=1)) == RejectReason.TOO_LARGE


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_tensor_values(bad):
    state = small_state()
    state["layer.weight"][2, 3] = bad
    assert reason_of(valid_envelope(tensors=state)) == RejectReason.NON_FINITE


def test_non_finite_metric():
    assert reason_of(valid_envelope(metrics={"loss": float("nan")})) == RejectReason.NON_FINITE


def test_wrong_dtype():
    as_float64 = {k: v.astype(np.float64) for k, v in small_state().items()}
    assert reason_of(valid_envelope(tensors=as_float64)) == RejectReason.UNSUPPORTED_DTYPE
    allow_64 = opener(allowed_dtypes=frozenset({"float32", "float64"}))
    assert reason_of(valid_envelope(tensors=as_float64), allow_64) == RejectReason.UNSUPPORTED_DTYPE
    with pytest.raises(ValueError, match="dtype"):
        build_envelope(
            ModelUpdate({"x": np.zeros(3, np.int64)}), ALICE, [BOB.public_key], 1, now=NOW
        )


def test_wrong_shape_missing_or_extra_tensor():
    state = small_state()
    state["layer.bias"] = np.zeros(9, np.float32)
    assert reason_of(valid_envelope(tensors=state)) == RejectReason.SHAPE_MISMATCH
    state = small_state()
    del state["scale"]
    assert reason_of(valid_envelope(tensors=state)) == RejectReason.SHAPE_MISMATCH
    state = small_state()
    state["extra"] = np.zeros(1, np.float32)
    assert reason_of(valid_envelope(tensors=state)) == RejectReason.SHAPE_MISMATCH


def test_stale_timestamps():
    data = valid_envelope()
    assert reason_of(data, now=NOW + 301) == RejectReason.STALE
    assert reason_of(data, now=NOW - 301) == RejectReason.STALE
    assert reason_of(data, opener(timestamp_window_s=10), now=NOW + 11) == RejectReason.STALE
    opener().open(data, now=NOW + 299)


def test_rounds_older_than_the_replay_window_are_stale_and_memory_is_bounded():
    guard = ReplayGuard(round_window=4, max_per_round=2)
    receiver = EnvelopeOpener(BOB, ALLOWLIST, SPEC, replay=guard)
    for round_ in range(10):
        receiver.open(valid_envelope(round=round_), now=NOW)
    rounds = guard.to_state()["senders"][ALICE.public_key.hex()]["rounds"]
    assert sorted(map(int, rounds)) == [6, 7, 8, 9]
    assert reason_of(valid_envelope(round=5), receiver) == RejectReason.STALE
    receiver.open(valid_envelope(round=6), now=NOW)
    assert reason_of(valid_envelope(round=6), receiver) == RejectReason.RATE_LIMITED


def test_unsupported_version_and_kind():
    data = valid_envelope()
    fields = msgpack.unpackb(data)
    assert fields["version"] == PROTOCOL_VERSION == 5
    for other in (1, 2, 3, 4, 6):
        reason = reason_of(msgpack.packb({**fields, "version": other}))
        assert reason == RejectReason.UNSUPPORTED_VERSION
    assert reason_of(resign(data, kind="model")) == RejectReason.UNSUPPORTED_KIND
    with pytest.raises(ValueError, match="kind"):
        build_envelope(small_update(), ALICE, [BOB.public_key], 1, kind="model")


def test_decrypt_failed_when_the_signed_wrapped_key_is_wrong():
    data = valid_envelope(recipients=(BOB,))
    wrong_key = ((BOB.public_key, bytes(64)),)
    assert reason_of(resign(data, recipients=wrong_key)) == RejectReason.DECRYPT_FAILED


def test_an_insider_re_signing_another_senders_envelope_is_refused():
    """Issue #25 item 1: Dave, admitted but not a recipient, sees Alice's envelope to Bob on
    the (plaintext) wire, puts his own key in the sender field and signs it himself. Before
    v4 Bob took Alice's model as Dave's. Now the key wrap opens only under Alice's key, and
    the body only under Alice's header: the envelope is refused, with a typed reason, and,
    its signature being Dave's and valid, it counts against Dave's replay limits."""
    data = valid_envelope(recipients=(BOB,))
    stolen = resign(data, signer=DAVE, sender=DAVE.public_key)
    receiver = opener(BOB)
    with pytest.raises(WireError) as caught:
        receiver.open(stolen, now=NOW, sender=DAVE.public_key)
    assert caught.value.reason == RejectReason.DECRYPT_FAILED
    assert "sender's" in caught.value.detail
    assert caught.value.signed == (DAVE.public_key, 7, msgpack.unpackb(data)["nonce"])
    assert reason_of(stolen, receiver) == RejectReason.REPLAY  # recorded, as Dave's
    # Re-signing it under another round does not help either (the header is the body's AD).
    assert reason_of(resign(data, signer=DAVE, sender=DAVE.public_key, round=8)) == (
        RejectReason.DECRYPT_FAILED
    )
    # Alice's own envelope is untouched by all this.
    assert receiver.open(data, now=NOW).sender.name == "alice"


def test_the_body_is_bound_to_every_header_field():
    """A sender that re-signs its own envelope with any header field changed (but the same
    body and wraps) gets an envelope that does not decrypt: the header is the AEAD's
    associated data."""
    data = valid_envelope(recipients=(BOB,))
    for changes in (
        {"round": 8},
        {"timestamp_ms": int(NOW * 1000) + 1},
        {"head_digest": bytes(32)},
        {"nonce": bytes(24)},
    ):
        assert reason_of(resign(data, **changes)) == RejectReason.DECRYPT_FAILED, changes


def test_the_signed_key_commitment_admits_one_body_key_only():
    """Issue #25 item 9: the signature covers SHA-256("murmur-body-key\0" ‖ K), so a signed
    envelope whose wrap yields any other key is refused before decryption."""
    data = valid_envelope(recipients=(BOB,))
    with pytest.raises(WireError) as caught:
        opener().open(resign(data, key_commitment=bytes(32)), now=NOW)
    assert caught.value.reason == RejectReason.DECRYPT_FAILED
    assert "key commitment" in caught.value.detail


def test_an_envelope_posted_by_another_peer_is_a_sender_mismatch():
    data = valid_envelope()
    assert reason_of_posted(data, CAROL) == RejectReason.SENDER_MISMATCH
    assert HTTP_STATUS[RejectReason.SENDER_MISMATCH] == 403
    assert opener().open(data, now=NOW, sender=ALICE.public_key).sender.name == "alice"


def reason_of_posted(data: bytes, posted_by, opener_=None) -> RejectReason:
    with pytest.raises(WireError) as excinfo:
        (opener_ or opener()).open(data, now=NOW, sender=posted_by.public_key)
    return excinfo.value.reason


def test_verify_changes_nothing_and_accept_lets_one_of_two_copies_in():
    """The node verifies off its event loop and records on it (node/node.py receive): two
    copies of one envelope verified concurrently are both valid, and only the first
    accepted counts."""
    data = valid_envelope()
    receiver = opener()
    first, second = receiver.verify(data, NOW), receiver.verify(data, NOW)
    assert receiver.replay.to_state()["senders"] == {}
    receiver.accept(first)
    with pytest.raises(WireError) as caught:
        receiver.accept(second)
    assert caught.value.reason == RejectReason.REPLAY


def split_body(body: bytes) -> tuple[dict, bytes]:
    """(decoded msgpack header, raw tensor bytes) of a body plaintext."""
    length = int.from_bytes(body[:4], "big")
    return msgpack.unpackb(body[4 : 4 + length]), body[4 + length :]


def join_body(header: object, data: bytes) -> bytes:
    packed = msgpack.packb(header)
    return len(packed).to_bytes(4, "big") + packed + data


def test_body_layout_is_header_then_raw_little_endian_tensors():
    header, data = split_body(_encode_body(small_update()))
    state = small_state()
    assert header == {
        "tensors": [[name, "float32", list(a.shape)] for name, a in state.items()],
        "metrics": {"loss": 0.25, "auc": 0.8},
        "receipts": [],
        "proofs": [],
        "audit_head": bytes(56),  # no audit log: seq 0, zero hash, 0 steps, epsilon +0.0
    }
    assert "num_samples" not in header  # v3: nobody needs it, and it reveals the set's size
    assert data == b"".join(a.astype("<f4").tobytes() for a in state.values())


def test_signature_is_over_the_two_level_layout_of_the_protocol_doc():
    """Recompute docs/protocol.md's layout by hand: a second implementation must agree."""
    head = AuditHead(41, bytes(range(32)), 1234, 0.70)
    keys = [BOB.public_key, CAROL.public_key]
    data = build_envelope(small_update(), ALICE, keys, 7, head=head, now=NOW)
    fields = msgpack.unpackb(data)
    assert list(fields) == [
        "version", "kind", "sender", "round", "head_digest", "timestamp_ms", "nonce",
        "ephemeral_key", "key_commitment", "recipients", "signature", "body",
    ]  # fmt: skip
    head_bytes = (
        (41).to_bytes(8, "big") + bytes(range(32)) + (1234).to_bytes(8, "big")
    ) + struct.pack(">d", 0.70)
    assert len(head_bytes) == 56
    assert (
        fields["head_digest"] == hashlib.sha256(b"murmur-envelope-head\x00" + head_bytes).digest()
    )
    rest = hashlib.sha256(
        fields["timestamp_ms"].to_bytes(8, "big")
        + fields["nonce"]
        + fields["ephemeral_key"]
        + fields["key_commitment"]
        + len(fields["recipients"]).to_bytes(2, "big")
        + b"".join(key + wrapped for key, wrapped in fields["recipients"])
        + hashlib.sha256(fields["body"]).digest()
    ).digest()
    signed = hashlib.sha256(
        b"murmur-envelope\x00"
        + fields["version"].to_bytes(2, "big")
        + bytes([len(b"update")])
        + b"update"
        + fields["sender"]
        + fields["round"].to_bytes(8, "big")
        + fields["head_digest"]
        + rest
    ).digest()
    assert ALICE.signing_key.verify_key.verify(signed, fields["signature"])
    opened = opener().open(data, now=NOW)
    assert opened.head == head
    assert opened.receipt == Receipt(
        5, "update", ALICE.public_key, 7, head, rest, fields["signature"]
    )
    assert opened.receipt.verify()
    # The receipt's bytes, as docs/protocol.md lays them out: the head in the clear.
    assert opened.receipt.encode() == (
        (5).to_bytes(2, "big") + bytes([6]) + b"update" + ALICE.public_key
        + (7).to_bytes(8, "big") + head_bytes + rest + fields["signature"]
    )  # fmt: skip
    # Every recipient gets the same receipt: the same signed envelope.
    assert opener(CAROL).open(data, now=NOW).receipt == opened.receipt


def two_receipts() -> tuple[Receipt, Receipt]:
    a, b = (opener().open(valid_envelope(), now=NOW).receipt for _ in range(2))
    return a, b


def test_receipts_and_proofs_ride_in_the_body():
    a, b = two_receipts()
    proof = EquivocationProof.of(a, b)
    data = valid_envelope(receipts=[a, b], proofs=[proof])
    opened = opener(CAROL).open(data, now=NOW)
    assert opened.update.receipts == [a, b]
    assert opened.update.proofs == [proof]
    assert opened.update.proofs[0].verify()


def test_bad_receipt_lists_reject_the_envelope():
    a, b = two_receipts()
    good, data = split_body(_encode_body(small_update(receipts=[a], proofs=[])))
    proof = EquivocationProof.of(a, b).encode()
    bodies = [
        join_body({**good, "receipts": "x"}, data),
        join_body({**good, "receipts": ["text"]}, data),
        join_body({**good, "receipts": [a.encode()[:-1]]}, data),
        join_body({**good, "receipts": [a.encode() + b"\x00"]}, data),
        join_body({**good, "proofs": [a.encode()]}, data),
        join_body({**good, "proofs": [a.encode() + a.encode()]}, data),  # no conflict
        join_body({**good, "proofs": [proof[len(proof) // 2 :] + proof[: len(proof) // 2]]}, data),
        join_body({**good, "proofs": {}}, data),
    ]
    for body in bodies:
        assert reason_of(envelope_with_body(body)) == RejectReason.BAD_RECEIPT, body[:60]
    assert HTTP_STATUS[RejectReason.BAD_RECEIPT] == 400
    too_many = join_body({**good, "receipts": [a.encode()] * 3}, data)
    assert reason_of(envelope_with_body(too_many), opener(max_receipts=2)) == RejectReason.TOO_LARGE
    with pytest.raises(ValueError, match="at most"):
        _encode_body(small_update(receipts=[a] * 65))


def test_malformed_bodies_from_an_admitted_sender():
    good, data = split_body(_encode_body(small_update()))
    bodies = [
        b"",
        b"\x00\x00",
        b"\x00\x00\xff\xff" + data,  # header length past the end
        (3).to_bytes(4, "big") + b"\xc1\xc1\xc1" + data,  # header is not msgpack
        join_body([1, 2, 3], data),
        join_body({**good, "extra": 1}, data),
        join_body({**good, "tensors": "x"}, data),
        join_body({**good, "num_samples": 12}, data),  # a version-2 field
        join_body({k: v for k, v in good.items() if k != "audit_head"}, data),
        join_body({**good, "audit_head": good["audit_head"][:-1]}, data),
        join_body({**good, "audit_head": b"\x80" + bytes(55)}, data),  # seq >= 2**63
        join_body({**good, "audit_head": bytes(48) + struct.pack(">d", float("nan"))}, data),
        join_body({**good, "audit_head": bytes(48) + struct.pack(">d", -1.0)}, data),
        join_body({**good, "audit_head": bytes(48) + struct.pack(">d", -0.0)}, data),
        join_body({**good, "audit_head": "0" * 56}, data),
        join_body({**good, "metrics": {"loss": "low"}}, data),
        join_body({**good, "metrics": [1.0]}, data),
        join_body({**good, "tensors": [t[:2] for t in good["tensors"]]}, data),
        join_body({**good, "tensors": [[t[0].encode(), *t[1:]] for t in good["tensors"]]}, data),
        join_body({**good, "tensors": [[*t[:2], [-1]] for t in good["tensors"]]}, data),
        join_body({**good, "tensors": good["tensors"] * 2}, data * 2),
        join_body(good, data[:-1]),
        join_body(good, data + b"\x00"),
    ]
    for body in bodies:
        assert reason_of(envelope_with_body(body)) == RejectReason.MALFORMED, body[:40]
    opener().open(envelope_with_body(join_body(good, data)), now=NOW)


@pytest.mark.parametrize("data", [None, "text", 42, b"", b"\x80", b"\xc1", memoryview(b"\x90")])
def test_non_envelopes_are_malformed(data):
    assert reason_of(data) == RejectReason.MALFORMED


def test_every_reason_has_an_http_status_and_errors_explain_themselves():
    assert set(HTTP_STATUS) == set(RejectReason)
    assert HTTP_STATUS[RejectReason.TOO_LARGE] == 413
    assert HTTP_STATUS[RejectReason.REPLAY] == 409
    error = WireError(RejectReason.REPLAY, "seen before")
    assert str(error) == "replay: seen before" and error.http_status == 409


def test_build_rejects_bad_arguments():
    keys = [BOB.public_key]
    with pytest.raises(ValueError, match="recipients"):
        build_envelope(small_update(), ALICE, [], 1)
    with pytest.raises(ValueError, match="distinct"):
        build_envelope(small_update(), ALICE, keys * 2, 1)
    with pytest.raises(ValueError, match="32-byte"):
        build_envelope(small_update(), ALICE, [b"short"], 1)
    with pytest.raises(ValueError, match="round"):
        build_envelope(small_update(), ALICE, keys, -1)
    with pytest.raises(TypeError, match="AuditHead"):
        build_envelope(small_update(), ALICE, keys, 1, head=(1, b"", 0, 0.0))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="numpy"):
        build_envelope(ModelUpdate({"x": [1.0]}), ALICE, keys, 1)


def test_opener_checks_its_model_spec():
    with pytest.raises(ValueError, match="allowed_dtypes"):
        EnvelopeOpener(BOB, ALLOWLIST, {"x": ((2,), "float64")})
    with pytest.raises(ValueError, match="cannot go on the wire"):
        EnvelopeOpener(BOB, ALLOWLIST, {"x": ((2,), "int32")})


def test_replay_state_rejects_garbage():
    with pytest.raises(ValueError, match="not a ReplayGuard state"):
        ReplayGuard.from_state({"version": 1, "senders": {}})
    with pytest.raises(ValueError, match="not a ReplayGuard state"):
        ReplayGuard.from_state({"version": 9})


def test_default_clock_is_used_when_now_is_omitted():
    data = build_envelope(small_update(), ALICE, [BOB.public_key], 1)
    opened = opener().open(data)
    assert abs(opened.timestamp - time.time()) < 60


MODEL_INPUTS = {
    "logreg": ((30,), {}),
    "mlp": ((13,), {"hidden": (64, 32)}),
    "cox": ((39,), {}),
    "cnn": ((1, 28, 28), {}),
    "cnn_gn": ((1, 28, 28), {}),
    "multimodal": ((1, 28, 28), {"clinical_features": 13}),
    "resnet18": ((1, 28, 28), {}),
    "resnet18_25m": ((1, 28, 28), {}),
}


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_round_trip_for_every_model_murmur_has(name: str) -> None:
    input_shape, params = MODEL_INPUTS[name]
    state = get_state(build_model(name, input_shape, seed=3, **params))
    envelope = build_envelope(ModelUpdate(state), ALICE, [BOB.public_key], 2, now=NOW)
    opened = EnvelopeOpener(BOB, ALLOWLIST, model_spec(state)).open(envelope, now=NOW)
    assert opened.sender.name == ALICE.name and opened.round == 2
    assert list(opened.update.tensors) == list(state)
    for key, array in state.items():
        np.testing.assert_array_equal(opened.update.tensors[key], array)
    assert state_sha256(opened.update.tensors) == state_sha256(state)


# ------------------------------------------------------------------ the study an update is for

STUDY_A = hashlib.sha256(b"study a").digest()
STUDY_B = hashlib.sha256(b"study b").digest()


def study_opener(study: bytes | None) -> EnvelopeOpener:
    return EnvelopeOpener(BOB, ALLOWLIST, SPEC, study=study)


def test_an_update_is_opened_only_by_a_node_of_its_study() -> None:
    keys = [BOB.public_key]
    for_a = build_envelope(small_update(), ALICE, keys, 7, now=NOW, study=STUDY_A)
    opened = study_opener(STUDY_A).open(for_a, now=NOW)
    assert opened.update.tensors.keys() == SPEC.keys()
    assert reason_of(for_a, study_opener(STUDY_B)) is RejectReason.UNKNOWN_STUDY
    assert reason_of(for_a, study_opener(None)) is RejectReason.UNKNOWN_STUDY
    without = build_envelope(small_update(), ALICE, keys, 7, now=NOW)
    assert reason_of(without, study_opener(STUDY_A)) is RejectReason.UNKNOWN_STUDY
    assert study_opener(None).open(without, now=NOW).round == 7  # no study on either side
    assert HTTP_STATUS[RejectReason.UNKNOWN_STUDY] == 409


def test_the_study_is_signed_it_cannot_be_swapped_into_another_envelope() -> None:
    """The study sits in the encrypted body, whose hash the sender signs: a body re-encoded
    with another study no longer matches the signature."""
    keys = [BOB.public_key]
    for_a = build_envelope(small_update(), ALICE, keys, 7, now=NOW, study=STUDY_A)
    for_b = build_envelope(small_update(), ALICE, keys, 7, now=NOW, study=STUDY_B)
    a, b = _parse_envelope(for_a, WireLimits(), 10**7), _parse_envelope(for_b, WireLimits(), 10**7)
    spliced = dataclasses.replace(a, body=b.body)
    data = _envelope_prefix(spliced) + spliced.body
    assert reason_of(data, study_opener(STUDY_A)) is RejectReason.BAD_SIGNATURE
    # The kind names study A, so study B's opener refuses it before hashing anything...
    assert reason_of(data, study_opener(STUDY_B)) is RejectReason.UNKNOWN_STUDY
    # ...and the kind rewritten to study B's no longer matches the signature.
    rekinded = dataclasses.replace(spliced, kind=b.kind)
    data = _envelope_prefix(rekinded) + rekinded.body
    assert reason_of(data, study_opener(STUDY_B)) is RejectReason.BAD_SIGNATURE
    with pytest.raises(ValueError, match="32-byte"):
        build_envelope(small_update(), ALICE, keys, 7, study=b"short")


def test_the_envelope_kind_names_the_study() -> None:
    """Protocol 5: one key's envelopes of two studies are two (kind, round) slots, so their
    receipts for one round are not an equivocation proof (docs/governance.md)."""
    keys = [BOB.public_key]
    assert study_kind(None) == "update"
    assert study_kind(STUDY_A) == "update@" + STUDY_A.hex()[:16] != study_kind(STUDY_B)
    for kind in (study_kind(STUDY_A), "update"):
        assert is_update_kind(kind)
    for kind in ("update@", "update@" + "A" * 16, "update@" + "0" * 15, "model", "update@x" * 3):
        assert not is_update_kind(kind)
    a = study_opener(STUDY_A).open(
        build_envelope(small_update(), ALICE, keys, 7, now=NOW, study=STUDY_A), now=NOW
    )
    b = study_opener(STUDY_B).open(
        build_envelope(small_update(1), ALICE, keys, 7, now=NOW, study=STUDY_B), now=NOW
    )
    assert a.kind == a.receipt.kind == study_kind(STUDY_A) and b.kind == study_kind(STUDY_B)
    assert a.receipt.slot != b.receipt.slot
    with pytest.raises(ReceiptError):
        EquivocationProof.of(a.receipt, b.receipt)
    book = ReceiptBook([ALICE.public_key])
    assert book.check(a.receipt, accepted=True) is None
    assert book.check(b.receipt, accepted=True) is None  # another study: no proof
    # A kind that is not one of the node's study, signed or not, is refused.
    garbage = build_envelope(small_update(), ALICE, keys, 7, now=NOW, kind="update@" + "0" * 16)
    assert reason_of(garbage, study_opener(STUDY_A)) is RejectReason.UNKNOWN_STUDY
