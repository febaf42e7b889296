"""One key, several studies: the evidence a neighbour keeps is per (sender, study), and one
process routes what it is sent to the study it names (node/multistudy.py).

Pure parts first (gossip/heads.py, gossip/receipts.py, the receipts request), then the
`[[studies]]` config, then a `StudyHost` of two studies in this process, fed envelopes,
receipts requests and approvals signed by its neighbour."""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from pathlib import Path

import aiohttp
import numpy as np
import pytest
from murmur.crypto.identity import generate_identity, load_identity
from murmur.gossip.heads import (
    HeadBook,
    HeadCheck,
    ReceiptsRequest,
    RequestError,
    RequestGuard,
    RollbackProof,
    check_request,
    open_receipts_answer,
)
from murmur.gossip.receipts import AuditHead, Receipt, ReceiptBook, ReceiptError, signed_digest
from murmur.gossip.wire import ModelUpdate, build_envelope, is_streamed, study_kind
from murmur.node.config import ConfigError, load_config, load_configs
from murmur.node.multistudy import StudyHost, envelope_kind
from murmur.node.studies.approvals import approve as sign_approval

from tests.netutil import make_network
from tests.studyutil import approve_study, propose_study, run_studies

H = generate_identity("hospital_1")
ME = generate_identity("hospital_0")
STUDY_A = hashlib.sha256(b"study a").digest()
STUDY_B = hashlib.sha256(b"study b").digest()
NOW = 1_800_000_000.0


def receipt(study: bytes, round_: int, seq: int, steps: int = 0, sender=H) -> Receipt:
    """A receipt signed by ``sender`` of an envelope of ``study`` claiming audit seq ``seq``."""
    kind = study_kind(study)
    head = AuditHead(seq, hashlib.sha256(b"%d" % seq).digest(), steps, steps * 0.01)
    rest = hashlib.sha256(b"%s %d %d" % (study, round_, seq)).digest()
    digest = signed_digest(5, kind, sender.public_key, round_, head.digest(), rest)
    return Receipt(5, kind, sender.public_key, round_, head, rest, sender.sign(digest))


# ------------------------------------------------------------------ the evidence, pure


def test_one_keys_two_studies_are_two_histories_in_the_head_book() -> None:
    """Study A at round 11 is far ahead of study B at round 3 (its own audit log): in one
    book keyed by sender alone that would be a rollback proof; keyed by (sender, study) it
    is two first heads. A rollback inside one study is still caught."""
    book = HeadBook.for_senders([H.public_key])
    a11 = receipt(STUDY_A, 11, seq=500, steps=110)
    b3 = receipt(STUDY_B, 3, seq=40, steps=30)
    assert book.observe(a11) == (HeadCheck.FIRST, None)
    assert book.observe(b3) == (HeadCheck.FIRST, None)
    assert book.latest(H.public_key, study_kind(STUDY_A)) == a11
    assert book.latest(H.public_key, study_kind(STUDY_B)) == b3
    assert book.latest(H.public_key) == a11  # any kind: the newest round
    assert book.observe(receipt(STUDY_B, 4, seq=60, steps=40))[0] is HeadCheck.ADVANCED
    check, proof = book.observe(receipt(STUDY_B, 5, seq=50, steps=40))
    assert check is HeadCheck.ROLLBACK and proof is not None and proof.verify()
    assert book.proof(H.public_key, study_kind(STUDY_B)) is proof
    assert book.proof(H.public_key, study_kind(STUDY_A)) is None
    assert book.proofs() == {H.public_key: proof}
    again = HeadBook.from_state(book.to_state(), [H.public_key])
    assert again.latest(H.public_key, study_kind(STUDY_A)) == a11
    assert again.proof(H.public_key, study_kind(STUDY_B)) == proof


def test_two_studies_receipts_are_no_rollback_proof_even_handmade() -> None:
    """A proof is checked offline by anyone: one made of two studies' receipts never
    verifies, whoever builds it."""
    a11, b3 = receipt(STUDY_A, 11, seq=500), receipt(STUDY_B, 12, seq=40)
    with pytest.raises(ReceiptError, match="same sender and kind"):
        RollbackProof.of(a11, b3)
    assert not RollbackProof(a11, b3).verify()
    with pytest.raises(ReceiptError):
        RollbackProof.decode(a11.encode() + b3.encode())


def test_one_round_of_two_studies_under_one_key_is_no_equivocation() -> None:
    book = ReceiptBook([H.public_key])
    book.advance(7)
    a, b = receipt(STUDY_A, 7, seq=10), receipt(STUDY_B, 7, seq=3)
    assert book.check(a, accepted=True) is None and book.check(b, accepted=True) is None
    assert set(book.accepted(7)) == {a, b}
    other_a = receipt(STUDY_A, 7, seq=11)  # the same study's round 7, signed twice
    proof = book.check(other_a)
    assert proof is not None and proof.verify() and proof.kind == study_kind(STUDY_A)


def test_a_receipts_request_signs_the_study_it_asks_about() -> None:
    guard = RequestGuard()

    def check(data: bytes) -> ReceiptsRequest:
        return check_request(
            data,
            own_key=ME.public_key,
            known_senders=[H.public_key],
            guard=guard,
            now=NOW,
            window_s=300,
        )

    request = ReceiptsRequest.make(H, ME.public_key, NOW, STUDY_A)
    assert check(request.encode()).study_id == STUDY_A
    swapped = bytearray(ReceiptsRequest.make(H, ME.public_key, NOW, STUDY_A).encode())
    swapped[90:122] = STUDY_B  # the study, rewritten in transit
    with pytest.raises(RequestError) as caught:
        check(bytes(swapped))
    assert caught.value.reason == "bad_signature"
    assert ReceiptsRequest.make(H, ME.public_key, NOW).study_id is None
    with pytest.raises(ValueError, match="32 bytes"):
        ReceiptsRequest.make(H, ME.public_key, NOW, b"short")


def test_the_router_reads_the_kind_from_the_envelopes_first_bytes() -> None:
    tensors = {"w": np.zeros((2, 3), dtype="<f4")}
    data = build_envelope(ModelUpdate(tensors), H, [ME.public_key], 1, study=STUDY_A)
    assert envelope_kind(data) == study_kind(STUDY_A)
    assert envelope_kind(build_envelope(ModelUpdate(tensors), H, [ME.public_key], 1)) == "update"
    for bad in (b"", b"\x80", data[:3], b"not msgpack at all", bytes(600)):
        assert envelope_kind(bad) is None
    streamed = build_envelope(
        ModelUpdate(tensors), H, [ME.public_key], 1, study=STUDY_B, stream_above=16
    )
    assert is_streamed(streamed) and envelope_kind(streamed) == study_kind(STUDY_B)


# ------------------------------------------------------------------ the config


def two_study_network(tmp_path: Path, rounds: int = 4):
    net = make_network(
        tmp_path / "net",
        *("--nodes", "2", "--rounds", str(rounds), "--round-timeout", "5"),
        *("--aggregator", "mean", "--dp-epsilon", "1.0", "--dp-delta", "1e-5"),
    )
    made = [propose_study(tmp_path, net, n, e) for n, e in (("alpha", 1.0), ("beta", 1.2))]
    return net, made


def test_studies_entries_give_each_study_its_config_and_state(tmp_path: Path) -> None:
    net, made = two_study_network(tmp_path)
    node = net.node("hospital_0")
    run_studies(net, "hospital_0", [m for m, _ in made], tmp_path / "site.sqlite")
    configs = load_configs(node.config_path)
    assert [c.study.sha256 for c in configs] == [study for _, study in made]
    assert [c.privacy.epsilon for c in configs] == [1.0, 1.2]  # each from its manifest
    for config, (_, study) in zip(configs, made, strict=True):
        assert config.node.state_dir == node.state_dir / "studies" / study[:16]
        assert config.studies_root == node.state_dir
    assert configs[0].sha256 != configs[1].sha256  # each study's checkpoint binds its own
    with pytest.raises(ConfigError, match="runs 2 \\[\\[studies\\]\\]"):
        load_config(node.config_path)
    # One entry is a one-study list, as [study] is.
    run_studies(net, "hospital_0", [made[0][0]], None)
    (only,) = load_configs(node.config_path)
    assert load_config(node.config_path) == only
    # Bad entries name the field and the fix.
    run_studies(net, "hospital_0", [made[0][0], made[0][0]], None)
    with pytest.raises(ConfigError, match=r"names study .* twice"):
        load_configs(node.config_path)
    net.edit_config("hospital_0", "study", manifest=str(made[0][0]))
    with pytest.raises(ConfigError, match=r"both \[study\] and \[\[studies\]\]"):
        load_configs(node.config_path)


# ------------------------------------------------------------------ one process, two studies


def test_a_study_host_routes_each_message_to_its_study(tmp_path: Path) -> None:
    net, made = two_study_network(tmp_path)
    for name in ("hospital_0", "hospital_1"):
        run_studies(net, name, [m for m, _ in made], None)
        for manifest, study in made:
            approve_study(net, name, manifest, study)
    host = StudyHost(load_configs(net.node("hospital_0").config_path))
    try:
        asyncio.run(_route(host, net, [bytes.fromhex(s) for _, s in made]))
    finally:
        for rt in host.runtimes:
            rt.audit.close()


async def _route(host: StudyHost, net, studies: list[bytes]) -> None:
    h1 = load_identity(net.run_dir / "keys" / "hospital_1.key")
    peer = host.allowlist.by_key(h1.public_key)
    a, b = host.runtimes
    me = [host.identity.public_key]

    def envelope(study: bytes, round_: int, seq: int, runtime=a, **kw) -> bytes:
        head = AuditHead(seq, hashlib.sha256(b"%d" % seq).digest(), 0, 0.0)
        update = ModelUpdate(dict(runtime.study.state()))
        return build_envelope(update, h1, me, round_, head=head, study=study, **kw)

    def reader(data: bytes):
        """The listener's `read(n)` over ``data``, in the pieces the opener asks for."""
        left = memoryview(data)

        async def read(n: int) -> bytes:
            nonlocal left
            piece, left = bytes(left[:n]), left[n:]
            return piece

        return read

    # Round 1 of both studies, signed by the same key: each lands in its own study's inbox;
    # study B's as a streamed envelope, read in pieces (what POST /gossip does above 1 MiB).
    assert (await host.receive(envelope(studies[0], 1, seq=30), sender=peer))[0] == 202
    streamed = envelope(studies[1], 1, seq=4, runtime=b, stream_above=16)
    assert is_streamed(streamed)
    got = await host.receive_stream(reader(streamed), len(streamed), sender=peer)
    assert got[0] == 202, got
    assert a.inbox.highest_round_seen == {"hospital_1": 1}
    assert b.inbox.highest_round_seen == {"hospital_1": 1}
    # Study A far ahead of study B (its own audit log): not a rollback of B, nor B of A.
    assert (await host.receive(envelope(studies[0], 2, seq=90), sender=peer))[0] == 202
    assert (await host.receive(envelope(studies[1], 2, seq=8, runtime=b), sender=peer))[0] == 202
    for rt in (a, b):
        assert rt.rollback.status()["proven"] == {} and rt.evidence.status()["proven"] == {}
    # A second, different round-2 envelope of study A is an equivocation: proven in study A,
    # and learned by study B (a key that equivocates in one study is trusted in none).
    await host.receive(envelope(studies[0], 2, seq=91), sender=peer)
    assert "hospital_1" in a.evidence.status()["proven"]
    assert "hospital_1" in b.evidence.status()["proven"]
    assert b.evidence.counts["proofs_learned"] == 1
    # ...but a rollback inside one study still is one, and the key is refused in every study.
    status, reason, _ = await host.receive(envelope(studies[1], 3, seq=5, runtime=b), sender=peer)
    assert (status, reason) == (409, "rollback")
    assert "hospital_1" in b.rollback.status()["proven"] and a.rollback.status()["proven"] == {}
    status, reason, detail = await host.receive(envelope(studies[0], 3, seq=99), sender=peer)
    assert (status, reason) == (409, "rollback") and "in every study" in detail
    # A study this process does not run: unknown_study, counted once for the hospital.
    other = hashlib.sha256(b"another study").digest()
    status, reason, _ = await host.receive(envelope(other, 1, seq=1), sender=peer)
    assert (status, reason) == (409, "unknown_study")
    assert host.status()["rejected"]["unknown_study"] == 1
    # /metrics: each study's series, labelled with its study (the refusal went to the first).
    text = host.metrics.render().decode()
    first, second = (s.hex()[:16] for s in studies)
    assert f'murmur_messages_rejected_total{{reason="unknown_study",study="{first}"}} 1.0' in text
    assert text.count("# TYPE murmur_round_completed gauge") == 1
    assert f'murmur_round_completed{{study="{second}"}}' in text

    # POST /receipts: each study's newest receipt, for the study the request names.
    for study, round_ in ((studies[0], 2), (studies[1], 2)):
        request = ReceiptsRequest.make(h1, host.identity.public_key, time.time(), study)
        code, _, payload = host.answer_receipts_request(request.encode(), h1.public_key)
        assert code == 200
        answered, _ = open_receipts_answer(h1, request, payload)
        assert {r.kind for r in answered} == {study_kind(study)}
        assert max(r.round for r in answered) == round_
    # A study this process does not run: answered, with no receipts (and the hospital's
    # budget log head, which is per hospital: a new study's admission checks it).
    request = ReceiptsRequest.make(h1, host.identity.public_key, time.time(), other)
    code, _, payload = host.answer_receipts_request(request.encode(), h1.public_key)
    assert code == 200 and open_receipts_answer(h1, request, payload) == ([], 0)

    # POST /approvals: one body with both studies' approvals, each kept by its study.
    body = json.dumps([sign_approval(s.hex(), h1).to_json() for s in studies]).encode()
    assert host.answer_approvals(body, peer) == (202, "accepted")
    for study, rt in zip(studies, (a, b), strict=True):
        assert sorted(x.approver for x in rt.gate.book.of_study(study.hex())) == [
            "hospital_0",
            "hospital_1",
        ]
    # The peers' budget log heads are the hospital's: one witness table for every study.
    root = host.config.studies_root
    assert a.gate.witness.path == b.gate.witness.path == root / "budget_witness.sqlite"
    # The operator listener serves the hospital's status, with the studies map, and metrics.
    from murmur.node.api import start_api

    api = await start_api(host, None)
    try:
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{api.operator.address}/status") as reply:
                served = await reply.json()
            async with session.get(f"{api.operator.address}/metrics") as reply:
                scraped = await reply.text()
    finally:
        await api.close()
    assert sorted(served["studies"]) == sorted(s.hex() for s in studies)
    assert served["rejected"]["unknown_study"] == 1 and served["name"] == "hospital_0"
    assert f'study="{second}"' in scraped
    studies_status = host.status()["studies"]
    assert sorted(studies_status) == sorted(s.hex() for s in studies)
    assert {s["public_key"] for s in studies_status.values()} == {host.identity.public_key.hex()}
