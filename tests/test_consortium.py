"""The node's membership intake and log (node/consortium.py): expiry, quorum, replays,
feasibility, the durable log across a restart, a manifest that does not match; and the
node-side pieces around it (allowlist replacement, `revoked_key` in request auth, config)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
from murmur.crypto.allowlist import Allowlist, Peer
from murmur.crypto.identity import generate_identity
from murmur.gossip.auth import AuthError, AuthFailure, RequestAuthenticator, request_headers
from murmur.gossip.membership import (
    Manifest,
    Member,
    MembershipError,
    Reason,
    admit_args,
    make_proposal,
    make_vote,
)
from murmur.node.consortium import (
    STORE_FILE,
    ConsortiumStore,
    Governance,
    complete_graph_feasibility,
    load_manifest,
)

NOW = 1_000_000.0


@pytest.fixture
def founders():
    ids = [generate_identity(f"hospital_{i}") for i in range(4)]
    members = tuple(
        Member(i.name, i.public_key, f"http://127.0.0.1:{9000 + k}") for k, i in enumerate(ids)
    )
    manifest = Manifest("c", members, quorum=3, created_at=1.0)
    for ident in ids:
        manifest = manifest.signed_by(ident)
    return ids, manifest


def governance(manifest: Manifest, tmp_path: Path, **kw) -> Governance:
    return Governance(
        manifest, ConsortiumStore(tmp_path / STORE_FILE, manifest.consortium_id), **kw
    )


def admit_fifth(ids, gov: Governance, expires: float = NOW + 60):
    fifth = generate_identity("hospital_4")
    member = Member("hospital_4", fifth.public_key, "http://127.0.0.1:9004")
    return fifth, make_proposal(ids[0], gov.membership, "admit", admit_args(member), expires)


def test_votes_reach_the_quorum_and_the_log_survives_a_restart(founders, tmp_path) -> None:
    ids, manifest = founders
    gov = governance(manifest, tmp_path)
    _, proposal = admit_fifth(ids, gov)
    first = gov.offer(proposal.encode(), NOW)
    assert first.new and not first.applied and gov.epoch == 0
    assert gov.offer(proposal.encode(), NOW).new is False  # gossip brings it twice
    vote1 = make_vote(ids[1], proposal, NOW + 60).encode()
    assert not gov.offer(vote1, NOW).applied
    assert gov.status()["pending"][0]["approvals"] == 2
    done = gov.offer(make_vote(ids[2], proposal, NOW + 60).encode(), NOW)
    assert [m.epoch for m in done.applied] == [1] and gov.membership.by_name("hospital_4")
    assert not gov.proposals  # nothing pending for the old epoch
    # An echo of a vote that made the change is quiet; a late vote is a replay.
    assert gov.offer(vote1, NOW).reason is None
    late = gov.offer(make_vote(ids[3], proposal, NOW + 60).encode(), NOW)
    assert late.reason is Reason.REPLAYED and gov.epoch == 1
    gov.store.close()
    again = governance(manifest, tmp_path)
    assert again.membership == gov.membership
    # A peer behind catches up from the applied changes.
    (tmp_path / "behind").mkdir()
    behind = governance(manifest, tmp_path / "behind")
    assert [m.epoch for m in behind.offer_change(gov.changes_since(0)[0]).applied] == [1]


def test_expired_unknown_forged_and_outsider_records_are_refused(founders, tmp_path) -> None:
    ids, manifest = founders
    gov = governance(manifest, tmp_path)
    _, stale = admit_fifth(ids, gov, expires=NOW - 1)
    assert gov.offer(stale.encode(), NOW).reason is Reason.EXPIRED
    _, proposal = admit_fifth(ids, gov)
    assert gov.offer(make_vote(ids[1], proposal, NOW + 60).encode(), NOW).reason is (
        Reason.UNKNOWN_PROPOSAL
    )
    gov.offer(proposal.encode(), NOW)
    assert gov.offer(make_vote(ids[1], proposal, NOW - 5).encode(), NOW).reason is Reason.EXPIRED
    outsider = make_vote(generate_identity("mallory"), proposal, NOW + 60)
    assert gov.offer(outsider.encode(), NOW).reason is Reason.NOT_MEMBER
    good = make_vote(ids[2], proposal, NOW + 60)
    forged = replace(good, signature=bytes([good.signature[0] ^ 1]) + good.signature[1:])
    assert gov.offer(forged.encode(), NOW).reason is Reason.FORGED
    assert gov.offer(b"\x00garbage", NOW).reason is Reason.MALFORMED
    assert gov.epoch == 0 and gov.status()["pending"][0]["approvals"] == 1
    assert gov.refused == {
        "expired": 2,
        "unknown_proposal": 1,
        "not_member": 1,
        "forged_signature": 1,
        "malformed": 1,
    }


def test_a_change_that_would_make_the_rule_infeasible_is_refused(founders, tmp_path) -> None:
    ids, manifest = founders
    # trimmed_mean with f=1 needs 3 inputs: 2 neighbours each, so 3 members at least.
    gov = governance(manifest, tmp_path, feasible=complete_graph_feasibility("trimmed_mean", 1))
    revoke = make_proposal(ids[0], gov.membership, "revoke", {"key": ids[3].public_key}, NOW + 60)
    assert gov.offer(revoke.encode(), NOW).reason is None
    gov.offer(make_vote(ids[1], revoke, NOW + 60).encode(), NOW)
    gov.offer(make_vote(ids[2], revoke, NOW + 60).encode(), NOW)
    assert len(gov.membership.members) == 3
    again = make_proposal(ids[0], gov.membership, "revoke", {"key": ids[2].public_key}, NOW + 60)
    refused = gov.offer(again.encode(), NOW)
    assert refused.reason is Reason.INFEASIBLE
    assert "hospital_0 has 1 neighbour" in refused.detail and "degree >= 2" in refused.detail
    assert len(gov.membership.members) == 3


def test_a_manifest_that_does_not_match_is_refused(founders, tmp_path) -> None:
    _, manifest = founders
    path = tmp_path / "manifest.bin"
    path.write_bytes(manifest.encode())
    assert load_manifest(path, manifest.consortium_id.hex()).consortium_id == manifest.consortium_id
    with pytest.raises(MembershipError) as err:
        load_manifest(path, "ab" * 32)
    assert err.value.reason is Reason.MANIFEST_MISMATCH
    ConsortiumStore(tmp_path / STORE_FILE, manifest.consortium_id).close()
    with pytest.raises(MembershipError) as err:
        ConsortiumStore(tmp_path / STORE_FILE, b"\x01" * 32)
    assert err.value.reason is Reason.MANIFEST_MISMATCH


def test_a_revoked_key_is_refused_as_revoked_by_request_auth() -> None:
    me, peer = generate_identity("me"), generate_identity("peer")
    allowlist = Allowlist([Peer("peer", "http://127.0.0.1:1", peer.public_key)])
    auth = RequestAuthenticator(me.public_key, allowlist, 300.0)
    headers = request_headers(peer, me.public_key, "/gossip", b"x", "application/octet-stream", NOW)
    assert auth.check(headers["Murmur-Auth"], "/gossip", 1, NOW)[0].name == "peer"
    allowlist.replace([], revoked=[peer.public_key])
    again = request_headers(peer, me.public_key, "/gossip", b"y", "application/octet-stream", NOW)
    with pytest.raises(AuthError) as err:
        auth.check(again["Murmur-Auth"], "/gossip", 1, NOW)
    assert err.value.why is AuthFailure.REVOKED_KEY
    assert allowlist.by_key(peer.public_key) is None and len(allowlist) == 0


def test_consortium_init_sign_and_show(tmp_path: Path, capsys) -> None:
    from murmur.crypto.identity import save_identity
    from murmur.node.cli import main

    keys = {}
    for name in ("hospital_a", "hospital_b"):
        keys[name] = save_identity(generate_identity(name), tmp_path)
    out = tmp_path / "manifest.bin"
    members = [
        f"{n}={pub}@http://127.0.0.1:{9000 + i}" for i, (n, (_, pub)) in enumerate(keys.items())
    ]
    argv = ["consortium", "init", "--name", "c", "--quorum", "2", "--out", str(out)]
    for m in members:
        argv += ["--member", m]
    assert main([*argv, "--key", str(keys["hospital_a"][0])]) == 0
    assert (
        "still to sign" in capsys.readouterr().out
        and "hospital_b" in Manifest.decode(out.read_bytes()).unsigned_founders()
    )
    assert (
        main(["consortium", "init", "--sign", str(out), "--key", str(keys["hospital_b"][0])]) == 0
    )
    assert "signed by every founder" in capsys.readouterr().out
    manifest = Manifest.decode(out.read_bytes())
    assert manifest.verify().quorum == 2
    assert main(["consortium", "show", str(out)]) == 0
    assert manifest.consortium_id.hex() in capsys.readouterr().out
    # A key that is not a founder's cannot sign the manifest.
    stranger, _ = save_identity(generate_identity("mallory"), tmp_path)
    assert main(["consortium", "init", "--sign", str(out), "--key", str(stranger)]) == 2
    assert "not a founder" in capsys.readouterr().err


def test_the_governance_exchange_message_is_checked() -> None:
    from murmur.node.governance import decode_exchange, encode_exchange

    assert decode_exchange(encode_exchange(3, [b"r"], [b"c"])) == (3, [b"r"], [b"c"])
    for bad in (b"\xc1", b"\x93\x01\x02\x03", encode_exchange(1, [], [])[:-1]):
        with pytest.raises(MembershipError) as err:
            decode_exchange(bad)
        assert err.value.reason is Reason.MALFORMED


def test_pending_records_survive_a_restart_and_expire_meanwhile(founders, tmp_path) -> None:
    ids, manifest = founders
    gov = governance(manifest, tmp_path)
    _, proposal = admit_fifth(ids, gov)
    gov.offer(proposal.encode(), NOW)
    gov.offer(make_vote(ids[1], proposal, NOW + 60).encode(), NOW)
    gov.store.close()
    again = governance(manifest, tmp_path, now=NOW)  # the restart, before anything expired
    assert again.status()["pending"][0]["approvals"] == 2 and again.refused == {}
    done = again.offer(make_vote(ids[2], proposal, NOW + 60).encode(), NOW)
    assert [m.epoch for m in done.applied] == [1]
    assert again.store.pending() == []  # applied: nothing left pending on disk
    again.store.close()

    (tmp_path / "late").mkdir()
    late = governance(manifest, tmp_path / "late")
    late.offer(proposal.encode(), NOW)
    late.store.close()
    expired = governance(manifest, tmp_path / "late", now=NOW + 120)
    assert expired.status()["pending"] == [] and expired.refused == {}  # dropped, not counted
    assert expired.store.pending() == []


def test_a_consortium_log_put_back_or_replaced_is_found_against_the_audit(
    founders, tmp_path
) -> None:
    from murmur.node.consortium import behind_audit

    ids, manifest = founders
    gov = governance(manifest, tmp_path)
    gov.store.close()
    empty = (tmp_path / STORE_FILE).read_bytes()  # an earlier copy: epoch 0
    gov = governance(manifest, tmp_path)
    _, proposal = admit_fifth(ids, gov)
    for record in (proposal, make_vote(ids[1], proposal, NOW + 60)):
        gov.offer(record.encode(), NOW)
    gov.offer(make_vote(ids[2], proposal, NOW + 60).encode(), NOW)
    assert gov.epoch == 1
    head = gov.membership.head.hex()  # what the `membership` audit record holds
    assert behind_audit(gov, 1, head) is None and behind_audit(gov, 0, gov.heads[0].hex()) is None
    gov.store.close()

    (tmp_path / STORE_FILE).write_bytes(empty)
    old = governance(manifest, tmp_path)
    assert "put back to an older copy" in behind_audit(old, 1, head)
    # Another history at epoch 1: a quorum change instead of the admission.
    other = make_proposal(ids[0], old.membership, "quorum", {"k": 2}, NOW + 60)
    for voter in (None, ids[1], ids[2]):
        record = other if voter is None else make_vote(voter, other, NOW + 60)
        old.offer(record.encode(), NOW)
    assert old.epoch == 1 and "the file was replaced" in behind_audit(old, 1, head)
    old.store.close()


def test_a_node_keeps_pending_votes_and_refuses_a_put_back_consortium_log(tmp_path) -> None:
    """On a node: a pending proposal and vote survive its restart; after the change applied
    (and was audited as `membership`), the node refuses to start on an older copy of
    consortium.sqlite, naming the epochs and the fix."""
    import time

    from murmur.crypto.identity import load_identity
    from murmur.node.config import load_config
    from murmur.node.governance import take
    from murmur.node.node import HospitalNode
    from murmur.node.state import StartupError

    from tests.test_consortium_network import consortium

    net, _ = consortium(tmp_path, rounds=2)
    keys = {n.name: load_identity(tmp_path / "keys" / f"{n.name}.key") for n in net.nodes}
    config_path = net.node("hospital_0").config_path

    def open_node() -> HospitalNode:
        return HospitalNode(load_config(config_path))

    def close(node: HospitalNode) -> None:
        node.gate.close()
        node.governance.store.close()
        node.audit.close()

    node = open_node()
    fifth = Member("hospital_4", keys["hospital_4"].public_key, net.node("hospital_4").address)
    expires = time.time() + 600
    proposal = make_proposal(
        keys["hospital_0"], node.governance.membership, "admit", admit_args(fifth), expires
    )
    vote = make_vote(keys["hospital_1"], proposal, expires)
    take(node, [proposal.encode(), vote.encode()], [], "test")
    close(node)
    node = open_node()
    assert node.governance.status()["pending"][0]["approvals"] == 2  # kept across the restart
    close(node)
    store = node.state_dir / STORE_FILE
    old = store.read_bytes()
    node = open_node()
    take(node, [make_vote(keys["hospital_2"], proposal, expires).encode()], [], "test")
    assert node.governance.epoch == 1
    assert node.gate.members[keys["hospital_4"].public_key] == "hospital_4"  # its approvals count
    node.audit.wait_durable(5)
    close(node)
    store.write_bytes(old)
    with pytest.raises(StartupError) as refused:
        open_node()
    text = str(refused.value)
    assert "ends at epoch 0" in text and "recorded membership epoch 1" in text
    assert "put back to an older copy" in text and "Fix: put back the newest copy" in text
