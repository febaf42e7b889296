"""The `murmur` command as an operator types it."""

from __future__ import annotations

import stat
import subprocess
import sys
from pathlib import Path

from node.cli import main
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
        [sys.executable, "-m", "node.cli", "node", "--config", str(config)],
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
