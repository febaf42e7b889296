"""Receipts and equivocation proofs (gossip/receipts.py): made from really signed envelopes,
they verify exactly when the sender signed two different envelopes for one (kind, round)."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from murmur.crypto.identity import generate_identity
from murmur.gossip.receipts import (
    MAX_PROOF_BYTES,
    MAX_RECEIPT_BYTES,
    EquivocationProof,
    Receipt,
    ReceiptBook,
    ReceiptError,
)

from tests.test_wire import ALICE, BOB, CAROL, NOW, opener, valid_envelope


def receipt_of(data: bytes, receiver=BOB) -> Receipt:
    return opener(receiver).open(data, now=NOW).receipt


def conflicting(round_: int = 7, sender=ALICE) -> tuple[Receipt, Receipt]:
    """Two different envelopes, both really signed by ``sender`` for one round."""
    first = receipt_of(valid_envelope(sender=sender, round=round_, seed=1))
    second = receipt_of(valid_envelope(sender=sender, round=round_, seed=2), receiver=CAROL)
    return first, second


def test_a_proof_from_two_really_signed_envelopes_verifies():
    a, b = conflicting()
    proof = EquivocationProof.of(a, b)
    assert proof.verify()
    assert proof.sender == ALICE.public_key and proof.round == 7 and proof.kind == "update"
    assert EquivocationProof.of(b, a) == proof  # one conflict, one canonical proof
    assert proof.first.signed_digest() < proof.second.signed_digest()


def test_the_same_envelope_to_two_recipients_is_no_conflict():
    data = valid_envelope()
    a, b = receipt_of(data, BOB), receipt_of(data, CAROL)
    assert a == b and a.verify()
    with pytest.raises(ReceiptError, match="same envelope"):
        EquivocationProof.of(a, b)


def test_tampered_receipts_do_not_verify():
    a, b = conflicting()
    tampered = [
        dataclasses.replace(a, round=8),
        dataclasses.replace(a, rest_digest=bytes(32)),
        dataclasses.replace(a, signature=bytes(a.signature[:-1]) + bytes([a.signature[-1] ^ 1])),
        dataclasses.replace(a, kind="other"),
        dataclasses.replace(a, version=1),
        dataclasses.replace(a, sender=BOB.public_key),
        dataclasses.replace(a, head=dataclasses.replace(a.head, audit_seq=1)),
        dataclasses.replace(a, head=dataclasses.replace(a.head, dp_steps=1)),
        dataclasses.replace(a, head=dataclasses.replace(a.head, epsilon=0.5)),
        dataclasses.replace(a, head=dataclasses.replace(a.head, audit_hash=b"\x01" * 32)),
    ]
    for bad in tampered:
        assert not bad.verify()
        # Forced into a proof (bypassing `of`), a tampered receipt makes the proof invalid.
        first, second = sorted((bad, b), key=lambda r: r.signed_digest())
        assert not EquivocationProof(first, second).verify()


def test_proofs_that_are_not_conflicts_are_refused_or_do_not_verify():
    a, b = conflicting()
    other_round = conflicting(round_=8)[0]
    carol = conflicting(sender=CAROL)[0]
    for x, y in ((a, other_round), (a, carol), (a, dataclasses.replace(b, kind="other"))):
        with pytest.raises(ReceiptError, match="same sender, kind and round"):
            EquivocationProof.of(x, y)
        first, second = sorted((x, y), key=lambda r: r.signed_digest())
        assert not EquivocationProof(first, second).verify()
    # Same slot, one receipt signed by another key: the claimed sender never signed it.
    mallory = generate_identity("mallory")
    forged = dataclasses.replace(b, signature=mallory.sign(b.signed_digest()))
    assert not EquivocationProof.of(a, forged).verify()
    # Same digest twice: not a conflict, even when forced.
    assert not EquivocationProof(a, a).verify()
    # Wrong order (not canonical) does not verify either.
    proof = EquivocationProof.of(a, b)
    assert not EquivocationProof(proof.second, proof.first).verify()


def test_encode_decode_round_trip():
    a, b = conflicting()
    assert Receipt.decode(a.encode()) == a
    assert len(a.encode()) == 2 + 1 + len("update") + 32 + 8 + 56 + 32 + 64
    proof = EquivocationProof.of(a, b)
    assert EquivocationProof.decode(proof.encode()) == proof
    assert EquivocationProof.decode(proof.encode()).verify()
    assert proof.evidence()["receipts"] == [proof.first.to_hex(), proof.second.to_hex()]
    assert MAX_PROOF_BYTES == 2 * MAX_RECEIPT_BYTES


def test_malformed_bytes_give_a_clear_error():
    a, b = conflicting()
    proof = EquivocationProof.of(a, b).encode()
    zero_kind = b"\x00\x02\x00" + a.encode()[3 + 6 :] + b"\x00" * 6
    bad_receipts = {
        b"": "at least",
        a.encode()[:-1]: "kind length",
        a.encode() + b"\x00": "after the receipt",
        zero_kind: "kind length",
        a.encode()[:3] + b"\xff" * 6 + a.encode()[9:]: "UTF-8",
    }
    for data, message in bad_receipts.items():
        with pytest.raises(ReceiptError, match=message):
            Receipt.decode(data)
    with pytest.raises(ReceiptError, match="bytes, not str"):
        Receipt.decode("text")  # type: ignore[arg-type]
    bad_proofs = {
        a.encode(): "at least",
        a.encode() + a.encode(): "same envelope",
        proof + b"\x00": "after the proof",
        b.encode() + a.encode()
        if b.signed_digest() > a.signed_digest()
        else a.encode() + b.encode(): ("canonical order"),
    }
    for data, message in bad_proofs.items():
        with pytest.raises(ReceiptError, match=message):
            EquivocationProof.decode(data)


@settings(derandomize=True, database=None, deadline=None, max_examples=300)
@given(st.binary(max_size=2 * MAX_PROOF_BYTES))
def test_random_bytes_never_crash_the_decoders(data: bytes):
    for decode in (Receipt.decode, EquivocationProof.decode):
        try:
            decode(data)
        except ReceiptError as exc:
            assert str(exc)


def test_receipt_fields_are_validated():
    a, _ = conflicting()
    for changes in (
        {"sender": b"short"},
        {"rest_digest": b""},
        {"signature": bytes(63)},
        {"kind": ""},
        {"kind": "x" * 256},
        {"round": -1},
        {"version": 2**16},
    ):
        with pytest.raises(ReceiptError):
            dataclasses.replace(a, **changes)


def test_book_finds_a_conflict_and_remembers_what_this_node_accepted():
    a, b = conflicting()
    book = ReceiptBook([ALICE.public_key])
    book.advance(7)
    assert book.check(a, accepted=True) is None
    assert book.holds(a) and not book.holds(b)
    assert book.check(a) is None  # the same envelope again: no conflict
    proof = book.check(b)
    assert proof is not None and proof.verify() and proof == EquivocationProof.of(a, b)
    assert book.accepted(7) == [a]  # the conflicting receipt does not replace the held one
    assert book.accepted(6) == []


def test_book_keeps_only_known_senders_and_recent_rounds():
    a, b = conflicting(round_=3)
    carol_a, carol_b = conflicting(round_=3, sender=CAROL)
    book = ReceiptBook([ALICE.public_key], rounds_kept=2, rounds_ahead=1)
    book.advance(3)
    book.check(carol_a)
    assert book.check(carol_b) is None and not book.holds(carol_a)  # not on its list
    book.check(a, accepted=True)
    book.advance(5)  # round 3 still within 2 behind
    assert book.check(b) is not None
    book.advance(6)  # round 3 forgotten
    assert not book.holds(a) and book.check(b) is None and book.accepted(3) == []
    far = conflicting(round_=8)[0]
    assert not book.tracks(far)  # more than rounds_ahead ahead


def test_book_memory_is_bounded_by_senders_and_window():
    senders = [generate_identity(f"n{i}") for i in range(3)]
    book = ReceiptBook([s.public_key for s in senders], rounds_kept=2, rounds_ahead=0)
    template, _ = conflicting()
    for round_ in range(1, 30):
        book.advance(round_)
        for sender in senders:
            for digest in (b"\x01" * 32, b"\x02" * 32):
                book.check(
                    dataclasses.replace(
                        template, sender=sender.public_key, round=round_, rest_digest=digest
                    )
                )
    held = book.to_state()["receipts"]
    assert len(held) <= 3 * (2 + 1)


def test_book_state_round_trip():
    a, b = conflicting()
    book = ReceiptBook([ALICE.public_key])
    book.advance(7)
    book.check(a, accepted=True)
    restored = ReceiptBook.from_state(book.to_state(), [ALICE.public_key])
    assert restored.accepted(7) == [a]
    assert restored.check(b) == EquivocationProof.of(a, b)
    with pytest.raises(ValueError, match="not a ReceiptBook state"):
        ReceiptBook.from_state({"version": 1, "current_round": 0, "receipts": [["zz", True]]}, [])
    with pytest.raises(ValueError, match="not a ReceiptBook state"):
        ReceiptBook.from_state({"version": 9}, [])
