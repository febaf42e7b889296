"""`[consortium]` with several `[[studies]]` in one process (node/multistudy.py): one
membership log for the hospital, each change applied once and seen by every study at once.

A `StudyHost` of two studies under a 3-of-4 consortium, in this process: the log is one
`consortium.sqlite` at the state root; a revocation taken once through the peer route
(`POST /governance`, node/governance.py `answer`) is refused by both studies' request check
and envelope opener, audited in each study's audit log, and still in force after a restart;
an admission makes the new member a peer of both studies."""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from pathlib import Path

import pytest
from murmur.crypto.identity import generate_identity, load_identity
from murmur.gossip.membership import Manifest, Member, admit_args, make_proposal, make_vote
from murmur.gossip.receipts import AuditHead
from murmur.gossip.wire import ModelUpdate, build_envelope
from murmur.node.audit import records_of_kind
from murmur.node.config import load_configs
from murmur.node.consortium import STORE_FILE
from murmur.node.governance import answer, decode_exchange, encode_exchange
from murmur.node.multistudy import StudyHost, _close_all
from murmur.node.state import StartupError

from tests.netutil import make_network
from tests.studyutil import approve_study, propose_study, run_studies

FOUNDERS = ("hospital_0", "hospital_1", "hospital_2", "hospital_3")


def consortium_of_two_studies(tmp_path: Path):
    net = make_network(
        tmp_path / "net",
        *("--nodes", "4", "--rounds", "2", "--round-timeout", "5"),
        *("--aggregator", "mean", "--dp-epsilon", "1.0", "--dp-delta", "1e-5"),
    )
    made = [propose_study(tmp_path, net, n, e) for n, e in (("alpha", 1.0), ("beta", 1.2))]
    keys = {n: load_identity(net.run_dir / "keys" / f"{n}.key") for n in FOUNDERS}
    members = tuple(Member(n, keys[n].public_key, net.node(n).address) for n in FOUNDERS)
    manifest = Manifest("two-studies", members, quorum=3, created_at=time.time())
    for name in FOUNDERS:
        manifest = manifest.signed_by(keys[name])
    path = tmp_path / "manifest.bin"
    path.write_bytes(manifest.encode())
    run_studies(net, "hospital_0", [m for m, _ in made], None)
    net.edit_config("hospital_0", "consortium", manifest=str(path), exchange_interval_s=1.0)
    for manifest_path, study in made:
        approve_study(net, "hospital_0", manifest_path, study)
    return net, made, keys


def test_one_membership_log_for_every_study_and_a_revocation_refused_in_each(
    tmp_path: Path,
) -> None:
    net, made, keys = consortium_of_two_studies(tmp_path)
    node = net.node("hospital_0")
    host = StudyHost(load_configs(node.config_path))
    founding_log = (node.state_dir / STORE_FILE).read_bytes()
    try:
        asyncio.run(_revoke_once(host, keys, [bytes.fromhex(s) for _, s in made]))
    finally:
        _close_all(host)
    # One log, at the hospital's state root; none inside a study's state.
    assert (node.state_dir / STORE_FILE).is_file()
    for _, study in made:
        assert not (node.state_dir / "studies" / study[:16] / STORE_FILE).exists()
    # A restart: both studies start from the one log, the key still revoked in each.
    again = StudyHost(load_configs(node.config_path))
    try:
        assert again.governance.epoch == 2
        for rt in again.runtimes:
            assert rt.governance is again.governance
            assert rt.allowlist.is_revoked(keys["hospital_3"].public_key)
            assert rt.allowlist.by_key(keys["hospital_3"].public_key) is None
    finally:
        _close_all(again)
    # The log put back to its founding copy: each study's audit log recorded epoch 2, so
    # the process refuses to start (it would accept the revoked key again).
    (node.state_dir / STORE_FILE).write_bytes(founding_log)
    with pytest.raises(StartupError, match="put back to an older copy"):
        StudyHost(load_configs(node.config_path))
    # A log left inside one study's state (a hospital that ran one [[studies]] entry before)
    # is named, with the move, rather than silently started over.
    (node.state_dir / STORE_FILE).rename(node.state_dir / "studies" / made[0][1][:16] / STORE_FILE)
    with pytest.raises(StartupError, match="Fix: move it to"):
        StudyHost(load_configs(node.config_path))


async def _revoke_once(host: StudyHost, keys, studies: list[bytes]) -> None:
    a, b = host.runtimes
    assert a.governance is b.governance is host.governance
    assert a.governed is b.governed and set(map(id, a.governed)) == {id(a), id(b)}
    h3 = keys["hospital_3"]
    me = [host.identity.public_key]

    def envelope(study: bytes, runtime, round_: int = 1) -> bytes:
        head = AuditHead(10 + round_, hashlib.sha256(b"%d" % round_).digest(), 0, 0.0)
        update = ModelUpdate(dict(runtime.study.state()))
        return build_envelope(update, h3, me, round_, head=head, study=study)

    # Before: hospital_3 is a member, so a peer of both studies.
    peer = host.allowlist.by_key(h3.public_key)
    assert peer is not None and peer.name == "hospital_3"
    for rt, study in ((a, studies[0]), (b, studies[1])):
        assert rt.allowlist.by_key(h3.public_key) is not None
        got = await host.receive(envelope(study, rt), sender=peer)
        assert got[0] == 202, got

    # Revoke hospital_3: the proposal and two votes (3 of 4), in one POST /governance from
    # hospital_1, taken once for the hospital.
    gov = host.governance
    expires = time.time() + 600
    proposal = make_proposal(
        keys["hospital_0"], gov.membership, "revoke", {"key": h3.public_key}, expires
    )
    votes = [make_vote(keys[n], proposal, expires) for n in ("hospital_1", "hospital_2")]
    body = encode_exchange(0, [proposal.encode(), *(v.encode() for v in votes)], [])
    status, reply = answer(host, body, "hospital_1")
    assert status == 200
    epoch, _, changes = decode_exchange(reply)
    assert epoch == 1 and len(changes) == 1  # applied once: one change in the one log
    assert gov.epoch == 1 and len(gov.store.changes()) == 1

    # At once, in both studies: the request check and each study's envelope opener.
    for rt, study in ((a, studies[0]), (b, studies[1])):
        assert rt.allowlist.is_revoked(h3.public_key)
        assert "hospital_3" not in {p.name for p in rt.peers}
        assert "hospital_3" not in rt.state.peers
        refused = await host.receive(envelope(study, rt, round_=2))
        assert refused[1] == "unknown_sender", refused
        assert rt.rejected["unknown_sender"] == 1
        assert rt.state.consortium["epoch"] == 1
    assert host.status()["consortium"]["epoch"] == 1
    # Audited in each study's own log (each study's startup check compares it with the log).
    for rt in (a, b):
        rt.audit.wait_durable(5)
        (record,) = records_of_kind(rt.state_dir, "membership")
        assert record.fields["epoch"] == 1 and record.fields["removed"] == ["hospital_3"]
    # The same records again (gossip echoes them): nothing applied twice.
    assert answer(host, body, "hospital_2")[0] == 200
    assert gov.epoch == 1 and len(gov.store.changes()) == 1
    for rt in (a, b):
        assert len(records_of_kind(rt.state_dir, "membership")) == 1

    # Admitting a new member makes it a peer of both studies (their gates count its approvals).
    newcomer = generate_identity("hospital_9")
    member = Member("hospital_9", newcomer.public_key, "http://127.0.0.1:9")
    admit = make_proposal(keys["hospital_0"], gov.membership, "admit", admit_args(member), expires)
    votes = [make_vote(keys[n], admit, expires) for n in ("hospital_1", "hospital_2")]
    body = encode_exchange(1, [admit.encode(), *(v.encode() for v in votes)], [])
    assert answer(host, body, "hospital_1")[0] == 200 and gov.epoch == 2
    for rt in (a, b):
        assert rt.allowlist.by_key(newcomer.public_key).name == "hospital_9"
        assert "hospital_9" in {p.name for p in rt.peers}
        assert rt.gate.members[newcomer.public_key] == "hospital_9"


# ------------------------------------------------------------------ real processes


@pytest.mark.slow
def test_a_revocation_mid_run_reaches_both_studies_of_each_process(tmp_path: Path) -> None:
    """Three hospitals, each one process of two studies under a 2-of-3 consortium: a
    revocation of hospital_2 proposed at hospital_0 and voted at hospital_1 (one
    `POST /governance` each, on the process's operator listener) is applied once per process
    and, from the round after, neither study of either process uses hospital_2's envelopes."""
    from tests.test_consortium_network import members, propose, vote, wait_until

    hospitals = ("hospital_0", "hospital_1", "hospital_2")
    rounds = 120
    net = make_network(
        tmp_path / "net",
        *("--nodes", "3", "--rounds", str(rounds), "--round-timeout", "4"),
        *("--no-dp", "--aggregator", "mean", "--local-epochs", "20", "--batch-size", "8"),
    )
    made = [propose_study(tmp_path, net, n, e) for n, e in (("alpha", 1.0), ("beta", 1.2))]
    keys = {n: load_identity(net.run_dir / "keys" / f"{n}.key") for n in hospitals}
    founders = tuple(Member(n, keys[n].public_key, net.node(n).address) for n in hospitals)
    manifest = Manifest("two-studies-live", founders, quorum=2, created_at=time.time())
    for name in hospitals:
        manifest = manifest.signed_by(keys[name])
    path = tmp_path / "manifest.bin"
    path.write_bytes(manifest.encode())
    for name in hospitals:
        run_studies(net, name, [m for m, _ in made], None)
        net.edit_config(name, "consortium", manifest=str(path), exchange_interval_s=1.0)
        net.edit_config(name, "gossip", startup_timeout_s=30.0)
        for manifest_path, study in made:
            approve_study(net, name, manifest_path, study)
    kept = hospitals[:2]
    try:
        net.start_all()
        net.wait_for_round("hospital_0", 2, timeout_s=120)
        proposal = propose(net, path, "hospital_0", "--revoke", "hospital_2")
        vote(net, path, "hospital_1", proposal)
        wait_until(
            lambda: all("hospital_2" not in members(net, n) for n in kept),
            60,
            "hospital_2 was not revoked in both processes",
        )
        for name in kept:
            net.procs[name].wait(timeout=300)
        for name in kept:
            state = net.node(name).state_dir
            top = json.loads((state / "status.json").read_text())
            assert top["consortium"]["epoch"] == 1
            applied = top["consortium"]["applied_round"]["1"]
            assert applied < rounds - 1, "the revocation came too late to observe"
            assert (state / STORE_FILE).is_file()
            for _, study in made:
                status = top["studies"][study]
                assert status["phase"] == "done" and status["round"] == rounds
                # hospital_2 counted while a member, never after (a study's round can be a
                # few ahead of the first study's, whose round applied_round is).
                early = [r for r in status["history"] if r["round"] < applied]
                assert any("hospital_2" in r["received"] for r in early), name
                late = [r for r in status["history"] if r["round"] > applied + 3]
                assert late and all("hospital_2" not in r["received"] for r in late), name
                assert not (state / "studies" / study[:16] / STORE_FILE).exists()
                (record,) = records_of_kind(state / "studies" / study[:16], "membership")
                assert record.fields["removed"] == ["hospital_2"]
    finally:
        net.kill_all()
