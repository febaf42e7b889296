"""Crash-safe node state: one checkpoint file, replaced atomically every round.

Why: a node killed at any moment (SIGKILL, power cut) must restart from its last round
without forgetting or re-spending privacy budget. So the file is written the only way POSIX
makes atomic -- write a temporary file in the same directory, fsync it, rename it over the
old one, fsync the directory -- and it carries its own SHA-256, so a damaged file is refused
instead of being half-read. Loading also cross-checks the audit log: a checkpoint that is
missing, or older than the last one the log recorded, is refused with what to do, because
starting over would silently claim a fresh privacy budget.

File format (docs/audit.md): MAGIC (8 bytes) | version (u16, big-endian) | body length
(u64, big-endian) | msgpack body | SHA-256 of everything before it (32 bytes). Never pickle:
loading a checkpoint must not be able to run code.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
from murmur.node.audit import AuditError, audit_db_path, prior_activity
from murmur.node.binding import binding_problem
from murmur.node.durable import atomic_write

CHECKPOINT_FILE = "checkpoint.murmur"
MAGIC = b"MURMURCK"
FORMAT_VERSION = 1
_HEADER = struct.Struct(">8sHQ")
_TRAILER_BYTES = 32
_TEMP_PREFIX = ".checkpoint-"

# Shown with every refusal: the one thing an operator must not do, and what to do instead.
_NO_FRESH_START = (
    "Do not delete it to start over: this node already spent privacy budget, and a fresh "
    "start would spend it again. Restore the state directory from backup; if there is none, "
    "retire this node's state directory and start a new deployment in a new one with your "
    "data protection officer's approval."
)


class CheckpointError(Exception):
    """A checkpoint is missing, damaged or does not belong here; the message says what to do."""


@dataclass
class NodeCheckpoint:
    """Everything a node needs to continue exactly where it stopped.

    `trainer_state` is opaque bytes (torch.save of optimizer and non-DP sampler state; no DP
    randomness is ever saved, docs/privacy.md "Randomness");
    `privacy` and `replay` are the plain-data states of the privacy ledger and replay guard.
    `binding` holds the configuration fields the checkpoint may only resume under
    (node/binding.py); checkpoints written before it existed have none and are bound to
    `config_sha256`, the config file's raw bytes. Those dicts round-trip through msgpack:
    tuples come back as lists.
    """

    round: int
    model_state: dict[str, np.ndarray]
    trainer_state: bytes
    privacy: dict[str, Any]
    replay: dict[str, Any]
    config_sha256: str
    extra: dict[str, Any] = field(default_factory=dict)
    binding: dict[str, Any] = field(default_factory=dict)


def checkpoint_path(state_dir: Path | str) -> Path:
    return Path(state_dir) / CHECKPOINT_FILE


# --------------------------------------------------------------------------- encoding


def _plain(value: Any) -> Any:
    """msgpack hook: numpy scalars become Python numbers; anything else is refused clearly."""
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(
        f"a checkpoint cannot store a {type(value).__name__}; use int, float, str, bytes, bool, "
        "None, or lists and dicts of them (model tensors go in model_state)"
    )


def encode_checkpoint(ckpt: NodeCheckpoint) -> bytes:
    """The checkpoint's file bytes."""
    if isinstance(ckpt.round, bool) or not isinstance(ckpt.round, int) or ckpt.round < 0:
        raise ValueError(f"checkpoint round must be an int >= 0, got {ckpt.round!r}")
    tensors = {}
    for name, array in ckpt.model_state.items():
        array = np.asarray(array)
        if array.dtype.kind not in "biuf":
            raise ValueError(
                f"model_state[{name!r}] has dtype {array.dtype}; checkpoints store numeric arrays"
            )
        tensors[name] = {
            "dtype": array.dtype.str,
            "shape": list(array.shape),
            "data": np.ascontiguousarray(array).tobytes(),
        }
    body = {
        "round": ckpt.round,
        "model_state": tensors,
        "trainer_state": bytes(ckpt.trainer_state),
        "privacy": ckpt.privacy,
        "replay": ckpt.replay,
        "config_sha256": ckpt.config_sha256,
        "extra": ckpt.extra,
        "binding": ckpt.binding,
    }
    try:
        packed = msgpack.packb(body, use_bin_type=True, default=_plain)
    except (TypeError, ValueError, OverflowError) as exc:
        raise ValueError(f"cannot encode checkpoint: {exc}") from exc
    head = _HEADER.pack(MAGIC, FORMAT_VERSION, len(packed)) + packed
    return head + hashlib.sha256(head).digest()


def decode_checkpoint(data: bytes, source: str = "checkpoint") -> NodeCheckpoint:
    """Parse and check checkpoint bytes; CheckpointError names `source` and the fix."""

    def refuse(problem: str) -> CheckpointError:
        return CheckpointError(f"{source}: {problem}. {_NO_FRESH_START}")

    if len(data) < _HEADER.size + _TRAILER_BYTES:
        raise refuse(f"the file is truncated ({len(data)} bytes; a checkpoint has a header)")
    magic, version, body_len = _HEADER.unpack_from(data)
    if magic != MAGIC:
        raise refuse("this is not a murmur checkpoint (wrong magic bytes)")
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"{source}: checkpoint format version {version}; this murmur reads version "
            f"{FORMAT_VERSION}. Run the murmur version that wrote it."
        )
    expected = _HEADER.size + body_len + _TRAILER_BYTES
    if len(data) != expected:
        raise refuse(
            f"the file is truncated or extended: {len(data)} bytes where the header promises "
            f"{expected}"
        )
    head, trailer = data[:-_TRAILER_BYTES], data[-_TRAILER_BYTES:]
    if hashlib.sha256(head).digest() != trailer:
        raise refuse("the file is corrupt (its SHA-256 does not match its contents)")
    try:
        body = msgpack.unpackb(head[_HEADER.size :], raw=False, strict_map_key=False)
        return _from_body(body)
    except (ValueError, TypeError, KeyError, msgpack.UnpackException) as exc:
        raise refuse(f"the checkpoint's contents are malformed ({exc})") from exc


def _from_body(body: dict[str, Any]) -> NodeCheckpoint:
    model_state = {}
    for name, t in body["model_state"].items():
        dtype = np.dtype(t["dtype"])
        if dtype.kind not in "biuf":
            raise ValueError(f"tensor {name!r} has non-numeric dtype {dtype}")
        array = np.frombuffer(t["data"], dtype=dtype)
        model_state[name] = array.reshape(t["shape"]).copy()
    ckpt = NodeCheckpoint(
        round=body["round"],
        model_state=model_state,
        trainer_state=body["trainer_state"],
        privacy=body["privacy"],
        replay=body["replay"],
        config_sha256=body["config_sha256"],
        extra=body["extra"],
        binding=body.get("binding", {}),  # absent in checkpoints from before node/binding.py
    )
    if not isinstance(ckpt.round, int) or not isinstance(ckpt.trainer_state, bytes):
        raise ValueError("round or trainer_state has the wrong type")
    maps = (ckpt.privacy, ckpt.replay, ckpt.extra, ckpt.binding)
    if not all(isinstance(d, dict) for d in maps):
        raise ValueError("privacy, replay, extra and binding must be maps")
    return ckpt


# --------------------------------------------------------------------------- files


def save_checkpoint(state_dir: Path | str, ckpt: NodeCheckpoint) -> str:
    """Atomically replace the state directory's checkpoint; returns the file's SHA-256.

    The hash equals `sha256sum checkpoint.murmur`; the node logs it in its `checkpoint`
    audit record.
    """
    state_dir = Path(state_dir)
    data = encode_checkpoint(ckpt)
    final = checkpoint_path(state_dir)
    for stale in state_dir.glob(_TEMP_PREFIX + "*"):  # left by an earlier crash mid-write
        stale.unlink(missing_ok=True)
    atomic_write(final, data, temp_prefix=_TEMP_PREFIX)  # write, fsync, rename, fsync dir
    return hashlib.sha256(data).hexdigest()


def load_checkpoint(
    state_dir: Path | str,
    *,
    expected_config_sha256: str | None = None,
    binding: Mapping[str, Any] | None = None,
    config_file: str = "the config file",
) -> NodeCheckpoint | None:
    """The last checkpoint, or None when this state directory never had one.

    Raises CheckpointError, naming the file and the fix, when the file is damaged, belongs to
    another configuration, is missing although the audit log shows earlier rounds, or is older
    than the last checkpoint the audit log recorded (restored from a stale copy).

    "Another configuration": with `binding` (node/binding.py), a checkpoint that records its
    own binding may resume unless a bound field changed; one from before bindings existed
    may resume only under the config file whose raw SHA-256 it recorded. Without `binding`,
    only `expected_config_sha256` is compared.
    """
    state_dir = Path(state_dir)
    path = checkpoint_path(state_dir)
    try:
        activity = prior_activity(state_dir)
    except AuditError as exc:
        raise CheckpointError(f"cannot cross-check {path} against the audit log: {exc}") from exc
    if not path.exists():
        if activity is None or not (
            activity.last_checkpoint_round is not None
            or activity.updates_sent
            or activity.privacy_records
        ):
            return None
        if activity.last_checkpoint_round is None:
            when = "it shared updates before its first checkpoint (stopped during round 1?)"
        else:
            when = f"its last checkpoint was of round {activity.last_checkpoint_round}"
        raise CheckpointError(
            f"{path} is missing, but the audit log {audit_db_path(state_dir)} shows this node "
            f"already worked: {when}; {activity.updates_sent} update(s) sent, epsilon spent "
            f"{activity.last_epsilon_spent}. {_NO_FRESH_START}"
        )
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CheckpointError(f"cannot read {path}: {exc}. Check its permissions.") from exc
    ckpt = decode_checkpoint(data, source=str(path))
    if binding is not None and ckpt.binding:
        problem = binding_problem(ckpt.binding, binding, config_file)
        if problem is not None:
            raise CheckpointError(f"{path}: {problem}")
    elif (
        binding is not None
        and expected_config_sha256 is not None
        and ckpt.config_sha256 != expected_config_sha256
    ):
        raise CheckpointError(
            f"{path} was written by an earlier murmur, which bound a checkpoint to the config "
            f"file's exact bytes (SHA-256 {ckpt.config_sha256}); {config_file} now hashes to "
            f"{expected_config_sha256}. Fix: put back the config file exactly as it was when "
            "this node last ran (comments included) and start the node once: its next "
            "checkpoint records the fields it is bound to, and from then on only those must "
            "stay (docs/config.md)."
        )
    elif expected_config_sha256 is not None and ckpt.config_sha256 != expected_config_sha256:
        raise CheckpointError(
            f"{path} was written under configuration {ckpt.config_sha256}, but the node now runs "
            f"configuration {expected_config_sha256}. Its privacy budget belongs to that "
            "configuration: restore the old config file to continue, or start the new "
            "configuration in a new state directory (a new deployment, with approval)."
        )
    if activity is not None and (activity.last_checkpoint_round or 0) > ckpt.round:
        raise CheckpointError(
            f"{path} holds round {ckpt.round}, but the audit log recorded a checkpoint of round "
            f"{activity.last_checkpoint_round} (SHA-256 {activity.last_checkpoint_sha256}): this "
            "file is an older copy, and resuming from it would re-spend the budget of the rounds "
            "in between. Put back the checkpoint whose SHA-256 matches the audit log."
        )
    return ckpt
