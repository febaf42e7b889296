"""Verifying the audit chain: every link, record hash, signature and signed head, and
`murmur audit verify`, which prints the outcome (also against heads peers hold).
"""

from __future__ import annotations

import json
import sqlite3
import sys
from collections import Counter
from pathlib import Path
from typing import Any, TextIO

import nacl.exceptions
import nacl.signing
from murmur.node.audit.reading import (
    HEAD_BEYOND_END,
    HEAD_CONTAINED,
    HEAD_PRUNED,
    PeerHead,
    _read_only,
    check_peer_heads,
)
from murmur.node.audit.records import (
    _RECORD_COLUMNS,
    RECORD_TAG,
    AuditError,
    VerifyResult,
    _safe_iso,
    anchor_message,
    chain_hash,
    genesis_hash,
    head_message,
    record_body,
)


def verify(state: Path | str, expected_public_key: bytes | None = None) -> VerifyResult:
    """Check the whole log: every link, every record hash, every signature, every signed head.

    `expected_public_key` should come from outside the log (the node's .pub file or config):
    someone who rewrites the database could also replace the key stored inside it.
    """
    with _read_only(state) as conn:
        conn.execute("BEGIN")  # one consistent snapshot while the node keeps writing
        return _verify_snapshot(conn, expected_public_key)


class _Broken(Exception):
    """The log fails verification at record `seq` (None: the log as a whole)."""

    def __init__(self, seq: int | None, problem: str) -> None:
        super().__init__(problem)
        self.seq, self.problem = seq, problem


def _verify_snapshot(conn: sqlite3.Connection, expected_public_key: bytes | None) -> VerifyResult:
    counts: Counter[str] = Counter()
    result = VerifyResult(ok=False, first_bad_seq=None, problem=None, records=0, signed_heads=0)
    try:
        verify_key = _log_key(conn, expected_public_key, result)
        anchor = conn.execute("SELECT seq, hash, signature FROM anchor").fetchone()
        anchor_seq = None
        if anchor is not None:
            anchor_seq, anchor_hash = anchor[0], bytes(anchor[1])
            if not _signed(verify_key, anchor_message(anchor_seq, anchor_hash), anchor[2]):
                raise _Broken(
                    anchor_seq, f"the retention anchor at record {anchor_seq} is not signed"
                )
            prev_hash, expected_seq = anchor_hash, anchor_seq + 1
        else:
            prev_hash, expected_seq = genesis_hash(verify_key.encode()), 1
        heads = {
            seq: (bytes(h), sig)
            for seq, h, sig in conn.execute("SELECT seq, hash, signature FROM heads").fetchall()
        }
        rows = conn.execute(f"SELECT {_RECORD_COLUMNS} FROM records ORDER BY seq")
        for row in rows:
            prev_hash = _check_record(
                row, prev_hash, expected_seq, anchor_seq, verify_key, heads, result
            )
            counts[row[2]] += 1
            expected_seq = row[0] + 1
        last_seq = expected_seq - 1
        _check_end(heads, last_seq, result)
    except _Broken as broken:
        result.first_bad_seq, result.problem, result.counts = (
            broken.seq,
            broken.problem,
            dict(counts),
        )
        return result
    result.ok = True
    result.last_seq = last_seq if result.records else None
    result.head_hash = prev_hash.hex()
    result.counts = dict(counts)
    return result


def _log_key(
    conn: sqlite3.Connection, expected_public_key: bytes | None, result: VerifyResult
) -> nacl.signing.VerifyKey:
    """The key the log says it is signed with, checked against the expected one if given."""
    meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
    try:
        public_key = bytes.fromhex(meta.get("public_key", ""))
        verify_key = nacl.signing.VerifyKey(public_key)
    except (ValueError, TypeError, nacl.exceptions.ValueError):
        raise _Broken(None, "the log stores no valid public key (meta table damaged)") from None
    result.public_key = public_key.hex()
    if expected_public_key is None:
        result.warnings.append(
            "signatures were checked against the public key stored in the log itself; pass the "
            "node's published key (--public-key) to rule out a log re-signed under another key"
        )
    elif bytes(expected_public_key) != public_key:
        raise _Broken(
            None,
            f"the log is signed by key {public_key.hex()}, not by the expected key "
            f"{bytes(expected_public_key).hex()}: it belongs to another node or was re-keyed",
        )
    return verify_key


def _signed(verify_key: nacl.signing.VerifyKey, message: bytes, signature: Any) -> bool:
    try:
        verify_key.verify(message, bytes(signature))
        return True
    except (nacl.exceptions.BadSignatureError, nacl.exceptions.ValueError, TypeError):
        return False


def _check_record(
    row: tuple[Any, ...],
    prev_hash: bytes,
    expected_seq: int,
    anchor_seq: int | None,
    verify_key: nacl.signing.VerifyKey,
    heads: dict[int, tuple[bytes, Any]],
    result: VerifyResult,
) -> bytes:
    """Check one stored record against the chain so far; returns its hash (the next link)."""
    seq, time_us, kind, round_, fields_text, stored_prev, stored_hash, signature = row
    where = f"record {seq} ({kind}, round {round_}, {_safe_iso(time_us)})"
    if seq != expected_seq:
        raise _Broken(
            expected_seq,
            f"record {expected_seq} is missing (the next stored record is {seq}): "
            "records were deleted",
        )
    if stored_prev != prev_hash:
        previous = "the retention anchor" if seq - 1 == anchor_seq else f"record {seq - 1}"
        raise _Broken(
            seq, f"{where} does not link to {previous}: records were removed or re-ordered"
        )
    try:
        body = record_body(seq, time_us, kind, round_, json.loads(fields_text))
    except (TypeError, ValueError) as exc:
        raise _Broken(seq, f"{where} is malformed ({exc})") from None
    digest = chain_hash(prev_hash, body)
    if digest != stored_hash:
        raise _Broken(
            seq,
            f"{where} was altered after it was written: its contents hash to "
            f"{digest.hex()[:16]}…, the chain recorded {bytes(stored_hash).hex()[:16]}…",
        )
    if not _signed(verify_key, RECORD_TAG + digest, signature):
        raise _Broken(
            seq,
            f"{where} is not signed by this node's key: it was forged or altered by someone "
            "without the key",
        )
    if seq in heads:
        head_hash, head_signature = heads[seq]
        if head_hash != digest or not _signed(
            verify_key, head_message(seq, digest), head_signature
        ):
            raise _Broken(seq, f"the signed head at {where} does not verify")
        result.signed_heads += 1
    result.records += 1
    result.first_seq = seq if result.first_seq is None else result.first_seq
    return digest


def _check_end(heads: dict[int, tuple[bytes, Any]], last_seq: int, result: VerifyResult) -> None:
    """Fail when a signed head lies beyond the last record (the end was cut off); warn about
    records after the last signed head."""
    beyond = sorted(s for s in heads if s > last_seq)
    if beyond:
        raise _Broken(
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
