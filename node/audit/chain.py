"""Writing the audit chain: `AuditLog`, the node's one writer, and the background fsync.

Every append links to the previous record's hash and is signed; `sign_head` seals a round
and asks `_WalSyncer` to make it durable without making the round loop wait for the disk.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import nacl.exceptions
import nacl.signing
from murmur.node.audit.reading import head_position, last_records
from murmur.node.audit.records import (
    _RECORD_COLUMNS,
    KIND_PATTERN,
    MAX_FIELDS_BYTES,
    RECORD_TAG,
    RETENTION_CHECK_INTERVAL_S,
    SCHEMA_VERSION,
    SYNC_EVERY_APPENDS,
    AuditError,
    AuditRecord,
    RetentionPolicy,
    SigningIdentity,
    _check_kind_fields,
    _iso,
    _normalize,
    _record_body,
    anchor_message,
    canonical_json,
    chain_hash,
    genesis_hash,
    head_message,
    record_body,
)

log = logging.getLogger("murmur.audit")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS records (
    seq INTEGER PRIMARY KEY,
    time_us INTEGER NOT NULL,
    kind TEXT NOT NULL,
    round INTEGER,
    fields TEXT NOT NULL,
    prev_hash BLOB NOT NULL,
    hash BLOB NOT NULL,
    signature BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS heads (
    seq INTEGER PRIMARY KEY,
    hash BLOB NOT NULL,
    time_us INTEGER NOT NULL,
    signature BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS anchor (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    seq INTEGER NOT NULL,
    hash BLOB NOT NULL,
    time_us INTEGER NOT NULL,
    signature BLOB NOT NULL
);
"""


class _WalSyncer:
    """Makes sealed records durable off the caller's thread.

    A PASSIVE WAL checkpoint on its own connection fsyncs the WAL before copying it into the
    database and fsyncs the database after, never blocking the writer or the readers.
    """

    def __init__(self, path: Path) -> None:
        self._conn = sqlite3.connect(
            path, isolation_level=None, check_same_thread=False, timeout=30
        )
        self._changed = threading.Condition()
        self._requested = 0
        self._done = 0
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="murmur-audit-sync", daemon=True)
        self._thread.start()

    def request(self) -> int:
        """Ask for everything committed so far to reach the disk; returns a ticket to wait on."""
        with self._changed:
            self._requested += 1
            self._changed.notify_all()
            return self._requested

    def wait(self, ticket: int, timeout: float | None) -> bool:
        with self._changed:
            return self._changed.wait_for(lambda: self._done >= ticket, timeout)

    @property
    def done(self) -> int:
        """The newest ticket whose records have reached the disk."""
        with self._changed:
            return self._done

    def _run(self) -> None:
        while True:
            with self._changed:
                self._changed.wait_for(lambda: self._requested > self._done or self._closing)
                if self._requested == self._done:
                    return  # closing, nothing left to sync
                target = self._requested
            try:
                self._conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
            except sqlite3.Error as exc:  # e.g. disk full: the records stay in the WAL
                log.warning("audit log fsync failed (%s); the next round retries", exc)
            with self._changed:
                self._done = target
                self._changed.notify_all()

    def close(self) -> None:
        with self._changed:
            self._closing = True
            self._changed.notify_all()
        self._thread.join(timeout=60)
        self._conn.close()


class AuditLog:
    """The node's append-only audit log. One writer (this object); any number of readers.

    `append` and `sign_head` may be called from any thread. `counts_by_kind` answers from
    memory and `last` opens its own read-only connection, so /status never waits for (or
    blocks) the writer.
    """

    def __init__(
        self,
        path: Path,
        identity: SigningIdentity,
        *,
        retention: RetentionPolicy | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = Path(path)
        self._identity = identity
        self._public_key = bytes(identity.public_key)
        self._retention = retention or RetentionPolicy()
        self._clock = clock
        self._lock = threading.Lock()
        self._last_retention_check = float("-inf")
        self._check_identity()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._conn: sqlite3.Connection | None = None
        try:
            self._open()
        except BaseException as exc:
            if self._conn is not None:
                self._conn.close()
                self._conn = None
            if isinstance(exc, sqlite3.DatabaseError):
                raise AuditError(
                    f"{self.path} is not a readable murmur audit log ({exc}); restore it from "
                    "backup, or move it aside and run `murmur audit verify` on the copy"
                ) from exc
            raise
        self.apply_retention()

    # -- setup

    def _open(self) -> None:
        self._conn = sqlite3.connect(
            self.path, isolation_level=None, check_same_thread=False, timeout=30
        )
        self._configure()
        self._init_schema()
        self._head_seq, self._head_hash = self._load_head()
        self._signed_seq = self._db.execute("SELECT max(seq) FROM heads").fetchone()[0] or 0
        # A head read back from the file survived whatever happened before; heads signed from
        # now on count as durable once the syncer has fsync'd them (`durable_head`).
        self._durable_head = self._stored_signed_head()
        self._pending_heads: list[tuple[int, int, bytes]] = []  # (ticket, seq, hash)
        self._counts = self._count_kinds()
        self._syncer = _WalSyncer(self.path)
        self._sync_ticket = 0
        self._appends_since_sync = 0

    def _stored_signed_head(self) -> tuple[int, bytes]:
        """The newest signed head in the file, else the retention anchor, else seq 0 with the
        genesis hash (the chain's starting point, which every log of this key contains)."""
        row = self._db.execute("SELECT seq, hash FROM heads ORDER BY seq DESC LIMIT 1").fetchone()
        if row is None:
            row = self._db.execute("SELECT seq, hash FROM anchor").fetchone()
        return (row[0], bytes(row[1])) if row else (0, genesis_hash(self._public_key))

    @property
    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            raise AuditError(f"audit log {self.path} is closed")
        return self._conn

    def _check_identity(self) -> None:
        probe = b"murmur-audit-probe"
        try:
            nacl.signing.VerifyKey(self._public_key).verify(probe, self._identity.sign(probe))
        except (nacl.exceptions.BadSignatureError, nacl.exceptions.ValueError, TypeError) as exc:
            raise AuditError(
                "the identity given to AuditLog does not sign with its own public key "
                f"({exc}); pass the node's Identity from crypto.identity"
            ) from exc

    def _configure(self) -> None:
        mode = self._db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise AuditError(
                f"{self.path}: SQLite refused WAL mode (got {mode!r}); keep the state directory "
                "on a local disk, not a network share"
            )
        self._db.execute("PRAGMA synchronous=NORMAL")
        # Checkpoints (and their fsyncs) are the background syncer's job, never the caller's.
        self._db.execute("PRAGMA wal_autocheckpoint=0")

    def _init_schema(self) -> None:
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    db.execute(statement)
            meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
            if not meta:
                db.executemany(
                    "INSERT INTO meta (key, value) VALUES (?, ?)",
                    [
                        ("schema_version", str(SCHEMA_VERSION)),
                        ("public_key", self._public_key.hex()),
                        ("node_name", str(self._identity.name)),
                        ("created_utc", _iso(int(self._clock() * 1e6))),
                    ],
                )
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        if meta and meta.get("schema_version") != str(SCHEMA_VERSION):
            raise AuditError(
                f"{self.path} has audit schema {meta.get('schema_version')!r}; this murmur "
                f"writes schema {SCHEMA_VERSION}: use the murmur version that created it"
            )
        if meta and meta.get("public_key") != self._public_key.hex():
            raise AuditError(
                f"{self.path} belongs to the node with public key {meta.get('public_key')}, not "
                f"to this identity ({self._public_key.hex()}); point node.state_dir at this "
                "node's own state directory"
            )

    def _load_head(self) -> tuple[int, bytes]:
        row = self._db.execute(
            f"SELECT {_RECORD_COLUMNS} FROM records ORDER BY seq DESC LIMIT 1"
        ).fetchone()
        if row is None:
            anchor = self._db.execute("SELECT seq, hash FROM anchor").fetchone()
            return (anchor[0], bytes(anchor[1])) if anchor else (0, genesis_hash(self._public_key))
        seq, time_us, kind, round_, fields_text, prev_hash, stored_hash, signature = row
        try:
            body = record_body(seq, time_us, kind, round_, json.loads(fields_text))
            recomputed = chain_hash(bytes(prev_hash), body)
            nacl.signing.VerifyKey(self._public_key).verify(RECORD_TAG + recomputed, signature)
            ok = recomputed == bytes(stored_hash)
        except (ValueError, TypeError, nacl.exceptions.BadSignatureError):
            ok = False
        if not ok:
            raise AuditError(
                f"the last record ({seq}) of {self.path} does not verify, so the chain cannot be "
                f"extended; run `murmur audit verify --state {self.path.parent}` and restore the "
                "log from backup"
            )
        return seq, bytes(stored_hash)

    def _count_kinds(self) -> Counter[str]:
        """One scan at open (and after pruning); `append` keeps the counts up to date."""
        return Counter(dict(self._db.execute("SELECT kind, count(*) FROM records GROUP BY kind")))

    # -- writing

    def _insert(self, kind: str, round_: int | None, fields_json: bytes) -> tuple[int, bytes]:
        """Insert the next record inside the caller's transaction; returns (seq, hash)."""
        seq = self._head_seq + 1
        time_us = int(self._clock() * 1e6)
        digest = chain_hash(self._head_hash, _record_body(seq, time_us, kind, round_, fields_json))
        signature = self._identity.sign(RECORD_TAG + digest)
        self._db.execute(
            f"INSERT INTO records ({_RECORD_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (
                seq,
                time_us,
                kind,
                round_,
                fields_json.decode("ascii"),
                self._head_hash,
                digest,
                signature,
            ),
        )
        return seq, digest

    def append(self, kind: str, round: int | None, **fields: Any) -> int:
        """Append one record and return its sequence number.

        `fields` are JSON scalars, short lists and dicts; a value that looks like data (an
        array, bytes, a list of more than 32 numbers) is refused with ValueError.
        """
        if not isinstance(kind, str) or not KIND_PATTERN.match(kind):
            raise ValueError(
                f"audit kind {kind!r} must be lowercase letters, digits and _, e.g. 'update_sent'"
            )
        if round is not None and (isinstance(round, bool) or not isinstance(round, int)):
            raise ValueError(f"audit round must be an int or None, got {round!r}")
        normalized = _normalize(fields)
        _check_kind_fields(kind, normalized)
        fields_json = canonical_json(normalized)
        if len(fields_json) > MAX_FIELDS_BYTES:
            raise ValueError(
                f"audit record {kind!r} is larger than {MAX_FIELDS_BYTES} bytes; log a summary"
            )
        with self._lock:
            try:
                seq, digest = self._insert(kind, round, fields_json)
            except sqlite3.Error as exc:
                raise AuditError(f"cannot append to {self.path}: {exc}") from exc
            self._head_seq, self._head_hash = seq, digest
            self._counts[kind] += 1
            self._appends_since_sync += 1
            if self._appends_since_sync >= SYNC_EVERY_APPENDS:
                self._request_sync()
        return seq

    def _request_sync(self) -> None:
        """Ask the syncer to fsync everything committed so far (caller holds the lock)."""
        self._sync_ticket = self._syncer.request()
        self._appends_since_sync = 0

    def sign_head(self) -> None:
        """Seal everything written so far: sign (seq, head hash) and have it fsync'd.

        The node calls this after every round and at shutdown. The fsync runs in the
        background (`wait_durable` waits for it); a killed process loses nothing either way.
        """
        with self._lock:
            if self._head_seq == 0 or self._signed_seq >= self._head_seq:
                return
            seq, digest = self._head_seq, self._head_hash
            signature = self._identity.sign(head_message(seq, digest))
            try:
                self._db.execute(
                    "INSERT INTO heads (seq, hash, time_us, signature) VALUES (?, ?, ?, ?)",
                    (seq, digest, int(self._clock() * 1e6), signature),
                )
            except sqlite3.Error as exc:
                raise AuditError(f"cannot sign the head of {self.path}: {exc}") from exc
            self._signed_seq = seq
            self._request_sync()
            self._pending_heads.append((self._sync_ticket, seq, digest))
        if self._clock() - self._last_retention_check >= RETENTION_CHECK_INTERVAL_S:
            self.apply_retention()

    def wait_durable(self, timeout: float | None = None) -> bool:
        """Wait until everything sealed by `sign_head` so far has been fsync'd."""
        return self._syncer.wait(self._sync_ticket, timeout)

    @property
    def durable_head(self) -> tuple[int, bytes]:
        """(seq, hash) of the newest signed head known to be on disk.

        This is the log position a node may claim in an envelope (gossip/receipts.py,
        AuditHead): a claim must survive a power cut, or the node's own neighbours would later
        hold a head its log no longer has. Never blocks; it only grows.
        """
        done = self._syncer.done
        with self._lock:
            while self._pending_heads and self._pending_heads[0][0] <= done:
                _, seq, digest = self._pending_heads.pop(0)
                self._durable_head = (seq, digest)
            return self._durable_head

    def position(self, seq: int, digest: bytes) -> str:
        """Where a claimed head (seq, hash) stands in this log; see `head_position`."""
        with self._lock:
            return head_position(self._db, seq, digest, self._public_key)

    def apply_retention(self, now: float | None = None) -> int:
        """Delete records older than the retention policy; returns how many were deleted.

        The newest deleted record's (seq, hash) is kept as a signed anchor, and a
        `retention_prune` record is appended, so the remaining chain still verifies.
        """
        now_s = self._clock() if now is None else now
        self._last_retention_check = now_s
        days = self._retention.max_age_days
        if days is None:
            return 0
        cutoff_us = int((now_s - days * 86400) * 1e6)
        with self._lock:
            db = self._db
            oldest = db.execute("SELECT time_us FROM records ORDER BY seq LIMIT 1").fetchone()
            if oldest is None or oldest[0] >= cutoff_us:
                return 0  # the usual case, answered without scanning the log
            row = db.execute(
                "SELECT seq, hash FROM records WHERE seq = "
                "(SELECT max(seq) FROM records WHERE time_us < ? AND seq < ?)",
                (cutoff_us, self._head_seq),
            ).fetchone()
            if row is None:
                return 0
            anchor_seq, anchor_hash = row[0], bytes(row[1])
            signature = self._identity.sign(anchor_message(anchor_seq, anchor_hash))
            db.execute("BEGIN IMMEDIATE")
            try:
                pruned = db.execute("DELETE FROM records WHERE seq <= ?", (anchor_seq,)).rowcount
                db.execute("DELETE FROM heads WHERE seq <= ?", (anchor_seq,))
                db.execute(
                    "INSERT OR REPLACE INTO anchor (id, seq, hash, time_us, signature) "
                    "VALUES (1, ?, ?, ?, ?)",
                    (anchor_seq, anchor_hash, int(now_s * 1e6), signature),
                )
                fields = {
                    "anchor_seq": anchor_seq,
                    "anchor_hash": anchor_hash.hex(),
                    "pruned": pruned,
                    "cutoff_utc": _iso(cutoff_us),
                    "max_age_days": days,
                }
                seq, digest = self._insert("retention_prune", None, canonical_json(fields))
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise
            self._head_seq, self._head_hash = seq, digest
            self._counts = self._count_kinds()
            self._request_sync()
        return pruned

    def close(self) -> None:
        """Seal the head, wait until it is on disk, and close. Safe to call twice."""
        if self._conn is None:
            return
        try:
            self.sign_head()
        finally:
            self._syncer.close()
            self._conn.close()
            self._conn = None

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- reading (safe from any thread while the node writes)

    @property
    def head(self) -> tuple[int, str]:
        """(seq, hex hash) of the newest record this writer appended."""
        return self._head_seq, self._head_hash.hex()

    def counts_by_kind(self) -> dict[str, int]:
        """Records per kind, from memory: /status may ask every second, at no cost."""
        with self._lock:
            return dict(self._counts)

    def last(self, n: int = 10) -> list[AuditRecord]:
        return last_records(self.path, n)
