"""The node's parts on their own, without HTTP: the durable files, the evidence book, the
receive pipeline, the aggregator's exclusions, the study, and the Byzantine wrapper; and the
shape rules between them (the API sees only `ServedNode`; no honest part knows of attacks)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from murmur.gossip.receipts import EquivocationProof, ReceiptBook
from murmur.gossip.spool import SpooledModel, spool_folder
from murmur.gossip.trust import TrustTracker
from murmur.gossip.wire import ModelUpdate, build_envelope
from murmur.models.params import state_sha256
from murmur.node.audit import AuditLog, records_of_kind
from murmur.node.byzantine import AttackSharing
from murmur.node.evidence import EvidenceBook
from murmur.node.metrics import NodeMetrics
from murmur.node.persistence import PRIVACY_INTENT_FILE, SIGNED_ROUND_FILE, STATUS_FILE, NodeStore
from murmur.node.served import ServedNode
from murmur.node.sharing import HonestSharing
from murmur.node.state import StartupError

from tests.netutil import REPO, build_node
from tests.test_receipts import conflicting
from tests.test_wire import ALICE, ALLOWLIST, BOB, small_update

# ---------------------------------------------------------------------------- persistence


def test_the_store_keeps_the_signed_round_and_the_privacy_intent(tmp_path: Path) -> None:
    store = NodeStore(tmp_path / "state")
    assert store.read_signed_round() == 0 and store.read_privacy_intent() == 0
    store.write_signed_round(4)
    store.write_privacy_intent(120)
    again = NodeStore(tmp_path / "state")
    assert again.last_signed_round == 0  # nothing is read until asked
    assert again.read_signed_round() == 4 and again.last_signed_round == 4
    assert again.read_privacy_intent() == 120
    assert json.loads((tmp_path / "state" / SIGNED_ROUND_FILE).read_text()) == {"round": 4}
    assert json.loads((tmp_path / "state" / PRIVACY_INTENT_FILE).read_text()) == {"steps": 120}


def test_a_corrupt_signed_round_file_stops_the_node_with_the_fix(tmp_path: Path) -> None:
    store = NodeStore(tmp_path)
    (tmp_path / SIGNED_ROUND_FILE).write_text("{not json")
    with pytest.raises(StartupError, match=r"corrupt.*Fix: restore it"):
        store.read_signed_round()


def test_status_is_replaced_whole_and_leaves_no_temporary_file(tmp_path: Path) -> None:
    store = NodeStore(tmp_path)
    store.write_status({"round": 1, "path": Path("/x")})
    store.write_status({"round": 2, "path": Path("/y")})
    assert json.loads((tmp_path / STATUS_FILE).read_text()) == {"round": 2, "path": "/y"}
    assert sorted(p.name for p in tmp_path.iterdir()) == [STATUS_FILE]


# ---------------------------------------------------------------------------- evidence


def evidence_book(tmp_path: Path) -> tuple[EvidenceBook, TrustTracker, AuditLog, list[int]]:
    trust = TrustTracker([p.name for p in ALLOWLIST])
    audit = AuditLog(tmp_path / "audit.sqlite", BOB)
    changes: list[int] = []
    book = EvidenceBook(
        ReceiptBook([p.public_key for p in ALLOWLIST]),
        allowlist=ALLOWLIST,
        trust=trust,
        audit=audit,
        metrics=NodeMetrics("bob"),
        current_round=lambda: 7,
        on_change=lambda: changes.append(1),
    )
    book.receipts.advance(7)
    return book, trust, audit, changes


def test_two_envelopes_for_one_round_become_one_proof_forwarded_once(tmp_path: Path) -> None:
    book, trust, audit, changes = evidence_book(tmp_path)
    first, second = conflicting(round_=7, sender=ALICE)
    book.check_envelope(first, accepted=True)
    assert trust.proven() == {} and not changes
    book.check_envelope(second, accepted=False)
    assert trust.proven() == {"alice": 7} and changes
    assert book.status()["proofs_learned"] == 1 and book.status()["pending_proofs"] == 1
    receipts, proofs = book.outgoing(8)
    assert receipts == [first]  # the accepted one, as round 8's envelope carries it
    assert proofs == [EquivocationProof.of(first, second)]
    assert book.outgoing(8)[1] == []  # each proof is forwarded once
    audit.close()
    (record,) = records_of_kind(tmp_path, "equivocation_proof")
    assert record.fields["peer"] == "alice" and record.fields["reported_by"] is None


def test_relayed_evidence_is_checked_before_it_counts(tmp_path: Path) -> None:
    book, trust, audit, _ = evidence_book(tmp_path)
    first, second = conflicting(round_=7, sender=ALICE)
    forged = dataclasses.replace(first, signature=bytes(64))
    book.take("carol", small_update(receipts=[forged]))
    assert book.status()["invalid_receipts"] == 1 and trust.proven() == {}
    proof = EquivocationProof.of(first, second)
    book.take("carol", small_update(proofs=[proof]))
    book.take("dave", small_update(proofs=[proof]))  # the same proof again: seen already
    assert trust.proven() == {"alice": 7} and book.status()["proofs_learned"] == 1
    audit.close()
    (record,) = records_of_kind(tmp_path, "equivocation_proof")
    assert record.fields["reported_by"] == "carol"


# ---------------------------------------------------------------------------- receiving


def peer_envelope(tmp_path: Path, node: Any, round_: int, seed: int) -> bytes:
    from murmur.crypto.identity import load_identity

    peer = load_identity(tmp_path / "keys" / "hospital_1.key")
    state = {k: v + seed for k, v in node.study.state().items()}
    update = ModelUpdate(state, metrics={})
    return build_envelope(update, peer, [node.identity.public_key], round_)


async def test_the_receive_pipeline_files_an_envelope_and_proves_a_second_one(
    tmp_path: Path,
) -> None:
    node = build_node(tmp_path, nodes=3)
    heard: list[tuple[int, int]] = []
    node.receiver.accepted_listeners.append(lambda r, body: heard.append((r, len(body))))
    try:
        first = peer_envelope(tmp_path, node, 1, seed=1)
        assert await node.receiver.receive(first) == (202, "accepted", "")
        assert heard == [(1, len(first))]
        assert node.inbox.offer("hospital_1", 1, None).value == "duplicate"  # it is filed
        status, reason, _ = await node.receiver.receive(peer_envelope(tmp_path, node, 1, seed=2))
        assert (status, reason) == (409, "duplicate")
        assert node.trust.proven() == {"hospital_1": 1}  # two envelopes, one round: a proof
        assert node.state.peers["hospital_1"]["proven_equivocation"] is True
        assert node.rejected["duplicate"] == 1 and len(heard) == 1
        status, reason, _ = await node.receiver.receive(b"junk")
        assert status >= 400 and node.rejected[reason] == 1
    finally:
        node.audit.close()


async def test_a_spooling_node_keeps_models_on_disk_and_aggregates_them_the_same(
    tmp_path: Path,
) -> None:
    """A node that spools (a large model's, here forced) files the model it received as a
    SpooledModel, aggregates it as it would the model in memory, and answers a spool it
    cannot write with 503 spool_failed, counted, without recording the envelope."""
    node = build_node(tmp_path, nodes=3)
    try:
        node.opener.spool = spool_folder(node.state_dir)
        data = peer_envelope(tmp_path, node, 1, seed=1)
        assert await node.receiver.receive(data) == (202, "accepted", "")
        collected = await node.inbox.collect(1, ["hospital_1"], 1.0, asyncio.Event())
        filed = collected.messages["hospital_1"]
        assert isinstance(filed.envelope.update.tensors, SpooledModel)
        own = node.study.state()
        in_memory = {k: v + 1 for k, v in own.items()}
        assert filed.model_sha256 == state_sha256(in_memory)
        spooled_result, _, _ = node.aggregator.aggregate(
            1, own, state_sha256(own), {"hospital_1": filed}
        )
        memory_result, _, _ = node.aggregator.aggregate(
            1, own, state_sha256(own), {"hospital_1": received(in_memory)}
        )
        for name in own:
            np.testing.assert_array_equal(spooled_result[name], memory_result[name])
        node.opener.spool = tmp_path / "gone"  # no such folder: the write fails
        second = peer_envelope(tmp_path, node, 2, seed=2)
        status, reason, _ = await node.receiver.receive(second)
        assert (status, reason) == (503, "spool_failed")
        assert node.rejected["spool_failed"] == 1
        node.opener.spool = None  # the same envelope is taken once the node can keep it
        assert await node.receiver.receive(second) == (202, "accepted", "")
    finally:
        node.audit.close()


# ---------------------------------------------------------------------------- aggregating


def received(state: dict[str, np.ndarray]) -> Any:
    """What the aggregator reads of a ReceivedUpdate: the tensors and their hash."""
    envelope = SimpleNamespace(update=SimpleNamespace(tensors=state))
    return SimpleNamespace(envelope=envelope, model_sha256=state_sha256(state))


def test_the_aggregator_leaves_out_ignored_and_proven_peers_and_says_why(
    tmp_path: Path,
) -> None:
    node = build_node(tmp_path, nodes=4)
    try:
        own = node.study.state()
        models = {f"hospital_{i}": {k: v + 0.01 * i for k, v in own.items()} for i in (1, 2, 3)}
        inbox = {name: received(state) for name, state in models.items()}
        node.trust.prove_equivocation("hospital_2", 1, 1, "00")
        node.aggregator.ignored = frozenset({"hospital_3"})
        new_state, new_sha, _ = node.aggregator.aggregate(1, own, state_sha256(own), inbox)
        assert new_sha == state_sha256(new_state) != state_sha256(own)
        (record,) = [r for r in node.audit.last(5) if r.kind == "aggregation"]
        assert [u["peer"] for u in record.fields["used"]] == ["hospital_1"]
        assert record.fields["excluded"] == [
            {
                "peer": "hospital_2",
                "model_sha256": inbox["hospital_2"].model_sha256,
                "reason": "proven_equivocation",
            }
        ]  # hospital_3 is not even mentioned: an attacker's colluder is never heard
        weights = node.aggregator.mixing_weights(["hospital_1"])
        assert weights.sum() == pytest.approx(1.0) and weights[0] > weights[1]
    finally:
        node.audit.close()


# ---------------------------------------------------------------------------- the study


def test_a_diverged_round_puts_the_model_back(tmp_path: Path, monkeypatch) -> None:
    node = build_node(tmp_path)
    study = node.study
    try:
        reference = study.state()

        def poisoned_round(start: dict[str, np.ndarray]) -> None:
            for parameter in study.model.parameters():  # what a blown-up step leaves
                parameter.data.fill_(float("nan"))

        monkeypatch.setattr(study.trainer, "train_round", poisoned_round)
        assert study.train_round(reference) is False
        assert state_sha256(study.state()) == state_sha256(reference)
        assert study.spend() == (0, 0.0) and study.steps_after_round() is None  # no DP here
        assert study.privacy_status() == {"enabled": False, "epsilon_spent": 0.0}
    finally:
        node.audit.close()


# ---------------------------------------------------------------------------- the adversary


def test_an_attacker_is_an_honest_node_with_its_outgoing_path_replaced(tmp_path: Path) -> None:
    honest = build_node(tmp_path / "honest", nodes=3)
    attacker = build_node(
        tmp_path / "attacker", nodes=3, adversary={"attack": "label_flip", "colluders": []}
    )
    try:
        assert honest.adversary is None and isinstance(honest.rounds.sharing, HonestSharing)
        assert honest.state.adversary is None and not honest.receiver.accepted_listeners
        assert attacker.adversary is not None
        assert isinstance(attacker.rounds.sharing, AttackSharing)
        assert attacker.state.adversary == attacker.adversary.status()
        assert attacker.receiver.accepted_listeners == [attacker.adversary.remember]
        assert honest.on_start == [] and len(attacker.on_start) == 1  # its loud warning
        # label flipping: the same rows, every training label flipped
        np.testing.assert_array_equal(attacker.data.x_train, honest.data.x_train)
        np.testing.assert_array_equal(attacker.data.y_train, 1 - honest.data.y_train)
        np.testing.assert_array_equal(attacker.data.y_test, honest.data.y_test)
    finally:
        honest.audit.close()
        attacker.audit.close()


HONEST_PARTS = [
    "aggregator.py",
    "evidence.py",
    "neighbours.py",
    "persistence.py",
    "receiver.py",
    "rounds.py",
    "sharing.py",
    "study.py",
]


@pytest.mark.parametrize("module", HONEST_PARTS)
def test_no_honest_part_knows_of_attacks(module: str) -> None:
    text = (REPO / "node" / module).read_text().lower()
    assert "adversary" not in text and "murmur.gossip.attacks" not in text


# ---------------------------------------------------------------------------- the API's view


def test_the_api_imports_no_node_and_the_node_serves_its_protocol(tmp_path: Path) -> None:
    code = "import sys, node.api; print('murmur.node.node' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "False"
    members = set(ServedNode.__annotations__) | {
        name for name in vars(ServedNode) if not name.startswith("_")
    }
    node = build_node(tmp_path)
    try:
        missing = [name for name in sorted(members) if not hasattr(node, name)]
        assert missing == []
        assert node.current_round == node.inbox.current_round
        assert node.audit.path == node.state_dir / "audit.sqlite"
    finally:
        node.audit.close()


# ---------------------------------------------------------------------------- neighbours


class ProbeAnswers:
    """A transport whose probes get fixed answers (HTTP status, reason) by peer name."""

    def __init__(self, answers: dict[str, tuple[int | None, str]]) -> None:
        self.answers = answers
        self.asked: list[str] = []

    async def probe(self, peer: Any, probe: bytes, timeout_s: float) -> Any:
        from murmur.gossip.probe import Contact

        self.asked.append(peer.name)
        status, reason = self.answers[peer.name]
        return Contact.from_answer(status, reason, "", source="probe")


async def test_a_round_waits_until_enough_neighbours_admit_the_node(tmp_path: Path) -> None:
    node = build_node(tmp_path, nodes=3, gossip={"min_neighbours": 2, "startup_timeout_s": 0.0})
    watch = node.neighbours
    try:
        refused = ProbeAnswers({"hospital_1": (200, "admitted"), "hospital_2": (None, "down")})
        waiting = asyncio.create_task(watch.wait_for_peers(refused, 1, starting=True))
        await asyncio.sleep(0.5)
        assert not waiting.done() and node.state.phase == "waiting_for_neighbours"
        assert set(refused.asked) == {"hospital_1", "hospital_2"}
        assert list(node.state.neighbours["waiting_for"]) == ["hospital_2"]
        refused.answers["hospital_2"] = (200, "admitted")  # it comes up
        assert await asyncio.wait_for(waiting, timeout=10) is True
        assert node.state.neighbours["counted"] == ["hospital_1", "hospital_2"]
        node.stop.set()
        assert await watch.wait_for_peers(refused, 2, starting=False) is False
    finally:
        node.audit.close()
    kinds = [r.kind for r in records_of_kind(node.state_dir, "waiting_for_neighbours")]
    assert kinds == ["waiting_for_neighbours"]  # audited once, however long it waited
