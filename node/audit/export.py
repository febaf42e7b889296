"""`murmur audit export`: every record as CSV or JSON, with the verification outcome."""

from __future__ import annotations

import csv
import json
import sys
from collections.abc import Iterator
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

from murmur.node.audit.reading import (
    _read_only,
    _to_record,
)
from murmur.node.audit.records import (
    _RECORD_COLUMNS,
    AuditError,
    AuditRecord,
    VerifyResult,
    _safe_iso,
    canonical_json,
)
from murmur.node.audit.verify import verify

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
