"""The signed records of consortium membership, and their canonical bytes: members,
proposals, votes, applied changes (gossip/membership.py is the state machine over them).

Encoding: canonical msgpack (maps with sorted string keys, bin for bytes); a signature is
Ed25519 (crypto/identity.py, libsodium) over a domain tag and that encoding. Pure: no I/O,
no clock.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import TYPE_CHECKING, Any

import msgpack
from murmur.crypto.identity import (
    Identity,
    IdentityError,
    check_name,
    check_public_key,
    verify_signature,
)

if TYPE_CHECKING:
    from murmur.gossip.membership import Membership

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


def pack(obj: Any) -> bytes:
    """Canonical msgpack: msgpack-python writes dict items in insertion order, so maps are
    rebuilt with sorted keys (recursively) before packing."""
    return msgpack.packb(_sorted(obj), use_bin_type=True)


def _sorted(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {k: _sorted(obj[k]) for k in sorted(obj)}
    if isinstance(obj, list | tuple):
        return [_sorted(v) for v in obj]
    return obj


def unpack(data: bytes) -> dict[str, Any]:
    if not isinstance(data, bytes) or len(data) > MAX_RECORD_BYTES:
        raise MembershipError(Reason.MALFORMED, f"a record is bytes of at most {MAX_RECORD_BYTES}")
    try:
        obj = msgpack.unpackb(data, raw=False, strict_map_key=True, max_bin_len=MAX_RECORD_BYTES)
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as exc:
        raise MembershipError(Reason.MALFORMED, f"not msgpack: {type(exc).__name__}") from None
    if not isinstance(obj, dict) or obj.get("v") != FORMAT_VERSION:
        raise MembershipError(Reason.MALFORMED, f"not a version-{FORMAT_VERSION} record")
    return obj


def digest(domain: bytes, body: bytes) -> bytes:
    return hashlib.sha256(domain + body).digest()


def field_of(obj: Mapping[str, Any], name: str, kind: type | tuple[type, ...]) -> Any:
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
        relays = field_of(obj, "relays", list)
        return cls(
            field_of(obj, "name", str),
            field_of(obj, "key", bytes),
            field_of(obj, "address", str),
            tuple(relays),
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
        return pack(
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
        return digest(PROPOSAL_DOMAIN, self.body())

    def verify_signature(self) -> bool:
        return verify_signature(self.proposer, PROPOSAL_DOMAIN + self.body(), self.signature)

    def encode(self) -> bytes:
        obj = unpack(self.body())
        obj["signature"] = self.signature
        return pack(obj)

    @classmethod
    def from_obj(cls, obj: dict[str, Any]) -> Proposal:
        return cls(
            consortium_id=field_of(obj, "consortium", bytes),
            epoch=field_of(obj, "epoch", int),
            action=field_of(obj, "action", str),
            args=field_of(obj, "args", dict),
            proposer=field_of(obj, "proposer", bytes),
            expires_at=float(field_of(obj, "expires_at", (int, float))),
            signature=field_of(obj, "signature", bytes),
        )

    def describe(self) -> str:
        args = self.args
        match self.action:
            case "admit":
                m = args.get("member", {})
                return f"admit {m.get('name')} ({m.get('address') or 'relays'})"
            case "revoke" | "leave":
                return f"{self.action} {short_key(args.get('key'))}"
            case "rotate":
                return f"rotate {short_key(args.get('old'))} -> {short_key(args.get('new'))}"
            case "quorum":
                return f"quorum -> {args.get('k')}"
        return self.action


def short_key(key: Any) -> str:
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
        return pack(
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
        obj = unpack(self.body())
        obj["signature"] = self.signature
        return pack(obj)

    @classmethod
    def from_obj(cls, obj: dict[str, Any]) -> Vote:
        return cls(
            consortium_id=field_of(obj, "consortium", bytes),
            proposal_id=field_of(obj, "proposal", bytes),
            voter=field_of(obj, "voter", bytes),
            expires_at=float(field_of(obj, "expires_at", (int, float))),
            signature=field_of(obj, "signature", bytes),
        )


def decode_record(data: bytes) -> Proposal | Vote:
    """A proposal or a vote from its encoding; ``MembershipError(MALFORMED)`` otherwise."""
    obj = unpack(data)
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
        return pack(
            {
                "v": FORMAT_VERSION,
                "proposal": self.proposal.encode(),
                "votes": [v.encode() for v in self.votes],
            }
        )

    @classmethod
    def decode(cls, data: bytes) -> Change:
        obj = unpack(data)
        proposal = decode_record(field_of(obj, "proposal", bytes))
        votes = [decode_record(v) for v in field_of(obj, "votes", list) if isinstance(v, bytes)]
        if not isinstance(proposal, Proposal) or not all(isinstance(v, Vote) for v in votes):
            raise MembershipError(Reason.MALFORMED, "a change is one proposal and its votes")
        return cls(proposal, tuple(votes))  # type: ignore[arg-type]
