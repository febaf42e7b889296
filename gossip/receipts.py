"""Receipts and equivocation proofs: what makes a two-faced peer provably two-faced.

An honest node signs one envelope per round and sends the same bytes to every neighbour. A
node that sends *different* signed envelopes for the same (kind, round) to different neighbours
(the dissensus and equivocation attacks) is equivocating, and its own signatures prove it.

The envelope signature (docs/protocol.md, "What the signature covers") is over
``SHA-256(DOMAIN, version, kind, sender, round, head_digest, rest_digest)``, where
``head_digest`` is the hash of the sender's :class:`AuditHead` (its audit log position and
privacy spend when it signed) and ``rest_digest`` condenses everything else (timestamp, nonce,
keys, recipients, body hash). So a **receipt**, the seven fields ``(version, kind, sender,
round, head, rest_digest, signature)``, is a standalone, ~200-byte object whose signature
anyone can check without the envelope. Honest nodes tell their neighbours which envelopes they
accepted by piggybacking receipts on their next envelope; two valid receipts by one sender for
one (kind, round) that differ in what was signed are an :class:`EquivocationProof` that any
node can verify and forward. Because the head is inside the receipt, a receipt is also the
sender's own signed claim of how far its audit log and privacy ledger had got, which is what
rollback detection (gossip/heads.py) rests on.

Pure: no I/O, no clock. Signatures are checked with ``crypto.identity.verify_signature``
(libsodium); nothing here is hand-rolled cryptography, only fixed byte layouts.
"""

from __future__ import annotations

import hashlib
import math
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from murmur.crypto.identity import verify_signature

SIGNATURE_DOMAIN = b"murmur-envelope\x00"
HEAD_DOMAIN = b"murmur-envelope-head\x00"
KEY_BYTES = 32
DIGEST_BYTES = 32
SIGNATURE_BYTES = 64
MAX_KIND_BYTES = 255
MAX_ROUND = 2**63 - 1
MAX_UINT63 = MAX_ROUND
# An honest node's epsilon never decreases; comparisons allow this relative slack so that a
# recomputation of the same spend (another dp-accounting build) can never look like a rollback.
EPSILON_TOLERANCE = 1e-6
_FIXED = struct.Struct(">HB")  # version, length of kind
_ROUND = struct.Struct(">Q")
_HEAD = struct.Struct(">Q32sQd")  # audit_seq, audit_hash, dp_steps, epsilon (IEEE 754 binary64)
AUDIT_HEAD_BYTES = _HEAD.size  # 56
# version + kind length + kind + sender + round + head + rest_digest + signature
MIN_RECEIPT_BYTES = (
    _FIXED.size + 1 + KEY_BYTES + _ROUND.size + AUDIT_HEAD_BYTES + DIGEST_BYTES + SIGNATURE_BYTES
)
MAX_RECEIPT_BYTES = MIN_RECEIPT_BYTES - 1 + MAX_KIND_BYTES
MAX_PROOF_BYTES = 2 * MAX_RECEIPT_BYTES


class ReceiptError(ValueError):
    """Bytes that are not a well-formed receipt or proof; the message says what is wrong."""


@dataclass(frozen=True)
class AuditHead:
    """Where the sender's audit log and privacy ledger stood when it signed an envelope.

    ``audit_seq`` and ``audit_hash`` are the sequence number and chain hash of the newest
    *signed head* of its audit log (node/audit/; seq 0 with the genesis hash before the
    first one); ``dp_steps`` and ``epsilon`` are its privacy ledger's steps taken and epsilon
    spent (0 without DP). All four only ever grow for an honest node, so a later envelope whose
    head is behind an earlier one proves the sender's state was rolled back. The head's bytes
    travel inside the encrypted body and only their digest in the clear envelope header: the
    spend reveals roughly the training-set size, which a network observer should not learn.
    """

    audit_seq: int
    audit_hash: bytes
    dp_steps: int
    epsilon: float

    def __post_init__(self) -> None:
        for name in ("audit_seq", "dp_steps"):
            value = getattr(self, name)
            if type(value) is not int or not 0 <= value <= MAX_UINT63:
                raise ReceiptError(f"audit head {name} must be an integer in [0, 2**63)")
        if type(self.audit_hash) is not bytes or len(self.audit_hash) != DIGEST_BYTES:
            raise ReceiptError(f"audit head audit_hash must be {DIGEST_BYTES} bytes")
        eps = self.epsilon
        if (
            type(eps) is not float
            or not math.isfinite(eps)
            or eps < 0
            or math.copysign(1.0, eps) < 0
        ):
            raise ReceiptError(f"audit head epsilon must be a finite float >= +0.0, got {eps!r}")

    def encode(self) -> bytes:
        """The 56 canonical bytes (docs/protocol.md, "The audit head")."""
        return _HEAD.pack(self.audit_seq, self.audit_hash, self.dp_steps, self.epsilon)

    @classmethod
    def decode(cls, data: bytes) -> AuditHead:
        """Parse exactly 56 bytes; ``ReceiptError`` otherwise."""
        if type(data) is not bytes or len(data) != AUDIT_HEAD_BYTES:
            raise ReceiptError(f"an audit head is exactly {AUDIT_HEAD_BYTES} bytes")
        return cls(*_HEAD.unpack(data))

    def digest(self) -> bytes:
        """``head_digest``: what the envelope header carries and the signature covers."""
        return hashlib.sha256(HEAD_DOMAIN + self.encode()).digest()

    def regressions(self, earlier: AuditHead) -> list[str]:
        """The components in which this head is behind ``earlier`` (empty: not behind).

        ``audit_hash`` is named when both heads claim the same sequence number with different
        hashes (two different logs at one position). Epsilon allows ``EPSILON_TOLERANCE``
        relative slack; sequence and steps are exact.
        """
        behind = []
        if self.audit_seq < earlier.audit_seq:
            behind.append("audit_seq")
        elif self.audit_seq == earlier.audit_seq and self.audit_hash != earlier.audit_hash:
            behind.append("audit_hash")
        if self.dp_steps < earlier.dp_steps:
            behind.append("dp_steps")
        if earlier.epsilon - self.epsilon > EPSILON_TOLERANCE * max(1.0, earlier.epsilon):
            behind.append("epsilon")
        return behind

    def to_json(self) -> dict[str, Any]:
        """Plain data for logs, audit records and /status."""
        return {
            "audit_seq": self.audit_seq,
            "audit_hash": self.audit_hash.hex(),
            "dp_steps": self.dp_steps,
            "epsilon": self.epsilon,
        }


def no_audit_head() -> AuditHead:
    """The head of a sender without an audit log or privacy ledger (tests, benchmarks)."""
    return AuditHead(0, bytes(DIGEST_BYTES), 0, 0.0)


def signed_digest(
    version: int, kind: str, sender: bytes, round_: int, head_digest: bytes, rest_digest: bytes
) -> bytes:
    """The 32 bytes an envelope's Ed25519 signature covers (docs/protocol.md).

    A fixed big-endian layout, not msgpack, so two implementations cannot disagree about it.
    Everything an equivocation proof compares (sender, kind, round) is in the clear here; the
    audit head enters through its own digest and the rest of the envelope through
    ``rest_digest``.
    """
    kind_bytes = kind.encode("utf-8")
    return hashlib.sha256(
        b"".join(
            (
                SIGNATURE_DOMAIN,
                _FIXED.pack(version, len(kind_bytes)),
                kind_bytes,
                sender,
                _ROUND.pack(round_),
                head_digest,
                rest_digest,
            )
        )
    ).digest()


@dataclass(frozen=True)
class Receipt:
    """Evidence that ``sender`` signed one envelope of ``kind`` for ``round``.

    Construct it from an opened envelope (``OpenedEnvelope.receipt``) or with :meth:`decode`;
    both check the structure, :meth:`verify` checks the signature.
    """

    version: int
    kind: str
    sender: bytes
    round: int
    head: AuditHead
    rest_digest: bytes
    signature: bytes

    def __post_init__(self) -> None:
        if not isinstance(self.head, AuditHead):
            raise ReceiptError("receipt head must be an AuditHead")
        kind = self.kind.encode("utf-8") if isinstance(self.kind, str) else b""
        if type(self.version) is not int or not 0 <= self.version < 2**16:
            raise ReceiptError(f"receipt version must be a uint16, got {self.version!r}")
        if not 1 <= len(kind) <= MAX_KIND_BYTES:
            raise ReceiptError(f"receipt kind must be 1..{MAX_KIND_BYTES} UTF-8 bytes")
        if type(self.round) is not int or not 0 <= self.round <= MAX_ROUND:
            raise ReceiptError(f"receipt round must be an integer in [0, 2**63), got {self.round}")
        for name, size in (
            ("sender", KEY_BYTES),
            ("rest_digest", DIGEST_BYTES),
            ("signature", SIGNATURE_BYTES),
        ):
            value = getattr(self, name)
            if type(value) is not bytes or len(value) != size:
                raise ReceiptError(f"receipt {name} must be {size} bytes")

    @property
    def slot(self) -> tuple[bytes, str, int]:
        """What an honest sender signs exactly once: (sender, kind, round)."""
        return (self.sender, self.kind, self.round)

    def signed_digest(self) -> bytes:
        return signed_digest(
            self.version, self.kind, self.sender, self.round, self.head.digest(), self.rest_digest
        )

    def same_envelope(self, other: Receipt) -> bool:
        """Whether both receipts are of one signed envelope (same slot, same signed content)."""
        return (
            self.slot == other.slot
            and self.version == other.version
            and self.head == other.head
            and self.rest_digest == other.rest_digest
        )

    def verify(self) -> bool:
        """True when ``signature`` is the sender's valid Ed25519 signature of this envelope."""
        return verify_signature(self.sender, self.signed_digest(), self.signature)

    def encode(self) -> bytes:
        """The canonical bytes (docs/protocol.md, "Receipts"): one fixed big-endian layout."""
        kind = self.kind.encode("utf-8")
        return b"".join(
            (
                _FIXED.pack(self.version, len(kind)),
                kind,
                self.sender,
                _ROUND.pack(self.round),
                self.head.encode(),
                self.rest_digest,
                self.signature,
            )
        )

    @classmethod
    def decode(cls, data: bytes) -> Receipt:
        """Parse exactly one receipt; ``ReceiptError`` if ``data`` is anything else."""
        receipt, end = cls._decode_from(data, 0)
        if end != len(data):
            raise ReceiptError(f"{len(data) - end} bytes after the receipt")
        return receipt

    @classmethod
    def _decode_from(cls, data: bytes, offset: int) -> tuple[Receipt, int]:
        if not isinstance(data, bytes):
            raise ReceiptError(f"a receipt is bytes, not {type(data).__name__}")
        if len(data) - offset < MIN_RECEIPT_BYTES:
            raise ReceiptError(
                f"a receipt is at least {MIN_RECEIPT_BYTES} bytes; {len(data) - offset} given"
            )
        version, kind_length = _FIXED.unpack_from(data, offset)
        at = offset + _FIXED.size
        end = (
            at
            + kind_length
            + KEY_BYTES
            + _ROUND.size
            + AUDIT_HEAD_BYTES
            + DIGEST_BYTES
            + SIGNATURE_BYTES
        )
        if kind_length == 0 or end > len(data):
            raise ReceiptError("the receipt's kind length does not match its size")
        try:
            kind = data[at : at + kind_length].decode("utf-8")
        except UnicodeDecodeError:
            raise ReceiptError("the receipt's kind is not UTF-8") from None
        at += kind_length
        sender = data[at : at + KEY_BYTES]
        at += KEY_BYTES
        (round_,) = _ROUND.unpack_from(data, at)
        at += _ROUND.size
        head = AuditHead.decode(data[at : at + AUDIT_HEAD_BYTES])
        at += AUDIT_HEAD_BYTES
        rest = data[at : at + DIGEST_BYTES]
        at += DIGEST_BYTES
        signature = data[at : at + SIGNATURE_BYTES]
        return cls(version, kind, sender, round_, head, rest, signature), end

    def to_hex(self) -> str:
        return self.encode().hex()


@dataclass(frozen=True)
class EquivocationProof:
    """Two receipts by one sender for one (kind, round) with different contents.

    Build it with :meth:`of`, which puts the receipts in canonical order (smaller signed
    digest first) so that one conflict has exactly one encoding and one :attr:`id`.
    """

    first: Receipt
    second: Receipt

    @classmethod
    def of(cls, a: Receipt, b: Receipt) -> EquivocationProof:
        """The proof made of ``a`` and ``b``; ``ReceiptError`` if they do not conflict."""
        if a.slot != b.slot or a.version != b.version:
            raise ReceiptError("a proof needs two receipts of the same sender, kind and round")
        if a.same_envelope(b):
            raise ReceiptError("the two receipts are of the same envelope: no conflict")
        first, second = sorted((a, b), key=lambda r: r.signed_digest())
        return cls(first, second)

    @property
    def sender(self) -> bytes:
        return self.first.sender

    @property
    def round(self) -> int:
        return self.first.round

    @property
    def kind(self) -> str:
        return self.first.kind

    @property
    def id(self) -> str:
        """Hex SHA-256 of the encoding: names one proof in logs and de-duplicates forwarding."""
        return hashlib.sha256(self.encode()).hexdigest()

    def verify(self) -> bool:
        """True only for a real conflict: same sender, kind, round and version, two different
        signed digests in canonical order, and both signatures valid."""
        a, b = self.first, self.second
        return (
            a.slot == b.slot
            and a.version == b.version
            and a.signed_digest() < b.signed_digest()
            and a.verify()
            and b.verify()
        )

    def encode(self) -> bytes:
        return self.first.encode() + self.second.encode()

    @classmethod
    def decode(cls, data: bytes) -> EquivocationProof:
        """Parse a proof; ``ReceiptError`` unless it is two conflicting receipts in canonical
        order (signatures are checked by :meth:`verify`, not here)."""
        first, at = Receipt._decode_from(data, 0)
        second, end = Receipt._decode_from(data, at)
        if end != len(data):
            raise ReceiptError(f"{len(data) - end} bytes after the proof")
        proof = cls.of(first, second)
        if proof.first != first:
            raise ReceiptError("the proof's receipts are not in canonical order")
        return proof

    def evidence(self) -> dict[str, Any]:
        """Plain data for the audit log: both receipts in hex, and what they claim."""
        return {
            "proof_id": self.id,
            "sender": self.sender.hex(),
            "envelope_kind": self.kind,
            "equivocation_round": self.round,
            "receipts": [self.first.to_hex(), self.second.to_hex()],
        }


@dataclass
class _Held:
    receipt: Receipt
    accepted: bool  # this node accepted the envelope itself (not only heard of it)


class ReceiptBook:
    """The receipts a node holds for recent rounds, one per (sender, kind, round).

    It remembers the receipt of every envelope the node accepted and, for the same senders,
    receipts its neighbours reported; a second receipt for a held slot with a different digest
    is an equivocation proof. Memory is bounded: only ``known_senders`` (the allowlist) are
    tracked, and only rounds within ``rounds_kept`` behind and ``rounds_ahead`` ahead of the
    current round. Receipts given to :meth:`check` must already be verified.
    """

    STATE_VERSION = 1

    def __init__(
        self, known_senders: Iterable[bytes], rounds_kept: int = 4, rounds_ahead: int = 3
    ) -> None:
        if rounds_kept < 1 or rounds_ahead < 0:
            raise ValueError("ReceiptBook needs rounds_kept >= 1 and rounds_ahead >= 0")
        self.known_senders = frozenset(known_senders)
        self.rounds_kept = rounds_kept
        self.rounds_ahead = rounds_ahead
        self.current_round = 0
        self._rounds: dict[int, dict[tuple[bytes, str], _Held]] = {}

    def advance(self, round_: int) -> None:
        """Move the window to ``round_`` and forget rounds that fell out of it."""
        self.current_round = max(self.current_round, round_)
        oldest = self.current_round - self.rounds_kept
        for old in [r for r in self._rounds if r < oldest]:
            del self._rounds[old]

    def tracks(self, receipt: Receipt) -> bool:
        """Whether this receipt is about a sender and round the book keeps."""
        return (
            receipt.sender in self.known_senders
            and self.current_round - self.rounds_kept
            <= receipt.round
            <= self.current_round + self.rounds_ahead
        )

    def holds(self, receipt: Receipt) -> bool:
        """True if exactly this receipt is already held (no need to verify it again)."""
        held = self._rounds.get(receipt.round, {}).get((receipt.sender, receipt.kind))
        return held is not None and held.receipt == receipt

    def check(self, receipt: Receipt, *, accepted: bool = False) -> EquivocationProof | None:
        """Remember a verified receipt; return a proof if it conflicts with the held one.

        ``accepted`` marks an envelope this node accepted itself (its receipt is passed on in
        the next round). A conflicting receipt does not replace the held one.
        """
        if not self.tracks(receipt):
            return None
        slots = self._rounds.setdefault(receipt.round, {})
        held = slots.get((receipt.sender, receipt.kind))
        if held is None:
            slots[(receipt.sender, receipt.kind)] = _Held(receipt, accepted)
            return None
        if held.receipt.same_envelope(receipt):
            held.accepted = held.accepted or accepted
            return None
        return EquivocationProof.of(held.receipt, receipt)

    def accepted(self, round_: int) -> list[Receipt]:
        """Receipts of the envelopes this node itself accepted for ``round_``, by sender."""
        held = self._rounds.get(round_, {})
        return [held[k].receipt for k in sorted(held) if held[k].accepted]

    def to_state(self) -> dict[str, Any]:
        """Plain data for the node's checkpoint."""
        return {
            "version": self.STATE_VERSION,
            "current_round": self.current_round,
            "receipts": [
                [held.receipt.to_hex(), held.accepted]
                for slots in self._rounds.values()
                for held in slots.values()
            ],
        }

    @classmethod
    def from_state(
        cls,
        state: Mapping[str, Any],
        known_senders: Iterable[bytes],
        rounds_kept: int = 4,
        rounds_ahead: int = 3,
    ) -> ReceiptBook:
        """Rebuild from :meth:`to_state`; ``ValueError`` if the state is not one."""
        book = cls(known_senders, rounds_kept, rounds_ahead)
        try:
            if state["version"] != cls.STATE_VERSION:
                raise ValueError(f"unknown receipt book version {state['version']!r}")
            book.current_round = int(state["current_round"])
            for receipt_hex, accepted in state["receipts"]:
                book.check(Receipt.decode(bytes.fromhex(receipt_hex)), accepted=bool(accepted))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"not a ReceiptBook state: {exc!r}") from None
        return book
