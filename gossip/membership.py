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

The records themselves and their canonical bytes are in gossip/governance_records.py
(re-exported here); the manifest and the state machine are here.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from murmur.crypto.identity import Identity, verify_signature
from murmur.gossip.governance_records import (
    ACTIONS,
    CHANGE_DOMAIN,
    FORMAT_VERSION,
    MANIFEST_DOMAIN,
    MAX_MEMBERS,
    MAX_RECORD_BYTES,
    PROPOSAL_DOMAIN,
    ROTATION_DOMAIN,
    VOTE_DOMAIN,
    Change,
    Member,
    MembershipError,
    Proposal,
    Reason,
    Vote,
    admit_args,
    check_member_set,
    decode_record,
    digest,
    field_of,
    make_proposal,
    make_vote,
    pack,
    rotate_args,
    rotation_proof,
    short_key,
    unpack,
)

__all__ = [
    "ACTIONS",
    "MAX_MEMBERS",
    "MAX_RECORD_BYTES",
    "PROPOSAL_DOMAIN",
    "VOTE_DOMAIN",
    "Change",
    "Manifest",
    "Member",
    "Membership",
    "MembershipError",
    "Proposal",
    "Reason",
    "Vote",
    "admit_args",
    "decode_record",
    "make_proposal",
    "make_vote",
    "replay",
    "rotate_args",
    "rotation_proof",
]


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
        return pack(
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
        return digest(MANIFEST_DOMAIN, self.body())

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
        obj = unpack(self.body())
        obj["signatures"] = [[k, s] for k, s in sorted(self.signatures.items())]
        return pack(obj)

    @classmethod
    def decode(cls, data: bytes) -> Manifest:
        obj = unpack(data)
        pairs = field_of(obj, "signatures", list)
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
            consortium=field_of(obj, "consortium", str),
            founders=tuple(Member.from_obj(m) for m in field_of(obj, "founders", list)),
            quorum=field_of(obj, "quorum", int),
            created_at=float(field_of(obj, "created_at", (int, float))),
            signatures=sigs,
        )


# ------------------------------------------------------------------------------ state


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
            raise MembershipError(Reason.REVOKED_KEY, f"{what} key {short_key(key)} is revoked")
        member = self.by_key(key)
        if member is None:
            raise MembershipError(Reason.NOT_MEMBER, f"{what} key {short_key(key)} is no member")
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
        return replace(after, head=digest(CHANGE_DOMAIN, self.head + change.proposal.proposal_id))

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
                    key = field_of(args, "key", bytes)
                    target = self.check_signer(key, "revoked")
                    if p.action == "leave" and key != p.proposer:
                        raise MembershipError(Reason.INVALID_CHANGE, "only a member leaves itself")
                    members.remove(target)
                    if p.action == "revoke":
                        revoked.add(key)
                case "rotate":
                    old, new = field_of(args, "old", bytes), field_of(args, "new", bytes)
                    proof = field_of(args, "proof", bytes)
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
                    quorum = field_of(args, "k", int)
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
