"""The consensus phase between real `murmur node` processes over `POST /consensus`: every
honest node writes the same agreed model, signed by all of them, with the pooled evaluation;
a Byzantine member (played by this test with a member's key) that equivocates, forges an
offer, replays a step or sends garbage is refused with reasons and left out everywhere."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import time
from pathlib import Path

import aiohttp
import pytest
import torch
from murmur.crypto.identity import Identity, load_identity
from murmur.gossip import consensus as cs
from murmur.gossip.auth import request_headers
from murmur.gossip.consensus_wire import ConsensusMessage, seal_message
from murmur.gossip.transport import CONSENSUS_CONTENT_TYPE
from murmur.models.nets import build_model
from murmur.models.params import get_state, model_spec, set_state, state_sha256
from murmur.node import cli
from murmur.node.config import load_config
from murmur.node.consensus import load_agreed_model, read_agreement, study_label

from tests.netutil import Network, make_network

pytestmark = pytest.mark.slow


@pytest.fixture
def network_factory(tmp_path: Path):
    made: list[Network] = []

    def make(*args: str) -> Network:
        net = make_network(tmp_path / "net", *args)
        made.append(net)
        return net

    yield make
    for net in made:
        net.kill_all()


def small_network(factory, nodes: int) -> Network:
    return factory(
        *("--nodes", str(nodes), "--rounds", "2", "--no-dp", "--aggregator", "mean"),
        *("--round-timeout", "4", "--consensus"),
    )


def agreements(net: Network, names: list[str]) -> dict[str, dict]:
    return {name: read_agreement(net.node(name).state_dir) for name in names}


def test_every_node_process_writes_the_same_agreed_model_signed_by_all(network_factory) -> None:
    net = small_network(network_factory, 3)
    for node in net.nodes:
        net.edit_config(node.name, "consensus", step_timeout_s=10.0, start_timeout_s=60.0)
    net.start_all()
    codes = net.wait_all(timeout_s=150)
    assert codes == {n.name: 0 for n in net.nodes}, {n.name: net.log(n.name) for n in net.nodes}
    names = [n.name for n in net.nodes]
    docs = agreements(net, names)  # re-checks the file's hash and every signature
    hashes = {d["model_sha256"] for d in docs.values()}
    assert len(hashes) == 1, hashes
    for name, doc in docs.items():
        assert sorted(doc["valid_signers"]) == sorted(names), name
        assert sorted(e["name"] for e in doc["included"]) == sorted(names)
        assert doc["excluded"] == []
        pooled = doc["pooled_evaluation"]
        assert pooled["computed"] is True, pooled
        assert pooled["pooled"]["n"] == sum(e["facts"]["n_test"] for e in doc["included"])
        assert 0.5 < pooled["pooled"]["auroc"]["value"] <= 1.0
        assert list(pooled["hospitals"]) == [name]  # only its own figures, next to the pooled
        status = net.final_status(name)
        assert status["consensus"]["agreed"] == doc["model_sha256"]
    pooled_values = {
        json.dumps(d["pooled_evaluation"]["pooled"], sort_keys=True) for d in docs.values()
    }
    assert len(pooled_values) == 1  # every node summed the same masked shares
    check_model_cli(net, docs[names[0]], names)


def check_model_cli(net: Network, doc: dict, names: list[str]) -> None:
    """`murmur model show` and `murmur model release` on what hospital_0 wrote."""
    node = net.nodes[0]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert cli.main(["model", "show", str(node.state_dir)]) == 0
    text = out.getvalue()
    assert doc["model_sha256"] in text
    again = io.StringIO()
    with contextlib.redirect_stdout(again):  # the agreed/ directory itself will do too
        assert cli.main(["model", "show", str(node.state_dir / "agreed")]) == 0
    assert again.getvalue() == text
    assert "signed by 3 of 3 members" in text and all(n in text for n in names)
    assert "pooled evaluation over" in text and "AUROC" in text
    assert "last training round 2" in text and "(no DP)" in text
    release = node.state_dir.parent / "release"
    base = ["model", "release", "--config", str(node.config_path), "--out", str(release)]
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert cli.main([*base, "--min-signatures", "4"]) == 2
    assert "3 of 3 members signed" in err.getvalue() and "4 are required" in err.getvalue()
    assert not release.exists()  # refused before anything is written
    with contextlib.redirect_stderr(err):
        assert cli.main([*base, "--max-attack-auc", "0.0"]) == 2
    assert "membership-inference attack reaches AUC" in err.getvalue()
    assert not (release / "model_card.json").exists()
    assert json.loads((release / "membership_audit.json").read_text())["passed"] is False
    with contextlib.redirect_stdout(io.StringIO()):
        # 48 test patients per hospital: a loose gate here, the default one is
        # tests/test_release_gate.py's
        assert cli.main([*base, "--max-attack-auc", "0.8"]) == 0
    card = json.loads((release / "model_card.json").read_text())
    assert card["model_sha256"] == doc["model_sha256"]
    audit = card["membership_audit"]
    assert audit["passed"] and audit["auc"] <= 0.8 and audit["max_auc"] == 0.8
    (own,) = [e for e in doc["included"] if e["name"] == node.name]
    assert audit["n_members"] == own["facts"]["n_train"]  # this hospital's training rows
    assert sorted(h["name"] for h in card["hospitals"]) == sorted(names)
    assert card["signatures"]["valid_from_known_members"] == sorted(names)
    assert card["signatures"]["required"] == 2  # a majority of 3
    assert (
        card["pooled_evaluation"]["pooled"]["auroc"]["low"]
        <= card["pooled_evaluation"]["pooled"]["auroc"]["value"]
    )
    markdown = (release / "model_card.md").read_text()
    assert doc["model_sha256"] in markdown and "| hospital_1 |" in markdown
    released = load_agreed_model(node.state_dir)
    from safetensors.numpy import load_file

    assert (
        state_sha256({k: load_file(str(release / "model.safetensors"))[k] for k in released})
        == doc["model_sha256"]
    )
    assert card["exported_program"] == "model.pt2"
    program = torch.export.load(str(release / "model.pt2")).module()
    model = build_model("logreg", (30,), 0)
    set_state(model, released)
    rows = torch.randn(5, 30)
    assert torch.allclose(program(rows), model(rows))


def post_consensus(
    address: str, body: bytes, signer: Identity, recipient: bytes
) -> tuple[int, str]:
    async def send() -> tuple[int, str]:
        headers = request_headers(signer, recipient, "/consensus", body, CONSENSUS_CONTENT_TYPE)
        async with (
            aiohttp.ClientSession() as session,
            session.post(
                f"{address}/consensus",
                data=body,
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=10),
            ) as response,
        ):
            return response.status, (await response.json())["reason"]

    return asyncio.run(send())


def wait_for_api(net: Network, name: str, timeout_s: float = 60) -> dict:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        try:
            return net.status(name)
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"{name} never answered /status; log:\n{net.log(name)}")


def test_an_equivocating_and_forging_member_is_refused_and_left_out(network_factory) -> None:
    net = small_network(network_factory, 4)
    honest, byzantine = net.nodes[:3], net.nodes[3]
    for node in honest:
        net.edit_config(node.name, "consensus", max_byzantine=1, step_timeout_s=4.0)
        net.edit_config(node.name, "gossip", min_neighbours=2, startup_timeout_s=3.0)
    for node in honest:
        net.start(node.name)
    keys = {n.name: bytes.fromhex(wait_for_api(net, n.name)["public_key"]) for n in honest}
    mallory = load_identity(byzantine.config_path.parent.parent / "keys" / f"{byzantine.name}.key")
    config = load_config(honest[0].config_path)
    study = study_label(config)
    model = get_state(build_model("logreg", (30,), 0))
    spec = model_spec(model)
    other = {k: v + 1.0 for k, v in model.items()}

    def offer(state: dict, owner: Identity = mallory) -> cs.Delivery:
        o = cs.FinalOffer(study, owner.public_key, state_sha256(state))
        return cs.Delivery(cs.SignedOffer(o, ()).endorsed(owner), state)

    a, b = offer(model), offer(other)  # two final models, both signed by mallory
    forged = cs.Delivery(
        cs.SignedOffer(
            cs.FinalOffer(study, keys[honest[1].name], state_sha256(other)),
            ((keys[honest[1].name], bytes(64)),),
        ),
        other,
    )

    def send(node, message: ConsensusMessage) -> tuple[int, str]:
        body = seal_message(mallory, keys[node.name], message, spec)
        return post_consensus(node.address, body, mallory, keys[node.name])

    h0, h1, h2 = honest
    assert send(h0, ConsensusMessage(study, 1, (a, forged))) == (202, "accepted")
    assert send(h1, ConsensusMessage(study, 1, (b,))) == (202, "accepted")
    assert send(h2, ConsensusMessage(study, 1, (b,))) == (202, "accepted")
    # a second step-1 message (under a fresh, valid Murmur-Auth header) is one too many
    assert send(h1, ConsensusMessage(study, 1, (a,))) == (409, "consensus_duplicate")
    assert send(h2, ConsensusMessage("another-study", 1, (a,))) == (409, "consensus_wrong_study")
    assert send(h2, ConsensusMessage(study, 3, ())) == (409, "consensus_step_out_of_range")
    body = bytearray(seal_message(mallory, keys[h2.name], ConsensusMessage(study, 1, ()), spec))
    body[-5] ^= 0xFF  # inside the ciphertext: its tag no longer verifies
    assert post_consensus(h2.address, bytes(body), mallory, keys[h2.name]) == (
        400,
        "consensus_decrypt_failed",
    )

    codes = {n.name: net.procs[n.name].wait(timeout=150) for n in honest}
    assert codes == {n.name: 0 for n in honest}, {n.name: net.log(n.name) for n in honest}
    names = [n.name for n in honest]
    docs = agreements(net, names)
    assert len({d["model_sha256"] for d in docs.values()}) == 1
    for doc in docs.values():
        assert sorted(doc["valid_signers"]) == sorted(names)
        assert sorted(e["name"] for e in doc["included"]) == sorted(names)
        (left_out,) = doc["excluded"]
        assert left_out["name"] == byzantine.name and "equivocation" in left_out["why"]
        assert doc["equivocation_proofs"] == 1
        # mallory sent no pooled share: the pooled figures are withheld, saying why
        assert doc["pooled_evaluation"]["computed"] is False
        assert byzantine.name in doc["pooled_evaluation"]["why"]
    assert net.final_status(h0.name)["rejected"]["consensus_bad_signature"] == 1
    assert net.final_status(h1.name)["rejected"]["consensus_duplicate"] == 1
    h2_rejected = net.final_status(h2.name)["rejected"]
    for reason in (
        "consensus_wrong_study",
        "consensus_step_out_of_range",
        "consensus_decrypt_failed",
    ):
        assert h2_rejected[reason] == 1, h2_rejected


@pytest.mark.parametrize("attack", ["equivocate", "forge"])
def test_an_adversary_mode_process_cannot_stop_agreement_or_sneak_a_model_in(
    network_factory, attack: str
) -> None:
    net = small_network(network_factory, 4)
    honest, byzantine = net.nodes[:3], net.nodes[3]
    for node in net.nodes:  # they finish training together: a short first step too
        net.edit_config(
            node.name, "consensus", max_byzantine=1, step_timeout_s=4.0, start_timeout_s=8.0
        )
    net.edit_config(byzantine.name, "adversary", consensus_attack=attack)
    net.start_all()
    codes = net.wait_all(timeout_s=150)
    assert codes == {n.name: 0 for n in net.nodes}, {n.name: net.log(n.name) for n in net.nodes}
    names = [n.name for n in honest]
    docs = agreements(net, names)
    assert len({d["model_sha256"] for d in docs.values()}) == 1
    assert not (byzantine.state_dir / "agreed").exists()
    for doc in docs.values():
        assert sorted(doc["valid_signers"]) == sorted(names)
        assert sorted(e["name"] for e in doc["included"]) == sorted(names)
        (left_out,) = doc["excluded"]
        assert left_out["name"] == byzantine.name
        expected = "equivocation" if attack == "equivocate" else "no final offer"
        assert expected in left_out["why"]
    if attack == "forge":  # the 3 honest offers it relayed, tampered, were refused everywhere
        for node in honest:
            rejected = net.final_status(node.name)["rejected"]
            # a poisoned model under the owner's chain alone: too few signatures for step 2
            assert rejected["consensus_too_few_signatures"] == 2, rejected
            # a new hash under the owner's old signature
            assert rejected["consensus_bad_signature"] == 1, rejected
