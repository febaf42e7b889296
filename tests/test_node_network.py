"""Real `murmur node` processes on loopback: they learn together, survive a dead neighbour,
and refuse bad messages without stopping."""

from __future__ import annotations

import asyncio
import time
import urllib.request
from pathlib import Path

import aiohttp
import numpy as np
import pytest
from murmur.crypto.identity import Identity, generate_identity, load_identity
from murmur.gossip.auth import request_headers
from murmur.gossip.wire import ModelUpdate, build_envelope

from tests.netutil import Network, make_network

pytestmark = pytest.mark.slow


def post(
    address: str, body: bytes, signer: Identity | None = None, recipient: bytes = b""
) -> tuple[int, dict]:
    """POST /gossip as `signer` would send it to the node whose key is `recipient` (with the
    signed Murmur-Auth header), or as a stranger without one. With aiohttp, as nodes send:
    it reads the answer while it sends, so a body refused from the headers (and not read
    by the node) still gets its answer."""

    async def send() -> tuple[int, dict]:
        headers = (
            request_headers(signer, recipient, "/gossip", body, "application/x-murmur-envelope")
            if signer is not None
            else {}
        )
        async with (
            aiohttp.ClientSession() as session,
            session.post(
                f"{address}/gossip",
                data=body,
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=10),
            ) as response,
        ):
            return response.status, await response.json()

    return asyncio.run(send())


def wait_for_api(net: Network, name: str, timeout_s: float = 60) -> dict:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        try:
            return net.status(name)
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"{name} never answered /status; log:\n{net.log(name)}")


@pytest.fixture
def network_factory(tmp_path: Path):
    made: list[Network] = []

    def make(*args: str, sub: str = "net") -> Network:
        net = make_network(tmp_path / sub, *args)
        made.append(net)
        return net

    yield make
    for net in made:
        net.kill_all()


@pytest.mark.parametrize("topology", ["complete", "ring"])
def test_four_nodes_agree_and_improve(network_factory, topology: str) -> None:
    net = network_factory(
        "--nodes",
        "4",
        "--topology",
        topology,
        "--rounds",
        "6",
        "--no-dp",
        "--aggregator",
        "mean",
        "--lr",
        "0.05",
        "--round-timeout",
        "20",
    )
    # Start every hospital from a different random model, so agreement has to be earned.
    for i, node in enumerate(net.nodes):
        net.edit_config(node.name, "training", seed=100 + i)
    net.start_all()
    codes = net.wait_all(timeout_s=180)
    assert codes == {n.name: 0 for n in net.nodes}, {n.name: net.log(n.name) for n in net.nodes}
    for node in net.nodes:
        history = net.final_status(node.name)["history"]
        assert [h["round"] for h in history] == [1, 2, 3, 4, 5, 6]
        assert all(not h["missing"] for h in history), history
        first, last = history[0], history[-1]
        # Disagreement with neighbours shrinks as gossip mixes the models.
        assert last["neighbour_distance"] < 0.5 * first["neighbour_distance"], (node.name, history)
        # The shared model beats what this hospital had after round 1 on its own held-out data.
        assert last["metrics"]["brier"] < first["metrics"]["brier"], (node.name, history)


def test_a_killed_neighbour_costs_at_most_the_deadline(network_factory) -> None:
    timeout = 2.0
    net = network_factory(
        "--nodes",
        "4",
        "--topology",
        "complete",
        "--rounds",
        "6",
        "--no-dp",
        "--aggregator",
        "mean",
        "--round-timeout",
        str(timeout),
    )
    victim = net.nodes[-1].name
    # The victim plans far more rounds, so it is certainly still running when it is killed,
    # and trains long enough (~0.5 s a round, under the 2 s deadline) that the network is
    # still in its first rounds when the kill lands: tiny rounds take ~50 ms, and the
    # survivors could otherwise finish all six before the test notices round 2.
    net.edit_config(victim, "training", rounds=10_000, local_epochs=800)
    net.start_all()
    net.wait_for_round(victim, 2, timeout_s=90)
    net.procs[victim].kill()  # SIGKILL: no goodbye
    net.procs[victim].wait(timeout=10)
    killed_at = time.monotonic()
    survivors = [n.name for n in net.nodes if n.name != victim]
    end = time.monotonic() + 120
    for name in survivors:
        assert net.procs[name].wait(timeout=max(1, end - time.monotonic())) == 0, net.log(name)
    assert time.monotonic() - killed_at < 6 * (timeout + 5)
    for name in survivors:
        history = net.final_status(name)["history"]
        assert len(history) == 6
        after = [h for h in history if victim in h["missing"]]
        assert after, f"{name} never noticed {victim} was gone"
        slack = 3.0  # local training and aggregation of a tiny model, on a loaded 2-core box
        assert all(h["seconds"] <= timeout + slack for h in after), history


def test_bad_messages_are_refused_with_reasons_and_the_node_keeps_going(network_factory) -> None:
    net = network_factory(
        "--nodes",
        "2",
        "--topology",
        "complete",
        "--rounds",
        "4",
        "--no-dp",
        "--aggregator",
        "mean",
        "--round-timeout",
        "3",
    )
    a, b = net.nodes[0], net.nodes[1]
    # The forged round-1 envelope below and B's own round-1 envelope are two envelopes B
    # "signed" for one round: A proves B an equivocator and leaves it out for good. A then
    # has no neighbour to share with, so it trains alone, which it must be told explicitly.
    # B never answers A's start-up checks (it refuses to start: A holds a round-1 receipt of
    # B's key that B's state does not reach), so A's start-up patience is kept short.
    net.edit_config(a.name, "gossip", min_neighbours=0, startup_timeout_s=15)
    # Only A runs at first: it serves its API while it waits for B, so every attack below
    # lands on a live node before B joins and the two train together.
    net.start(a.name)
    status = wait_for_api(net, a.name)
    target_round = (
        1  # A's first round: an authentic update is buffered (a later one would make A catch up)
    )

    b_identity = load_identity(b.config_path.parent.parent / "keys" / f"{b.name}.key")
    a_key = bytes.fromhex(status["public_key"])
    from murmur.models.nets import build_model
    from murmur.models.params import (
        get_state,  # the honest model's shapes, to forge a well-formed update
    )

    template = get_state(build_model("logreg", (30,), 0))
    good = build_envelope(ModelUpdate(template, metrics={}), b_identity, [a_key], target_round)
    mallory = generate_identity("mallory")
    outsider = build_envelope(ModelUpdate(template, metrics={}), mallory, [a_key], target_round)
    wrong_shape = {
        k: np.zeros((v.shape[0] + 1, *v.shape[1:]), np.float32) for k, v in template.items()
    }
    misshapen = build_envelope(ModelUpdate(wrong_shape, {}), b_identity, [a_key], target_round + 1)
    nan_state = {k: np.full(v.shape, np.nan, np.float32) for k, v in template.items()}
    poisoned = build_envelope(ModelUpdate(nan_state, {}), b_identity, [a_key], target_round + 1)

    cases = [
        (np.random.default_rng(0).bytes(300), b_identity, 400, "malformed"),
        (np.random.default_rng(1).bytes(300), None, 401, "unauthenticated"),
        (good[: len(good) // 2], b_identity, 400, "malformed"),
        (b"\x00" * (10 * 1024 * 1024), b_identity, 413, "too_large"),
        (outsider, mallory, 401, "unauthenticated"),
        (misshapen, b_identity, 422, "shape_mismatch"),
        (poisoned, b_identity, 422, "non_finite"),
    ]
    for body, signer, code, reason in cases:
        got_code, got = post(a.address, body, signer, a_key)
        assert (got_code, got["reason"]) == (code, reason), (reason, got)
    assert post(a.address, good, b_identity, a_key) == (202, {"reason": "accepted"})
    replay_code, replay = post(a.address, good, b_identity, a_key)
    assert (replay_code, replay["reason"]) == (409, "replay")

    status = net.status(a.name)
    counted = status["rejected"]
    for reason in (
        "malformed",
        "too_large",
        "unauthenticated",
        "shape_mismatch",
        "non_finite",
        "replay",
    ):
        assert counted.get(reason, 0) >= 1, counted
    assert counted["malformed"] >= 2
    assert status["unauthenticated"] == {"missing": 1, "unknown_sender": 1}
    metrics = urllib.request.urlopen(f"{a.operator_address}/metrics", timeout=5).read().decode()
    assert 'murmur_messages_rejected_total{reason="replay"}' in metrics

    net.start(b.name)
    # Only A's run is under test: B, proven an equivocator by A, has no neighbour that takes
    # its envelopes and would wait out its start-up patience (the fixture stops it).
    assert net.procs[a.name].wait(timeout=180) == 0, net.log(a.name)
    assert net.procs[b.name].wait(timeout=30) == 2, net.log(b.name)
    assert "older than what it already signed" in net.log(b.name)
    assert len(net.final_status(a.name)["history"]) == 4  # it kept training after all of it


def test_infeasible_rule_for_the_topology_is_refused_before_round_one(network_factory) -> None:
    net = network_factory(
        "--nodes", "5", "--topology", "ring", "--rounds", "2", "--no-dp", "--aggregator", "mean"
    )
    name = net.nodes[0].name
    net.edit_config(name, "aggregation", rule="krum", f=1)
    proc = net.start(name)
    assert proc.wait(timeout=60) == 2
    log = net.log(name)
    assert name in log and "krum" in log and "neighbours" in log, log


def test_sigterm_ends_cleanly_and_persists_state(network_factory) -> None:
    import signal

    net = network_factory(
        "--nodes", "2", "--rounds", "50", "--no-dp", "--aggregator", "mean", "--round-timeout", "5"
    )
    net.start_all()
    a = net.nodes[0].name
    net.wait_for_round(a, 2, timeout_s=90)
    net.procs[a].send_signal(signal.SIGTERM)
    assert net.procs[a].wait(timeout=30) == 0, net.log(a)
    state_dir = net.node(a).state_dir
    assert (state_dir / "checkpoint.bin").exists() or any(state_dir.glob("checkpoint*"))
    final = net.final_status(a)
    assert final["phase"] == "stopped" and len(final["history"]) >= 2


def test_a_node_started_alone_waits_says_why_and_spends_nothing(network_factory) -> None:
    """The operator's case: a hospital started before its peer, as `murmur node` runs."""
    import signal

    net = network_factory("--nodes", "2", "--rounds", "4", "--aggregator", "clipping:0")
    a, b = net.nodes[0].name, net.nodes[1].name
    net.edit_config(a, "gossip", startup_timeout_s=0.5)
    net.start(a)
    wait_for_api(net, a)
    end = time.monotonic() + 60
    status = net.status(a)
    while status["phase"] != "waiting_for_neighbours" and time.monotonic() < end:
        time.sleep(0.2)
        status = net.status(a)
    time.sleep(3)  # long enough for several rounds, were it training alone
    status = net.status(a)
    assert status["phase"] == "waiting_for_neighbours", net.log(a)
    assert status["privacy"]["enabled"] and status["privacy"]["epsilon_spent"] == 0
    assert status["history"] == [] and status["privacy"]["steps_taken"] == 0
    assert "unreachable" in status["neighbours"]["waiting_for"][b]
    net.procs[a].send_signal(signal.SIGTERM)
    assert net.procs[a].wait(timeout=30) == 0, net.log(a)
    log = net.log(a)
    assert f"Waiting for {b}: unreachable" in log and "No privacy budget is spent" in log
    assert net.final_status(a)["phase"] == "stopped"
