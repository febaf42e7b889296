"""Consortium membership: the founding manifest, signed change proposals and votes, and the
deterministic state machine that turns them into who is a member now.

Why a state machine of its own: every node must reach the same membership from the same
records, whichever order gossip delivers them in, and must be able to re-check a peer's
claim from nothing but signed bytes. So this module is pure: no I/O, no clock (expiry is
checked by the caller's intake, node/consortium.py, with the time it is given), and
``replay(manifest, changes)`` recomputes the membership from the founding manifest and the
applied changes alone.

Records (docs/governance.md, "Membership"):

* ``Manifest``: consortium name, founders (name, Ed25519 key, address, relays), quorum k
  ("k of the current members"), signed by every founder. Its hash is the consortium id that
  every later record names, so a record for another consortium (or another manifest) is
  refused.
* ``Proposal``: one change (admit, revoke, rotate, quorum, leave) against membership epoch
  ``epoch`` (the number of changes applied so far), signed by its proposer, with an expiry.
  The proposer's signature counts as its vote. Binding the epoch makes every applied
  proposal single-use: once the epoch moved on, the same bytes are a replay.
* ``Vote``: a member's signed approval of one proposal id, with an expiry.

A change is applied when distinct, current, unrevoked members' valid approvals (proposer
included) reach the quorum. ``leave`` is the member's own notice and needs no votes; a
``rotate`` must be proposed by the old key and carry the new key's signature over both keys
(proof of possession), and the old key is kept in ``rotations`` so the hospital's earlier
signatures (audit log, receipts) stay attributable to it.

Encoding: canonical msgpack (maps with sorted string keys, bin for bytes), signatures are
Ed25519 over a domain-separated SHA-256 of that encoding (crypto/identity.py, libsodium).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any

import msgpack
from murmur.crypto.identity import (
    Identity,
    IdentityError,
    check_name,
    check_public_key,
    verify_signature,
)

MANIFEST_DOMAIN = b"murmur-consortium-manifest\x00"
PROPOSAL_DOMAIN = b"murmur-consortium-proposal\x00"
VOTE_DOMAIN = b"murmur-consortium-vote\x00"
ROTATION_DOMAIN = b"murmur-consortium-rotation\x00"
CHANGE_DOMAIN = b"murmur-consortium-change\x00"
FORMAT_VERSION = 1
MAX_RECORD_BYTES = 16 * 1024
MAX_MEMBERS = 256
ACTIONS = ("admit", "revoke", "rotate", "quorum", "leave")


class Reason(StrEnum):
    """Why a governance record was refused: the reason codes counted in /status and
    /metrics (as ``governance_<code>``) and written to the audit log."""

    MALFORMED = "malformed"
    MANIFEST_MISMATCH = "manifest_mismatch"
    WRONG_CONSORTIUM = "wrong_consortium"
    FORGED = "forged_signature"
    NOT_MEMBER = "not_member"
    REVOKED_KEY = "revoked_key"
    REPLAYED = "replayed"
    STALE_EPOCH = "stale_epoch"
    EXPIRED = "expired"
    UNDER_QUORUM = "under_quorum"
    INVALID_CHANGE = "invalid_change"
    INFEASIBLE = "infeasible"
    UNKNOWN_PROPOSAL = "unknown_proposal"


class MembershipError(ValueError):
    """A record or change that cannot be accepted; ``reason`` is its code."""

    def __init__(self, reason: Reason, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = Reason(reason)
        self.detail = detail


def _pack(obj: Any) -> bytes:
    """Canonical msgpack: msgpack-python writes dict items in insertion order, so maps are
    rebuilt with sorted keys (recursively) before packing."""
    return msgpack.packb(_sorted(obj), use_bin_type=True)


def _sorted(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {k: _sorted(obj[k]) for k in sorted(obj)}
    if isinstance(obj, list | tuple):
        return [_sorted(v) for v in obj]
    return obj


def _unpack(data: bytes) -> dict[str, Any]:
    if not isinstance(data, bytes) or len(data) > MAX_RECORD_BYTES:
        raise MembershipError(Reason.MALFORMED, f"a record is bytes of at most {MAX_RECORD_BYTES}")
    try:
        obj = msgpack.unpackb(data, raw=False, strict_map_key=True, max_bin_len=MAX_RECORD_BYTES)
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as exc:
        raise MembershipError(Reason.MALFORMED, f"not msgpack: {type(exc).__name__}") from None
    if not isinstance(obj, dict) or obj.get("v") != FORMAT_VERSION:
        raise MembershipError(Reason.MALFORMED, f"not a version-{FORMAT_VERSION} record")
    return obj


def _digest(domain: bytes, body: bytes) -> bytes:
    return hashlib.sha256(domain + body).digest()


def _field(obj: Mapping[str, Any], name: str, kind: type | tuple[type, ...]) -> Any:
    value = obj.get(name)
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise MembershipError(Reason.MALFORMED, f"field {name!r} is missing or of the wrong type")
    return value


@dataclass(frozen=True)
class Member:
    """One hospital in the consortium: what a peer needs to admit it and reach it."""

    name: str
    public_key: bytes
    address: str = ""
    relays: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        try:
            check_name(self.name)
            check_public_key(self.public_key)
        except IdentityError as exc:
            raise MembershipError(Reason.MALFORMED, f"member {self.name!r}: {exc}") from None
        if not isinstance(self.address, str) or not all(isinstance(r, str) for r in self.relays):
            raise MembershipError(Reason.MALFORMED, f"member {self.name!r}: bad address/relays")
        if not self.address and not self.relays:
            raise MembershipError(
                Reason.MALFORMED, f"member {self.name!r} needs an address or a relay"
            )

    def to_obj(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "key": self.public_key,
            "address": self.address,
            "relays": list(self.relays),
        }

    @classmethod
    def from_obj(cls, obj: Any) -> Member:
        if not isinstance(obj, dict):
            raise MembershipError(Reason.MALFORMED, "a member is a map")
        relays = _field(obj, "relays", list)
        return cls(
            _field(obj, "name", str),
            _field(obj, "key", bytes),
            _field(obj, "address", str),
            tuple(relays),
        )


# ------------------------------------------------------------------------------ manifest


@dataclass(frozen=True)
class Manifest:
    """The founding record; ``signatures`` maps founder key -> its signature of ``body``."""

    consortium: str
    founders: tuple[Member, ...]
    quorum: int
    created_at: float
    signatures: Mapping[bytes, bytes] = field(default_factory=dict)

    def body(self) -> bytes:
        return _pack(
            {
                "v": FORMAT_VERSION,
                "consortium": self.consortium,
                "founders": [m.to_obj() for m in self.founders],
                "quorum": self.quorum,
                "created_at": float(self.created_at),
            }
        )

    @property
    def consortium_id(self) -> bytes:
        """The consortium's id: the hash of the founding body (signatures excluded, so adding
        a founder's signature does not change it)."""
        return _digest(MANIFEST_DOMAIN, self.body())

    def signed_by(self, identity: Identity) -> Manifest:
        if identity.public_key not in {m.public_key for m in self.founders}:
            raise MembershipError(Reason.NOT_MEMBER, f"{identity.name} is not a founder")
        sig = identity.sign(MANIFEST_DOMAIN + self.body())
        return replace(self, signatures={**self.signatures, identity.public_key: sig})

    def unsigned_founders(self) -> list[str]:
        return [m.name for m in self.founders if m.public_key not in self.signatures]

    def verify(self) -> Membership:
        """The epoch-0 membership, or ``MembershipError`` when the manifest is not sound or
        not signed by every founder."""
        check_member_set(self.founders)
        if type(self.quorum) is not int or not 1 <= self.quorum <= len(self.founders):
            raise MembershipError(
                Reason.MALFORMED, f"quorum {self.quorum} is not between 1 and the founders"
            )
        message = MANIFEST_DOMAIN + self.body()
        for member in self.founders:
            sig = self.signatures.get(member.public_key)
            if sig is None:
                raise MembershipError(Reason.FORGED, f"founder {member.name} has not signed")
            if not verify_signature(member.public_key, message, sig):
                raise MembershipError(Reason.FORGED, f"founder {member.name}'s signature is bad")
        extra = set(self.signatures) - {m.public_key for m in self.founders}
        if extra:
            raise MembershipError(Reason.FORGED, "signatures by keys that are not founders")
        return Membership(
            consortium_id=self.consortium_id,
            consortium=self.consortium,
            epoch=0,
            quorum=self.quorum,
            members=tuple(sorted(self.founders, key=lambda m: m.name)),
            head=self.consortium_id,
        )

    def encode(self) -> bytes:
        obj = _unpack(self.body())
        obj["signatures"] = [[k, s] for k, s in sorted(self.signatures.items())]
        return _pack(obj)

    @classmethod
    def decode(cls, data: bytes) -> Manifest:
        obj = _unpack(data)
        pairs = _field(obj, "signatures", list)
        sigs: dict[bytes, bytes] = {}
        for pair in pairs:
            if not (
                isinstance(pair, list)
                and len(pair) == 2
                and all(isinstance(x, bytes) for x in pair)
            ):
                raise MembershipError(Reason.MALFORMED, "signatures are [key, signature] pairs")
            sigs[pair[0]] = pair[1]
        return cls(
            consortium=_field(obj, "consortium", str),
            founders=tuple(Member.from_obj(m) for m in _field(obj, "founders", list)),
            quorum=_field(obj, "quorum", int),
            created_at=float(_field(obj, "created_at", (int, float))),
            signatures=sigs,
        )


def check_member_set(members: Sequence[Member]) -> None:
    if not 1 <= len(members) <= MAX_MEMBERS:
        raise MembershipError(Reason.MALFORMED, f"1 to {MAX_MEMBERS} members")
    names = [m.name for m in members]
    keys = [m.public_key for m in members]
    if len(set(names)) != len(names) or len(set(keys)) != len(keys):
        raise MembershipError(Reason.MALFORMED, "member names and keys must be unique")


# ------------------------------------------------------------------------------ proposals


@dataclass(frozen=True)
class Proposal:
    """One signed membership change against ``epoch``. ``args`` by action:
    admit {member}; revoke {key}; rotate {old, new, proof}; quorum {k}; leave {key}."""

    consortium_id: bytes
    epoch: int
    action: str
    args: Mapping[str, Any]
    proposer: bytes
    expires_at: float
    signature: bytes = b""

    def body(self) -> bytes:
        return _pack(
            {
                "v": FORMAT_VERSION,
                "type": "proposal",
                "consortium": self.consortium_id,
                "epoch": self.epoch,
                "action": self.action,
                "args": dict(self.args),
                "proposer": self.proposer,
                "expires_at": float(self.expires_at),
            }
        )

    @property
    def proposal_id(self) -> bytes:
        return _digest(PROPOSAL_DOMAIN, self.body())

    def verify_signature(self) -> bool:
        return verify_signature(self.proposer, PROPOSAL_DOMAIN + self.body(), self.signature)

    def encode(self) -> bytes:
        obj = _unpack(self.body())
        obj["signature"] = self.signature
        return _pack(obj)

    @classmethod
    def from_obj(cls, obj: dict[str, Any]) -> Proposal:
        return cls(
            consortium_id=_field(obj, "consortium", bytes),
            epoch=_field(obj, "epoch", int),
            action=_field(obj, "action", str),
            args=_field(obj, "args", dict),
            proposer=_field(obj, "proposer", bytes),
            expires_at=float(_field(obj, "expires_at", (int, float))),
            signature=_field(obj, "signature", bytes),
        )

    def describe(self) -> str:
        args = self.args
        match self.action:
            case "admit":
                m = args.get("member", {})
                return f"admit {m.get('name')} ({m.get('address') or 'relays'})"
            case "revoke" | "leave":
                return f"{self.action} {_short(args.get('key'))}"
            case "rotate":
                return f"rotate {_short(args.get('old'))} -> {_short(args.get('new'))}"
            case "quorum":
                return f"quorum -> {args.get('k')}"
        return self.action


def _short(key: Any) -> str:
    return key.hex()[:16] if isinstance(key, bytes) else "?"


@dataclass(frozen=True)
class Vote:
    """A member's signed approval of ``proposal_id``."""

    consortium_id: bytes
    proposal_id: bytes
    voter: bytes
    expires_at: float
    signature: bytes = b""

    def body(self) -> bytes:
        return _pack(
            {
                "v": FORMAT_VERSION,
                "type": "vote",
                "consortium": self.consortium_id,
                "proposal": self.proposal_id,
                "voter": self.voter,
                "expires_at": float(self.expires_at),
            }
        )

    def verify_signature(self) -> bool:
        return verify_signature(self.voter, VOTE_DOMAIN + self.body(), self.signature)

    def encode(self) -> bytes:
        obj = _unpack(self.body())
        obj["signature"] = self.signature
        return _pack(obj)

    @classmethod
    def from_obj(cls, obj: dict[str, Any]) -> Vote:
        return cls(
            consortium_id=_field(obj, "consortium", bytes),
            proposal_id=_field(obj, "proposal", bytes),
            voter=_field(obj, "voter", bytes),
            expires_at=float(_field(obj, "expires_at", (int, float))),
            signature=_field(obj, "signature", bytes),
        )


def decode_record(data: bytes) -> Proposal | Vote:
    """A proposal or a vote from its encoding; ``MembershipError(MALFORMED)`` otherwise."""
    obj = _unpack(data)
    kind = obj.get("type")
    try:
        if kind == "proposal":
            return Proposal.from_obj(obj)
        if kind == "vote":
            return Vote.from_obj(obj)
    except MembershipError:
        raise
    except (TypeError, ValueError) as exc:
        raise MembershipError(Reason.MALFORMED, str(exc)) from None
    raise MembershipError(Reason.MALFORMED, f"unknown record type {kind!r}")


def make_proposal(
    identity: Identity,
    membership: Membership,
    action: str,
    args: Mapping[str, Any],
    expires_at: float,
) -> Proposal:
    unsigned = Proposal(
        membership.consortium_id,
        membership.epoch,
        action,
        dict(args),
        identity.public_key,
        expires_at,
    )
    return replace(unsigned, signature=identity.sign(PROPOSAL_DOMAIN + unsigned.body()))


def make_vote(identity: Identity, proposal: Proposal, expires_at: float) -> Vote:
    unsigned = Vote(proposal.consortium_id, proposal.proposal_id, identity.public_key, expires_at)
    return replace(unsigned, signature=identity.sign(VOTE_DOMAIN + unsigned.body()))


def rotation_proof(new: Identity, consortium_id: bytes, old_key: bytes) -> bytes:
    """The new key's signature over (consortium, old key, new key): proof that whoever
    rotates to it holds it, so nobody can rotate onto another hospital's key."""
    return new.sign(ROTATION_DOMAIN + consortium_id + old_key + new.public_key)


def admit_args(member: Member) -> dict[str, Any]:
    return {"member": member.to_obj()}


def rotate_args(new: Identity, consortium_id: bytes, old_key: bytes) -> dict[str, Any]:
    return {
        "old": old_key,
        "new": new.public_key,
        "proof": rotation_proof(new, consortium_id, old_key),
    }


# ------------------------------------------------------------------------------ state


@dataclass(frozen=True)
class Change:
    """An applied change: the proposal and the votes that brought it to quorum."""

    proposal: Proposal
    votes: tuple[Vote, ...] = ()

    def encode(self) -> bytes:
        return _pack(
            {
                "v": FORMAT_VERSION,
                "proposal": self.proposal.encode(),
                "votes": [v.encode() for v in self.votes],
            }
        )

    @classmethod
    def decode(cls, data: bytes) -> Change:
        obj = _unpack(data)
        proposal = decode_record(_field(obj, "proposal", bytes))
        votes = [decode_record(v) for v in _field(obj, "votes", list) if isinstance(v, bytes)]
        if not isinstance(proposal, Proposal) or not all(isinstance(v, Vote) for v in votes):
            raise MembershipError(Reason.MALFORMED, "a change is one proposal and its votes")
        return cls(proposal, tuple(votes))  # type: ignore[arg-type]


@dataclass(frozen=True)
class Membership:
    """Who is in the consortium at ``epoch``. ``head`` chains the applied changes (the
    consortium id at epoch 0), so two nodes can compare their whole histories by one hash."""

    consortium_id: bytes
    consortium: str
    epoch: int
    quorum: int
    members: tuple[Member, ...]
    revoked: frozenset[bytes] = frozenset()
    rotations: tuple[tuple[bytes, bytes, int], ...] = ()  # (old key, new key, epoch)
    head: bytes = b""

    def by_key(self, key: bytes) -> Member | None:
        return next((m for m in self.members if m.public_key == key), None)

    def by_name(self, name: str) -> Member | None:
        return next((m for m in self.members if m.name == name), None)

    def keys(self) -> set[bytes]:
        return {m.public_key for m in self.members}

    def former_keys(self, key: bytes) -> list[bytes]:
        """Every key this member's key replaced, newest first: its verifiable history."""
        found, current = [], key
        for old, new, _ in reversed(self.rotations):
            if new == current:
                found.append(old)
                current = old
        return found

    def check_signer(self, key: bytes, what: str) -> Member:
        """The current member behind ``key``; refusals say revoked or not a member."""
        if key in self.revoked:
            raise MembershipError(Reason.REVOKED_KEY, f"{what} key {_short(key)} is revoked")
        member = self.by_key(key)
        if member is None:
            raise MembershipError(Reason.NOT_MEMBER, f"{what} key {_short(key)} is no member")
        return member

    def check_proposal(self, proposal: Proposal) -> Membership:
        """Everything about a proposal but its votes; returns the membership it would make."""
        if proposal.consortium_id != self.consortium_id:
            raise MembershipError(Reason.WRONG_CONSORTIUM, "proposal names another consortium")
        self.check_signer(proposal.proposer, "proposer")
        if not proposal.verify_signature():
            raise MembershipError(Reason.FORGED, "the proposal's signature is not the proposer's")
        if proposal.epoch < self.epoch:
            raise MembershipError(
                Reason.REPLAYED, f"proposal for epoch {proposal.epoch}, now at {self.epoch}"
            )
        if proposal.epoch > self.epoch:
            raise MembershipError(
                Reason.STALE_EPOCH, f"proposal for epoch {proposal.epoch}, not yet at it"
            )
        return self._after(proposal)

    def check_vote(self, vote: Vote, proposal: Proposal) -> None:
        if vote.consortium_id != self.consortium_id:
            raise MembershipError(Reason.WRONG_CONSORTIUM, "vote names another consortium")
        if vote.proposal_id != proposal.proposal_id:
            raise MembershipError(Reason.UNKNOWN_PROPOSAL, "vote for another proposal")
        self.check_signer(vote.voter, "voter")
        if not vote.verify_signature():
            raise MembershipError(Reason.FORGED, "the vote's signature is not the voter's")

    def approvals(self, proposal: Proposal, votes: Iterable[Vote]) -> set[bytes]:
        """The distinct current members approving (the proposer included); invalid votes
        raise."""
        approving = {proposal.proposer}
        for vote in votes:
            self.check_vote(vote, proposal)
            approving.add(vote.voter)
        return approving

    def needed(self, proposal: Proposal) -> int:
        return 1 if proposal.action == "leave" else self.quorum

    def apply(self, change: Change) -> Membership:
        """The membership after ``change``, or ``MembershipError`` (nothing applied)."""
        after = self.check_proposal(change.proposal)
        approving = self.approvals(change.proposal, change.votes)
        needed = self.needed(change.proposal)
        if len(approving) < needed:
            raise MembershipError(
                Reason.UNDER_QUORUM, f"{len(approving)} of the {needed} approvals needed"
            )
        return replace(after, head=_digest(CHANGE_DOMAIN, self.head + change.proposal.proposal_id))

    def _after(self, p: Proposal) -> Membership:
        """The membership ``p`` would make (its own validity checked, not its votes)."""
        args, epoch = p.args, self.epoch + 1
        members = list(self.members)
        revoked, rotations, quorum = set(self.revoked), list(self.rotations), self.quorum
        try:
            match p.action:
                case "admit":
                    member = Member.from_obj(args.get("member"))
                    if member.public_key in self.revoked:
                        raise MembershipError(Reason.REVOKED_KEY, "cannot admit a revoked key")
                    members.append(member)
                case "revoke" | "leave":
                    key = _field(args, "key", bytes)
                    target = self.check_signer(key, "revoked")
                    if p.action == "leave" and key != p.proposer:
                        raise MembershipError(Reason.INVALID_CHANGE, "only a member leaves itself")
                    members.remove(target)
                    if p.action == "revoke":
                        revoked.add(key)
                case "rotate":
                    old, new = _field(args, "old", bytes), _field(args, "new", bytes)
                    proof = _field(args, "proof", bytes)
                    target = self.check_signer(old, "rotated")
                    if old != p.proposer:
                        raise MembershipError(Reason.INVALID_CHANGE, "the old key must propose")
                    message = ROTATION_DOMAIN + self.consortium_id + old + new
                    if new in revoked or not verify_signature(new, message, proof):
                        raise MembershipError(Reason.FORGED, "the new key's proof is not valid")
                    members[members.index(target)] = replace(target, public_key=new)
                    revoked.add(old)  # the old key signs nothing new from here on
                    rotations.append((old, new, epoch))
                case "quorum":
                    quorum = _field(args, "k", int)
                case _:
                    raise MembershipError(Reason.INVALID_CHANGE, f"unknown action {p.action!r}")
        except MembershipError as exc:
            if exc.reason is Reason.MALFORMED:
                raise MembershipError(Reason.INVALID_CHANGE, exc.detail) from None
            raise
        if not members:
            raise MembershipError(Reason.INVALID_CHANGE, "the last member cannot go")
        check_member_set(members)
        quorum = min(quorum, len(members)) if p.action != "quorum" else quorum
        if not 1 <= quorum <= len(members):
            raise MembershipError(
                Reason.INVALID_CHANGE, f"quorum {quorum} is not between 1 and {len(members)}"
            )
        return replace(
            self,
            epoch=epoch,
            quorum=quorum,
            members=tuple(sorted(members, key=lambda m: m.name)),
            revoked=frozenset(revoked),
            rotations=tuple(rotations),
        )

    def describe(self) -> dict[str, Any]:
        """JSON-ready summary (/status, `murmur consortium show`)."""
        return {
            "consortium": self.consortium,
            "consortium_id": self.consortium_id.hex(),
            "epoch": self.epoch,
            "head": self.head.hex(),
            "quorum": f"{self.quorum} of {len(self.members)}",
            "members": [
                {
                    "name": m.name,
                    "public_key": m.public_key.hex(),
                    "address": m.address,
                    "relays": list(m.relays),
                    "former_keys": [k.hex() for k in self.former_keys(m.public_key)],
                }
                for m in self.members
            ],
            "revoked": sorted(k.hex() for k in self.revoked),
        }


def replay(manifest: Manifest, changes: Iterable[Change]) -> Membership:
    """The membership after ``changes`` applied in order to the verified manifest."""
    membership = manifest.verify()
    for change in changes:
        membership = membership.apply(change)
    return membership
