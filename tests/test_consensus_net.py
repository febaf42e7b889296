"""The consensus phase of node/consensus_net.py between real `HospitalNode`s in one process,
their messages sealed, posted and opened as over HTTP (gossip/memory_transport.py hands the
bodies to `answer_consensus`): every node writes the same agreed model, and the pooled AUROC
from the masked histograms equals scikit-learn's on the pooled scores within the bins'
resolution, and no per-patient score is in any message or log line."""

from __future__ import annotations

import asyncio
import logging
import types
from pathlib import Path

import numpy as np
from murmur.gossip.memory_transport import MemoryTransport
from murmur.models.params import set_state
from murmur.models.training import predict_proba
from murmur.node import consensus_net
from murmur.node.config import load_config
from murmur.node.consensus import load_agreed_model, read_agreement
from murmur.node.consensus_net import run_network_phase
from murmur.node.lifecycle import finished_already
from murmur.node.node import HospitalNode
from sklearn.metrics import roc_auc_score

import run_cluster
from tests.test_pooled_privacy import scores_visible


async def train_then_agree(tmp_path: Path, nodes: int) -> list[HospitalNode]:
    args = run_cluster.parse_args(
        [
            *("--out", str(tmp_path), "--nodes", str(nodes), "--rounds", "2", "--no-dp"),
            *("--aggregator", "mean", "--round-timeout", "30", "--consensus", "--quiet"),
        ]
    )
    written, _ = run_cluster.write_network(args, tmp_path)
    hospitals = [HospitalNode(load_config(n.config_path)) for n in written]
    by_address = {n.address: h for n, h in zip(written, hospitals, strict=True)}
    try:
        await asyncio.gather(
            *(h.run_rounds(MemoryTransport(by_address, h.identity)) for h in hospitals)
        )
        await asyncio.gather(
            *(run_network_phase(h, MemoryTransport(by_address, h.identity)) for h in hospitals)
        )
    finally:
        for h in hospitals:
            h.audit.close()
    return hospitals


def test_nodes_agree_and_the_pooled_auroc_is_the_pooled_scores_auroc(
    tmp_path: Path, monkeypatch, caplog
) -> None:
    sent: list[bytes] = []  # every body posted, and the plaintext of every message sealed

    def recording_seal(sender, recipient, message, spec):
        body = original_seal(sender, recipient, message, spec)
        offers = b"".join(b"".join(a.tobytes() for a in d.model.values()) for d in message.offers)
        sent.extend([body, offers, *message.shares, repr(message.agreed).encode()])
        return body

    original_seal = consensus_net.seal_message
    monkeypatch.setattr(consensus_net, "seal_message", recording_seal)
    with caplog.at_level(logging.DEBUG):
        hospitals = asyncio.run(train_then_agree(tmp_path, 4))
    docs = [read_agreement(h.state_dir) for h in hospitals]
    assert len({d["model_sha256"] for d in docs}) == 1
    names = sorted(h.config.node.name for h in hospitals)
    for doc in docs:
        assert sorted(doc["valid_signers"]) == names and doc["excluded"] == []
        assert doc["round"] == 2 and doc["extra_rounds"] == 2
    agreed = load_agreed_model(hospitals[0].state_dir)
    ys, ps = [], []
    for h in hospitals:
        set_state(h.study.model, agreed)
        ys.append(h.data.y_test)
        ps.append(predict_proba(h.study.model, h.data.x_test))
    exact = roc_auc_score(np.concatenate(ys), np.concatenate(ps))
    for doc in docs:
        auroc = doc["pooled_evaluation"]["pooled"]["auroc"]
        assert abs(auroc["value"] - exact) <= max(auroc["max_binning_error"], 1e-9) + 1e-12
        assert abs(auroc["value"] - exact) < 0.002
    for h in hospitals:
        assert h.state.rejected == {}, h.state.rejected  # nothing honest was refused
    # No hospital's per-patient score is in any message, log line or agreement file; the
    # control shows the check would catch a score sent outside the histogram path.
    text = caplog.text + "".join(
        (h.state_dir / "agreed" / "agreement.json").read_text() for h in hospitals
    )
    assert sent
    for p in ps:  # a saturated 1.0 or 0.0 is in any text; every other score is checked
        checked = p[(p > 0.0) & (p < 1.0)]
        assert len(checked) > 0.8 * len(p)
        assert scores_visible(sent, text, checked) == []
    assert len(scores_visible([*sent, ps[0].astype("<f8").tobytes()], text, ps[0])) == len(ps[0])


def test_a_trained_node_without_an_agreement_runs_the_phase_on_restart(tmp_path: Path) -> None:
    node = types.SimpleNamespace(
        next_round=3,
        config=types.SimpleNamespace(training=types.SimpleNamespace(rounds=2)),
        consensus_inbox=object(),
        state_dir=tmp_path,
        study=types.SimpleNamespace(budget_spent=lambda: False),
    )
    assert finished_already(node) is None
    (tmp_path / "agreed").mkdir()
    (tmp_path / "agreed" / "agreement.json").write_text("{}")
    assert finished_already(node) == "done"
    node.consensus_inbox = None
    (tmp_path / "agreed" / "agreement.json").unlink()
    assert finished_already(node) == "done"
