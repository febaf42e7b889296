"""Rollback is detected: the privacy budget belongs to the hospital's key, not to a folder.

Issue #15 item 3, reproduced: someone who can write a node's state directory (no key needed)
cuts its audit log back to an earlier signed head and puts back the earlier checkpoint and
intent files. The node would restart with the earlier epsilon, and `murmur audit verify` says
the log is intact. Here, with real ``HospitalNode`` round loops in one process (as
bench/byzantine.py runs them; envelopes really signed, encrypted and verified):

* that exact rollback makes the node refuse to start, naming the neighbour, round, sequence
  number and epsilon of its own signed claim; the intact state starts;
* a new state directory with the same key is refused the same way;
* an envelope whose signed head went backwards is refused by a neighbour, with the evidence in
  its audit log, /status and /metrics;
* ``murmur audit heads`` on a neighbour and ``murmur audit verify --peer-heads`` catch the
  cut-back log and pass the intact one.

Then the pieces: the head is covered by the signature (every bit), rollback proofs, the head
book, the POST /receipts exchange, the state-directory lock and the fsyncs.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import sqlite3
import stat
import struct
import sys
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
from murmur.crypto.identity import generate_identity, load_identity
from murmur.gossip.auth import request_headers
from murmur.gossip.heads import (
    REQUEST_BYTES,
    REQUEST_CONTENT_TYPE,
    HeadBook,
    HeadCheck,
    ReceiptsRequest,
    RequestError,
    RequestGuard,
    RollbackProof,
    check_request,
    open_receipts_answer,
    seal_receipts_answer,
)
from murmur.gossip.memory_transport import MemoryTransport
from murmur.gossip.receipts import (
    AuditHead,
    EquivocationProof,
    Receipt,
    ReceiptBook,
    ReceiptError,
    no_audit_head,
)
from murmur.gossip.wire import (
    ModelUpdate,
    RejectReason,
    _encode_body,
    _seal_envelope,
    build_envelope,
)
from murmur.models.params import get_state
from murmur.node import durable
from murmur.node.audit import AUDIT_FILE, AuditLog, records_of_kind, verify
from murmur.node.checkpoint import CHECKPOINT_FILE, NodeCheckpoint, save_checkpoint
from murmur.node.cli import main as murmur
from murmur.node.config import load_config
from murmur.node.durable import StateLock, StateLockError, atomic_write
from murmur.node.node import SIGNED_ROUND_FILE, HospitalNode, StartupError

import run_cluster
from tests.test_wire import ALICE, BOB, CAROL, MALLORY, NOW, opener, small_update

ROUNDS = 4
CUT_ROUND = 2  # the round whose state the "attacker" puts back
RESTORED_FILES = (CHECKPOINT_FILE, "privacy_intent.json", SIGNED_ROUND_FILE)


# --------------------------------------------------------------------------- the network


@dataclass
class Scenario:
    """Three DP hospitals after ROUNDS rounds; the victim's state in two variants."""

    run_dir: Path
    specs: list[run_cluster.NodeProcess]
    neighbours: list[HospitalNode]  # still open: they answer POST /receipts
    transport: MemoryTransport
    victim: str
    victim_key: bytes
    intact: Path  # the victim's state directory as the run left it
    rolled_back: Path  # the same, put back to its state after round CUT_ROUND
    cut_seq: int  # the signed head the rolled-back log ends at
    epsilon_cut: float
    epsilon_final: float
    last_head: AuditHead  # the head of the victim's round-ROUNDS envelope

    @property
    def victim_spec(self) -> run_cluster.NodeProcess:
        return self.specs[0]

    def install(self, variant: Path) -> Path:
        """Put ``variant`` in the victim's state directory (its config points there)."""
        target = self.victim_spec.state_dir
        shutil.rmtree(target)
        shutil.copytree(variant, target)
        return target

    def restart(self, variant: Path, **gossip: float) -> HospitalNode:
        self.install(variant)
        config = load_config(self.victim_spec.config_path)
        if gossip:
            config = dataclasses.replace(
                config, gossip=dataclasses.replace(config.gossip, **gossip)
            )
        return HospitalNode(config)


@pytest.fixture(scope="module")
def scenario(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scenario]:
    run_dir = tmp_path_factory.mktemp("rollback")
    args = run_cluster.parse_args(
        [
            "--dataset", "breast-cancer", "--nodes", "3", "--topology", "complete",
            "--rounds", str(ROUNDS), "--dp-epsilon", "1.0", "--aggregator", "mean",
            "--round-timeout", "30", "--seed", "0", "--quiet", "--out", str(run_dir),
        ]
    )  # fmt: skip
    specs, _ = run_cluster.write_network(args, run_dir)
    nodes = [HospitalNode(load_config(s.config_path)) for s in specs]
    by_address = {s.address: n for s, n in zip(specs, nodes, strict=True)}
    victim = nodes[0]
    saved = run_dir / "saved_at_cut"
    saved.mkdir()
    cut: dict[str, Any] = {}
    original_checkpoint = victim.rounds.checkpoint

    def checkpoint_and_copy(r: int) -> None:
        original_checkpoint(r)
        if r == CUT_ROUND:  # what an old backup of the state directory would hold
            for name in RESTORED_FILES:
                shutil.copy2(victim.state_dir / name, saved / name)
            cut["seq"] = victim.audit.head[0]  # signed right after, at the end of the round
            cut["epsilon"] = victim.ledger.epsilon_spent()

    victim.rounds.checkpoint = checkpoint_and_copy  # type: ignore[method-assign]

    async def run_all() -> None:
        await asyncio.gather(
            *(n.run_rounds(MemoryTransport(by_address, n.identity)) for n in nodes)
        )

    asyncio.run(run_all())
    last_head = nodes[1].rollback.heads.latest(victim.identity.public_key).head
    epsilon_final = victim.ledger.epsilon_spent()
    victim.audit.close()
    intact = run_dir / "variant_intact"
    shutil.copytree(victim.state_dir, intact)

    # The reviewer's rollback: the log cut back to the signed head of round CUT_ROUND, and
    # the checkpoint, intent and signed-round files of that time put back. No key needed.
    rolled_back = run_dir / "variant_rolled_back"
    shutil.copytree(victim.state_dir, rolled_back)
    with sqlite3.connect(rolled_back / AUDIT_FILE) as db:
        assert db.execute("SELECT count(*) FROM heads WHERE seq = ?", (cut["seq"],)).fetchone()[0]
        db.execute("DELETE FROM records WHERE seq > ?", (cut["seq"],))
        db.execute("DELETE FROM heads WHERE seq > ?", (cut["seq"],))
    for name in RESTORED_FILES:
        shutil.copy2(saved / name, rolled_back / name)

    yield Scenario(
        run_dir=run_dir,
        specs=specs,
        neighbours=nodes[1:],
        transport=MemoryTransport(by_address, victim.identity),
        victim=specs[0].name,
        victim_key=victim.identity.public_key,
        intact=intact,
        rolled_back=rolled_back,
        cut_seq=cut["seq"],
        epsilon_cut=cut["epsilon"],
        epsilon_final=epsilon_final,
        last_head=last_head,
    )
    for node in nodes[1:]:
        node.audit.close()


def test_the_rolled_back_log_still_verifies_on_its_own(scenario: Scenario) -> None:
    """The problem as reported: nothing inside the directory shows the rollback."""
    result = verify(scenario.rolled_back, scenario.victim_key)
    assert result.ok and result.last_seq == scenario.cut_seq
    assert scenario.epsilon_cut < scenario.epsilon_final  # and it forgets budget it spent


def test_a_clean_run_keeps_every_peer_head_and_refuses_nothing(scenario: Scenario) -> None:
    for node in scenario.neighbours:
        status = node.status()
        assert "rollback" not in status["rejected"], status["rejected"]
        assert status["rollback"]["proven"] == {}
        held = node.rollback.heads.latest(scenario.victim_key)
        assert held is not None and held.round == ROUNDS and held.head == scenario.last_head
        # Every accepted envelope's receipt is in the receiver's audit log, heads in order.
        received = [
            Receipt.decode(bytes.fromhex(r.fields["receipt"]))
            for r in records_of_kind(node.state_dir, "message_received")
            if r.fields.get("sender") == scenario.victim and r.fields["accepted"]
        ]
        assert [r.round for r in received] == list(range(1, ROUNDS + 1))
        assert all(r.verify() and r.sender == scenario.victim_key for r in received)
        steps = [r.head.dp_steps for r in received]
        seqs = [r.head.audit_seq for r in received]
        assert steps == sorted(steps) and steps[0] > 0 and len(set(steps)) == ROUNDS
        assert seqs == sorted(seqs) and len(set(seqs)) == ROUNDS  # one signed head a round
        assert received[-1].head.epsilon == pytest.approx(scenario.epsilon_final)


async def test_the_rolled_back_node_refuses_to_start_naming_the_evidence(
    scenario: Scenario,
) -> None:
    node = scenario.restart(scenario.rolled_back)
    try:
        assert node.next_round == CUT_ROUND + 1  # it would resume from the old checkpoint
        assert node.ledger.epsilon_spent() == pytest.approx(scenario.epsilon_cut)
        with pytest.raises(StartupError) as refused:
            await node.check_own_receipts(scenario.transport)
    finally:
        node.audit.close()
    text = str(refused.value)
    head = scenario.last_head
    assert "older than what it already signed" in text
    assert any(n.config.node.name in text for n in scenario.neighbours)
    assert f"round {ROUNDS}" in text and f"seq {head.audit_seq}" in text
    assert f"epsilon {head.epsilon:.4f}" in text and f"{head.dp_steps} DP steps" in text
    assert f"last signed round is {CUT_ROUND}" in text
    assert f"audit log ends before record {head.audit_seq}" in text
    assert f"spent epsilon {scenario.epsilon_cut:.4f}" in text
    refusal = records_of_kind(scenario.victim_spec.state_dir, "startup_refused")
    assert len(refusal) == 1 and Receipt.decode(bytes.fromhex(refusal[0].fields["receipt"]))
    checks = records_of_kind(scenario.victim_spec.state_dir, "rollback_check")
    assert checks[-1].fields["outcome"] == "refused"


async def test_the_intact_state_starts(scenario: Scenario) -> None:
    node = scenario.restart(scenario.intact)
    try:
        await node.check_own_receipts(scenario.transport)
        assert node.rollback.startup_check["outcome"] == "ok"
        assert node.rollback.startup_check["answered"] == sorted(
            n.config.node.name for n in scenario.neighbours
        )
        assert node.rollback.startup_check["newest"]["round"] == ROUNDS
        assert node.status()["rollback"]["startup_check"]["outcome"] == "ok"
    finally:
        node.audit.close()
    for neighbour in scenario.neighbours:  # each answered and audited the request
        asked = records_of_kind(neighbour.state_dir, "receipts_request")
        assert any(
            r.fields["requester"] == scenario.victim and r.fields["outcome"] == "answered"
            for r in asked
        )
        assert neighbour.status()["rollback"]["receipts_requests"]["answered"] >= 1


async def test_a_fresh_state_directory_with_the_same_key_is_refused(scenario: Scenario) -> None:
    spec = scenario.victim_spec
    doc = tomllib.loads(spec.config_path.read_text())
    doc["node"]["state_dir"] = str(scenario.run_dir / "fresh_state")
    config_path = scenario.run_dir / "fresh.toml"
    config_path.write_text(run_cluster.to_toml(doc))
    node = HospitalNode(load_config(config_path))
    try:
        assert node.ledger.steps_taken == 0
        with pytest.raises(StartupError) as refused:
            await node.check_own_receipts(scenario.transport)
    finally:
        node.audit.close()
    text = str(refused.value)
    assert "last signed round is 0" in text and "0 DP steps" in text
    assert f"round {ROUNDS}" in text and "retire the key" in text


async def test_no_answer_within_the_wait_starts_with_a_loud_warning(
    scenario: Scenario, caplog: pytest.LogCaptureFixture
) -> None:
    node = scenario.restart(scenario.rolled_back, startup_timeout_s=0.3)
    try:
        with caplog.at_level(logging.WARNING):
            await node.check_own_receipts(MemoryTransport({}, node.identity))  # all are down
        assert node.rollback.startup_check["outcome"] == "no_answer"
        assert set(node.rollback.startup_check["unanswered"]) == {
            n.config.node.name for n in scenario.neighbours
        }
        assert node.rollback.startup_check["seconds"] < 5
    finally:
        node.audit.close()
    assert "ROLLBACK CHECK INCOMPLETE" in caplog.text


async def test_a_neighbour_refuses_an_envelope_whose_head_went_back(scenario: Scenario) -> None:
    """If the rolled-back node started anyway (no neighbour answered), it catches up with its
    neighbours and signs a later round with its old head: they refuse it, with the proof, and
    refuse it for good. Signing again a round it had signed is an equivocation instead."""
    node = scenario.restart(scenario.rolled_back)
    receiver, other = scenario.neighbours
    try:
        stale_head = node.own_head()
        assert stale_head.audit_seq == scenario.cut_seq
        update = ModelUpdate(get_state(node.model))
        key = [receiver.identity.public_key]
        envelope = build_envelope(update, node.identity, key, ROUNDS + 1, head=stale_head)
        status, reason, detail = await receiver.receive(envelope)
        assert (status, reason) == (409, "rollback")
        assert f"older than its round-{ROUNDS} envelope" in detail and "audit_seq" in detail
        # Even a head ahead of everything is refused now: the peer's ledger is not to be
        # believed any more (its operators must restore its newest state, or use a new key).
        ahead = AuditHead(10**6, bytes(32), 10**6, 99.0)
        later = build_envelope(update, node.identity, key, ROUNDS + 2, head=ahead)
        assert (await receiver.receive(later))[1] == "rollback"
        # Round CUT_ROUND + 1 again, as the restored node would sign it: an equivocation.
        again = build_envelope(
            update, node.identity, [other.identity.public_key], CUT_ROUND + 1, head=stale_head
        )
        assert (await other.receive(again))[1] == "old_round"
        assert other.trust.proven() == {scenario.victim: CUT_ROUND + 1}
        # Asked at a restart, the receiver hands back the newest receipt and the proof's.
        request = ReceiptsRequest.make(node.identity, receiver.identity.public_key, time.time())
        status, _, answer = receiver.answer_receipts_request(request.encode())
        got, _ = open_receipts_answer(node.identity, request, answer)
        assert status == 200 and [r.round for r in got] == [ROUNDS + 2, ROUNDS]
    finally:
        node.audit.close()
    victim = scenario.victim
    status_page = receiver.status()
    proven = status_page["rollback"]["proven"][victim]
    assert set(proven["regressions"]) == {"audit_seq", "dp_steps", "epsilon"}
    assert proven["earlier"]["round"] == ROUNDS and proven["later"]["round"] == ROUNDS + 1
    assert status_page["peers"][victim]["rolled_back"] is True
    assert status_page["rejected"]["rollback"] == 2
    metrics = receiver.metrics.render().decode()
    assert f'murmur_rollback_detected_total{{peer="{victim}"}} 2.0' in metrics
    assert 'murmur_messages_rejected_total{reason="rollback"} 2.0' in metrics
    (record,) = records_of_kind(receiver.state_dir, "rollback_detected")
    proof = RollbackProof.decode(b"".join(bytes.fromhex(h) for h in record.fields["receipts"]))
    assert proof.verify() and proof.sender == scenario.victim_key  # anyone can check it
    assert record.fields["later"]["audit_seq"] == scenario.cut_seq
    # The proof, and the high-water head (the furthest the peer ever signed, refused or
    # not), survive the neighbour's checkpoint.
    keys = [p.public_key for p in receiver.peers]
    restored = HeadBook.from_state(json.loads(json.dumps(receiver.rollback.heads.to_state())), keys)
    assert restored.proof(scenario.victim_key) == proof
    assert restored.latest(scenario.victim_key).round == ROUNDS + 2


async def test_the_receipts_route_answers_only_the_requester_and_refuses_bad_requests(
    scenario: Scenario,
) -> None:
    from aiohttp.test_utils import TestClient, TestServer
    from murmur.node.api import build_peer_app

    node = scenario.neighbours[1]
    victim = load_identity(scenario.run_dir / "keys" / f"{scenario.victim}.key")
    other = scenario.neighbours[0].identity  # admitted too
    own_key = node.identity.public_key
    before = dict(node.status()["rollback"]["receipts_requests"])
    rejected_before = dict(node.rejected)

    def signed(body: bytes, by: Any = victim) -> dict[str, str]:
        return request_headers(by, own_key, "/receipts", body, REQUEST_CONTENT_TYPE)

    async with TestClient(TestServer(build_peer_app(node))) as client:
        request = ReceiptsRequest.make(victim, own_key, time.time())
        body = request.encode()
        response = await client.post("/receipts", data=body, headers=signed(body))
        assert response.status == 200
        assert response.content_type == "application/x-murmur-receipts"
        receipts, ignored = open_receipts_answer(victim, request, await response.read())
        assert ignored == 0 and [r.round for r in receipts] == [ROUNDS]
        assert receipts[0].sender == scenario.victim_key and receipts[0].verify()
        from_mallory = ReceiptsRequest.make(MALLORY, own_key, time.time()).encode()
        victims = ReceiptsRequest.make(victim, own_key, time.time()).encode()
        cases = [
            (b"x" * 10, victim, 400, "malformed"),
            (b"\x00" * 50_000, victim, 413, "too_large"),  # from Content-Length, before auth
            (from_mallory, victim, 403, "unknown_sender"),
            (from_mallory, MALLORY, 401, "unauthenticated"),  # refused before the body
            (victims, other, 403, "sender_mismatch"),  # a neighbour posting another's request
            (request.encode(), victim, 409, "replay"),
            (ReceiptsRequest.make(victim, victim.public_key, time.time()).encode(), victim,
             421, "wrong_recipient"),
        ]  # fmt: skip
        for body, poster, status, reason in cases:
            response = await client.post("/receipts", data=body, headers=signed(body, poster))
            assert response.status == status, (reason, await response.text())
            assert (await response.json())["reason"] == reason
        response = await client.post("/receipts", data=victims)  # no Murmur-Auth at all
        assert (response.status, (await response.json())["reason"]) == (401, "unauthenticated")
        assert (await client.get("/health")).status == 200  # and it keeps serving
    after = node.status()["rollback"]["receipts_requests"]
    assert after["answered"] == before.get("answered", 0) + 1
    for reason in ("malformed", "unknown_sender", "sender_mismatch", "replay", "wrong_recipient"):
        assert after[reason] == before.get(reason, 0) + 1, reason
    # What the HTTP layer refused never reached the route: counted with the listener's codes.
    assert node.rejected["too_large"] == rejected_before.get("too_large", 0) + 1
    assert node.rejected["unauthenticated"] == rejected_before.get("unauthenticated", 0) + 2
    assert node.state.unauthenticated["unknown_sender"] >= 1
    assert node.state.unauthenticated["missing"] >= 1
    metrics = node.metrics.render().decode()
    assert 'murmur_receipts_requests_total{outcome="sender_mismatch"}' in metrics
    assert 'murmur_unauthenticated_requests_total{why="missing"}' in metrics


def test_audit_verify_against_peer_heads_catches_the_cut_back_log(
    scenario: Scenario, capsys: pytest.CaptureFixture[str]
) -> None:
    # The neighbour that saw no made-up head (the other one was sent one in a test above: a
    # head the victim's log never had, which verify would rightly report).
    holder = scenario.neighbours[1]
    heads_file = scenario.run_dir / "heads_of_victim.json"
    args = ["audit", "heads", "--state", str(holder.state_dir), "--of", scenario.victim]
    assert murmur([*args, "--out", str(heads_file)]) == 0
    exported = json.loads(heads_file.read_text())
    rounds = [e["round"] for e in exported["receipts"]]
    assert sorted(set(rounds)) == list(range(1, ROUNDS + 1)) and rounds == sorted(rounds)
    assert exported["of"]["public_key"] == scenario.victim_key.hex()
    by_key = ["audit", "heads", "--state", str(holder.state_dir), "--of", scenario.victim_key.hex()]
    assert murmur(by_key) == 0
    assert json.loads(capsys.readouterr().out)["receipts"] == exported["receipts"]

    pub = str(scenario.run_dir / "keys" / f"{scenario.victim}.pub")
    verify_args = ["audit", "verify", "--public-key", pub, "--peer-heads", str(heads_file)]
    assert murmur([*verify_args, "--state", str(scenario.intact)]) == 0
    assert f"all {len(rounds)} checked heads are in this log" in capsys.readouterr().out

    assert murmur([*verify_args, "--state", str(scenario.rolled_back)]) == 1
    out = capsys.readouterr().out
    assert "audit log OK" in out  # on its own it verifies...
    assert "FAILED against peer heads" in out  # ...but not against what the peers hold
    assert f"head seq {scenario.last_head.audit_seq}" in out and "cut back" in out
    assert f"round-{ROUNDS} envelope" in out

    # An edited heads file cannot claim a head the node never signed: only receipts count.
    forged = json.loads(heads_file.read_text())
    receipt = Receipt.decode(bytes.fromhex(forged["receipts"][-1]["receipt"]))
    head = dataclasses.replace(receipt.head, audit_seq=receipt.head.audit_seq + 10**6)
    forged["receipts"] = [{"receipt": dataclasses.replace(receipt, head=head).to_hex()}]
    forged_file = scenario.run_dir / "forged_heads.json"
    forged_file.write_text(json.dumps(forged))
    intact_args = ["audit", "verify", "--state", str(scenario.intact), "--public-key", pub]
    assert murmur([*intact_args, "--peer-heads", str(forged_file)]) == 0
    assert "signature does not verify" in capsys.readouterr().out


def test_heads_seen_after_the_last_checkpoint_survive_a_crash(scenario: Scenario) -> None:
    """The head book is in the checkpoint, and every authentic envelope's receipt is in the
    audit log at once: a node killed before its next checkpoint still knows the newest head."""
    holder = scenario.neighbours[0]
    peer = load_identity(scenario.run_dir / "keys" / f"{holder.config.node.name}.key")
    node = scenario.restart(scenario.intact)
    try:
        assert node.rollback.heads.latest(peer.public_key).round == ROUNDS
        ahead = AuditHead(10**5, bytes(32), 10**5, 5.0)
        update = ModelUpdate(get_state(node.model))
        envelope = build_envelope(update, peer, [node.identity.public_key], ROUNDS + 1, head=ahead)
        assert asyncio.run(node.receive(envelope))[1] == "too_far_ahead"  # refused, authentic
    finally:
        node.audit.close()  # "killed": no checkpoint after it
    again = HospitalNode(load_config(scenario.victim_spec.config_path))
    try:
        latest = again.rollback.heads.latest(peer.public_key)
        assert latest.round == ROUNDS + 1 and latest.head == ahead
    finally:
        again.audit.close()


def test_node_state_files_are_fsynced_with_their_directory(
    scenario: Scenario, monkeypatch: pytest.MonkeyPatch
) -> None:
    node = scenario.restart(scenario.intact)
    try:
        events = record_syscalls(monkeypatch)
        node.store.write_signed_round(node.last_signed_round)
        node.rounds.write_privacy_intent()
        node._checkpoint(node.next_round - 1)
    finally:
        monkeypatch.undo()
        node.audit.close()
    for name in (SIGNED_ROUND_FILE, "privacy_intent.json", CHECKPOINT_FILE):
        assert_durable_replace(events, node.state_dir / name)


# --------------------------------------------------------------------------- wire and receipts


def head_of(seq: int, steps: int, epsilon: float, tag: bytes = b"") -> AuditHead:
    return AuditHead(seq, hashlib.sha256(b"%d" % seq + tag).digest(), steps, epsilon)


def signed_receipt(identity, round_: int, head: AuditHead, rest: bytes | None = None) -> Receipt:
    """What ``identity`` signs for one envelope, without building the envelope."""
    rest = rest if rest is not None else hashlib.sha256(b"rest %d" % round_).digest()
    unsigned = Receipt(3, "update", identity.public_key, round_, head, rest, bytes(64))
    return dataclasses.replace(unsigned, signature=identity.sign(unsigned.signed_digest()))


def test_the_signature_covers_every_bit_of_the_head() -> None:
    head = AuditHead(41, bytes(range(32)), 1234, 0.7)
    data = build_envelope(small_update(), ALICE, [BOB.public_key], 7, head=head, now=NOW)
    receipt = opener().open(data, now=NOW).receipt
    assert receipt.head == head and receipt.verify()
    encoded = head.encode()
    for bit in range(len(encoded) * 8):
        flipped = bytearray(encoded)
        flipped[bit // 8] ^= 1 << (bit % 8)
        try:
            tampered = dataclasses.replace(receipt, head=AuditHead.decode(bytes(flipped)))
        except ReceiptError:
            continue  # not even a head (e.g. a NaN or negative epsilon)
        assert not tampered.verify(), bit
        assert not Receipt.decode(tampered.encode()).verify(), bit


def test_the_head_travels_encrypted_and_must_match_what_was_signed() -> None:
    head = AuditHead(41, b"\xab" * 32, 987654, 0.7)
    data = build_envelope(small_update(), ALICE, [BOB.public_key], 7, head=head, now=NOW)
    assert head.encode() not in data and b"\xab" * 32 not in data
    assert struct.pack(">Q", 987654) not in data  # DP steps would reveal the set's size
    fields = msgpack.unpackb(data)
    assert fields["head_digest"] == head.digest()
    # A body whose head is not the one signed: authentic, but refused before it is used.
    other = dataclasses.replace(head, dp_steps=1)
    body = _encode_body(small_update(), other)
    mismatched = _seal_envelope(
        body, ALICE, [BOB.public_key], 7, head_digest=head.digest(), now=NOW
    )
    with pytest.raises(Exception) as refused:
        opener().open(mismatched, now=NOW)
    assert refused.value.reason == RejectReason.MALFORMED and "audit head" in str(refused.value)


def test_the_audit_head_layout_is_the_documented_one() -> None:
    """docs/protocol.md, "The audit head": a second implementation must agree byte for byte."""
    head = AuditHead(2**40 + 5, bytes(range(100, 132)), 77, 0.41)
    expected = (
        (2**40 + 5).to_bytes(8, "big") + bytes(range(100, 132)) + (77).to_bytes(8, "big")
        + bytes.fromhex("3fda3d70a3d70a3d")  # 0.41 as IEEE 754 binary64, big-endian
    )  # fmt: skip
    assert head.encode() == expected and AuditHead.decode(expected) == head
    assert head.digest() == hashlib.sha256(b"murmur-envelope-head\x00" + expected).digest()
    assert no_audit_head().encode() == bytes(56)
    for bad in (
        {"audit_seq": -1},
        {"audit_seq": 2**63},
        {"dp_steps": 1.5},
        {"audit_hash": b"x" * 31},
        {"epsilon": float("inf")},
        {"epsilon": -0.0},
        {"epsilon": 1},  # an int: the wire type is float64
    ):
        with pytest.raises(ReceiptError):
            dataclasses.replace(head, **bad)


def test_two_receipts_that_differ_only_in_the_head_are_an_equivocation() -> None:
    rest = hashlib.sha256(b"one envelope's other fields").digest()
    a = signed_receipt(ALICE, 5, head_of(10, 30, 0.3), rest)
    b = signed_receipt(ALICE, 5, head_of(12, 30, 0.3), rest)
    proof = EquivocationProof.of(a, b)
    assert proof.verify() and EquivocationProof.decode(proof.encode()) == proof
    book = ReceiptBook([ALICE.public_key])
    book.advance(5)
    assert book.check(a) is None and book.check(b) == proof


def test_rollback_proofs_need_a_later_round_behind_an_earlier_one() -> None:
    earlier = signed_receipt(ALICE, 4, head_of(90, 60, 0.70))
    later = signed_receipt(ALICE, 5, head_of(51, 36, 0.41))
    proof = RollbackProof.of(later, earlier)  # either order in
    assert (proof.earlier, proof.later) == (earlier, later)
    assert proof.regressions == ["audit_seq", "dp_steps", "epsilon"] and proof.verify()
    assert RollbackProof.decode(proof.encode()) == proof
    evidence = proof.evidence()
    assert evidence["earlier"]["audit_seq"] == 90 and evidence["later"]["epsilon"] == 0.41
    # Each component alone is enough; the same seq with another hash is another log.
    for head in (
        head_of(89, 60, 0.70),
        head_of(95, 59, 0.70),
        head_of(95, 60, 0.69),
        head_of(90, 60, 0.70, tag=b"forked"),
    ):
        assert RollbackProof.of(earlier, signed_receipt(ALICE, 6, head)).verify()
    not_rollbacks = [
        signed_receipt(ALICE, 5, head_of(95, 66, 0.74)),  # progress
        signed_receipt(ALICE, 5, head_of(90, 60, 0.70 - 1e-9)),  # same spend, recomputed
        signed_receipt(ALICE, 4, head_of(51, 36, 0.41)),  # same round: an equivocation
        signed_receipt(BOB, 5, head_of(51, 36, 0.41)),  # someone else
    ]
    for other in not_rollbacks:
        with pytest.raises(ReceiptError):
            RollbackProof.of(earlier, other)
    # Forged or reordered proofs do not verify.
    forged = dataclasses.replace(later, signature=MALLORY.sign(later.signed_digest()))
    assert not RollbackProof(earlier, forged).verify()
    assert not RollbackProof(later, earlier).verify()
    with pytest.raises(ReceiptError, match="signing order"):
        RollbackProof.decode(later.encode() + earlier.encode())


def test_the_head_book_keeps_the_newest_head_and_proves_a_rollback() -> None:
    book = HeadBook.for_senders([ALICE.public_key, CAROL.public_key])
    r1 = signed_receipt(ALICE, 1, head_of(0, 6, 0.2))
    r2 = signed_receipt(ALICE, 2, head_of(20, 12, 0.3))
    r3 = signed_receipt(ALICE, 3, head_of(40, 18, 0.4))
    assert book.observe(r1) == (HeadCheck.FIRST, None)
    assert book.observe(r2) == (HeadCheck.ADVANCED, None)
    assert book.observe(r2) == (HeadCheck.SAME, None)
    assert book.observe(r1) == (HeadCheck.OLDER, None)  # a late envelope, consistent
    assert book.observe(r3) == (HeadCheck.ADVANCED, None)
    back = signed_receipt(ALICE, 4, head_of(20, 12, 0.3, tag=b"again"))
    check, proof = book.observe(back)
    assert check is HeadCheck.ROLLBACK and proof is not None and proof.verify()
    assert (proof.earlier, proof.later) == (r3, back)
    assert book.latest(ALICE.public_key) == r3  # the high-water mark stays
    assert book.proof(ALICE.public_key) is proof
    # An *older* round whose head is ahead of the newest: the newest was the rolled-back one.
    book2 = HeadBook.for_senders([ALICE.public_key])
    book2.observe(back)
    check, proof2 = book2.observe(r3)
    assert check is HeadCheck.ROLLBACK and (proof2.earlier, proof2.later) == (r3, back)
    # Senders not on the list are never kept (bounded memory).
    assert book.observe(signed_receipt(MALLORY, 9, head_of(1, 1, 0.1))) == (HeadCheck.OLDER, None)
    assert book.latest(MALLORY.public_key) is None
    # State round trip; entries whose signatures do not verify are dropped on restore.
    state = json.loads(json.dumps(book.to_state()))
    restored = HeadBook.from_state(state, [ALICE.public_key])
    assert restored.latest(ALICE.public_key) == r3 and restored.proof(ALICE.public_key) == proof
    forged = dataclasses.replace(r3, signature=bytes(64)).to_hex()
    dropped = HeadBook.from_state({**state, "latest": [forged], "proofs": []}, [ALICE.public_key])
    assert dropped.latest(ALICE.public_key) is None
    with pytest.raises(ValueError, match="not a HeadBook state"):
        HeadBook.from_state({"version": 9}, [])


# --------------------------------------------------------------------------- POST /receipts


def test_a_receipts_request_is_signed_addressed_fresh_and_used_once() -> None:
    keys = [ALICE.public_key, CAROL.public_key]
    guard = RequestGuard(window_s=300, max_per_window=3)

    def check(data: bytes, now: float = NOW) -> ReceiptsRequest:
        return check_request(
            data, own_key=BOB.public_key, known_senders=keys, guard=guard, now=now, window_s=300
        )

    def refused(data: bytes, now: float = NOW) -> str:
        with pytest.raises(RequestError) as caught:
            check(data, now)
        assert RejectReason(caught.value.reason)  # every refusal is a wire reason code
        return caught.value.reason

    request = ReceiptsRequest.make(ALICE, BOB.public_key, NOW)
    data = request.encode()
    assert len(data) == REQUEST_BYTES == 186
    # The documented layout: version, requester, responder, timestamp_ms, nonce, study,
    # signature (the study all zero for a node without one).
    assert data[:2] == (5).to_bytes(2, "big") and data[2:34] == ALICE.public_key
    assert data[34:66] == BOB.public_key and data[66:74] == int(NOW * 1000).to_bytes(8, "big")
    assert data[90:122] == bytes(32) and request.study_id is None
    signed = hashlib.sha256(b"murmur-receipts-request\x00" + data[:122]).digest()
    assert ALICE.signing_key.verify_key.verify(signed, data[122:])
    assert check(data) == request
    assert refused(data) == "replay"
    assert refused(ReceiptsRequest.make(MALLORY, BOB.public_key, NOW).encode()) == "unknown_sender"
    assert refused(ReceiptsRequest.make(ALICE, CAROL.public_key, NOW).encode()) == (
        "wrong_recipient"
    )
    assert refused(ReceiptsRequest.make(ALICE, BOB.public_key, NOW - 301).encode()) == "stale"
    flipped = bytearray(ReceiptsRequest.make(ALICE, BOB.public_key, NOW).encode())
    flipped[80] ^= 1  # in the nonce
    assert refused(bytes(flipped)) == "bad_signature"
    assert refused(data[:-1]) == "malformed"
    assert refused(data + b"\x00") == "too_large"
    assert refused(b"\x00\x03" + data[2:]) == "unsupported_version"
    check(ReceiptsRequest.make(ALICE, BOB.public_key, NOW).encode())
    check(ReceiptsRequest.make(ALICE, BOB.public_key, NOW).encode())
    assert refused(ReceiptsRequest.make(ALICE, BOB.public_key, NOW).encode()) == "rate_limited"
    check(ReceiptsRequest.make(CAROL, BOB.public_key, NOW).encode())  # per requester
    check(ReceiptsRequest.make(ALICE, BOB.public_key, NOW + 301).encode(), now=NOW + 301)


def test_the_answer_is_for_the_requester_only_and_carries_only_its_receipts() -> None:
    request = ReceiptsRequest.make(ALICE, BOB.public_key, NOW)
    own = signed_receipt(ALICE, 4, head_of(90, 60, 0.7))
    someone_else = signed_receipt(CAROL, 4, head_of(9, 6, 0.1))
    answer = seal_receipts_answer(BOB, request, [someone_else, own])
    assert own.encode() not in answer  # sealed: an observer learns nothing of the spend
    assert open_receipts_answer(ALICE, request, answer) == ([own], 0)
    with pytest.raises(RequestError) as caught:
        open_receipts_answer(CAROL, request, answer)  # not readable by anyone else
    assert caught.value.reason == "decrypt_failed"
    # Bound to its request (the nonce is associated data) and to the neighbour asked (its
    # static key wraps the body key): a copy for another request, or from someone else, fails.
    other_request = ReceiptsRequest.make(ALICE, BOB.public_key, NOW)
    for wrong_request, wrong_answer in (
        (other_request, answer),
        (request, seal_receipts_answer(CAROL, request, [own])),
    ):
        with pytest.raises(RequestError) as caught:
            open_receipts_answer(ALICE, wrong_request, wrong_answer)
        assert caught.value.reason == "decrypt_failed"
    # A neighbour cannot frame the requester: receipts that do not verify are ignored.
    forged = dataclasses.replace(own, head=head_of(900, 600, 7.0))
    forged_answer = seal_receipts_answer(BOB, request, [forged])
    assert open_receipts_answer(ALICE, request, forged_answer) == ([], 1)
    for bad in (b"", b"\xc1", msgpack.packb({"version": 4}), b"\x00" * 10_000):
        with pytest.raises(RequestError):
            open_receipts_answer(ALICE, request, bad)


# --------------------------------------------------------------------------- Task B: lock, fsync


def test_a_second_open_of_the_state_lock_is_refused_naming_the_holder(tmp_path: Path) -> None:
    first = StateLock(tmp_path / "state").acquire()
    assert (tmp_path / "state" / durable.LOCK_FILE).read_text().strip() == str(os.getpid())
    with pytest.raises(StateLockError) as refused:
        StateLock(tmp_path / "state").acquire()
    assert f"PID {os.getpid()}" in str(refused.value)
    first.release()
    with StateLock(tmp_path / "state") as again:  # released: the next node may start
        assert again.held


def record_syscalls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, Any]]:
    """Record fsync (of a file or a directory, by path) and os.replace, in order."""
    events: list[tuple[str, Any]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        mode = os.fstat(fd).st_mode
        path = Path(os.readlink(f"/proc/self/fd/{fd}"))
        events.append(("fsync_dir" if stat.S_ISDIR(mode) else "fsync_file", path))
        real_fsync(fd)

    def replace(src: Any, dst: Any) -> None:
        events.append(("replace", (Path(src), Path(dst))))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    return events


def assert_durable_replace(events: list[tuple[str, Any]], target: Path) -> None:
    """The temporary file was fsynced, renamed onto ``target``, then the directory fsynced."""
    renames = [i for i, (kind, arg) in enumerate(events) if kind == "replace" and arg[1] == target]
    assert renames, f"{target.name} was not replaced atomically: {events}"
    at = renames[-1]
    tmp = events[at][1][0]
    assert tmp.parent == target.parent and tmp.name.endswith(".tmp")
    assert ("fsync_file", tmp) in events[:at], f"{tmp} not fsynced before the rename"
    assert ("fsync_dir", target.parent) in events[at + 1 :], "directory not fsynced after rename"


def test_atomic_write_and_checkpoints_fsync_the_file_then_the_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    events = record_syscalls(monkeypatch)
    atomic_write(tmp_path / "signed_round.json", b'{"round": 3}')
    ckpt = NodeCheckpoint(1, {"w": np.zeros(3, np.float32)}, b"", {}, {}, "0" * 64)
    save_checkpoint(tmp_path, ckpt)
    monkeypatch.undo()
    assert_durable_replace(events, tmp_path / "signed_round.json")
    assert_durable_replace(events, tmp_path / CHECKPOINT_FILE)
    assert (tmp_path / "signed_round.json").read_bytes() == b'{"round": 3}'
    assert sorted(p.name for p in tmp_path.iterdir()) == [CHECKPOINT_FILE, "signed_round.json"]


def test_a_failed_write_leaves_the_old_file_and_no_temporary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "privacy_intent.json"
    atomic_write(target, b'{"steps": 5}')

    def fail(fd: int) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", fail)
    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, b'{"steps": 10}')
    monkeypatch.undo()
    assert target.read_bytes() == b'{"steps": 5}'
    assert [p.name for p in tmp_path.iterdir()] == [target.name]


def test_the_audit_log_claims_only_durable_heads(tmp_path: Path) -> None:
    identity = generate_identity("hospital_a")
    with AuditLog(tmp_path / AUDIT_FILE, identity) as log:
        seq0, hash0 = log.durable_head
        assert seq0 == 0 and log.position(seq0, hash0) == "contained"  # the genesis point
        log.append("node_start", 1, config_sha256="0" * 64)
        log.sign_head()
        assert log.wait_durable(timeout=30)
        seq, digest = log.durable_head
        assert (seq, digest.hex()) == log.head
        assert log.position(seq, digest) == "contained"
        assert log.position(seq, b"\x00" * 32) == "mismatch"
        assert log.position(seq + 5, digest) == "beyond_end"
    with AuditLog(tmp_path / AUDIT_FILE, identity) as log:  # read back after a restart
        assert log.durable_head == (seq, digest)


_HOLD_LOCK = """
import sys, time
from murmur.node.durable import StateLock
lock = StateLock(sys.argv[1]).acquire()
print("locked", flush=True)
time.sleep(60)
"""


def test_a_second_process_on_the_state_directory_is_refused(tmp_path: Path) -> None:
    """Two real processes: the holder's PID is named, and its death frees the directory."""
    import subprocess

    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD_LOCK, str(tmp_path)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        with pytest.raises(StateLockError, match=f"PID {holder.pid}"):
            StateLock(tmp_path).acquire()
    finally:
        holder.kill()
        holder.wait(timeout=10)
    StateLock(tmp_path).acquire().release()  # the kernel dropped the dead holder's lock
