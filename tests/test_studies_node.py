"""A node's study gate in one process: bad approvals offered on POST /approvals are refused
with their reason codes, counted in /status and /metrics, and change nothing; a good one is
kept and audited."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
from murmur.crypto.identity import generate_identity, load_identity
from murmur.node.audit import records_of_kind
from murmur.node.config import load_config
from murmur.node.node import HospitalNode, StartupError
from murmur.node.studies.approvals import approve as sign_approval
from murmur.node.studies.manifest import load_manifest
from murmur.node.studies.site_budget import SiteBudgetStore

from tests.studyutil import approve, murmur, propose, site_budget, study_network


@pytest.fixture
def node_and_keys(tmp_path: Path):
    net, manifest = study_network(tmp_path, "gamma", epsilon=1.0, rounds=1)
    node_config = net.node("hospital_0").config_path
    unapproved = HospitalNode(load_config(node_config))
    with pytest.raises(StartupError, match="is not approved by this node's operator"):
        unapproved.gate.check_own_approval()
    unapproved.audit.close()
    approve(net, "hospital_0", manifest)
    node = HospitalNode(load_config(node_config))
    node.gate.check_own_approval()
    peer_key = load_identity(net.run_dir / "keys" / "hospital_1.key")
    yield node, peer_key, load_manifest(manifest).id
    node.audit.close()


def test_bad_approvals_are_refused_counted_and_not_kept(node_and_keys) -> None:
    node, h1, study = node_and_keys
    peer = next(p for p in node.peers if p.name == "hospital_1")
    now = time.time()
    forged = sign_approval(study, h1, now=now).to_json()
    forged["expires_at"] += 86400 * 365  # stretched after signing
    offers = {
        "approval_forged": forged,
        "approval_expired": sign_approval(study, h1, now=now - 3 * 86400, valid_days=1).to_json(),
        "approval_unknown_signer": sign_approval(
            study, generate_identity("eve"), now=now
        ).to_json(),
        "unknown_study": sign_approval("ab" * 32, h1, now=now).to_json(),
        "approval_future": sign_approval(study, h1, now=now + 3600).to_json(),
    }
    for document in offers.values():
        assert node.answer_approvals(json.dumps([document]).encode(), peer) == (202, "accepted")
    assert node.answer_approvals(b"{not json", peer) == (400, "approval_malformed")
    newer = sign_approval(study, h1, now=now)
    older = sign_approval(study, h1, now=now - 60)
    body = json.dumps([newer.to_json(), older.to_json(), newer.to_json()]).encode()
    assert node.answer_approvals(body, peer) == (202, "accepted")

    rejected = node.status()["rejected"]
    for reason in [*offers, "approval_malformed", "approval_replayed"]:
        assert rejected.get(reason) == 1, (reason, rejected)
    metrics = node.metrics.render().decode()
    assert 'murmur_messages_rejected_total{reason="approval_forged"} 1.0' in metrics
    held = node.gate.book.of_study(study)
    assert sorted(a.approver for a in held) == ["hospital_0", "hospital_1"]
    assert next(a for a in held if a.approver == "hospital_1").signature == newer.signature
    assert node.gate.other_approvers() == ["hospital_1"]
    assert node.status()["study"]["approved_by"] == ["hospital_0", "hospital_1"]
    node.audit.wait_durable(5)
    kept = records_of_kind(node.state_dir, "study_approval")
    assert [r.fields["approver"] for r in kept] == ["hospital_0", "hospital_1"]


def test_a_site_budget_store_put_back_or_replaced_stops_the_node(tmp_path: Path) -> None:
    net, manifest = study_network(tmp_path, "delta", epsilon=1.0, rounds=1)
    approve(net, "hospital_0", manifest)
    store = tmp_path / "site.sqlite"
    site_budget(net, "hospital_0", store, max_epsilon=5.0)
    config_path = net.node("hospital_0").config_path

    def admit_once() -> None:
        node = HospitalNode(load_config(config_path))
        try:
            node.gate.admit(node.study.ledger)
        finally:
            node.gate.close()
            node.audit.close()

    admit_once()
    old = store.read_bytes()  # a copy taken after the admission
    node = HospitalNode(load_config(config_path))
    node.gate.admit(node.study.ledger)
    node.gate.record(node.study.ledger, 1)  # a later write, recorded in the audit log
    node.gate.close()
    node.audit.close()
    store.write_bytes(old)
    with pytest.raises(StartupError, match="put back to an earlier copy"):
        admit_once()
    store.unlink()
    with pytest.raises(StartupError, match="deleted or replaced"):
        admit_once()


def test_a_checkpoint_does_not_resume_under_another_study(tmp_path: Path) -> None:
    from murmur.node.checkpoint import CheckpointError

    net, manifest = study_network(tmp_path, "first", epsilon=1.0, rounds=1)
    approve(net, "hospital_0", manifest)
    config_path = net.node("hospital_0").config_path
    HospitalNode(load_config(config_path)).audit.close()  # checkpoint of round 0, study "first"
    key = net.run_dir / "keys" / "hospital_0.key"
    second = propose(tmp_path, "second", config_path, key)  # the same fields, another study
    net.edit_config("hospital_0", "study", manifest=str(second), sha256=load_manifest(second).id)
    approve(net, "hospital_0", second)
    with pytest.raises(CheckpointError, match=r"study\.sha256"):
        HospitalNode(load_config(config_path))


def test_config_check_names_nodes_of_different_studies(tmp_path: Path) -> None:
    from murmur.node.config_check import check_configs

    net, _ = study_network(tmp_path, "same", epsilon=1.0, rounds=1)
    paths = [n.config_path for n in net.nodes]
    _, findings = check_configs(paths)
    assert not [f for f in findings if "study.sha256" in str(f)]
    key = net.run_dir / "keys" / "hospital_1.key"
    other = propose(tmp_path, "other", paths[1], key)
    net.edit_config("hospital_1", "study", manifest=str(other))
    _, findings = check_configs(paths)
    assert [f.level for f in findings if "study.sha256" in str(f)] == ["error"]


def test_an_attackers_update_in_a_study_network_reaches_the_round_not_unknown_study(
    tmp_path: Path,
) -> None:
    """Adversary mode in a study network: the attacker's envelope carries the study, so the
    honest node files it for the round's robust aggregation instead of refusing it."""
    import asyncio

    net, manifest = study_network(tmp_path, "attacked", epsilon=1.0, rounds=1)
    for name in ("hospital_0", "hospital_1"):
        approve(net, name, manifest)
    net.edit_config("hospital_1", "adversary", attack="sign_flip")
    honest = HospitalNode(load_config(net.node("hospital_0").config_path))
    attacker = HospitalNode(load_config(net.node("hospital_1").config_path))
    try:
        assert attacker.adversary is not None
        own = attacker.study.state()
        messages = attacker.adversary.messages(1, own, own, {})
        assert len(messages) == 1

        async def deliver():
            verdict = await honest.receiver.receive(messages[0].data)
            collected = await honest.inbox.collect(1, ["hospital_1"], 1.0, asyncio.Event())
            return verdict, collected

        verdict, collected = asyncio.run(deliver())
        assert verdict[:2] == (202, "accepted"), verdict
        assert "unknown_study" not in honest.status()["rejected"]
        assert attacker.adversary.study == honest.gate.wire_id is not None
        # What the round's robust rule is given: the attacker's poison (sign flip of its own).
        poison = collected.messages["hospital_1"].envelope.update.tensors
        for name, tensor in own.items():
            assert np.allclose(poison[name], -np.asarray(tensor), atol=1e-6), name
    finally:
        honest.audit.close()
        attacker.audit.close()


def test_a_site_budget_store_deleted_or_put_back_between_studies_is_refused(
    tmp_path: Path,
) -> None:
    """The peers' record of the hospital's budget log head (node/studies/witness.py) catches
    what the node's own audit log cannot: a store deleted or put back while no study ran,
    found by a *new* study with a fresh state directory. hospital_1 keeps hospital_0's head
    from its approvals exchange and hands it back in its POST /receipts answer."""
    from murmur.gossip.heads import ReceiptsRequest, open_receipts_answer_with_budget
    from murmur.node.studies.budget_log import BudgetHead

    net, manifest = study_network(tmp_path, "first", epsilon=1.0, rounds=1)
    store, peer_store = tmp_path / "h0-site.sqlite", tmp_path / "h1-site.sqlite"
    for name, path in (("hospital_0", store), ("hospital_1", peer_store)):
        approve(net, name, manifest)
        site_budget(net, name, path, max_epsilon=10.0)
    h1 = HospitalNode(load_config(net.node("hospital_1").config_path))
    as_h0 = next(p for p in h1.peers if p.name == "hospital_0")

    first = HospitalNode(load_config(net.node("hospital_0").config_path))
    first.gate.admit(first.study.ledger, {})
    assert h1.answer_approvals(first.gate.held_approvals(), as_h0) == (202, "accepted")
    first.gate.close()
    old = tmp_path / "old-site.sqlite"
    old.write_bytes(store.read_bytes())  # a copy taken after the admission
    first = HospitalNode(load_config(net.node("hospital_0").config_path))
    first.gate.admit(first.study.ledger, {})
    first.gate.record(first.study.ledger, 1, finished=True)  # the study ends, fewer steps
    assert h1.answer_approvals(first.gate.held_approvals(), as_h0) == (202, "accepted")
    held = BudgetHead.decode(h1.gate.witnessed_head_of(as_h0.public_key))
    assert held.seq == 2 and held.hospital == "hospital_0"
    first.gate.close()
    first.audit.close()

    # A new study of hospital_0, in a new state directory: its own audit log knows nothing.
    key = net.run_dir / "keys" / "hospital_0.key"
    second = propose(tmp_path, "second", net.node("hospital_0").config_path, key)
    state = tmp_path / "second-state"
    net.edit_config("hospital_0", "study", manifest=str(second))
    net.edit_config("hospital_0", "node", state_dir=str(state))
    done = murmur("study", "approve", str(second), "--state", str(state), "--key", str(key))
    assert done.returncode == 0, done.stderr

    def start_second() -> HospitalNode:
        node = HospitalNode(load_config(net.node("hospital_0").config_path))
        request = ReceiptsRequest.make(node.identity, h1.identity.public_key, time.time())
        status, _, answer = h1.answer_receipts_request(request.encode(), node.identity.public_key)
        assert status == 200
        _, _, budget = open_receipts_answer_with_budget(node.identity, request, answer)
        assert budget is not None
        try:
            node.gate.admit(node.study.ledger, node.rollback.budget_heads | {"hospital_1": budget})
        finally:
            node.gate.close()
            node.audit.close()
        return node

    for suffix in ("", "-wal", "-shm"):
        Path(f"{store}{suffix}").unlink(missing_ok=True)
    with pytest.raises(StartupError) as refused:
        start_second()
    text = str(refused.value)
    assert "hospital_1 holds this hospital's signed budget log head" in text
    assert "deleted or replaced" in text and "Fix: put back the newest copy" in text
    assert SiteBudgetStore(store).runs("breast-cancer") == []  # nothing admitted

    store.write_bytes(old.read_bytes())  # put back the copy taken after the admission
    with pytest.raises(StartupError, match="put back to an earlier copy") as refused:
        start_second()
    assert "ends at write 1" in str(refused.value)
    assert [r.name for r in SiteBudgetStore(store).runs("breast-cancer")] == ["first"]

    # hospital_1 refuses the head of the put-back store, and hospital_0's envelopes with it.
    behind = HospitalNode(load_config(net.node("hospital_0").config_path))
    assert h1.answer_approvals(behind.gate.held_approvals(), as_h0) == (202, "accepted")
    behind.gate.close()
    behind.audit.close()
    assert h1.status()["rejected"].get("budget_rollback") == 1
    assert "put back to an earlier copy" in h1.gate.budget_refusal(as_h0.public_key)
    assert h1.status()["study"]["budget_rolled_back"] == ["hospital_0"]
    assert BudgetHead.decode(h1.gate.witnessed_head_of(as_h0.public_key)).seq == 2  # kept
    h1.audit.wait_durable(5)
    assert [
        r.fields["peer"] for r in records_of_kind(h1.state_dir, "budget_rollback_detected")
    ] == ["hospital_0"]
    h1.gate.close()
    h1.audit.close()


def test_a_withdrawn_approval_stops_the_study_at_the_next_round_boundary(
    node_and_keys,
) -> None:
    """With `required_approvals = 1`, hospital_1's withdrawal (gossiped on POST /approvals)
    drops the count below what is required: the gate says why, /status and the audit log
    show it, and the round loop stops before its next round with that reason."""
    import asyncio

    from murmur.node.studies.approvals import withdraw

    node, h1, study = node_and_keys
    from dataclasses import replace

    gate = node.gate
    gate.config = replace(gate.config, study=replace(gate.config.study, required_approvals=1))
    peer = next(p for p in node.peers if p.name == "hospital_1")
    body = json.dumps([sign_approval(study, h1).to_json()]).encode()
    assert node.answer_approvals(body, peer) == (202, "accepted")
    assert node.gate.approval_lost() is None
    body = json.dumps([withdraw(study, h1).to_json()]).encode()
    assert node.answer_approvals(body, peer) == (202, "accepted")
    why = node.gate.approval_lost()
    assert why is not None and "fewer than the 1 required (withdrawn by hospital_1)" in why
    assert node.status()["study"]["withdrawn_by"] == ["hospital_1"]
    assert node.status()["study"]["approved_by"] == ["hospital_0"]

    asyncio.run(node.run_rounds(transport=None))  # halts before it needs a transport
    assert node.state.phase == "approval_withdrawn" and node.state.stop_detail == why
    node.audit.wait_durable(5)
    assert [r.fields["approver"] for r in records_of_kind(node.state_dir, "study_withdrawal")] == [
        "hospital_1"
    ]
    stopped = records_of_kind(node.state_dir, "study_stopped")
    assert stopped[-1].fields["detail"] == why

    # This operator's own withdrawal, handed over by the operator listener (sender None).
    own = load_identity(node.config.node.key_file)
    body = json.dumps([withdraw(study, own).to_json()]).encode()
    assert node.answer_approvals(body, None) == (202, "accepted")
    assert "this node's operator no longer approves study" in node.gate.approval_lost()
