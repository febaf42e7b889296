"""The node's small durable files: checkpoint, write-ahead privacy intent, signed round.

Why one place: the privacy and no-equivocation guarantees rest on these files surviving any
crash, and each is replaced the one way node/durable.py makes atomic and durable
(`atomic_write`). What goes INTO a checkpoint is the node's business (node/node.py gathers it
from its parts); this module only writes and reads the bytes, and says clearly when a file is
damaged.

* `privacy_intent.json`: the DP steps a round may spend, written before training starts, so
  a node killed mid-round counts those steps as spent on restart.
* `signed_round.json`: the round about to be signed, written before the envelope is, so a
  restarted node never signs a second, different envelope for it (equivocation).
* `status.json`: a view for run_cluster and operators, rebuilt from the checkpoint after a
  crash: replaced atomically but not fsync'd every round.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from murmur.node.checkpoint import NodeCheckpoint, load_checkpoint, save_checkpoint
from murmur.node.durable import atomic_write
from murmur.node.state import StartupError

SIGNED_ROUND_FILE = "signed_round.json"
PRIVACY_INTENT_FILE = "privacy_intent.json"
STATUS_FILE = "status.json"


class NodeStore:
    """The durable files of one state directory (created if missing)."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.last_signed_round = 0

    def load_checkpoint(
        self, *, config_sha256: str, binding: dict[str, Any], config_file: str
    ) -> NodeCheckpoint | None:
        """The last checkpoint, or None for a fresh node (node/checkpoint.py checks it)."""
        return load_checkpoint(
            self.state_dir,
            expected_config_sha256=config_sha256,
            binding=binding,
            config_file=config_file,
        )

    def save_checkpoint(self, ckpt: NodeCheckpoint) -> str:
        """Replace the checkpoint atomically and durably; returns the file's SHA-256."""
        return save_checkpoint(self.state_dir, ckpt)

    def write_privacy_intent(self, planned_steps: int) -> None:
        """Before training, durably record the steps this round may spend (write-ahead)."""
        data = json.dumps({"steps": planned_steps}).encode()
        atomic_write(self.state_dir / PRIVACY_INTENT_FILE, data)

    def read_privacy_intent(self) -> int:
        """The steps the last round started may have spent; 0 when none was recorded."""
        path = self.state_dir / PRIVACY_INTENT_FILE
        if not path.exists():
            return 0
        return int(json.loads(path.read_text())["steps"])

    def write_signed_round(self, r: int) -> None:
        """Before signing round r, durably record it (fsync): a node restarted in this round
        must not sign a second, different round-r envelope, which would be equivocation."""
        atomic_write(self.state_dir / SIGNED_ROUND_FILE, json.dumps({"round": r}).encode())
        self.last_signed_round = r

    def read_signed_round(self) -> int:
        """The last round this node signed (0: none), remembered in `last_signed_round`."""
        path = self.state_dir / SIGNED_ROUND_FILE
        if not path.exists():
            self.last_signed_round = 0
            return 0
        try:
            self.last_signed_round = int(json.loads(path.read_text())["round"])
        except (ValueError, KeyError, TypeError) as exc:
            raise StartupError(
                f"{path} is corrupt ({exc!r}); it records the last round this node signed. "
                "Fix: restore it, or delete it only if you know no envelope of a later round "
                "than the checkpoint's was sent"
            ) from None
        return self.last_signed_round

    def write_status(self, status: dict[str, Any]) -> None:
        """Replace status.json (atomic, not fsync'd: it is rebuilt from the checkpoint)."""
        data = json.dumps(status, default=str).encode()
        atomic_write(self.state_dir / STATUS_FILE, data, durable=False)
