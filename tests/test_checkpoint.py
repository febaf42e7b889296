"""Checkpoints: exact round trips, atomic replacement, and loud refusal of anything doubtful."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from murmur.crypto.identity import Identity, generate_identity
from murmur.node.audit import AUDIT_FILE, AuditLog, verify
from murmur.node.checkpoint import (
    CHECKPOINT_FILE,
    CheckpointError,
    NodeCheckpoint,
    checkpoint_path,
    load_checkpoint,
    save_checkpoint,
)

CONFIG = hashlib.sha256(b"config").hexdigest()


def make_checkpoint(round_: int = 3, size: int = 10) -> NodeCheckpoint:
    rng = np.random.default_rng(round_)
    return NodeCheckpoint(
        round=round_,
        model_state={
            "layer.weight": rng.standard_normal((size, 4)).astype(np.float32),
            "layer.bias": rng.standard_normal(size).astype(np.float32),
            "bn.num_batches_tracked": np.array(7, dtype=np.int64),
        },
        trainer_state=b"\x80opaque torch.save bytes\x00",
        privacy={"steps": 30, "noise_multiplier": np.float64(1.1), "sample_rate": 0.01},
        replay={"window": 4, "seen": [["hospital_b", 3, b"\x01" * 16]]},
        config_sha256=CONFIG,
        extra={"history": [{"round": 3, "auc": float("nan")}], "bytes_sent": np.int64(12)},
    )


@pytest.fixture
def identity() -> Identity:
    return generate_identity("hospital_a")


def test_a_checkpoint_round_trips_exactly(tmp_path: Path) -> None:
    ckpt = make_checkpoint()
    digest = save_checkpoint(tmp_path, ckpt)
    assert digest == hashlib.sha256(checkpoint_path(tmp_path).read_bytes()).hexdigest()
    loaded = load_checkpoint(tmp_path, expected_config_sha256=CONFIG)
    assert loaded is not None
    assert list(loaded.model_state) == list(ckpt.model_state)  # order kept
    for name, array in ckpt.model_state.items():
        assert loaded.model_state[name].dtype == array.dtype
        np.testing.assert_array_equal(loaded.model_state[name], array)
    assert loaded.model_state["layer.weight"].flags.writeable
    assert loaded.round == 3 and loaded.trainer_state == ckpt.trainer_state
    assert loaded.privacy == {"steps": 30, "noise_multiplier": 1.1, "sample_rate": 0.01}
    assert loaded.replay == {"window": 4, "seen": [["hospital_b", 3, b"\x01" * 16]]}
    assert loaded.extra["bytes_sent"] == 12 and np.isnan(loaded.extra["history"][0]["auc"])
    assert [p.name for p in tmp_path.iterdir()] == [CHECKPOINT_FILE]  # no temporary files left


def test_no_checkpoint_and_no_history_means_a_fresh_start(
    tmp_path: Path, identity: Identity
) -> None:
    assert load_checkpoint(tmp_path) is None
    with AuditLog(tmp_path / AUDIT_FILE, identity) as log:
        log.append("node_start", 1, config_sha256=CONFIG)
    assert load_checkpoint(tmp_path) is None  # started, but never shared or checkpointed


def test_unstorable_values_are_refused_when_saving(tmp_path: Path) -> None:
    ckpt = make_checkpoint()
    ckpt.privacy = {"ledger": object()}
    with pytest.raises(ValueError, match="cannot store a object"):
        save_checkpoint(tmp_path, ckpt)
    ckpt = make_checkpoint()
    ckpt.model_state["names"] = np.array(["a", "b"])
    with pytest.raises(ValueError, match="numeric arrays"):
        save_checkpoint(tmp_path, ckpt)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda b: b[:100] + bytes([b[100] ^ 0x01]) + b[101:], "corrupt"),
        (lambda b: b[: len(b) // 2], "truncated"),
        (lambda b: b[:10], "truncated"),
        (lambda b: b"", "truncated"),
        (lambda b: b"PK\x03\x04" + b[4:], "not a murmur checkpoint"),
        (lambda b: b + b"\x00", "truncated or extended"),
    ],
    ids=["flipped-byte", "half", "header-cut", "empty", "wrong-magic", "trailing-bytes"],
)
def test_a_damaged_checkpoint_is_refused_with_what_to_do(
    tmp_path: Path, damage: object, message: str
) -> None:
    save_checkpoint(tmp_path, make_checkpoint())
    path = checkpoint_path(tmp_path)
    path.write_bytes(damage(path.read_bytes()))  # type: ignore[operator]
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(tmp_path)
    text = str(err.value)
    assert message in text and str(path) in text
    assert "Do not delete it" in text and "backup" in text


def test_a_checkpoint_from_another_configuration_is_refused(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, make_checkpoint())
    other = hashlib.sha256(b"other config").hexdigest()
    with pytest.raises(CheckpointError, match="written under configuration"):
        load_checkpoint(tmp_path, expected_config_sha256=other)


def test_a_deleted_checkpoint_is_refused_when_the_audit_log_shows_earlier_rounds(
    tmp_path: Path, identity: Identity
) -> None:
    with AuditLog(tmp_path / AUDIT_FILE, identity) as log:
        digest = save_checkpoint(tmp_path, make_checkpoint(round_=1))
        log.append("checkpoint", 1, checkpoint_sha256=digest)
        log.append("privacy", 1, epsilon_spent=0.4, steps=10)
    checkpoint_path(tmp_path).unlink()
    with pytest.raises(CheckpointError, match="is missing, but the audit log") as err:
        load_checkpoint(tmp_path)
    assert "epsilon spent 0.4" in str(err.value)


def test_a_node_that_shared_but_never_checkpointed_cannot_start_fresh(
    tmp_path: Path, identity: Identity
) -> None:
    with AuditLog(tmp_path / AUDIT_FILE, identity) as log:
        log.append("update_sent", 1, recipients=["hospital_b"], bytes=10, model_sha256=CONFIG)
    with pytest.raises(CheckpointError, match="1 update"):
        load_checkpoint(tmp_path)


def test_an_older_copy_of_the_checkpoint_is_refused(tmp_path: Path, identity: Identity) -> None:
    with AuditLog(tmp_path / AUDIT_FILE, identity) as log:
        for r in (1, 2):
            digest = save_checkpoint(tmp_path, make_checkpoint(round_=r))
            log.append("checkpoint", r, checkpoint_sha256=digest)
            if r == 1:
                old = checkpoint_path(tmp_path).read_bytes()
    assert load_checkpoint(tmp_path).round == 2  # type: ignore[union-attr]
    checkpoint_path(tmp_path).write_bytes(old)  # "restored" from a stale backup
    with pytest.raises(CheckpointError, match="older copy"):
        load_checkpoint(tmp_path)


def test_a_crash_before_the_rename_keeps_the_previous_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    save_checkpoint(tmp_path, make_checkpoint(round_=1))

    def power_cut(*args: object) -> None:
        raise OSError("simulated crash before rename")

    monkeypatch.setattr(os, "replace", power_cut)
    with pytest.raises(OSError, match="simulated"):
        save_checkpoint(tmp_path, make_checkpoint(round_=2))
    monkeypatch.undo()
    assert load_checkpoint(tmp_path).round == 1  # type: ignore[union-attr]
    assert [p.name for p in tmp_path.iterdir()] == [CHECKPOINT_FILE]
    (tmp_path / ".checkpoint-leftover.tmp").write_bytes(b"half a file")  # as after a SIGKILL
    save_checkpoint(tmp_path, make_checkpoint(round_=2))
    assert [p.name for p in tmp_path.iterdir()] == [CHECKPOINT_FILE]


_KILLED_NODE = """
import sys
from pathlib import Path
import numpy as np
from nacl.signing import SigningKey
from murmur.crypto.identity import Identity
from murmur.node.audit import AuditLog
from murmur.node.checkpoint import NodeCheckpoint, save_checkpoint
state = Path(sys.argv[1])
identity = Identity("hospital_a", SigningKey(bytes.fromhex(sys.argv[2])))
log = AuditLog(state / "audit.sqlite", identity)
weights = np.zeros(250_000, dtype=np.float32)
r = 0
while True:
    r += 1
    weights += 1
    ckpt = NodeCheckpoint(r, {"w": weights}, b"", {"steps": 10 * r}, {}, sys.argv[3])
    log.append("checkpoint", r, checkpoint_sha256=save_checkpoint(state, ckpt))
    log.append("privacy", r, epsilon_spent=0.1 * r, steps=10 * r)
    log.sign_head()
    if r == 3:
        print("ready", flush=True)
"""


@pytest.mark.parametrize("delay_s", [0.0, 0.05, 0.3])
def test_sigkill_at_any_moment_resumes_from_the_last_checkpoint(
    tmp_path: Path, identity: Identity, delay_s: float
) -> None:
    seed = identity.signing_key.encode().hex()
    child = subprocess.Popen(
        [sys.executable, "-c", _KILLED_NODE, str(tmp_path), seed, CONFIG],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "ready"
        time.sleep(delay_s)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=10)
    ckpt = load_checkpoint(tmp_path, expected_config_sha256=CONFIG)  # never half-written
    assert ckpt is not None and ckpt.round >= 3
    assert ckpt.privacy == {"steps": 10 * ckpt.round}
    np.testing.assert_array_equal(ckpt.model_state["w"], np.full(250_000, ckpt.round, np.float32))
    assert verify(tmp_path, identity.public_key).ok
