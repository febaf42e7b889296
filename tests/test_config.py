"""The node config: a typo or an impossible value stops the node, naming the field and the fix."""

from __future__ import annotations

from pathlib import Path

import pytest
from murmur.node import config_learning
from murmur.node.config import ConfigError, load_config, parse_config

MINIMAL = {
    "node": {"name": "hospital_a", "key_file": "a.key", "state_dir": "state"},
    "data": {"hospital": "hospital_0"},
}


def with_(section: str, **values: object) -> dict:
    raw = {k: dict(v) for k, v in MINIMAL.items()}
    raw.setdefault(section, {}).update(values)
    return raw


def test_minimal_config_gets_safe_defaults(tmp_path: Path) -> None:
    config = parse_config(MINIMAL, base_dir=tmp_path)
    assert config.node.listen.startswith("127.0.0.1:")  # loopback unless told otherwise
    assert config.privacy.enabled and config.privacy.epsilon == 1.0
    assert config.node.key_file == tmp_path / "a.key"  # relative to the config file


def test_unknown_key_is_named_with_a_suggestion() -> None:
    with pytest.raises(
        ConfigError, match=r"\[training\] unknown key 'local_epoch'.*did you mean 'local_epochs'"
    ):
        parse_config(with_("training", local_epoch=2))


def test_unknown_section_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"unknown section \[privcy\].*did you mean 'privacy'"):
        parse_config({**MINIMAL, "privcy": {}})


@pytest.mark.parametrize(
    ("section", "values", "pattern"),
    [
        ("training", {"rounds": "ten"}, r"training.rounds must be an integer"),
        ("training", {"rounds": 0}, r"training.rounds must be >= 1; fix: rounds = 20"),
        ("privacy", {"epsilon": -1.0}, r"privacy.epsilon must be > 0"),
        ("privacy", {"delta": 2.0}, r"privacy.delta must be in \(0, 1\)"),
        ("privacy", {"accountant": "moments"}, r"privacy.accountant unknown accountant"),
        ("privacy", {"min_site_patients": 0}, r"privacy.min_site_patients must be >= 1.*fix:"),
        ("adversary", {"noise_claim": "huge"}, r"adversary.noise_claim unknown noise claim"),
        ("aggregation", {"rule": "average"}, r"aggregation.rule unknown rule 'average'"),
        ("node", {"listen": "localhost"}, r"node.listen .* must be HOST:PORT"),
        ("data", {"dataset": "mnist"}, r"data.dataset unknown dataset 'mnist'"),
        ("model", {"hidden": [64, "x"]}, r"model.hidden\[1\] must be an integer"),
        (
            "training",
            {"class_weighting": 1},
            r"training.class_weighting must be a string in quotes or true or false",
        ),
        ("training", {"class_weighting": "inverse"}, r"training.class_weighting unknown .*fix:"),
        ("training", {"class_weights": [1.0]}, r"training.class_weights must be two numbers"),
        ("training", {"class_weights": [1.0, -2.0]}, r"training.class_weights must be two numbers"),
        ("data", {"preprocessing": "zscore"}, r"data.preprocessing unknown preprocessing"),
        ("data", {"reference": "ref.csv"}, r"data.reference only applies to dataset = 'csv'"),
        ("evaluation", {"threshold": 1.5}, r"evaluation.threshold must be in \[0, 1\]"),
        ("compression", {"warmup": -1}, r"compression.warmup must be a whole number >= 0"),
    ],
)
def test_bad_values_name_field_and_fix(section: str, values: dict, pattern: str) -> None:
    with pytest.raises(ConfigError, match=pattern):
        parse_config(with_(section, **values))


def test_peer_needs_exactly_one_key_and_a_url() -> None:
    raw = dict(MINIMAL, peers=[{"name": "b", "address": "127.0.0.1:8701", "public_key": "00" * 32}])
    with pytest.raises(ConfigError, match=r"peers\[0\] \(b\).address must be an http\(s\) URL"):
        parse_config(raw)
    raw = dict(MINIMAL, peers=[{"name": "b", "address": "http://127.0.0.1:8701"}])
    with pytest.raises(ConfigError, match="exactly one of public_key"):
        parse_config(raw)


def test_duplicate_peers_and_self_as_peer_are_refused() -> None:
    peer = {"name": "b", "address": "http://127.0.0.1:1", "public_key": "00" * 32}
    with pytest.raises(ConfigError, match="duplicate peer names"):
        parse_config(dict(MINIMAL, peers=[peer, peer]))
    with pytest.raises(ConfigError, match="lists the node itself"):
        parse_config(dict(MINIMAL, peers=[dict(peer, name="hospital_a")]))


def test_load_config_reports_toml_syntax_and_hashes_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[node\nname = 1")
    with pytest.raises(ConfigError, match="is not valid TOML"):
        load_config(bad)
    good = tmp_path / "good.toml"
    good.write_text(
        '[node]\nname = "a"\nkey_file = "a.key"\nstate_dir = "s"\n[data]\nhospital = "h"\n'
    )
    config = load_config(good)
    assert len(config.sha256) == 64 and config.source == good
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "missing.toml")


def test_class_weighting_accepts_the_modes_fixed_weights_and_old_booleans() -> None:
    from murmur.models import training

    assert config_learning.CLASS_WEIGHTING == training.CLASS_WEIGHTING  # no drift, no torch import
    assert parse_config(MINIMAL).training.class_weighting == "auto"
    no_dp = {"privacy": {"enabled": False}}
    assert (
        parse_config({**with_("training", class_weighting=True), **no_dp}).training.class_weighting
        == "balanced"
    )
    assert parse_config(with_("training", class_weighting=False)).training.class_weighting == "none"
    fixed = parse_config(with_("training", class_weights=[1, 2.5])).training
    assert fixed.class_weights == [1.0, 2.5]
    with pytest.raises(ConfigError, match=r"class_weights conflicts with class_weighting = 'none'"):
        parse_config(with_("training", class_weighting="none", class_weights=[1.0, 2.0]))


@pytest.mark.parametrize(
    ("section", "values", "pattern"),
    [
        (
            "training",
            {"class_weighting": "balanced"},
            r"training.class_weighting = \"balanced\" computes loss weights .*fix: .*"
            r"class_weights = \[w_neg, w_pos\]",
        ),
        (
            "training",
            {"class_weighting": True},  # an old config's explicit default
            r"training.class_weighting = \"balanced\"",
        ),
        ("data", {"preprocessing": "fitted"}, r"data.preprocessing = \"fitted\" .*fix: omit it"),
        (
            "data",
            {"dataset": "csv", "path": "x.csv", "label": "y"},
            r"data.reference is required under DP for dataset = 'csv'.*fix: reference = ",
        ),
    ],
)
def test_dp_refuses_statistics_of_the_training_rows(
    section: str, values: dict, pattern: str
) -> None:
    with pytest.raises(ConfigError, match=pattern):
        parse_config(with_(section, **values))
    # The same settings are fine without DP.
    parse_config({**with_(section, **values), "privacy": {"enabled": False}})


def test_dp_resolves_auto_to_data_independent_choices(tmp_path: Path) -> None:
    private = parse_config(MINIMAL)
    plain = parse_config({**MINIMAL, "privacy": {"enabled": False}})
    assert private.data.resolved_preprocessing(True) == "reference"
    assert plain.data.resolved_preprocessing(False) == "fitted"
    assert private.evaluation.resolved_threshold(True) == 0.5
    assert plain.evaluation.resolved_threshold(False) is None  # Youden's J on training rows
    fixed = parse_config(with_("evaluation", threshold=0.3))
    assert (
        fixed.evaluation.resolved_threshold(True)
        == fixed.evaluation.resolved_threshold(False)
        == 0.3
    )
    csv = parse_config(
        with_("data", dataset="csv", path="x.csv", label="y", reference="ref.csv"),
        base_dir=tmp_path,
    )
    assert csv.data.reference == tmp_path / "ref.csv"


def test_run_cluster_writes_fixed_class_weights_and_a_csv_reference(tmp_path: Path) -> None:
    import run_cluster
    from tests.test_data import clinic_rows, write_csv, write_reference

    table = write_csv(
        tmp_path / "all.csv", clinic_rows("north", 30, 1) + clinic_rows("south", 30, 2)
    )
    csv_args = ["--dataset", "csv", "--data", str(table), "--label", "outcome", "--site", "site"]
    with pytest.raises(SystemExit):  # DP without a reference: refused before anything starts
        run_cluster.parse_args(csv_args)
    reference = write_reference(tmp_path / "reference.csv")
    args = run_cluster.parse_args(
        [*csv_args, "--reference", str(reference), "--class-weights", "1", "2.5",
         "--aggregator", "mean", "--out", str(tmp_path / "run")]
    )  # fmt: skip
    nodes, _ = run_cluster.write_network(args, tmp_path / "run")
    config = load_config(nodes[0].config_path)
    assert config.privacy.enabled and config.data.reference == reference.resolve()
    assert config.training.class_weights == [1.0, 2.5]


def test_the_operator_listener_is_loopback_by_default_on_a_port_of_its_own() -> None:
    config = parse_config(MINIMAL)
    assert config.operator.listen == "127.0.0.1:9700" and config.operator.token_file is None
    assert config.operator.listen != config.node.listen
    with pytest.raises(ConfigError, match=r"operator.listen uses port 8700.*node.listen"):
        parse_config(with_("operator", listen="127.0.0.1:8700"))


@pytest.mark.parametrize("host", ["0.0.0.0", "10.0.0.2", "[::]", "node-a.example.org"])
def test_a_non_loopback_operator_bind_needs_allow_remote_and_a_token(host: str) -> None:
    listen = f"{host}:9700"
    with pytest.raises(ConfigError, match=r"operator.listen binds .* not a loopback address.*fix"):
        parse_config(with_("operator", listen=listen))
    with pytest.raises(ConfigError, match=r"operator.token_file is required"):
        parse_config(with_("operator", listen=listen, allow_remote=True))
    config = parse_config(
        with_("operator", listen=listen, allow_remote=True, token_file="operator.token"),
        base_dir=Path("/etc/murmur"),
    )
    assert config.operator.token_file == Path("/etc/murmur/operator.token")


@pytest.mark.parametrize("host", ["127.0.0.1", "127.3.4.5", "[::1]", "localhost"])
def test_loopback_operator_binds_need_no_token(host: str) -> None:
    assert parse_config(with_("operator", listen=f"{host}:9700")).operator.token_file is None


@pytest.mark.parametrize(
    ("values", "pattern"),
    [
        ({"body_timeout_s": 0}, r"peer_listener.body_timeout_s must be > 0"),
        ({"idle_timeout_s": -1.0}, r"peer_listener.idle_timeout_s must be > 0"),
        ({"max_connections": 0}, r"peer_listener.max_connections must be >= 1"),
        (
            {"max_connections": 4, "max_connections_per_address": 8},
            r"max_connections_per_address must be in 1..max_connections \(4\)",
        ),
        ({"max_uploads_per_address": 0}, r"max_uploads_per_address must be >= 1"),
    ],
)
def test_peer_listener_limits_are_checked(values: dict, pattern: str) -> None:
    with pytest.raises(ConfigError, match=pattern):
        parse_config(with_("peer_listener", **values))
