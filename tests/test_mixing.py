"""Mixing weights by patient count (node/mixing.py): shares of the counts the signed study
manifest fixes, capped per neighbour, and never taken from what a peer says of itself."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from murmur.crypto.identity import generate_identity
from murmur.models.params import flatten, state_sha256
from murmur.node.config import ConfigError, load_config
from murmur.node.mixing import patient_weights
from murmur.node.state import StartupError
from murmur.node.studies.manifest import sign_manifest, write_manifest

import run_cluster
from tests.netutil import Network, build_node, make_network
from tests.studyutil import SITE_KEYS
from tests.test_node_parts import received

COUNTS = {"a": 100, "b": 300, "c": 50, "d": 550}


def test_weights_are_shares_of_the_counts_and_sum_to_one() -> None:
    w = patient_weights("a", ["b", "c"], COUNTS, [1.0, 1.0], max_weight=1.0)
    np.testing.assert_allclose(w, [100 / 450, 300 / 450, 50 / 450])
    assert w.sum() == pytest.approx(1.0)


def test_no_neighbour_weighs_more_than_the_cap_and_the_excess_stays_home() -> None:
    # d holds 550 / 1000 of the patients a sees; capped at 1/3 it gets exactly 1/3
    w = patient_weights("a", ["b", "c", "d"], COUNTS, [1.0] * 3, max_weight=1 / 3)
    np.testing.assert_allclose(w[1:], [0.3, 0.05, 1 / 3])
    assert w[0] == pytest.approx(1 - 0.3 - 0.05 - 1 / 3) and w.sum() == pytest.approx(1.0)


def test_trust_scales_a_share_and_an_uncounted_neighbour_weighs_nothing() -> None:
    w = patient_weights("a", ["b", "stranger", "c"], COUNTS, [0.5, 1.0, 0.0], max_weight=1.0)
    np.testing.assert_allclose(w[1:], [0.5 * 300 / 450, 0.0, 0.0])
    assert w[0] == pytest.approx(1 - 0.5 * 300 / 450)


# ---------------------------------------------------------------------------- the config


def counts_of(*args: str) -> dict[str, int]:
    return run_cluster.hospital_counts(run_cluster.parse_args(list(args)))


def weighted_network(tmp_path: Path, nodes: int = 3) -> Network:
    return make_network(
        tmp_path,
        *("--nodes", str(nodes), "--no-dp", "--aggregator", "mean", "--weighting", "patients"),
    )


def test_run_cluster_writes_every_hospitals_count_into_every_config(tmp_path: Path) -> None:
    net = weighted_network(tmp_path)
    expected = counts_of("--nodes", "3")
    for node in net.nodes:
        config = load_config(node.config_path)
        assert config.aggregation.weighting == "patients"
        assert config.aggregation.patients == expected


def test_a_missing_count_is_a_config_error_naming_the_field_and_the_fix(tmp_path: Path) -> None:
    net = weighted_network(tmp_path)
    path = net.node("hospital_0").config_path
    doc = tomllib.loads(path.read_text())
    del doc["aggregation"]["patients"]["hospital_2"]
    path.write_text(run_cluster.to_toml(doc))
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    message = str(caught.value)
    assert "aggregation.patients.hospital_2 is missing" in message
    assert "fix: add hospital_2 = N" in message


@pytest.mark.parametrize(
    ("aggregation", "field", "problem"),
    [
        ({"rule": "clipping", "f": 1, "max_weight": 0.5}, "aggregation.max_weight", "half"),
        ({"rule": "median", "f": 1}, "aggregation.weighting", "only the weights"),
        ({"max_weight": 0.0}, "aggregation.max_weight", "(0, 1]"),
        ({"weighting": "by_size"}, "aggregation.weighting", "unknown weighting"),
    ],
)
def test_a_cap_that_lets_f_neighbours_outweigh_the_rest_is_refused(
    tmp_path: Path, aggregation: dict[str, Any], field: str, problem: str
) -> None:
    net = weighted_network(tmp_path)
    net.edit_config("hospital_0", "aggregation", **aggregation)
    with pytest.raises(ConfigError, match="fix:") as caught:
        load_config(net.node("hospital_0").config_path)
    assert str(caught.value).startswith(field) and problem in str(caught.value)


def test_a_count_that_is_not_the_own_training_split_stops_the_node(tmp_path: Path) -> None:
    counts = counts_of("--nodes", "2")
    wrong = {**counts, "hospital_0": counts["hospital_0"] * 10}
    with pytest.raises(StartupError, match=r"aggregation.patients.hospital_0 = .* fix:"):
        build_node(tmp_path, aggregation={"weighting": "patients", "patients": wrong})


# ---------------------------------------------------------------------------- the manifest


def signed_study(net: Network, tmp_path: Path) -> Path:
    """A manifest signed by hospital_0's proposer with the sections run_cluster wrote."""
    config = tomllib.loads(net.node("hospital_0").config_path.read_text())
    content: dict[str, Any] = {"study": {"name": "weighted", "topology": "complete"}}
    for section in ("data", "model", "training", "privacy", "aggregation"):
        content[section] = {k: v for k, v in config[section].items() if k not in SITE_KEYS}
    manifest = tmp_path / "weighted.json"
    write_manifest(sign_manifest(content, generate_identity("proposer")), manifest)
    return manifest


def test_the_counts_come_from_the_signed_manifest_and_cannot_be_inflated(
    tmp_path: Path,
) -> None:
    net = weighted_network(tmp_path / "net")
    manifest = signed_study(net, tmp_path)
    counts = counts_of("--nodes", "3")
    for node in net.nodes:  # every node's own config now names no counts: the manifest does
        path = node.config_path
        doc = tomllib.loads(path.read_text())
        doc["aggregation"] = {}
        doc["study"] = {"manifest": str(manifest)}
        path.write_text(run_cluster.to_toml(doc))
    assert load_config(net.node("hospital_0").config_path).aggregation.patients == counts
    # hospital_1 claiming ten times its patients in its own config is refused ...
    net.edit_config("hospital_1", "aggregation", patients={**counts, "hospital_1": 10_000})
    with pytest.raises(ConfigError, match=r"aggregation.patients = .* fix: remove"):
        load_config(net.node("hospital_1").config_path)
    # ... and so is a manifest whose count was raised after it was signed
    document = json.loads(manifest.read_text())
    document["manifest"]["aggregation"]["patients"]["hospital_1"] = 10_000
    manifest.write_text(json.dumps(document))
    with pytest.raises(ConfigError, match="manifest_forged"):
        load_config(net.node("hospital_0").config_path)


# ---------------------------------------------------------------------------- aggregating


def test_the_mean_weighs_each_model_by_its_hospitals_signed_count_capped(
    tmp_path: Path,
) -> None:
    counts = counts_of("--nodes", "3", "--alpha", "0.3")  # 138, 22 and 265 patients
    node = build_node(
        tmp_path,
        nodes=3,
        data={"alpha": 0.3},
        aggregation={"weighting": "patients", "patients": counts},
        trust={"enabled": False},
    )
    try:
        own = node.study.state()
        models = {f"hospital_{i}": {k: v + float(i) for k, v in own.items()} for i in (1, 2)}
        # What a peer might say of itself travels nowhere near the weights: the envelope
        # carries tensors, and the aggregator reads the counts from the config only.
        inbox = {name: received(state) for name, state in models.items()}
        new_state, _, _ = node.aggregator.aggregate(1, own, state_sha256(own), inbox)
        total = sum(counts.values())
        w1 = counts["hospital_1"] / total
        w2 = min(counts["hospital_2"] / total, 1 / 3)  # 0.62 of the patients, capped at 1/3
        assert w2 == pytest.approx(1 / 3)
        expected = (
            (1 - w1 - w2) * flatten(own)
            + w1 * flatten(models["hospital_1"])
            + w2 * flatten(models["hospital_2"])
        )
        np.testing.assert_allclose(flatten(new_state), expected, rtol=1e-5, atol=1e-6)
        # not the equal (Metropolis-Hastings) mean of a complete graph of three
        equal = (flatten(own) + flatten(models["hospital_1"]) + flatten(models["hospital_2"])) / 3
        assert not np.allclose(flatten(new_state), equal, atol=1e-2)
        (record,) = [r for r in node.audit.last(5) if r.kind == "aggregation"]
        assert [u["peer"] for u in record.fields["used"]] == ["hospital_1", "hospital_2"]
    finally:
        node.audit.close()
