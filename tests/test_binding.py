"""A checkpoint resumes after operational config edits, never after a change to the fields
that decide privacy and the model (node/binding.py, docs/config.md)."""

from __future__ import annotations

import asyncio
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from murmur.gossip.memory_transport import MemoryTransport
from murmur.node.binding import BOUND_FIELDS, binding_problem, config_binding
from murmur.node.checkpoint import (
    CheckpointError,
    checkpoint_path,
    decode_checkpoint,
    save_checkpoint,
)
from murmur.node.config import load_config
from murmur.node.node import HospitalNode

import run_cluster
from tests.netutil import Network, make_network


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Network:
    """Two DP hospitals that trained their 3 planned rounds together (in process)."""
    net = make_network(
        tmp_path_factory.mktemp("bound"),
        "--nodes", "2", "--rounds", "3", "--dp-epsilon", "1", "--aggregator", "clipping:0",
    )  # fmt: skip
    nodes = [HospitalNode(load_config(n.config_path)) for n in net.nodes]
    by_address = {n.address: h for n, h in zip(net.nodes, nodes, strict=True)}

    async def run() -> None:
        await asyncio.gather(
            *(h.run_rounds(MemoryTransport(by_address, h.identity)) for h in nodes)
        )

    try:
        asyncio.run(run())
    finally:
        for h in nodes:
            h.audit.close()
    assert all(len(h.state.history) == 3 for h in nodes)
    return net


@pytest.fixture
def node_config(trained: Network) -> Iterator[Path]:
    """hospital_0's config, put back as it was after each test."""
    path = trained.nodes[0].config_path
    original = path.read_text()
    yield path
    path.write_text(original)


def resume(config: Path) -> HospitalNode:
    node = HospitalNode(load_config(config))
    node.audit.close()
    return node


def edit(config: Path, section: str, **values: Any) -> None:
    doc = tomllib.loads(config.read_text())
    doc.setdefault(section, {}).update(values)
    config.write_text(run_cluster.to_toml(doc))


def refusal(config: Path) -> str:
    with pytest.raises(CheckpointError) as err:
        resume(config)
    return str(err.value)


def test_comments_addresses_and_timeouts_may_change(node_config: Path) -> None:
    before = resume(node_config)
    assert before.next_round == 4 and before.ledger is not None
    spent = before.ledger.steps_taken
    assert spent > 0
    doc = tomllib.loads(node_config.read_text())
    doc["peers"][0]["address"] = "http://10.9.8.7:8701"  # the neighbour moved
    doc["gossip"]["round_timeout_s"] = 30.0
    doc["trust"] = {"decay": 0.5}
    node_config.write_text("# moved hospital_1 to its new server\n" + run_cluster.to_toml(doc))
    after = resume(node_config)
    assert after.next_round == 4 and after.ledger is not None
    assert after.ledger.steps_taken == spent  # the same budget, neither reset nor re-spent
    assert after.peers[0].address == "http://10.9.8.7:8701"


@pytest.mark.parametrize(
    ("section", "values", "expected"),
    [
        ("privacy", {"epsilon": 2.0}, "privacy.epsilon: 1.0 -> 2.0 (this would ENLARGE"),
        ("privacy", {"delta": 1e-4}, "privacy.delta: "),
        ("privacy", {"enabled": False}, "privacy.enabled: True -> False (this would ENLARGE"),
        ("training", {"rounds": 5}, "training.rounds: 3 -> 5 (this would ENLARGE"),
        ("model", {"name": "mlp"}, "model.name: 'logreg' -> 'mlp'"),
        ("data", {"seed": 7}, "data.fingerprint: "),
        ("aggregation", {"rule": "median"}, "aggregation.rule: 'clipping' -> 'median'"),
        (
            "aggregation",
            {"weighting": "patients", "patients": {"hospital_0": 213, "hospital_1": 213}},
            "aggregation.weighting: 'metropolis' -> 'patients'",
        ),
    ],
    ids=["epsilon", "delta", "dp-off", "rounds", "model", "data", "rule", "weighting"],
)
def test_a_change_to_a_bound_field_is_refused_with_the_field_and_the_fix(
    node_config: Path, section: str, values: dict[str, Any], expected: str
) -> None:
    edit(node_config, section, **values)
    text = refusal(node_config)
    assert expected in text, text
    assert "Fix: put back" in text and str(node_config) in text
    assert "new deployment" in text and "never delete" in text


def test_a_shrunk_budget_is_refused_too_and_names_the_value_to_put_back(
    node_config: Path,
) -> None:
    edit(node_config, "privacy", epsilon=0.5)
    text = refusal(node_config)
    assert "privacy.epsilon: 1.0 -> 0.5 (the privacy budget would change)" in text
    assert "put back privacy.epsilon = 1.0" in text


def test_a_checkpoint_from_before_bindings_resumes_only_under_its_exact_file(
    node_config: Path, trained: Network
) -> None:
    path = checkpoint_path(trained.nodes[0].state_dir)
    original = path.read_bytes()
    old = decode_checkpoint(original)
    old.binding = {}  # what an earlier murmur wrote: only the config file's raw SHA-256
    save_checkpoint(path.parent, old)
    exact = node_config.read_text()
    try:
        node_config.write_text("# a comment\n" + exact)
        text = refusal(node_config)
        assert "earlier murmur" in text and "exactly as it was" in text, text
        node_config.write_text(exact)
        assert resume(node_config).next_round == 4  # the exact file: it resumes, and binds
        assert decode_checkpoint(path.read_bytes()).binding
        node_config.write_text("# a comment\n" + exact)
        assert resume(node_config).next_round == 4  # bound now: the comment is fine
    finally:
        path.write_bytes(original)


def test_every_bound_field_has_a_value_and_unbound_changes_are_not_problems(
    trained: Network,
) -> None:
    config = load_config(trained.nodes[0].config_path)
    binding = config_binding(config, public_key=b"\x01" * 32, fingerprint="ab" * 32, delta=1e-5)
    assert list(binding) == [f.name for f in BOUND_FIELDS]
    assert binding_problem(binding, dict(binding), "x.toml") is None
    newer = {**binding, "training.some_future_field": 3}  # bound by a later murmur
    assert binding_problem(binding, newer, "x.toml") is None
