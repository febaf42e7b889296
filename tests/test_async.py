"""Asynchronous gossip ([gossip] asynchronous, max_staleness; docs/protocol.md): the inbox's
newest-per-sender rule and staleness bound, the `stale_model` refusal a node counts, the
config checks, and a network in which one hospital five times slower holds no one up."""

from __future__ import annotations

import asyncio
import importlib
import json
import logging
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from murmur.gossip.memory_transport import MemoryTransport
from murmur.gossip.probe import Contact
from murmur.gossip.rounds import InboxVerdict, RoundInbox
from murmur.gossip.transport import SendResult
from murmur.gossip.wire import ModelUpdate, build_envelope
from murmur.node.audit import records_of_kind
from murmur.node.config import ConfigError, parse_config

import run_cluster
from tests.netutil import REPO, build_node
from tests.test_config import with_

# bench/async.py's in-process network (its module name is a keyword, hence importlib)
bench_async = importlib.import_module("bench.async")


def async_inbox(max_round: int = 20) -> RoundInbox[str]:
    return RoundInbox(max_round=max_round, asynchronous=True)


def test_each_sender_keeps_only_its_newest_model_not_yet_taken() -> None:
    inbox = async_inbox()
    assert inbox.offer("b", 1, "b1") is InboxVerdict.ACCEPTED
    assert inbox.offer("b", 3, "b3") is InboxVerdict.ACCEPTED  # replaces b1, untaken
    assert inbox.offer("b", 2, "b2 late") is InboxVerdict.OLD_ROUND  # older than what it sent
    assert inbox.offer("b", 3, "b3 again") is InboxVerdict.DUPLICATE
    assert inbox.offer("b", 21, "past the plan") is InboxVerdict.TOO_FAR_AHEAD
    # no round barrier: a peer far ahead of this node's step is not "too far ahead"
    assert inbox.offer("c", 15, "c15") is InboxVerdict.ACCEPTED
    fresh, stale = inbox.take_fresh(1, max_staleness=3, expected=["b", "c"])
    assert fresh == {"b": "b3", "c": "c15"} and stale == {}
    # taken means forgotten: the next step gets only what arrived since
    assert inbox.take_fresh(2, max_staleness=3, expected=["b", "c"]) == ({}, {})
    assert inbox.offer("b", 3, "b3 replayed") is InboxVerdict.DUPLICATE  # still refused


def test_a_model_older_than_max_staleness_steps_is_dropped_and_returned() -> None:
    inbox = async_inbox()
    inbox.offer("at_limit", 7, "m7")
    inbox.offer("one_over", 6, "m6")
    inbox.offer("ahead", 12, "m12")
    fresh, stale = inbox.take_fresh(10, max_staleness=3, expected=["at_limit", "one_over", "ahead"])
    assert fresh == {"at_limit": "m7", "ahead": "m12"}  # 10 - 7 = 3 is still fresh
    assert stale == {"one_over": 6}  # 10 - 6 = 4 > 3: its round, to be counted
    # a dropped model is gone too: it is not offered again at the next step
    assert inbox.take_fresh(11, max_staleness=10, expected=["one_over"]) == ({}, {})


def test_max_staleness_zero_takes_only_models_of_this_very_step_or_later() -> None:
    inbox = async_inbox()
    inbox.offer("same", 5, "s")
    inbox.offer("behind", 4, "b")
    fresh, stale = inbox.take_fresh(5, max_staleness=0, expected=["same", "behind"])
    assert fresh == {"same": "s"} and stale == {"behind": 4}


def test_take_fresh_leaves_unexpected_senders_and_newest_does_not_consume() -> None:
    inbox = async_inbox()
    inbox.offer("b", 2, "b2")
    inbox.offer("outsider", 2, "o2")
    assert inbox.newest(["b"]) == {"b": "b2"}  # what a rushing attacker reads
    assert inbox.newest(["b"]) == {"b": "b2"}  # still there
    fresh, _ = inbox.take_fresh(2, max_staleness=3, expected=["b"])
    assert fresh == {"b": "b2"}
    assert inbox.newest(["outsider"]) == {"outsider": "o2"}  # not taken for "b"'s step


def peer_envelope(tmp_path: Path, node: Any, round_: int) -> bytes:
    from murmur.crypto.identity import load_identity

    peer = load_identity(tmp_path / "keys" / "hospital_1.key")
    state = {k: v + round_ for k, v in node.study.state().items()}
    return build_envelope(ModelUpdate(state, metrics={}), peer, [node.identity.public_key], round_)


async def test_a_stale_model_is_refused_counted_and_audited(tmp_path: Path) -> None:
    node = build_node(tmp_path, nodes=3, gossip={"asynchronous": True, "max_staleness": 2})
    try:
        assert node.inbox.asynchronous
        assert await node.receiver.receive(peer_envelope(tmp_path, node, 1)) == (
            202,
            "accepted",
            "",
        )
        got = node.rounds._take_fresh(4, ["hospital_1", "hospital_2"])  # 4 - 1 = 3 > 2
        assert got.messages == {} and got.missing == ["hospital_1", "hospital_2"]
        assert node.rejected["stale_model"] == 1
        assert node.state.rejected["stale_model"] == 1
        metric = node.metrics.rejected.labels(reason="stale_model")._value.get()
        assert metric == 1
        refused = [
            rec
            for rec in records_of_kind(node.state_dir, "message_received")
            if rec.fields.get("reason") == "stale_model"
        ]
        assert len(refused) == 1 and refused[0].fields["sender"] == "hospital_1"
        assert refused[0].round == 4 and "3 steps old" in refused[0].fields["detail"]
        # a model within the bound is taken, and nothing more is counted
        assert (await node.receiver.receive(peer_envelope(tmp_path, node, 3)))[0] == 202
        got = node.rounds._take_fresh(5, ["hospital_1", "hospital_2"])
        assert list(got.messages) == ["hospital_1"] and got.missing == ["hospital_2"]
        assert node.rejected["stale_model"] == 1
    finally:
        node.audit.close()


def test_bad_asynchronous_configs_name_the_field_and_the_fix(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"gossip.max_staleness must be >= 0.*fix:"):
        parse_config(with_("gossip", asynchronous=True, max_staleness=-1))
    with pytest.raises(ConfigError, match=r"gossip.asynchronous cannot be combined.*fix:"):
        parse_config(with_("gossip", asynchronous=True, sample_peers=2))
    for argv in (
        ["--asynchronous", "--max-staleness", "-1"],
        ["--asynchronous", "--sample-peers", "2"],
    ):
        with pytest.raises(SystemExit):
            run_cluster.parse_args(["--nodes", "4", "--no-dp", *argv])


def test_one_slow_hospital_holds_no_one_up_and_everyone_converges(tmp_path: Path) -> None:
    """Six hospitals on a complete graph, hospital_0's training step 5x the others'. In
    synchronous rounds everyone finishes with it; asynchronously the five others finish
    their steps in well under half that time, nobody waited out a deadline, the slow one's
    models still reach the others, and every node ends near the synchronous AUC."""
    logging.disable(logging.WARNING)
    argv = [
        *("--nodes", "6", "--seed", "0", "--alpha", "0.5", "--rounds", "6", "--no-dp"),
        *("--preprocessing", "reference", "--round-timeout", "60"),
    ]
    step_s = 0.2
    delays = {0: 5 * step_s, **{i: step_s for i in range(1, 6)}}
    try:
        sync = bench_async.run_network(argv, tmp_path / "sync", delays)
        run = bench_async.run_network(
            [*argv, "--asynchronous", "--max-staleness", "6"], tmp_path / "async", delays
        )
    finally:
        logging.disable(logging.NOTSET)
    slow_done = float(sync.times[0, -1])
    assert slow_done >= 6 * 5 * step_s
    assert float(sync.times[1:, -1].min()) > 0.9 * slow_done  # the barrier holds them
    others_done = float(run.times[1:, -1].max())
    assert others_done < 0.5 * float(run.times[0, -1])
    assert others_done < 0.5 * slow_done
    # every one of the others heard hospital_0 at least once (max_staleness 6 = the plan),
    # and no step of anyone waited: the asynchronous step takes what is there
    for i in range(1, 6):
        history = json.loads(
            (tmp_path / "async" / "nodes" / f"hospital_{i}" / "status.json").read_text()
        )["history"]
        assert len(history) == 6
        assert any("hospital_0" in h["received"] for h in history)
    sync_auc = float(sync.aucs[:, -1].mean())
    assert sync_auc > 0.95
    assert np.all(run.aucs[:, -1] > sync_auc - 0.03)


class ExitingTransport(MemoryTransport):
    """The in-memory transport, with a node whose planned steps are done gone, as a node
    process is with `node.after_training = "exit"`: sends and probes to it are unreachable."""

    def gone(self, peer: Any) -> bool:
        return self.nodes[peer.address].state.phase == "done"

    async def send(self, peer: Any, envelope: bytes, signer: Any = None) -> SendResult:
        if self.gone(peer):
            return SendResult(peer.name, False, None, "unreachable: connection refused", 0.0)
        return await super().send(peer, envelope, signer)

    async def probe(self, peer: Any, probe: bytes, timeout_s: float) -> Contact:
        if self.gone(peer):
            return Contact.from_answer(None, "unreachable: connection refused", "", source="probe")
        return await super().probe(peer, probe, timeout_s)


async def test_a_slow_node_finishes_its_steps_after_the_fast_ones_exited(tmp_path: Path) -> None:
    """Without the finished-peer rule the slow node waits for neighbours that can take its
    envelope (min_neighbours 2 for clipping:1) forever once the fast three have exited."""
    from murmur.node.config import load_config
    from murmur.node.node import HospitalNode

    args = run_cluster.parse_args(
        [
            *("--nodes", "4", "--rounds", "5", "--no-dp", "--asynchronous"),
            *("--max-staleness", "5", "--quiet", "--out", str(tmp_path)),
        ]
    )
    nodes, _ = run_cluster.write_network(args, tmp_path)
    hospitals = [HospitalNode(load_config(n.config_path)) for n in nodes]
    slow = hospitals[0]
    train = slow.study.train_round

    def slow_train(reference: Any) -> Any:
        time.sleep(0.4)
        return train(reference)

    slow.study.train_round = slow_train
    by_address = {n.address: h for n, h in zip(nodes, hospitals, strict=True)}
    try:
        async with asyncio.timeout(60):
            await asyncio.gather(
                *(h.run_rounds(ExitingTransport(by_address, h.identity)) for h in hospitals)
            )
    finally:
        for h in hospitals:
            h.audit.close()
    assert [h.state.phase for h in hospitals] == ["done"] * 4
    assert [len(h.state.history) for h in hospitals] == [5] * 4
    # its last steps went ahead with every neighbour gone (each send to them failed)
    sent = records_of_kind(slow.state_dir, "update_sent")
    assert len(sent) == 5 and len(sent[-1].fields["failed"]) == 3


@pytest.mark.slow
def test_asynchronous_hospitals_in_two_processes_over_http(tmp_path: Path) -> None:
    """run_cluster --asynchronous with real node processes (two, two hospitals each): every
    node runs every step, hears its peers over HTTP and reports itself asynchronous."""
    out = tmp_path / "run"
    done = subprocess.run(
        [
            *(sys.executable, "run_cluster.py", "--nodes", "4", "--hosts-per-process", "2"),
            *("--rounds", "4", "--no-dp", "--asynchronous", "--max-staleness", "4"),
            *("--no-baselines", "--quiet", "--out", str(out)),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    report = json.loads((out / "report.json").read_text())
    assert report["asynchronous"] is True and report["rounds_completed"] == 4
    assert not report["failed"]
    heard = 0
    for state in sorted((out / "nodes").iterdir()):
        status = json.loads((state / "status.json").read_text())
        assert [h["round"] for h in status["history"]] == [1, 2, 3, 4]
        assert status["phase"] == "done"
        heard += sum(len(h["received"]) for h in status["history"])
        config = (state.parent.parent / "configs" / f"{state.name}.toml").read_text()
        assert "asynchronous = true" in config
    assert heard > 0  # models crossed the processes without any round barrier
