"""The tamper-evident audit log: hash-chained, signed records in SQLite.

Why: a compliance officer must be able to show, years later, what this hospital shared, with
whom, under which privacy budget, and which peers' updates went into a deployed model --
without trusting any central party. Every node therefore keeps its own log in its state
directory, and makes it tamper-evident with two mechanisms that need no server:

* a hash chain: record hash = SHA-256(previous record's hash || canonical JSON of
  {seq, time_us, kind, round, fields}), so changing, deleting or re-ordering a record breaks
  every later link;
* signatures with the node's Ed25519 identity key: every record's hash is signed (so a row
  forged by someone without the key fails even at the end of the chain), and the chain head
  is signed again once per round, sealing the round and starting its fsync.

Patient-level data never enters the log, structurally: field values are small JSON scalars,
short lists and dicts; arrays, bytes and long numeric lists are refused (see `_normalize`).

SQLite runs in WAL mode so /status readers never block the writer. Every append commits with
`synchronous=NORMAL`, which survives the process being killed at any moment. To also survive a
power cut, `sign_head` asks a background thread to checkpoint the WAL, which fsyncs it (and
with it every sealed record) without making the round loop wait for the disk: bench/audit.py
measured that waiting costs 0.2 ms per round on an idle disk and several ms on a busy one.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import re
import sqlite3
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol, TextIO

import nacl.exceptions
import nacl.signing
import numpy as np

AUDIT_FILE = "audit.sqlite"
SCHEMA_VERSION = 1

RECORD_TAG = b"murmur-audit-record-v1\x00"
HEAD_TAG = b"murmur-audit-head-v1\x00"
ANCHOR_TAG = b"murmur-audit-anchor-v1\x00"
GENESIS_TAG = b"murmur-audit-genesis-v1\x00"

# Structural limits that keep patient-level data out of the log (docs/audit.md, "What is
# never logged"). A model, a batch of features or a list of per-patient predictions would
# need far more numbers than any legitimate field does.
MAX_NUMBERS_PER_LIST = 32
MAX_LIST_ITEMS = 1024
MAX_STRING_CHARS = 4096
MAX_DEPTH = 6
MAX_FIELDS_BYTES = 64 * 1024

KIND_PATTERN = re.compile(r"^[a-z][a-z0-9_]{0,47}$")
SHA256_PATTERN = re.compile(r"^[0-9a-f]{64}$")

# Fields the read tools (lineage, export, checkpoint cross-checks) depend on. Other kinds
# (node_stop, evaluation, privacy, catch_up, ...) are free-form within the limits above.
REQUIRED_FIELDS: dict[str, tuple[str, ...]] = {
    "node_start": ("config_sha256",),
    "update_sent": ("recipients", "model_sha256"),
    "message_received": ("sender", "accepted"),
    "aggregation": ("rule", "used", "excluded", "own_model_sha256", "result_sha256"),
    "evaluation": ("metrics",),
    "quarantine": ("peer",),
    "equivocation_proof": ("peer", "proof_id", "receipts"),
    "checkpoint": ("checkpoint_sha256",),
    "retention_prune": ("anchor_seq", "anchor_hash", "pruned"),
}

RETENTION_CHECK_INTERVAL_S = 3600.0
SYNC_EVERY_APPENDS = 256  # bounds the WAL (and the unsynced tail) between signed heads

log = logging.getLogger("murmur.audit")


class AuditError(Exception):
    """The audit log cannot be opened, read or extended; the message says what to do."""


class SigningIdentity(Protocol):
    """What the log needs from `crypto.identity.Identity`."""

    name: str
    public_key: bytes

    def sign(self, data: bytes) -> bytes: ...


@dataclass(frozen=True)
class RetentionPolicy:
    """How long records are kept. The default keeps everything (HIPAA asks for years)."""

    max_age_days: int | None = None

    def __post_init__(self) -> None:
        days = self.max_age_days
        if days is not None and (isinstance(days, bool) or not isinstance(days, int) or days < 1):
            raise ValueError(
                f"RetentionPolicy.max_age_days must be a whole number of days >= 1, got {days!r}; "
                "use None to keep every record"
            )


@dataclass(frozen=True)
class AuditRecord:
    """One stored record, as the read tools return it."""

    seq: int
    time_us: int
    kind: str
    round: int | None
    fields: dict[str, Any]
    prev_hash: bytes
    hash: bytes
    signature: bytes

    @property
    def time_utc(self) -> str:
        return _iso(self.time_us)

    def to_json(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "time_utc": self.time_utc,
            "time_us": self.time_us,
            "kind": self.kind,
            "round": self.round,
            "fields": self.fields,
            "prev_hash": self.prev_hash.hex(),
            "hash": self.hash.hex(),
            "signature": self.signature.hex(),
        }


@dataclass
class VerifyResult:
    """The outcome of checking a whole log: chain links, record hashes and every signature."""

    ok: bool
    first_bad_seq: int | None
    problem: str | None
    records: int
    signed_heads: int
    warnings: list[str] = field(default_factory=list)
    first_seq: int | None = None
    last_seq: int | None = None
    head_hash: str | None = None
    public_key: str | None = None
    counts: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class PriorActivity:
    """What the log says this node already did; checkpoint loading cross-checks against it."""

    last_checkpoint_round: int | None
    last_checkpoint_sha256: str | None
    updates_sent: int
    privacy_records: int
    last_epsilon_spent: float | None


# --------------------------------------------------------------------------- encoding


def canonical_json(value: Any) -> bytes:
    """The one byte encoding that is hashed: sorted keys, no spaces, ASCII, no NaN."""
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    ).encode("ascii")


def record_body(seq: int, time_us: int, kind: str, round_: int | None, fields: Any) -> bytes:
    """The hashed bytes of a record: canonical JSON of {fields, kind, round, seq, time_us}."""
    return _record_body(seq, time_us, kind, round_, canonical_json(fields))


def _record_body(
    seq: int, time_us: int, kind: str, round_: int | None, fields_json: bytes
) -> bytes:
    """`record_body` from already-canonical fields, without encoding them a second time."""
    return b"".join(
        (
            b'{"fields":',
            fields_json,
            b',"kind":',
            _scalar_json(kind),
            b',"round":',
            _scalar_json(round_),
            b',"seq":',
            _scalar_json(seq),
            b',"time_us":',
            _scalar_json(time_us),
            b"}",
        )
    )


def _scalar_json(value: Any) -> bytes:
    """canonical_json(value), with fast paths for the header's ints and kind names."""
    if type(value) is int:
        return str(value).encode("ascii")
    if value is None:
        return b"null"
    if type(value) is str and KIND_PATTERN.match(value):
        return b'"' + value.encode("ascii") + b'"'
    return canonical_json(value)


def chain_hash(prev_hash: bytes, body: bytes) -> bytes:
    return hashlib.sha256(prev_hash + body).digest()


def genesis_hash(public_key: bytes) -> bytes:
    """The first record's prev_hash; binds the chain to the node's key."""
    return hashlib.sha256(GENESIS_TAG + public_key).digest()


def head_message(seq: int, head_hash: bytes) -> bytes:
    return HEAD_TAG + seq.to_bytes(8, "big") + head_hash


def anchor_message(seq: int, anchor_hash: bytes) -> bytes:
    return ANCHOR_TAG + seq.to_bytes(8, "big") + anchor_hash


FieldPath = tuple[str | int, ...]


def _where(path: FieldPath) -> str:
    """('fields', 'used', 0, 'peer') -> 'fields.used[0].peer', for error messages."""
    text = str(path[0])
    for part in path[1:]:
        text += f"[{part}]" if isinstance(part, int) else f".{part}"
    return text


def _normalize(value: Any, path: FieldPath = ("fields",), depth: int = 0) -> Any:
    """Return `value` as plain JSON, or raise ValueError naming the field and the fix.

    Every append walks its fields, so exact built-in types take the short paths first.
    """
    kind = type(value)
    if kind is str:
        if len(value) > MAX_STRING_CHARS:
            raise ValueError(
                f"audit field {_where(path)} is a {len(value)}-character string (limit "
                f"{MAX_STRING_CHARS}); log a SHA-256 or a short summary instead"
            )
        return value
    if value is None or kind is int or kind is bool:
        return value
    if kind is float:
        # JSON has no NaN/Infinity; an undefined metric is kept as a readable string.
        return value if math.isfinite(value) else str(value)
    if kind is dict or kind is list or kind is tuple:
        if depth >= MAX_DEPTH:
            raise ValueError(f"audit field {_where(path)} is nested deeper than {MAX_DEPTH} levels")
        return (
            _normalize_dict(value, path, depth)
            if kind is dict
            else _normalize_list(value, path, depth)
        )
    return _normalize_unusual(value, path, depth)


def _normalize_dict(value: dict[Any, Any], path: FieldPath, depth: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, item in value.items():
        if type(key) is not str:
            raise ValueError(
                f"audit field {_where(path)} has a non-string key {key!r}; use str keys"
            )
        item = _normalize(item, (*path, key), depth + 1)
        if item is not None and key.endswith("sha256"):
            _check_sha256(item, (*path, key))
        out[key] = item
    return out


def _normalize_list(value: list[Any] | tuple[Any, ...], path: FieldPath, depth: int) -> list[Any]:
    if len(value) > MAX_LIST_ITEMS:
        raise ValueError(
            f"audit field {_where(path)} is a list of {len(value)} items (limit {MAX_LIST_ITEMS})"
        )
    items = [_normalize(v, (*path, i), depth + 1) for i, v in enumerate(value)]
    numbers = sum(1 for v in items if type(v) is int or type(v) is float)
    if numbers > MAX_NUMBERS_PER_LIST:
        raise ValueError(
            f"audit field {_where(path)} holds {numbers} numbers (limit {MAX_NUMBERS_PER_LIST}): "
            "it looks like an array of data, which never enters the audit log (no "
            "patient-level data); log a SHA-256 or summary statistics instead"
        )
    return items


def _normalize_unusual(value: Any, path: FieldPath, depth: int) -> Any:
    """numpy scalars, enums and other subclasses become plain values; data is refused."""
    if isinstance(value, np.ndarray):
        raise ValueError(
            f"audit field {_where(path)} is a numpy array: arrays of data never enter the audit "
            "log (no patient-level data); log its SHA-256 or a summary number instead"
        )
    if isinstance(value, bytes | bytearray | memoryview):
        raise ValueError(f"audit field {_where(path)} is bytes; log bytes as a hex string (.hex())")
    if isinstance(value, np.generic):
        value = value.item()
    elif isinstance(value, int):  # e.g. IntEnum
        value = int(value)
    elif isinstance(value, float):
        value = float(value)
    elif isinstance(value, str):  # e.g. StrEnum reason codes
        value = str.__str__(value)
    elif isinstance(value, dict):
        value = dict(value)
    elif isinstance(value, list | tuple):
        value = list(value)
    else:
        raise ValueError(
            f"audit field {_where(path)} has type {type(value).__name__}; use str, int, float, "
            "bool, None, or lists and dicts of them"
        )
    return _normalize(value, path, depth)


def _check_sha256(value: Any, path: FieldPath) -> None:
    if not isinstance(value, str) or not SHA256_PATTERN.match(value):
        raise ValueError(
            f"audit field {_where(path)} must be a SHA-256 as 64 lowercase hex characters, got "
            f"{value!r}"
        )


def _check_kind_fields(kind: str, fields: dict[str, Any]) -> None:
    missing = [name for name in REQUIRED_FIELDS.get(kind, ()) if name not in fields]
    if missing:
        raise ValueError(f"audit record {kind!r} is missing field(s) {', '.join(missing)}")
    if kind == "update_sent" and not (
        isinstance(fields["recipients"], list)
        and all(isinstance(r, str) for r in fields["recipients"])
    ):
        raise ValueError("audit record 'update_sent': recipients must be a list of peer names")
    if kind == "message_received":
        if not isinstance(fields["accepted"], bool):
            raise ValueError("audit record 'message_received': accepted must be true or false")
        if fields["accepted"] and not isinstance(fields["sender"], str):
            raise ValueError("audit record 'message_received': an accepted message needs a sender")
    if kind == "aggregation":
        for name, needs in (("used", ("peer", "model_sha256")), ("excluded", ("peer",))):
            entries = fields[name]
            if not isinstance(entries, list) or not all(
                isinstance(e, dict) and all(k in e for k in needs) for e in entries
            ):
                raise ValueError(
                    f"audit record 'aggregation': {name} must be a list of objects with "
                    f"{' and '.join(needs)}, e.g. [{{'peer': 'hospital_b', 'model_sha256': ...}}]"
                )


def _iso(time_us: int) -> str:
    return datetime.fromtimestamp(time_us / 1e6, tz=UTC).isoformat(timespec="microseconds")


# --------------------------------------------------------------------------- the writer

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

_RECORD_COLUMNS = "seq, time_us, kind, round, fields, prev_hash, hash, signature"


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


# --------------------------------------------------------------------------- verification


def verify(state: Path | str, expected_public_key: bytes | None = None) -> VerifyResult:
    """Check the whole log: every link, every record hash, every signature, every signed head.

    `expected_public_key` should come from outside the log (the node's .pub file or config):
    someone who rewrites the database could also replace the key stored inside it.
    """
    with _read_only(state) as conn:
        conn.execute("BEGIN")  # one consistent snapshot while the node keeps writing
        return _verify_snapshot(conn, expected_public_key)


def _verify_snapshot(conn: sqlite3.Connection, expected_public_key: bytes | None) -> VerifyResult:
    counts: Counter[str] = Counter()
    result = VerifyResult(ok=False, first_bad_seq=None, problem=None, records=0, signed_heads=0)

    def fail(seq: int | None, problem: str) -> VerifyResult:
        result.first_bad_seq, result.problem, result.counts = seq, problem, dict(counts)
        return result

    meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
    try:
        public_key = bytes.fromhex(meta.get("public_key", ""))
        verify_key = nacl.signing.VerifyKey(public_key)
    except (ValueError, TypeError, nacl.exceptions.ValueError):
        return fail(None, "the log stores no valid public key (meta table damaged)")
    result.public_key = public_key.hex()
    if expected_public_key is None:
        result.warnings.append(
            "signatures were checked against the public key stored in the log itself; pass the "
            "node's published key (--public-key) to rule out a log re-signed under another key"
        )
    elif bytes(expected_public_key) != public_key:
        return fail(
            None,
            f"the log is signed by key {public_key.hex()}, not by the expected key "
            f"{bytes(expected_public_key).hex()}: it belongs to another node or was re-keyed",
        )

    def signed(message: bytes, signature: Any) -> bool:
        try:
            verify_key.verify(message, bytes(signature))
            return True
        except (nacl.exceptions.BadSignatureError, nacl.exceptions.ValueError, TypeError):
            return False

    anchor = conn.execute("SELECT seq, hash, signature FROM anchor").fetchone()
    anchor_seq = None
    if anchor is not None:
        anchor_seq, anchor_hash = anchor[0], bytes(anchor[1])
        if not signed(anchor_message(anchor_seq, anchor_hash), anchor[2]):
            return fail(anchor_seq, f"the retention anchor at record {anchor_seq} is not signed")
        prev_hash, expected_seq = anchor_hash, anchor_seq + 1
    else:
        prev_hash, expected_seq = genesis_hash(public_key), 1

    heads = {
        seq: (bytes(h), sig)
        for seq, h, sig in conn.execute("SELECT seq, hash, signature FROM heads").fetchall()
    }
    rows = conn.execute(f"SELECT {_RECORD_COLUMNS} FROM records ORDER BY seq")
    for seq, time_us, kind, round_, fields_text, stored_prev, stored_hash, signature in rows:
        where = f"record {seq} ({kind}, round {round_}, {_safe_iso(time_us)})"
        if seq != expected_seq:
            return fail(
                expected_seq,
                f"record {expected_seq} is missing (the next stored record is {seq}): "
                "records were deleted",
            )
        if stored_prev != prev_hash:
            previous = "the retention anchor" if seq - 1 == anchor_seq else f"record {seq - 1}"
            return fail(
                seq, f"{where} does not link to {previous}: records were removed or re-ordered"
            )
        try:
            body = record_body(seq, time_us, kind, round_, json.loads(fields_text))
        except (TypeError, ValueError) as exc:
            return fail(seq, f"{where} is malformed ({exc})")
        digest = chain_hash(prev_hash, body)
        if digest != stored_hash:
            return fail(
                seq,
                f"{where} was altered after it was written: its contents hash to "
                f"{digest.hex()[:16]}…, the chain recorded {bytes(stored_hash).hex()[:16]}…",
            )
        if not signed(RECORD_TAG + digest, signature):
            return fail(
                seq,
                f"{where} is not signed by this node's key: it was forged or altered by someone "
                "without the key",
            )
        if seq in heads:
            head_hash, head_signature = heads[seq]
            if head_hash != digest or not signed(head_message(seq, digest), head_signature):
                return fail(seq, f"the signed head at {where} does not verify")
            result.signed_heads += 1
        counts[kind] += 1
        result.records += 1
        result.first_seq = seq if result.first_seq is None else result.first_seq
        prev_hash, expected_seq = digest, seq + 1

    last_seq = expected_seq - 1
    beyond = sorted(s for s in heads if s > last_seq)
    if beyond:
        return fail(
            last_seq + 1,
            f"records from {last_seq + 1} on are missing: the node signed a head at record "
            f"{beyond[-1]}, so the end of the log was deleted",
        )
    signed_up_to = max((s for s in heads if s <= last_seq), default=None)
    if result.records == 0:
        result.warnings.append("the log holds no records")
    elif signed_up_to is None or signed_up_to < last_seq:
        start = (signed_up_to or (result.first_seq or 1) - 1) + 1
        result.warnings.append(
            f"records {start}..{last_seq} come after the last signed head (normal after a crash "
            "or a stop mid-round); each is individually signed and verified"
        )
    result.ok = True
    result.last_seq = last_seq if result.records else None
    result.head_hash = prev_hash.hex()
    result.counts = dict(counts)
    return result


def _safe_iso(time_us: Any) -> str:
    try:
        return _iso(int(time_us))
    except (TypeError, ValueError, OverflowError, OSError):
        return f"time {time_us!r}"


# --------------------------------------------------------------------------- lineage


@dataclass(frozen=True)
class Contribution:
    """One model that went into an aggregate, and the log record of its signed envelope."""

    peer: str
    model_sha256: str
    received_seq: int | None
    body_sha256: str | None


@dataclass(frozen=True)
class LineageStep:
    """One aggregation on the path back from a model."""

    round: int | None
    aggregation_seq: int
    rule: str
    f: Any
    result_sha256: str
    own_model_sha256: str
    contributions: list[Contribution]
    excluded: list[dict[str, Any]]


@dataclass(frozen=True)
class Lineage:
    """Where a model came from. `origin` is "aggregate" when the model is the result of
    aggregation record `record_seq`, "local" when it is the model this node trained and fed
    into that aggregation. `steps` go newest first."""

    model_sha256: str
    origin: str
    round: int | None
    record_seq: int
    steps: list[LineageStep]


Finder = Callable[[Callable[[AuditRecord], bool], int | None], AuditRecord | None]


def lineage(
    state: Path | str, model_sha256: str, *, max_rounds: int | None = None
) -> Lineage | None:
    """Walk back from a model through the aggregations that built it; None if never seen.

    Each round's own model was trained from an earlier aggregate: the one named by the
    aggregation record's optional `base_model_sha256`, else this node's latest aggregate of
    an earlier round (after a crash and restart, the re-done round is the one that counts).
    """
    aggregations = records_of_kind(state, "aggregation")
    target = _resolve_model_hash(model_sha256, aggregations)
    if target is None:
        return None
    received: dict[tuple[str, str], list[AuditRecord]] = {}
    for rec in records_of_kind(state, "message_received"):
        if rec.fields.get("accepted") is True and rec.fields.get("model_sha256"):
            key = (rec.fields.get("sender"), rec.fields["model_sha256"])
            received.setdefault(key, []).append(rec)

    def latest(predicate: Callable[[AuditRecord], bool], before: int | None) -> AuditRecord | None:
        return next(
            (
                a
                for a in reversed(aggregations)
                if (before is None or a.seq < before) and predicate(a)
            ),
            None,
        )

    start = latest(lambda a: a.fields.get("result_sha256") == target, None)
    origin = "aggregate"
    current = start
    if start is None:
        start = latest(lambda a: a.fields.get("own_model_sha256") == target, None)
        if start is None:
            return None
        origin, current = "local", _base_of(start, latest)
    steps: list[LineageStep] = []
    seen: set[int] = set()
    while current is not None and current.seq not in seen:
        if max_rounds is not None and len(steps) >= max_rounds:
            break
        seen.add(current.seq)
        steps.append(_step(current, received))
        current = _base_of(current, latest)
    return Lineage(target, origin, start.round, start.seq, steps)


MIN_HASH_PREFIX = 6
"""Hex characters a model-hash prefix needs (the dashboard shows 12) before it is looked up."""


def _resolve_model_hash(text: str, aggregations: list[AuditRecord]) -> str | None:
    """The full SHA-256 that `text` names: itself, or the one model of this log whose hash
    starts with it; None when no model of the log does. An ambiguous prefix is an error that
    lists the candidates, never a guess."""
    target = text.strip().lower()
    if SHA256_PATTERN.match(target):
        return target
    if not (MIN_HASH_PREFIX <= len(target) < 64 and all(c in "0123456789abcdef" for c in target)):
        raise AuditError(
            f"{text!r} is not a SHA-256 (64 hex characters) nor a prefix of one: give at "
            f"least {MIN_HASH_PREFIX} hex characters (the dashboard shows 12) or all 64"
        )
    models = {
        value
        for a in aggregations
        for value in (a.fields.get("result_sha256"), a.fields.get("own_model_sha256"))
        if isinstance(value, str) and value.startswith(target)
    }
    if len(models) > 1:
        raise AuditError(
            f"prefix {target} matches {len(models)} models of this log "
            f"({', '.join(sorted(m[:16] for m in models))}); give more characters"
        )
    return next(iter(models), None)


def _base_of(agg: AuditRecord, latest: Finder) -> AuditRecord | None:
    base = agg.fields.get("base_model_sha256")
    if base:
        return latest(lambda a: a.fields.get("result_sha256") == base, agg.seq)
    if agg.round is None:
        return latest(lambda a: True, agg.seq)
    return latest(lambda a: a.round is not None and a.round < agg.round, agg.seq)


def _step(agg: AuditRecord, received: dict[tuple[str, str], list[AuditRecord]]) -> LineageStep:
    contributions = []
    for used in agg.fields.get("used", []):
        sent = received.get((used["peer"], used["model_sha256"]), [])
        candidates = [r for r in sent if r.seq < agg.seq]
        same_round = [r for r in candidates if r.round == agg.round]
        match = (same_round or candidates or [None])[-1]
        contributions.append(
            Contribution(
                peer=used["peer"],
                model_sha256=used["model_sha256"],
                received_seq=match.seq if match else None,
                body_sha256=match.fields.get("body_sha256") if match else None,
            )
        )
    return LineageStep(
        round=agg.round,
        aggregation_seq=agg.seq,
        rule=str(agg.fields.get("rule")),
        f=agg.fields.get("f"),
        result_sha256=agg.fields["result_sha256"],
        own_model_sha256=agg.fields["own_model_sha256"],
        contributions=contributions,
        excluded=list(agg.fields.get("excluded", [])),
    )


# --------------------------------------------------------------------------- commands


def verify_command(
    state_dir: Path | str,
    public_key: bytes | None,
    out: TextIO | None = None,
    *,
    peer_heads: list[PeerHead] | None = None,
) -> int:
    """`murmur audit verify`: 0 when the whole log verifies, 1 naming the first bad record,
    2 when there is no readable log.

    With `peer_heads` (heads this node signed that its peers hold, `murmur audit heads`), it
    also fails, naming the head, when the log does not contain one of them: the log was cut
    back to an earlier point, or replaced, after the node had signed that head.
    """
    return verify_and_report(state_dir, public_key, out or sys.stdout, peer_heads=peer_heads)[0]


def verify_and_report(
    state_dir: Path | str,
    public_key: bytes | None,
    out: TextIO,
    *,
    peer_heads: list[PeerHead] | None = None,
) -> tuple[int, VerifyResult | None]:
    """`verify_command`'s exit status and printed lines, with the result they came from (None
    without a readable log), so `murmur audit report` shows exactly what verify prints."""
    try:
        result = verify(state_dir, public_key)
        positions = check_peer_heads(state_dir, peer_heads) if peer_heads else []
    except AuditError as exc:
        print(f"audit verify: {exc}", file=out)
        return 2, None
    if not result.ok:
        where = f"record {result.first_bad_seq}" if result.first_bad_seq is not None else "log"
        print(f"audit log FAILED at {where}: {result.problem}", file=out)
        print(f"({result.records} records before it verified)", file=out)
        return 1, result
    kinds = ", ".join(f"{k}={v}" for k, v in sorted(result.counts.items())) or "none"
    span = f"records {result.first_seq}..{result.last_seq}" if result.records else "no records"
    print(
        f"audit log OK: {result.records} records ({span}), {result.signed_heads} signed heads",
        file=out,
    )
    print(f"node key {result.public_key}", file=out)
    print(f"head hash {result.head_hash}", file=out)
    print(f"kinds: {kinds}", file=out)
    for warning in result.warnings:
        print(f"warning: {warning}", file=out)
    code = _report_peer_heads(result, positions, out) if peer_heads is not None else 0
    return code, result


def _report_peer_heads(
    result: VerifyResult, positions: list[tuple[PeerHead, str]], out: TextIO
) -> int:
    """Print what the peers' heads say about this log; 1 if any is missing from it."""
    failed = 0
    end = result.last_seq if result.last_seq is not None else 0
    for head, position in positions:
        where = f"head seq {head.seq} hash {head.hash.hex()} ({head.label})"
        if position == HEAD_CONTAINED:
            print(f"peer head OK: {where}", file=out)
        elif position == HEAD_PRUNED:
            print(f"warning: {where} is older than the retention anchor: not checked", file=out)
        elif position == HEAD_BEYOND_END:
            failed += 1
            print(
                f"audit log FAILED against peer heads: {where} is beyond the end of this log "
                f"(last record {end}): the log was cut back after the node signed that head",
                file=out,
            )
        else:
            failed += 1
            print(
                f"audit log FAILED against peer heads: {where} is not in this log (it holds "
                "another record at that seq, or none): the log was replaced or rewritten",
                file=out,
            )
    if not positions:
        print("warning: no peer heads to check against", file=out)
    elif not failed:
        print(f"peer heads: all {len(positions)} checked heads are in this log", file=out)
    return 1 if failed else 0


CSV_COLUMNS = [
    "seq",
    "time_utc",
    "kind",
    "round",
    "peer",
    "model_sha256",
    "epsilon_spent",
    "accepted",
    "reason",
    "fields_json",
    "prev_hash",
    "hash",
    "signature",
]


def _csv_row(rec: AuditRecord) -> dict[str, Any]:
    f = rec.fields
    peers: Any = f.get("sender") or f.get("peer") or f.get("recipients")
    if rec.kind == "aggregation":
        peers = [u.get("peer") for u in f.get("used", [])]
    return {
        "seq": rec.seq,
        "time_utc": rec.time_utc,
        "kind": rec.kind,
        "round": "" if rec.round is None else rec.round,
        "peer": ";".join(map(str, peers)) if isinstance(peers, list) else (peers or ""),
        "model_sha256": f.get("model_sha256") or f.get("result_sha256") or "",
        "epsilon_spent": "" if f.get("epsilon_spent") is None else f["epsilon_spent"],
        "accepted": "" if "accepted" not in f else str(f["accepted"]).lower(),
        "reason": f.get("reason") or "",
        "fields_json": canonical_json(f).decode("ascii"),
        "prev_hash": rec.prev_hash.hex(),
        "hash": rec.hash.hex(),
        "signature": rec.signature.hex(),
    }


def _iter_records(state: Path | str) -> Iterator[AuditRecord]:
    with _read_only(state) as conn:
        for row in conn.execute(f"SELECT {_RECORD_COLUMNS} FROM records ORDER BY seq"):
            yield _to_record(row)


def export_command(
    state_dir: Path | str, fmt: str, out: TextIO, public_key: bytes | None = None
) -> int:
    """`murmur audit export`: every record as CSV or JSON, with the verification outcome.

    Returns 0 when the log verified, 1 when it was exported but failed verification (the JSON
    says where; for CSV the outcome goes to stderr), 2 when there is no readable log.
    """
    if fmt not in ("csv", "json"):
        print(f"audit export: unknown format {fmt!r}; use csv or json", file=sys.stderr)
        return 2
    try:
        result = verify(state_dir, public_key)
        if fmt == "csv":
            writer = csv.DictWriter(out, fieldnames=CSV_COLUMNS)
            writer.writeheader()
            for rec in _iter_records(state_dir):
                writer.writerow(_csv_row(rec))
        else:
            _write_json_export(state_dir, result, out)
    except AuditError as exc:
        print(f"audit export: {exc}", file=sys.stderr)
        return 2
    status = "verified" if result.ok else f"FAILED at record {result.first_bad_seq}"
    print(f"audit export: {result.records} records written; chain {status}", file=sys.stderr)
    return 0 if result.ok else 1


def _write_json_export(state_dir: Path | str, result: VerifyResult, out: TextIO) -> None:
    """One JSON object; records one per line so that a large export stays greppable."""
    with _read_only(state_dir) as conn:
        meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
        anchor = conn.execute("SELECT seq, hash, time_us, signature FROM anchor").fetchone()
        heads = conn.execute("SELECT seq, hash, time_us, signature FROM heads ORDER BY seq")
        signed_heads = [_signed_point(*row) for row in heads.fetchall()]
    header = {
        "format": "murmur-audit-export/1",
        "node": meta.get("node_name"),
        "public_key": meta.get("public_key"),
        "log_created_utc": meta.get("created_utc"),
        "exported_utc": datetime.now(tz=UTC).isoformat(timespec="seconds"),
        "verification": asdict(result),
        "retention_anchor": None if anchor is None else _signed_point(*anchor),
        "signed_heads": signed_heads,
    }
    out.write("{\n")
    for key, value in header.items():
        out.write(f" {json.dumps(key)}: {json.dumps(value, sort_keys=True)},\n")
    out.write(' "records": [')
    for i, rec in enumerate(_iter_records(state_dir)):
        out.write(("\n  " if i == 0 else ",\n  ") + json.dumps(rec.to_json(), sort_keys=True))
    out.write("\n ]\n}\n")


def _signed_point(seq: int, digest: bytes, time_us: int, signature: bytes) -> dict[str, Any]:
    return {
        "seq": seq,
        "hash": bytes(digest).hex(),
        "time_utc": _safe_iso(time_us),
        "signature": bytes(signature).hex(),
    }


def lineage_command(
    state_dir: Path | str, model_sha256: str, out: TextIO, *, max_rounds: int | None = None
) -> int:
    """`murmur audit lineage`: the rounds and peers whose signed updates built a model.

    Returns 0 when found, 1 when no aggregation in this log involves the model, 2 on a bad
    log or argument.
    """
    try:
        found = lineage(state_dir, model_sha256, max_rounds=max_rounds)
    except AuditError as exc:
        print(f"audit lineage: {exc}", file=out)
        return 2
    if found is None:
        print(
            f"no aggregation in this node's audit log produced or used model "
            f"{model_sha256.strip().lower()}; check the hash (model_sha256 in /status) and --state",
            file=out,
        )
        return 1
    what = "the aggregate" if found.origin == "aggregate" else "this node's locally trained model"
    print(
        f"model {found.model_sha256} is {what} of round {found.round} "
        f"(audit record {found.record_seq})",
        file=out,
    )
    print(
        f"{len(found.steps)} aggregation(s) back, as far as this node's log sees "
        "(`murmur audit verify` checks the log itself):",
        file=out,
    )
    rows = [("round", "record", "contributor", "model_sha256", "evidence")]
    rounds_by_peer: dict[str, list[int | None]] = {}
    for step in found.steps:
        rnd, seq = "-" if step.round is None else str(step.round), str(step.aggregation_seq)
        rows.append(
            (rnd, seq, "(this node)", step.own_model_sha256, f"trained here; rule {step.rule}")
        )
        for c in step.contributions:
            evidence = (
                f"signed envelope accepted in record {c.received_seq}"
                if c.received_seq is not None
                else "no message_received record left in this log (pruned?)"
            )
            rows.append((rnd, seq, c.peer, c.model_sha256, evidence))
            rounds_by_peer.setdefault(c.peer, []).append(step.round)
        for e in step.excluded:
            reason = f"EXCLUDED: {e.get('reason')}"
            rows.append((rnd, seq, str(e.get("peer")), e.get("model_sha256") or "-", reason))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    for row in rows:
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=False)]
        print("  ".join([*cells, row[4]]), file=out)
    print("peers whose signed updates contributed:", file=out)
    for peer, rounds in sorted(rounds_by_peer.items()):
        print(f"  {peer}: {len(rounds)} round(s): {_ranges(rounds)}", file=out)
    if not rounds_by_peer:
        print("  none (every round kept this node's own model only)", file=out)
    return 0


def _ranges(rounds: list[int | None]) -> str:
    numbers = sorted({r for r in rounds if isinstance(r, int)})
    parts: list[tuple[int, int]] = []
    for n in numbers:
        if parts and parts[-1][1] == n - 1:
            parts[-1] = (parts[-1][0], n)
        else:
            parts.append((n, n))
    return ", ".join(f"{a}" if a == b else f"{a}-{b}" for a, b in parts) or "-"
