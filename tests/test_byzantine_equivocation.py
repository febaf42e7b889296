"""Equivocation is proven, not guessed (gossip/receipts.py, docs/robustness.md).

Real ``HospitalNode`` round loops in one process, exactly as bench/byzantine.py runs them
(run_cluster's configs; envelopes signed, encrypted and verified, handed over by direct calls):

* dissensus at 3 of 7 nodes (43 %) on a complete graph: by round 2 every honest node holds a
  verified proof against every attacker, leaves them out of aggregation, and ends within 0.03
  AUC of the honest hospitals alone; the same attack with trust off (mean, no defence) is also
  proven but not acted on, and does damage, so the test can fail;
* a clean run produces no proof at all, and the attackers' forged receipts and proofs against
  honest peers are ignored (counted), so no honest node is ever accused;
* a node killed after sending round r and restarted produces no proof against itself, and
  without its durable "signed round" record it would (so the record is what prevents it).
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from murmur.gossip.memory_transport import MemoryTransport
from murmur.gossip.receipts import EquivocationProof
from murmur.node.audit import records_of_kind
from murmur.node.config import load_config
from murmur.node.node import SIGNED_ROUND_FILE, HospitalNode

import run_cluster
from tests.netutil import run_in_process

COMMON = [
    "--dataset", "breast-cancer", "--nodes", "4", "--alpha", "0.5", "--topology", "complete",
    "--rounds", "6", "--lr", "0.1", "--no-dp", "--seed", "0", "--round-timeout", "30",
]  # fmt: skip
TARGET = 0.03


def run(tmp_path: Path, *extra: str) -> tuple[dict[str, Any], list[Any]]:
    return run_in_process([*COMMON, *extra], tmp_path)


def all_proofs(nodes: list[HospitalNode]) -> list[tuple[str, str]]:
    return [(n.config.node.name, peer) for n in nodes for peer in n.trust.proven()]


@pytest.fixture(scope="module")
def clean(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], list[HospitalNode]]:
    # The honest hospitals alone; 4 nodes of degree 3 allow clipping with f <= 2 (as the bench).
    return run(tmp_path_factory.mktemp("clean"), "--aggregator", "clipping:2")


def test_a_clean_run_produces_no_proof(clean) -> None:
    _, nodes = clean
    assert all_proofs(nodes) == []
    for node in nodes:
        status = node.status()
        assert status["equivocation"]["proofs_learned"] == 0
        assert status["equivocation"]["invalid_receipts"] == 0
        assert not any(p["proven_equivocation"] for p in status["peers"].values())
    # Receipts did travel: every node's last envelope carried one per neighbour.
    assert all(len(n.receipts.accepted(6)) == 3 for n in nodes)


def test_dissensus_is_proven_by_round_two_and_excluded(tmp_path: Path, clean) -> None:
    report, nodes = run(
        tmp_path / "defended", "--aggregator", "clipping:3", "--byzantine", "3",
        "--attack", "dissensus",
    )  # fmt: skip
    honest = [n for n in nodes if n.adversary is None]
    attackers = {n.config.node.name: n.identity.public_key for n in nodes if n.adversary}
    assert len(honest) == 4 and len(attackers) == 3
    for node in honest:
        name = node.config.node.name
        assert set(node.trust.proven()) == set(attackers), name
        assert set(node.trust.quarantined()) == set(attackers), name
        for attacker, key in attackers.items():
            saved = node.trust.peers[attacker]
            proof = EquivocationProof.decode(bytes.fromhex(saved.equivocation_proof))
            assert proof.verify() and proof.sender == key and proof.round == 1
        records = records_of_kind(node.state_dir, "equivocation_proof")
        assert {r.fields["peer"] for r in records} == set(attackers)
        assert all(r.round <= 2 and len(r.fields["receipts"]) == 2 for r in records)
        aggregations = {r.round: r for r in records_of_kind(node.state_dir, "aggregation")}
        for round_ in range(2, 7):
            used = {u["peer"] for u in aggregations[round_].fields["used"]}
            excluded = {e["peer"]: e["reason"] for e in aggregations[round_].fields["excluded"]}
            assert not used & set(attackers), (name, round_)
            assert excluded == dict.fromkeys(attackers, "proven_equivocation"), (name, round_)
        status = node.status()
        # The attackers' framing (made-up receipts and proofs against honest peers) was seen,
        # counted and ignored: no honest peer is accused.
        assert status["equivocation"]["invalid_receipts"] > 0
        assert status["equivocation"]["invalid_proofs"] > 0
        assert not any(
            status["peers"][h.config.node.name]["proven_equivocation"]
            for h in honest
            if h is not node
        )
        assert all(status["peers"][a]["proven_equivocation"] for a in attackers)
        assert all(status["peers"][a]["proven_equivocation_round"] == 1 for a in attackers)
        metrics = node.metrics.render().decode()
        for attacker in attackers:
            assert f'murmur_equivocation_proofs_total{{peer="{attacker}"}} 1.0' in metrics
            assert f'murmur_peer_quarantined{{peer="{attacker}"}} 1.0' in metrics
    assert clean[0]["mean_auc"] - report["mean_auc"] <= TARGET


def test_without_trust_the_proof_is_recorded_but_not_acted_on(tmp_path: Path) -> None:
    clean_report, _ = run(tmp_path / "clean", "--aggregator", "mean", "--no-trust")
    report, nodes = run(
        tmp_path / "undefended", "--aggregator", "mean", "--no-trust", "--byzantine", "3",
        "--attack", "dissensus",
    )  # fmt: skip
    honest = [n for n in nodes if n.adversary is None]
    assert all(len(n.trust.proven()) == 3 and not n.trust.quarantined() for n in honest)
    assert clean_report["mean_auc"] - report["mean_auc"] > TARGET


class Crash(Exception):
    """Stands in for SIGKILL: the node stops dead after sending round CRASH_ROUND."""


CRASH_ROUND = 3


@pytest.mark.parametrize("keep_signed_round", [True, False])
def test_a_node_restarted_after_sending_is_never_proven_to_equivocate(
    tmp_path: Path, keep_signed_round: bool
) -> None:
    argv = [*COMMON[:-1], "3", "--aggregator", "clipping:1", "--quiet", "--out", str(tmp_path)]
    args = run_cluster.parse_args(argv)
    specs, _ = run_cluster.write_network(args, tmp_path)
    nodes = [HospitalNode(load_config(s.config_path)) for s in specs]
    by_address = {s.address: n for s, n in zip(specs, nodes, strict=True)}

    def transport(node: HospitalNode) -> MemoryTransport:
        return MemoryTransport(by_address, node.identity)

    victim = nodes[0]
    original_send = victim.sender.send

    async def send_then_crash(r, transport_, peers, envelope, sha) -> None:
        await original_send(r, transport_, peers, envelope, sha)
        if r == CRASH_ROUND:
            raise Crash

    victim.sender.send = send_then_crash  # type: ignore[method-assign]
    # Envelopes the other nodes are handing to the victim when it "crashes": a killed process
    # would drop them; here they finish before its audit log closes (else they write to it).
    receiving = 0
    original_receive = victim.receive

    async def counted_receive(*args: Any, **kwargs: Any) -> tuple[int, str, str]:
        nonlocal receiving
        receiving += 1
        try:
            return await original_receive(*args, **kwargs)
        finally:
            receiving -= 1

    victim.receive = counted_receive  # type: ignore[method-assign]

    async def scenario() -> HospitalNode:
        others = [asyncio.create_task(n.run_rounds(transport(n))) for n in nodes[1:]]
        with pytest.raises(Crash):
            await victim.run_rounds(transport(victim))
        for _ in range(500):  # bounded: at most 5 s
            if not receiving:
                break
            await asyncio.sleep(0.01)
        victim.audit.close()  # no await from here until the restarted node takes its address
        if not keep_signed_round:
            (victim.state_dir / SIGNED_ROUND_FILE).unlink()
        restarted = HospitalNode(load_config(specs[0].config_path))
        by_address[specs[0].address] = restarted
        await asyncio.gather(restarted.run_rounds(transport(restarted)), *others)
        return restarted

    restarted = asyncio.run(scenario())
    for node in [restarted, *nodes[1:]]:
        node.audit.close()
    assert restarted.next_round == CRASH_ROUND  # it really resumed inside the signed round
    name = victim.config.node.name
    accused = [peer for n in nodes[1:] for peer in n.trust.proven()]
    sent = [r.round for r in records_of_kind(restarted.state_dir, "update_sent")]
    if keep_signed_round:
        assert accused == []
        resumed = records_of_kind(restarted.state_dir, "round_resumed")
        assert [r.round for r in resumed] == [CRASH_ROUND]
        assert sent.count(CRASH_ROUND) == 1  # round 3 was sent once, before the crash
        history = json.loads((restarted.state_dir / "status.json").read_text())["history"]
        assert history[-1]["round"] == 6 and [h["round"] for h in history].count(3) == 1
    else:
        # Signing round 3 a second time is exactly what every peer proves.
        assert sent.count(CRASH_ROUND) == 2
        assert accused == [name] * (len(nodes) - 1)
