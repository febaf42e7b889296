"""The `murmur` command as an operator types it."""

from __future__ import annotations

import stat
import subprocess
import sys
from pathlib import Path

from murmur.node.cli import main

from tests.netutil import REPO


def test_keygen_writes_a_private_key_only_the_owner_can_read(tmp_path: Path, capsys) -> None:
    assert main(["keygen", "--name", "hospital_a", "--out", str(tmp_path)]) == 0
    key = tmp_path / "hospital_a.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert (tmp_path / "hospital_a.pub").exists()
    assert "fingerprint" in capsys.readouterr().out.lower()
    assert main(["keygen", "--name", "hospital_a", "--out", str(tmp_path)]) != 0  # no overwrite


def run_node(config: Path) -> subprocess.CompletedProcess[str]:
    """`murmur node --config CONFIG` as a separate process, as an operator starts it."""
    return subprocess.run(
        [sys.executable, "-m", "murmur.node.cli", "node", "--config", str(config)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_node_with_a_bad_config_names_the_field_and_exits_2(tmp_path: Path) -> None:
    config = tmp_path / "a.toml"
    config.write_text(
        '[node]\nname = "a"\nkey_file = "a.key"\nstate_dir = "s"\n'
        '[data]\nhospital = "hospital_0"\n[training]\nrounds = "many"\n'
    )
    result = run_node(config)
    assert result.returncode == 2
    assert "training.rounds must be an integer" in result.stderr


def test_node_with_a_world_readable_key_refuses_to_start(tmp_path: Path) -> None:
    assert main(["keygen", "--name", "a", "--out", str(tmp_path)]) == 0
    (tmp_path / "a.key").chmod(0o644)
    config = tmp_path / "a.toml"
    config.write_text(
        '[node]\nname = "a"\nkey_file = "a.key"\nstate_dir = "s"\n[data]\nhospital = "hospital_0"\n'
    )
    result = run_node(config)
    assert result.returncode == 2
    assert f"chmod 600 {tmp_path / 'a.key'}" in result.stderr


def test_audit_verify_on_a_directory_without_a_log_fails(tmp_path: Path) -> None:
    assert main(["audit", "verify", "--state", str(tmp_path)]) != 0


# ---------------------------------------------------------------- version, keys, config check


def test_version_key_show_and_no_traceback_on_a_missing_key_file(tmp_path: Path, capsys) -> None:
    import pytest
    from murmur.node import __version__

    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.strip() == f"murmur {__version__}"
    assert main(["keygen", "--name", "hospital_a", "--out", str(tmp_path)]) == 0
    keygen_out = capsys.readouterr().out
    assert main(["key", "show", str(tmp_path / "hospital_a.key")]) == 0
    shown = capsys.readouterr().out
    public = (tmp_path / "hospital_a.pub").read_text().split()[0]
    assert "name:        hospital_a" in shown and public in shown
    fingerprint = shown.split("fingerprint: ")[1].strip()
    assert fingerprint in keygen_out  # the same fingerprint keygen printed
    assert main(["key", "show", str(tmp_path / "hospital_a.pub")]) == 0
    assert fingerprint in capsys.readouterr().out
    # A missing file is one line and exit 2, not a traceback (issue: audit verify did that).
    result = subprocess.run(
        [sys.executable, "-m", "murmur.node.cli", "audit", "verify", "--state", str(tmp_path),
         "--public-key", str(tmp_path / "missing.pub")],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "missing.pub" in result.stderr


def test_config_check_finds_a_seed_mismatch_a_wrong_degree_a_wrong_key_and_one_way_peers(
    tmp_path: Path, capsys
) -> None:
    from tests.netutil import make_network

    net = make_network(tmp_path, "--nodes", "3")
    paths = [str(n.config_path) for n in net.nodes]
    assert main(["config", "check", *paths]) == 0
    assert "OK: 3 config(s) checked" in capsys.readouterr().out

    net.edit_config("hospital_2", "training", seed=7)
    assert main(["config", "check", *paths]) == 1
    out = capsys.readouterr().out
    assert "error: training.seed: the nodes disagree" in out and "hospital_2 = 7" in out

    net.edit_config("hospital_2", "training", seed=0)
    import tomllib

    from run_cluster import to_toml

    a = net.node("hospital_0").config_path
    doc = tomllib.loads(a.read_text())
    doc["peers"][0]["degree"] = 3  # hospital_1 has 2 neighbours in a 3-node complete graph
    doc["peers"][1]["public_key_file"] = doc["peers"][0]["public_key_file"]  # wrong key
    a.write_text(to_toml(doc))
    b = net.node("hospital_1").config_path
    doc_b = tomllib.loads(b.read_text())
    doc_b["peers"] = [p for p in doc_b["peers"] if p["name"] != "hospital_0"]
    b.write_text(to_toml(doc_b))
    assert main(["config", "check", *paths]) == 1
    out = capsys.readouterr().out
    assert "degree is 3 but hospital_1 has 1 neighbours" in out
    assert "is not hospital_2's own key" in out
    assert "hospital_1 does not list hospital_0" in out
    # One config alone still validates and checks its keys; peers' degrees it cannot check.
    assert main(["config", "check", paths[2]]) == 0
    capsys.readouterr()
    # A config that does not parse names the field, in one line.
    bad = tmp_path / "bad.toml"
    bad.write_text(
        '[node]\nname = "x"\nkey_file = "x.key"\nstate_dir = "s"\n[data]\nhospital = "hospital_0"\n'
        "[training]\nrounds = 0\n"
    )
    assert main(["config", "check", str(bad)]) == 1
    assert "training.rounds" in capsys.readouterr().out
