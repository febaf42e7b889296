"""Rollback evidence: a node's own signed audit heads, kept by its neighbours.

Every envelope carries the sender's :class:`~gossip.receipts.AuditHead` (audit log position,
DP steps, epsilon) inside what it signs, so each receipt is the sender's own signed claim of
how far its state had got. An honest node's heads never go backwards: its audit log only
grows and its privacy ledger only spends. Someone who can write a node's state directory but
does not hold its key can put back an older copy of that directory (the audit log cut back to
an earlier signed head, the earlier checkpoint and intent files); the node then restarts with
an earlier epsilon, and its own log verifies. What they cannot do is unsign what the node
already told its neighbours. So:

* neighbours keep the newest head they saw of each peer (:class:`HeadBook`, in their
  checkpoint, and each receipt in their audit log) and refuse an envelope whose head is behind
  one the same sender signed for an earlier round; two such receipts are a
  :class:`RollbackProof` that anyone holding the sender's public key can check (two different
  heads for one round are an equivocation, which gossip/receipts.py already proves);
* a node that starts asks its neighbours for the newest receipt they hold of it
  (:class:`ReceiptsRequest`, answered with :func:`seal_receipts_answer`) and refuses to start
  when its state is older than what it signed (node/rollback.py).

Pure: no I/O, no clock (``now`` is passed in). Signatures are libsodium's Ed25519 through
``crypto.identity``, encryption is ``crypto.sealing``; nothing here is hand-rolled
cryptography, only fixed byte layouts (docs/protocol.md, "Rollback detection").
"""

from __future__ import annotations

import dataclasses
import hashlib
import secrets
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import msgpack
from murmur.crypto.identity import Identity, verify_signature
from murmur.crypto.sealing import (
    SEALED_FIELDS,
    SealedFieldsError,
    SealingError,
    seal_to_fields,
    unseal_fields,
)
from murmur.gossip.receipts import (
    KEY_BYTES,
    MAX_RECEIPT_BYTES,
    SIGNATURE_BYTES,
    Receipt,
    ReceiptError,
)

REQUEST_VERSION = 5  # the protocol version this exchange belongs to
STUDY_BYTES = 32  # the study a request asks about (its manifest hash); all zero: no study
NO_STUDY = bytes(STUDY_BYTES)
REQUEST_DOMAIN = b"murmur-receipts-request\x00"
ANSWER_DOMAIN = b"murmur-receipts-answer\x00"
REQUEST_NONCE_BYTES = 16
# The answer may also carry one opaque, self-verifying record of the requester kept by the
# responder: the newest head of the requester's hospital's site budget log
# (node/studies/witness.py), which its checks read; this module only carries the bytes.
BUDGET_FIELD = "budget"
MAX_EXTRA_BYTES = 1024
_REQUEST = struct.Struct(f">H{KEY_BYTES}s{KEY_BYTES}sQ{REQUEST_NONCE_BYTES}s{STUDY_BYTES}s")
REQUEST_BYTES = _REQUEST.size + SIGNATURE_BYTES  # 186
MAX_ANSWER_RECEIPTS = 4
# msgpack overhead + the sealed plaintext (request nonce + receipts) + its Poly1305 tag
MAX_ANSWER_BYTES = 1024 + MAX_EXTRA_BYTES + MAX_ANSWER_RECEIPTS * (MAX_RECEIPT_BYTES + 8)
REQUEST_CONTENT_TYPE = "application/x-murmur-receipts-request"
ANSWER_CONTENT_TYPE = "application/x-murmur-receipts"


class HeadCheck(StrEnum):
    """What a verified receipt tells a :class:`HeadBook` about its sender."""

    FIRST = "first"  # the first head held of this sender
    ADVANCED = "advanced"  # a later round, not behind: it is now the newest held
    SAME = "same"  # the same round as the newest held (the same envelope, or an equivocation)
    OLDER = "older"  # an earlier round whose head is not ahead of the newest: nothing new
    ROLLBACK = "rollback"  # not in signing order with the newest held: a RollbackProof


# --------------------------------------------------------------------------- the proof


def _ordered(a: Receipt, b: Receipt) -> tuple[Receipt, Receipt] | None:
    """(earlier, later) if the later round's head is behind the earlier round's, else None.

    Signing order is the round: an honest node signs round r before round r + 1, and between
    them its log and ledger can only grow. Two heads for one round prove nothing about which
    came first (that pair is an equivocation proof instead), so they are never a rollback.
    """
    if a.round == b.round or a.kind != b.kind:
        return None  # another study's envelopes are another history (format.study_kind)
    if a.round > b.round:
        a, b = b, a
    return (a, b) if b.head.regressions(a.head) else None


@dataclass(frozen=True)
class RollbackProof:
    """Two receipts by one sender: ``later`` (of a later round) has a head behind
    ``earlier``'s. An honest node never signs such a pair, so it proves that the sender's
    state went back after it signed ``earlier``.
    """

    earlier: Receipt
    later: Receipt

    @classmethod
    def of(cls, a: Receipt, b: Receipt) -> RollbackProof:
        """The proof made of ``a`` and ``b`` in either order; ``ReceiptError`` if none."""
        if a.sender != b.sender or a.kind != b.kind:
            raise ReceiptError(
                "a rollback proof needs two receipts of the same sender and kind (study)"
            )
        pair = _ordered(a, b)
        if pair is None:
            raise ReceiptError(
                "no rollback: the later round's head is not behind the earlier round's"
            )
        return cls(*pair)

    @property
    def sender(self) -> bytes:
        return self.later.sender

    @property
    def regressions(self) -> list[str]:
        """Which head components went back (audit_seq, audit_hash, dp_steps, epsilon)."""
        return self.later.head.regressions(self.earlier.head)

    @property
    def id(self) -> str:
        return hashlib.sha256(self.encode()).hexdigest()

    def verify(self) -> bool:
        """True only for a real rollback: one sender, ``later`` of a later round than
        ``earlier`` and behind it, both signatures valid."""
        a, b = self.earlier, self.later
        return (
            a.sender == b.sender
            and a.kind == b.kind
            and a.round < b.round
            and bool(b.head.regressions(a.head))
            and a.verify()
            and b.verify()
        )

    def encode(self) -> bytes:
        return self.earlier.encode() + self.later.encode()

    @classmethod
    def decode(cls, data: bytes) -> RollbackProof:
        """Parse a proof (earlier receipt, then later); signatures are checked by verify."""
        earlier, at = Receipt._decode_from(data, 0)
        later, end = Receipt._decode_from(data, at)
        if end != len(data):
            raise ReceiptError(f"{len(data) - end} bytes after the rollback proof")
        proof = cls.of(earlier, later)
        if proof.earlier != earlier:
            raise ReceiptError("the rollback proof's receipts are not in signing order")
        return proof

    def evidence(self) -> dict[str, Any]:
        """Plain data for the audit log, /status and the error message: what each receipt
        claims, and both in hex (anyone can verify them with the sender's public key)."""
        return {
            "proof_id": self.id,
            "sender": self.sender.hex(),
            "regressions": self.regressions,
            "earlier": {"round": self.earlier.round, **self.earlier.head.to_json()},
            "later": {"round": self.later.round, **self.later.head.to_json()},
            "receipts": [self.earlier.to_hex(), self.later.to_hex()],
        }


# --------------------------------------------------------------------------- the book


HeadKey = tuple[bytes, str]  # (sender, envelope kind): one study's history of one key


@dataclass
class HeadBook:
    """The newest verified receipt (and so the newest signed head) of each known sender in
    each study (envelope kind), and the first rollback proof against each; memory is one
    receipt and one proof per (sender, kind). One key's studies keep separate audit logs, so
    their heads are never compared with each other.

    A rollback never replaces the held receipt: the newest head stays the high-water mark that
    the sender's later envelopes, and its own restart, are checked against (when the rollback
    is seen the other way round, an earlier round's envelope ahead of the held one, the
    furthest head is the proof's ``earlier`` receipt, which ``POST /receipts`` also returns).
    """

    known_senders: frozenset[bytes]
    _latest: dict[HeadKey, Receipt] = field(default_factory=dict)
    _proofs: dict[HeadKey, RollbackProof] = field(default_factory=dict)

    STATE_VERSION = 1

    @classmethod
    def for_senders(cls, senders: Iterable[bytes]) -> HeadBook:
        return cls(frozenset(senders))

    def latest(self, sender: bytes, kind: str | None = None) -> Receipt | None:
        """The newest receipt of ``sender`` in ``kind`` (None: in any kind, newest round)."""
        if kind is not None:
            return self._latest.get((sender, kind))
        held = [r for (key, _), r in self._latest.items() if key == sender]
        return max(held, key=lambda r: r.round, default=None)

    def proof(self, sender: bytes, kind: str | None = None) -> RollbackProof | None:
        """The first rollback proof against ``sender`` in ``kind`` (None: in any kind)."""
        if kind is not None:
            return self._proofs.get((sender, kind))
        return next((p for (key, _), p in self._proofs.items() if key == sender), None)

    def proofs(self) -> dict[bytes, RollbackProof]:
        """The first proof against each sender, whatever its kind."""
        found: dict[bytes, RollbackProof] = {}
        for (sender, _), proof in self._proofs.items():
            found.setdefault(sender, proof)
        return found

    def observe(self, receipt: Receipt) -> tuple[HeadCheck, RollbackProof | None]:
        """Compare a *verified* receipt with the newest one held of its sender.

        Returns the verdict and, for ``ROLLBACK``, the proof (kept if it is the first against
        this sender). ``ROLLBACK`` also covers an envelope of an *earlier* round whose head is
        ahead of the newest held: then the newest held one is the rolled-back envelope. Senders
        not on the list are not kept (they get ``OLDER``).
        """
        if receipt.sender not in self.known_senders:
            return HeadCheck.OLDER, None
        key = (receipt.sender, receipt.kind)
        held = self._latest.get(key)
        if held is None:
            self._latest[key] = receipt
            return HeadCheck.FIRST, None
        pair = _ordered(held, receipt)
        if pair is not None:
            proof = RollbackProof(*pair)
            self._proofs.setdefault(key, proof)
            return HeadCheck.ROLLBACK, proof
        if receipt.round > held.round:
            self._latest[key] = receipt
            return HeadCheck.ADVANCED, None
        if receipt.round == held.round:
            if held.head.regressions(receipt.head) and not receipt.head.regressions(held.head):
                self._latest[key] = receipt  # keep the furthest head signed for the round
            return HeadCheck.SAME, None
        return HeadCheck.OLDER, None

    def to_state(self) -> dict[str, Any]:
        """Plain data for the node's checkpoint."""
        return {
            "version": self.STATE_VERSION,
            "latest": [r.to_hex() for r in self._latest.values()],
            "proofs": [p.encode().hex() for p in self._proofs.values()],
        }

    @classmethod
    def from_state(cls, state: Mapping[str, Any], known_senders: Iterable[bytes]) -> HeadBook:
        """Rebuild from :meth:`to_state`, keeping only entries whose signatures verify (a
        state directory is writable by people without the peers' keys); ``ValueError`` if
        the state is not one."""
        book = cls.for_senders(known_senders)
        try:
            if state["version"] != cls.STATE_VERSION:
                raise ValueError(f"unknown head book version {state['version']!r}")
            for text in state["latest"]:
                receipt = Receipt.decode(bytes.fromhex(text))
                if receipt.sender in book.known_senders and receipt.verify():
                    book._latest[(receipt.sender, receipt.kind)] = receipt
            for text in state["proofs"]:
                proof = RollbackProof.decode(bytes.fromhex(text))
                if proof.sender in book.known_senders and proof.verify():
                    book._proofs.setdefault((proof.sender, proof.later.kind), proof)
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"not a HeadBook state: {exc!r}") from None
        return book


# --------------------------------------------------------------------------- POST /receipts


class RequestError(ValueError):
    """A receipts request or answer that must be refused; ``reason`` is a wire reason code."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class ReceiptsRequest:
    """ "Which receipts of mine do you hold in this study?", signed by the asking node.

    186 bytes, a fixed big-endian layout (docs/protocol.md): version (u16), requester key
    (32), responder key (32), timestamp_ms (u64), nonce (16), study (32: the manifest hash,
    all zero for a node without a study), then the Ed25519 signature of
    SHA-256(``REQUEST_DOMAIN`` ‖ those 122 bytes). Naming the responder stops a request meant
    for one neighbour from being replayed to another; the nonce and timestamp stop replays;
    the study is signed, so a request for one study's receipts cannot be turned into a
    request for another's (one key may run several studies, each its own history).
    """

    requester: bytes
    responder: bytes
    timestamp_ms: int
    nonce: bytes
    signature: bytes = b""
    study: bytes = NO_STUDY

    def _signed_part(self) -> bytes:
        return _REQUEST.pack(
            REQUEST_VERSION,
            self.requester,
            self.responder,
            self.timestamp_ms,
            self.nonce,
            self.study,
        )

    def digest(self) -> bytes:
        return hashlib.sha256(REQUEST_DOMAIN + self._signed_part()).digest()

    @classmethod
    def make(
        cls, identity: Identity, responder: bytes, now: float, study: bytes | None = None
    ) -> ReceiptsRequest:
        """A signed request for the receipts of ``study`` (None: a node without a study)."""
        study = NO_STUDY if study is None else study
        if type(study) is not bytes or len(study) != STUDY_BYTES:
            raise ValueError(f"a study id is {STUDY_BYTES} bytes")
        unsigned = cls(
            identity.public_key,
            responder,
            int(now * 1000),
            secrets.token_bytes(REQUEST_NONCE_BYTES),
            study=study,
        )
        return dataclasses.replace(unsigned, signature=identity.sign(unsigned.digest()))

    @property
    def study_id(self) -> bytes | None:
        """The study asked about, None for a node without one."""
        return None if self.study == NO_STUDY else self.study

    def encode(self) -> bytes:
        return self._signed_part() + self.signature

    @classmethod
    def decode(cls, data: bytes) -> ReceiptsRequest:
        """Structure only (``RequestError``); the caller checks keys, clock and signature."""
        if type(data) is not bytes:
            raise RequestError("malformed", "a receipts request is bytes")
        if len(data) != REQUEST_BYTES:
            reason = "too_large" if len(data) > REQUEST_BYTES else "malformed"
            raise RequestError(reason, f"a receipts request is {REQUEST_BYTES} bytes")
        version, requester, responder, timestamp_ms, nonce, study = _REQUEST.unpack_from(data)
        if version != REQUEST_VERSION:
            raise RequestError(
                "unsupported_version",
                f"receipts request version {version}, not {REQUEST_VERSION}",
            )
        if timestamp_ms >= 2**63:
            raise RequestError("malformed", "timestamp_ms must be below 2**63")
        return cls(requester, responder, timestamp_ms, nonce, data[_REQUEST.size :], study)

    def verify(self) -> bool:
        return verify_signature(self.requester, self.digest(), self.signature)


@dataclass
class RequestGuard:
    """Replay and rate limits for receipts requests: per requester, the nonces of the last
    ``window_s`` seconds, at most ``max_per_window`` of them. Memory: peers × max_per_window."""

    window_s: float = 300.0
    max_per_window: int = 16
    _seen: dict[bytes, dict[bytes, float]] = field(default_factory=dict)

    def admit(self, requester: bytes, nonce: bytes, now: float) -> None:
        """Record one authenticated request, or ``RequestError`` (replay, rate_limited)."""
        seen = self._seen.setdefault(requester, {})
        for old in [n for n, t in seen.items() if t < now - self.window_s]:
            del seen[old]
        if nonce in seen:
            raise RequestError("replay", "this receipts request was already answered")
        if len(seen) >= self.max_per_window:
            raise RequestError(
                "rate_limited",
                f"{len(seen)} receipts requests from this peer in {self.window_s:.0f} s",
            )
        seen[nonce] = now


def check_request(
    data: bytes,
    *,
    own_key: bytes,
    known_senders: Iterable[bytes],
    guard: RequestGuard,
    now: float,
    window_s: float,
    sender: bytes | None = None,
) -> ReceiptsRequest:
    """The authenticated request in ``data``, or ``RequestError`` with the wire reason code.

    Cheap checks first, as for envelopes: size and structure, allowlist, the HTTP request's
    signer (``sender``, when the transport authenticated one), addressee, clock, then the
    signature, then the replay guard (only authenticated requests are recorded).
    """
    request = ReceiptsRequest.decode(data)
    if request.requester not in frozenset(known_senders):
        raise RequestError("unknown_sender", "the requester is not on the allowlist")
    if sender is not None and sender != request.requester:
        raise RequestError("sender_mismatch", "the request was posted by another peer")
    if request.responder != own_key:
        raise RequestError("wrong_recipient", "the request is addressed to another node")
    skew = request.timestamp_ms / 1000 - now
    if abs(skew) > window_s:
        raise RequestError("stale", f"timestamp is {skew:+.0f} s from this node's clock")
    if not request.verify():
        raise RequestError("bad_signature", "the request is not signed by the requester")
    guard.admit(request.requester, request.nonce, now)
    return request


def _answer_associated_data(request: ReceiptsRequest) -> bytes:
    """What the sealed answer is bound to: the exchange, both keys and the request nonce."""
    return b"".join(
        [
            ANSWER_DOMAIN,
            struct.pack(">H", REQUEST_VERSION),
            request.responder,
            request.requester,
            request.nonce,
            request.study,
        ]
    )


def seal_receipts_answer(
    responder: Identity,
    request: ReceiptsRequest,
    receipts: list[Receipt],
    budget: bytes | None = None,
) -> bytes:
    """The answer to ``request``: its requester's receipts, encrypted to the requester.

    A msgpack map ``{version, nonce, ephemeral_key, key_commitment, wrapped_key,
    ciphertext}``; the ciphertext (crypto/sealing.py, one recipient, the key wrapped by the
    responder's static key, bound to the request) holds the msgpack map ``{request_nonce,
    receipts}``. Receipts say how far the requester's log and ledger had got, which an
    observer should not learn; they are self-verifying, so the answer needs no signature of
    its own (a forged answer could only withhold, which an absent neighbour does too), and the
    responder's wrap tells the requester that the answer comes from the neighbour it asked.
    ``budget``: the optional ``BUDGET_FIELD`` (at most ``MAX_EXTRA_BYTES``), self-verifying too.
    """
    own = [r for r in receipts if r.sender == request.requester][:MAX_ANSWER_RECEIPTS]
    inner: dict[str, Any] = {"request_nonce": request.nonce, "receipts": [r.encode() for r in own]}
    if budget is not None:
        if type(budget) is not bytes or len(budget) > MAX_EXTRA_BYTES:
            raise ValueError(f"the budget record is at most {MAX_EXTRA_BYTES} bytes")
        inner[BUDGET_FIELD] = budget
    plaintext = msgpack.packb(inner)
    sealed = seal_to_fields(
        plaintext, responder, request.requester, _answer_associated_data(request)
    )
    return msgpack.packb({"version": REQUEST_VERSION, **sealed})


_ANSWER_FIELDS = {"version", *SEALED_FIELDS}


def open_receipts_answer(
    identity: Identity, request: ReceiptsRequest, data: bytes
) -> tuple[list[Receipt], int]:
    """The receipts of this node in an answer to ``request``: (valid receipts, how many were
    ignored because they are not this node's or their signature does not verify)."""
    receipts, ignored, _ = open_receipts_answer_with_budget(identity, request, data)
    return receipts, ignored


def open_receipts_answer_with_budget(
    identity: Identity, request: ReceiptsRequest, data: bytes
) -> tuple[list[Receipt], int, bytes | None]:
    """:func:`open_receipts_answer`, and the answer's ``BUDGET_FIELD`` bytes (None: absent),
    not yet checked: the caller verifies them.

    ``RequestError("malformed" | "too_large" | "decrypt_failed", ...)`` for an answer that is
    not one (or not sealed by the neighbour asked); the caller treats that neighbour as not
    having answered.
    """
    if type(data) is not bytes or len(data) > MAX_ANSWER_BYTES:
        raise RequestError("too_large", f"a receipts answer is at most {MAX_ANSWER_BYTES} bytes")
    outer = _unpack(data)
    if type(outer) is not dict or set(outer) != _ANSWER_FIELDS:
        raise RequestError("malformed", f"a receipts answer is a map of {sorted(_ANSWER_FIELDS)}")
    if outer["version"] != REQUEST_VERSION:
        raise RequestError("unsupported_version", f"receipts answer version {outer['version']!r}")
    try:
        plaintext = unseal_fields(
            identity, request.responder, outer, _answer_associated_data(request)
        )
    except SealedFieldsError as exc:
        raise RequestError("malformed", str(exc)) from None
    except SealingError as exc:
        raise RequestError("decrypt_failed", str(exc)) from None
    inner = _unpack(plaintext)
    if type(inner) is not dict or set(inner) - {BUDGET_FIELD} != {"request_nonce", "receipts"}:
        raise RequestError(
            "malformed", "the sealed answer is a map {request_nonce, receipts[, budget]}"
        )
    budget = inner.get(BUDGET_FIELD)
    if budget is not None and (type(budget) is not bytes or len(budget) > MAX_EXTRA_BYTES):
        raise RequestError("malformed", f"'{BUDGET_FIELD}' is at most {MAX_EXTRA_BYTES} bytes")
    if inner["request_nonce"] != request.nonce:
        raise RequestError("malformed", "the answer is not for this request (nonce differs)")
    items = inner["receipts"]
    if type(items) is not list or len(items) > MAX_ANSWER_RECEIPTS:
        raise RequestError("malformed", f"'receipts' is a list of at most {MAX_ANSWER_RECEIPTS}")
    valid, ignored = [], 0
    for item in items:
        try:
            receipt = Receipt.decode(item)
        except ReceiptError:
            ignored += 1
            continue
        if receipt.sender == identity.public_key and receipt.verify():
            valid.append(receipt)
        else:
            ignored += 1
    return valid, ignored, budget


def _unpack(data: bytes) -> Any:
    try:
        return msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            max_str_len=64,
            max_bin_len=MAX_ANSWER_BYTES,
            max_array_len=MAX_ANSWER_RECEIPTS + 1,
            max_map_len=8,
            max_ext_len=0,
        )
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise RequestError("malformed", f"not valid msgpack: {exc}") from None
