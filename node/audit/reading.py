"""Reading a node's audit log from any process: queries for the dashboard, the report,
checkpoint cross-checks and rollback checks, and where a claimed head stands in the log.

All readers open the file read-only, so they never block or disturb the node writing it.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from murmur.node.audit.records import (
    _RECORD_COLUMNS,
    AUDIT_FILE,
    AuditError,
    AuditRecord,
    PriorActivity,
    genesis_hash,
)

# --------------------------------------------------------------------------- readers


def audit_db_path(state: Path | str) -> Path:
    """The log inside a state directory (or `state` itself when it names the file)."""
    state = Path(state)
    return state / AUDIT_FILE if state.is_dir() else state


@contextmanager
def _read_only(state: Path | str) -> Iterator[sqlite3.Connection]:
    path = audit_db_path(state)
    if not path.is_file():
        raise AuditError(
            f"no audit log at {path}: pass the node's state directory (node.state_dir in its "
            "config) with --state"
        )
    try:
        conn = sqlite3.connect(path.resolve().as_uri() + "?mode=ro", uri=True, timeout=30)
    except sqlite3.Error as exc:
        raise AuditError(f"cannot open audit log {path}: {exc}") from exc
    try:
        yield conn
    except sqlite3.DatabaseError as exc:
        raise AuditError(f"{path} is not a readable murmur audit log: {exc}") from exc
    finally:
        conn.close()


def _to_record(row: tuple[Any, ...]) -> AuditRecord:
    seq, time_us, kind, round_, fields_text, prev_hash, digest, signature = row
    try:
        fields = json.loads(fields_text)
    except (TypeError, ValueError) as exc:
        raise AuditError(
            f"audit record {seq} is malformed ({exc}); run `murmur audit verify`"
        ) from exc
    return AuditRecord(
        seq, time_us, kind, round_, fields, bytes(prev_hash), bytes(digest), bytes(signature)
    )


def counts_by_kind(state: Path | str) -> dict[str, int]:
    """Number of stored records per kind, read from the file (from another process)."""
    with _read_only(state) as conn:
        rows = conn.execute("SELECT kind, count(*) FROM records GROUP BY kind").fetchall()
    return dict(rows)


def last_records(state: Path | str, n: int = 10, kinds: Sequence[str] = ()) -> list[AuditRecord]:
    """The newest `n` records (of `kinds`, when given), oldest first. Walks back from the end
    of the log, so it stays cheap for the dashboard's polls however long the log grows."""
    where = f"WHERE kind IN ({', '.join('?' for _ in kinds)}) " if kinds else ""
    with _read_only(state) as conn:
        rows = conn.execute(
            f"SELECT {_RECORD_COLUMNS} FROM records {where}ORDER BY seq DESC LIMIT ?",
            (*kinds, max(0, n)),
        ).fetchall()
    return [_to_record(r) for r in reversed(rows)]


def records_of_kind(state: Path | str, *kinds: str, after_seq: int = 0) -> list[AuditRecord]:
    """Every stored record of the given kinds (with seq > `after_seq`), in order."""
    marks = ", ".join("?" for _ in kinds)
    with _read_only(state) as conn:
        rows = conn.execute(
            f"SELECT {_RECORD_COLUMNS} FROM records WHERE kind IN ({marks}) AND seq > ? "
            "ORDER BY seq",
            (*kinds, after_seq),
        ).fetchall()
    return [_to_record(r) for r in rows]


def stored_meta(state: Path | str) -> dict[str, str]:
    """What a log says about itself: `node_name`, `public_key` (hex), `created_utc`,
    `schema_version`. Written by the node, so check the key against the published one."""
    with _read_only(state) as conn:
        return dict(conn.execute("SELECT key, value FROM meta").fetchall())


def stored_public_key(state: Path | str) -> bytes | None:
    """The public key a log says it belongs to (check it against the published one)."""
    with _read_only(state) as conn:
        row = conn.execute("SELECT value FROM meta WHERE key = 'public_key'").fetchone()
    try:
        return bytes.fromhex(row[0]) if row else None
    except ValueError:
        return None


def last_seq_of_kind(state: Path | str, kind: str) -> int | None:
    """The seq of the newest record of `kind`, or None."""
    with _read_only(state) as conn:
        (seq,) = conn.execute("SELECT max(seq) FROM records WHERE kind = ?", (kind,)).fetchone()
    return seq


def prior_activity(state_dir: Path | str) -> PriorActivity | None:
    """What the log in `state_dir` shows this node already did; None when there is no log."""
    if not audit_db_path(state_dir).is_file():
        return None
    with _read_only(state_dir) as conn:
        last_ckpt = conn.execute(
            "SELECT round, fields FROM records WHERE kind = 'checkpoint' ORDER BY seq DESC LIMIT 1"
        ).fetchone()
        (sent,) = conn.execute("SELECT count(*) FROM records WHERE kind = 'update_sent'").fetchone()
        (privacy,) = conn.execute("SELECT count(*) FROM records WHERE kind = 'privacy'").fetchone()
        spent_rows = conn.execute(
            "SELECT fields FROM records WHERE kind IN ('privacy', 'update_sent') "
            "ORDER BY seq DESC LIMIT 50"
        ).fetchall()
    try:
        ckpt_sha = json.loads(last_ckpt[1]).get("checkpoint_sha256") if last_ckpt else None
        spent = [json.loads(text).get("epsilon_spent") for (text,) in spent_rows]
    except (TypeError, ValueError, AttributeError) as exc:
        raise AuditError(
            f"the audit log in {state_dir} has malformed records ({exc}); run `murmur audit verify`"
        ) from exc
    numbers = [s for s in spent if isinstance(s, int | float) and not isinstance(s, bool)]
    return PriorActivity(
        last_checkpoint_round=last_ckpt[0] if last_ckpt else None,
        last_checkpoint_sha256=ckpt_sha,
        updates_sent=sent,
        privacy_records=privacy,
        last_epsilon_spent=numbers[0] if numbers else None,
    )


# --------------------------------------------------------------------------- claimed heads


HEAD_CONTAINED = "contained"  # the log has this record with this hash
HEAD_PRUNED = "pruned"  # older than the retention anchor: no longer checkable, not missing
HEAD_BEYOND_END = "beyond_end"  # the log ends before it: it was cut back
HEAD_MISMATCH = "mismatch"  # the log has another record there (or lost it): not this log


def head_position(conn: sqlite3.Connection, seq: int, digest: bytes, public_key: bytes) -> str:
    """Where the head (seq, hash) that this node once signed stands in the log on `conn`.

    One of HEAD_CONTAINED, HEAD_PRUNED, HEAD_BEYOND_END, HEAD_MISMATCH. Seq 0 is the chain's
    start, whose "hash" is the genesis hash of the node's key.
    """
    digest = bytes(digest)
    if seq == 0:
        return HEAD_CONTAINED if digest == genesis_hash(public_key) else HEAD_MISMATCH
    row = conn.execute("SELECT hash FROM records WHERE seq = ?", (seq,)).fetchone()
    if row is not None:
        return HEAD_CONTAINED if bytes(row[0]) == digest else HEAD_MISMATCH
    anchor = conn.execute("SELECT seq, hash FROM anchor").fetchone()
    if anchor is not None and seq <= anchor[0]:
        if seq == anchor[0]:
            return HEAD_CONTAINED if bytes(anchor[1]) == digest else HEAD_MISMATCH
        return HEAD_PRUNED
    (last,) = conn.execute("SELECT max(seq) FROM records").fetchone()
    end = last if last is not None else (anchor[0] if anchor is not None else 0)
    return HEAD_BEYOND_END if seq > end else HEAD_MISMATCH


@dataclass(frozen=True)
class PeerHead:
    """A head of this node's log that a peer holds, signed by this node (node/rollback.py
    turns the peers' receipts into these). `label` says who holds it and from which round."""

    seq: int
    hash: bytes
    label: str


def check_peer_heads(state: Path | str, heads: list[PeerHead]) -> list[tuple[PeerHead, str]]:
    """The position of each peer-held head in the log of `state` (see `head_position`)."""
    with _read_only(state) as conn:
        meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
        try:
            public_key = bytes.fromhex(meta.get("public_key", ""))
        except ValueError:
            public_key = b""
        return [(h, head_position(conn, h.seq, h.hash, public_key)) for h in heads]
