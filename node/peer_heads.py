"""`murmur audit heads` and `murmur audit verify --peer-heads`: a node's signed heads, as its
peers hold them, checked against its log from outside.

Why: a hospital's own log can be cut back or replaced by whoever can write its state
directory, but the heads it signed are also in its neighbours' logs (node/rollback.py keeps
them). `heads_command` exports the receipts one node holds of a peer; `load_peer_heads` reads
such exports (checking each receipt's signature against the peer's key) for
`murmur audit verify --peer-heads` and the compliance report.
"""

from __future__ import annotations

import contextlib
import json
import re
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TextIO

from murmur.gossip.receipts import Receipt, ReceiptError
from murmur.node.audit import (
    AuditError,
    PeerHead,
    records_of_kind,
    stored_public_key,
)

HEADS_FORMAT = "murmur-peer-heads/1"
_HEX_KEY = re.compile(r"^[0-9a-fA-F]{64}$")


def _read_checkpoint_heads(state_dir: Path) -> list[Receipt]:
    from murmur.node.checkpoint import CheckpointError, checkpoint_path, decode_checkpoint

    path = checkpoint_path(state_dir)
    if not path.is_file():
        return []
    try:
        ckpt = decode_checkpoint(path.read_bytes(), source=str(path))
    except (CheckpointError, OSError) as exc:
        print(f"audit heads: warning: {exc}", file=sys.stderr)
        return []
    out = []
    state = ckpt.extra.get("heads") or {}
    for text in state.get("latest", []) if isinstance(state, dict) else []:
        with contextlib.suppress(ValueError, TypeError):
            out.append(Receipt.decode(bytes.fromhex(text)))
    return out


def collect_peer_receipts(
    state_dir: Path, of: str
) -> tuple[str | None, bytes | None, list[Receipt]]:
    """Every verified receipt the node of ``state_dir`` holds of peer ``of`` (a name from its
    config or a 64-hex public key): (name, key, receipts oldest first, de-duplicated)."""
    name = None if _HEX_KEY.match(of) else of
    key = bytes.fromhex(of) if name is None else None
    found: list[Receipt] = []
    for record in records_of_kind(state_dir, "message_received"):
        text = record.fields.get("receipt")
        if not isinstance(text, str):
            continue
        try:
            receipt = Receipt.decode(bytes.fromhex(text))
        except ValueError:
            continue
        by_name = name is not None and record.fields.get("sender") == name
        if by_name or receipt.sender == key:
            key = key or receipt.sender
            name = name or record.fields.get("sender")
            found.append(receipt)
    if key is not None:
        found += [r for r in _read_checkpoint_heads(state_dir) if r.sender == key]
    unique: dict[bytes, Receipt] = {}
    for receipt in found:
        if receipt.sender == key and receipt.verify():
            unique.setdefault(receipt.encode(), receipt)
    ordered = sorted(unique.values(), key=lambda r: (r.round, r.head.audit_seq))
    return name, key, ordered


def heads_command(state_dir: Path, of: str, out: TextIO, *, limit: int = 100) -> int:
    """``murmur audit heads``: the signed receipts the node of ``state_dir`` holds of ``of``,
    as JSON (the newest ``limit``). Exit 0 with receipts, 1 with none, 2 without a log."""
    try:
        meta_key = stored_public_key(state_dir)
        name, key, receipts = collect_peer_receipts(state_dir, of)
    except AuditError as exc:
        print(f"audit heads: {exc}", file=sys.stderr)
        return 2
    receipts = receipts[-limit:] if limit > 0 else receipts
    doc = {
        "format": HEADS_FORMAT,
        "holder": {"state_dir": str(state_dir), "public_key": meta_key.hex() if meta_key else None},
        "of": {"name": name, "public_key": key.hex() if key else None},
        "exported_utc": datetime.now(tz=UTC).isoformat(timespec="seconds"),
        "receipts": [
            {"round": r.round, **r.head.to_json(), "receipt": r.to_hex()} for r in receipts
        ],
    }
    out.write(json.dumps(doc, indent=1) + "\n")
    print(f"audit heads: {len(receipts)} signed receipt(s) of {of}", file=sys.stderr)
    return 0 if receipts else 1


def load_peer_heads(
    paths: Sequence[Path], expected_key: bytes | None, state_dir: Path
) -> tuple[list[PeerHead], list[str]]:
    """The heads in ``murmur audit heads`` files that the log's node really signed, and
    warnings for entries that are not evidence (bad signature, another node's key).

    Only the ``receipt`` of each entry counts: the readable fields beside it are ignored, so
    an edited file cannot claim a head the node never signed.
    """
    key = expected_key if expected_key is not None else stored_public_key(state_dir)
    heads, warnings = [], []
    for path in paths:
        try:
            doc = json.loads(Path(path).read_text())
            entries = doc["receipts"]
            holder = (doc.get("holder") or {}).get("state_dir") or str(path)
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            warnings.append(f"{path}: not a murmur audit heads file ({exc!r})")
            continue
        for index, entry in enumerate(entries if isinstance(entries, list) else []):
            try:
                receipt = Receipt.decode(bytes.fromhex(entry["receipt"]))
            except (KeyError, TypeError, ValueError, ReceiptError) as exc:
                warnings.append(f"{path} entry {index}: not a receipt ({exc})")
                continue
            if key is not None and receipt.sender != key:
                warnings.append(f"{path} entry {index}: a receipt of another node; ignored")
            elif not receipt.verify():
                warnings.append(f"{path} entry {index}: its signature does not verify; ignored")
            else:
                label = f"signed in the round-{receipt.round} envelope, held by {holder}"
                heads.append(PeerHead(receipt.head.audit_seq, receipt.head.audit_hash, label))
    return heads, warnings
