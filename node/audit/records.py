"""The audit log's record format: constants, record types, and the canonical encoding
that is hashed and signed, with the structural limits that keep patient data out of it.

Shared by the writer (chain.py), the verifier (verify.py) and the readers; a change here
changes what every existing log verifies against, so the tags carry a version.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

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


_RECORD_COLUMNS = "seq, time_us, kind, round, fields, prev_hash, hash, signature"


def _safe_iso(time_us: Any) -> str:
    try:
        return _iso(int(time_us))
    except (TypeError, ValueError, OverflowError, OSError):
        return f"time {time_us!r}"
