"""The membership state machine (gossip/membership.py): founding, admit, revoke, rotate,
quorum, leave, and every way a record is refused (reason codes), with nothing applied."""

from __future__ import annotations

import pytest
from murmur.crypto.identity import generate_identity
from murmur.gossip.membership import (
    Change,
    Manifest,
    Member,
    MembershipError,
    Proposal,
    Reason,
    Vote,
    admit_args,
    decode_record,
    make_proposal,
    make_vote,
    replay,
    rotate_args,
)

EXPIRES = 2e9


def founders(n: int = 4):
    ids = [generate_identity(f"hospital_{i}") for i in range(n)]
    members = tuple(
        Member(i.name, i.public_key, f"http://127.0.0.1:{9000 + k}") for k, i in enumerate(ids)
    )
    manifest = Manifest("test-consortium", members, quorum=3, created_at=1.0)
    for ident in ids:
        manifest = manifest.signed_by(ident)
    return ids, manifest


def voted(membership, proposal, voters):
    return Change(proposal, tuple(make_vote(v, proposal, EXPIRES) for v in voters))


def test_manifest_round_trips_and_needs_every_founder() -> None:
    ids, manifest = founders()
    again = Manifest.decode(manifest.encode())
    assert again.consortium_id == manifest.consortium_id
    m = again.verify()
    assert m.epoch == 0 and m.quorum == 3 and len(m.members) == 4
    unsigned = Manifest("x", manifest.founders, 3, 1.0)
    partly = unsigned.signed_by(ids[0])
    with pytest.raises(MembershipError) as err:
        partly.verify()
    assert err.value.reason is Reason.FORGED and partly.unsigned_founders() == [
        "hospital_1",
        "hospital_2",
        "hospital_3",
    ]
    # A changed body keeps the old signatures, which no longer verify.
    tampered = Manifest("other", manifest.founders, 3, 1.0, manifest.signatures)
    with pytest.raises(MembershipError) as err:
        tampered.verify()
    assert err.value.reason is Reason.FORGED
    assert tampered.consortium_id != manifest.consortium_id


def test_admit_by_three_of_four_and_under_quorum_applies_nothing() -> None:
    ids, manifest = founders()
    m0 = manifest.verify()
    newcomer = generate_identity("hospital_4")
    member = Member("hospital_4", newcomer.public_key, "http://127.0.0.1:9004")
    proposal = make_proposal(ids[0], m0, "admit", admit_args(member), EXPIRES)
    with pytest.raises(MembershipError) as err:
        m0.apply(voted(m0, proposal, [ids[1]]))  # proposer + 1 = 2 of 3
    assert err.value.reason is Reason.UNDER_QUORUM
    assert m0.by_name("hospital_4") is None and m0.epoch == 0
    # Votes from the proposer itself do not count twice.
    with pytest.raises(MembershipError):
        m0.apply(voted(m0, proposal, [ids[0], ids[1]]))
    change = voted(m0, proposal, [ids[1], ids[2]])
    m1 = m0.apply(change)
    assert m1.epoch == 1 and m1.by_name("hospital_4").public_key == newcomer.public_key
    assert m1.head != m0.head
    # Replaying the applied change is refused: its epoch has passed.
    with pytest.raises(MembershipError) as err:
        m1.apply(change)
    assert err.value.reason is Reason.REPLAYED
    assert replay(manifest, [Change.decode(change.encode())]) == m1


def test_forged_and_outsider_votes_and_wrong_consortium() -> None:
    ids, manifest = founders()
    m0 = manifest.verify()
    proposal = make_proposal(ids[0], m0, "quorum", {"k": 2}, EXPIRES)
    outsider = generate_identity("mallory")
    bad = make_vote(outsider, proposal, EXPIRES)
    with pytest.raises(MembershipError) as err:
        m0.apply(Change(proposal, (make_vote(ids[1], proposal, EXPIRES), bad)))
    assert err.value.reason is Reason.NOT_MEMBER
    good = make_vote(ids[1], proposal, EXPIRES)
    forged = Vote(good.consortium_id, good.proposal_id, ids[2].public_key, EXPIRES, good.signature)
    with pytest.raises(MembershipError) as err:
        m0.apply(Change(proposal, (good, forged)))
    assert err.value.reason is Reason.FORGED
    other_ids, other = founders()
    foreign = make_proposal(other_ids[0], other.verify(), "quorum", {"k": 2}, EXPIRES)
    with pytest.raises(MembershipError) as err:
        m0.check_proposal(foreign)
    assert err.value.reason is Reason.WRONG_CONSORTIUM
    # A proposal whose bytes were altered after signing.
    tampered = Proposal(**{**proposal.__dict__, "args": {"k": 1}})
    with pytest.raises(MembershipError) as err:
        m0.check_proposal(tampered)
    assert err.value.reason is Reason.FORGED
    assert decode_record(proposal.encode()) == proposal
    with pytest.raises(MembershipError) as err:
        decode_record(b"\x93garbage")
    assert err.value.reason is Reason.MALFORMED


def test_revoked_member_cannot_propose_or_vote_and_is_gone() -> None:
    ids, manifest = founders()
    m0 = manifest.verify()
    revoke = make_proposal(ids[0], m0, "revoke", {"key": ids[3].public_key}, EXPIRES)
    m1 = m0.apply(voted(m0, revoke, [ids[1], ids[2]]))
    assert m1.by_key(ids[3].public_key) is None and ids[3].public_key in m1.revoked
    assert m1.quorum == 3 and len(m1.members) == 3
    again = make_proposal(ids[3], m1, "quorum", {"k": 1}, EXPIRES)
    with pytest.raises(MembershipError) as err:
        m1.check_proposal(again)
    assert err.value.reason is Reason.REVOKED_KEY
    p = make_proposal(ids[0], m1, "quorum", {"k": 2}, EXPIRES)
    with pytest.raises(MembershipError) as err:
        m1.apply(Change(p, (make_vote(ids[3], p, EXPIRES), make_vote(ids[1], p, EXPIRES))))
    assert err.value.reason is Reason.REVOKED_KEY
    # Re-admitting a revoked key is refused too.
    back = Member("hospital_3", ids[3].public_key, "http://127.0.0.1:9003")
    readmit = make_proposal(ids[0], m1, "admit", admit_args(back), EXPIRES)
    with pytest.raises(MembershipError) as err:
        m1.check_proposal(readmit)
    assert err.value.reason is Reason.REVOKED_KEY


def test_rotation_keeps_history_and_needs_the_new_keys_proof() -> None:
    ids, manifest = founders()
    m0 = manifest.verify()
    new = generate_identity("hospital_2")
    args = rotate_args(new, m0.consortium_id, ids[2].public_key)
    rotate = make_proposal(ids[2], m0, "rotate", args, EXPIRES)
    m1 = m0.apply(voted(m0, rotate, [ids[0], ids[1]]))
    assert m1.by_name("hospital_2").public_key == new.public_key
    assert m1.former_keys(new.public_key) == [ids[2].public_key]
    assert ids[2].public_key in m1.revoked  # the old key signs nothing new
    assert m1.describe()["members"][2]["former_keys"] == [ids[2].public_key.hex()]
    # Someone else's key cannot be claimed: the proof must be by the new key.
    stranger = generate_identity("x")
    bad_args = {**rotate_args(stranger, m0.consortium_id, ids[1].public_key), "new": new.public_key}
    bad = make_proposal(ids[1], m0, "rotate", bad_args, EXPIRES)
    with pytest.raises(MembershipError) as err:
        m0.check_proposal(bad)
    assert err.value.reason is Reason.FORGED
    # Only the old key may propose its rotation.
    by_other = make_proposal(ids[0], m0, "rotate", args, EXPIRES)
    with pytest.raises(MembershipError) as err:
        m0.check_proposal(by_other)
    assert err.value.reason is Reason.INVALID_CHANGE


def test_leave_needs_only_the_member_and_quorum_bounds() -> None:
    ids, manifest = founders()
    m0 = manifest.verify()
    leave = make_proposal(ids[1], m0, "leave", {"key": ids[1].public_key}, EXPIRES)
    m1 = m0.apply(Change(leave))
    assert m1.by_name("hospital_1") is None and ids[1].public_key not in m1.revoked
    push_out = make_proposal(ids[0], m1, "leave", {"key": ids[2].public_key}, EXPIRES)
    with pytest.raises(MembershipError) as err:
        m1.apply(Change(push_out))
    assert err.value.reason is Reason.INVALID_CHANGE
    too_big = make_proposal(ids[0], m1, "quorum", {"k": 9}, EXPIRES)
    with pytest.raises(MembershipError) as err:
        m1.check_proposal(too_big)
    assert err.value.reason is Reason.INVALID_CHANGE
