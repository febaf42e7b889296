"""Rollback detection on the node: the budget belongs to the hospital's key, not to a folder.

A node's state directory can be put back to an older copy by anyone who can write it (the
audit log cut back to an earlier signed head, the earlier checkpoint and intent files); a new
state directory can be started with the same key. Either way the node would restart with an
earlier epsilon and a log that verifies. What it cannot undo is what it signed: every envelope
carries its signed audit head (gossip/receipts.py, AuditHead), and its neighbours keep the
newest one (gossip/heads.py, HeadBook). This module is the node's side of that:

* ``POST /receipts`` (:func:`receipts_route`): an admitted peer asks, in a small signed
  request, for the newest receipt this node holds *of that peer*; the answer is sealed to it;
* at every start (:func:`poll_own_receipts`, :func:`own_state_behind`) the node asks its
  neighbours for their newest receipt of it and refuses to start when its state is older than
  what it signed; with no answer within a bounded wait it starts with a loud warning (the
  neighbours then catch a rollback on its first envelope);
* ``murmur audit heads`` (:func:`heads_command`) exports the receipts a node holds of a peer,
  and ``murmur audit verify --peer-heads`` (:func:`load_peer_heads`) checks a log against them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TextIO

from aiohttp import web

from crypto.allowlist import Peer
from crypto.identity import Identity
from gossip.heads import (
    MAX_ANSWER_BYTES,
    REQUEST_BYTES,
    HeadBook,
    ReceiptsRequest,
    RequestError,
    open_receipts_answer,
)
from gossip.receipts import EPSILON_TOLERANCE, Receipt, ReceiptError
from node.audit import (
    HEAD_BEYOND_END,
    HEAD_MISMATCH,
    AuditError,
    PeerHead,
    records_of_kind,
    stored_public_key,
)

if TYPE_CHECKING:
    from node.node import HospitalNode

log = logging.getLogger("murmur.rollback")

HEADS_FORMAT = "murmur-peer-heads/1"
_HEX_KEY = re.compile(r"^[0-9a-fA-F]{64}$")


class ReceiptsTransport(Protocol):
    """What the startup check needs from a transport (gossip/transport.py, PeerTransport)."""

    async def request_receipts(
        self, peer: Peer, request: bytes, max_bytes: int
    ) -> tuple[int | None, bytes]: ...


# --------------------------------------------------------------------------- serving


async def receipts_route(request: web.Request) -> web.Response:
    """``POST /receipts``: answer an admitted peer's signed request for its own receipts.

    At most ``REQUEST_BYTES + 1`` bytes are read, whatever the client claims, so the route
    costs nothing to abuse; the node answers every refusal with its reason code.
    """
    from node.api import NODE_KEY  # node.api imports this module for its route table

    node = request.app[NODE_KEY]
    # One byte more than a request is enough to refuse anything longer as too_large.
    body = await request.content.read(REQUEST_BYTES + 1)
    status, content_type, payload = node.answer_receipts_request(body)
    return web.Response(status=status, body=payload, content_type=content_type)


# --------------------------------------------------------------------------- asking at startup


@dataclass
class ReceiptsPoll:
    """What the neighbours said when asked for their newest receipts of this node."""

    answered: dict[str, list[Receipt]] = field(default_factory=dict)
    unanswered: dict[str, str] = field(default_factory=dict)  # peer -> why
    ignored: dict[str, int] = field(default_factory=dict)  # peer -> receipts that did not verify
    seconds: float = 0.0

    def newest(self) -> list[tuple[str, Receipt]]:
        """(holder, receipt) for every valid receipt, newest round first."""
        pairs = [(peer, r) for peer, receipts in self.answered.items() for r in receipts]
        return sorted(pairs, key=lambda pair: (-pair[1].round, -pair[1].head.audit_seq))


async def poll_own_receipts(
    transport: ReceiptsTransport,
    identity: Identity,
    peers: Sequence[Peer],
    *,
    deadline_s: float,
    grace_s: float,
    stop: asyncio.Event,
    retry_s: float = 0.5,
) -> ReceiptsPoll:
    """Ask every neighbour for the newest receipt it holds of this node, concurrently.

    Neighbours that are not up yet are asked again every ``retry_s`` until ``deadline_s``; once
    one has answered, the others get at most ``grace_s`` more (so one dead neighbour does not
    hold up every restart). A neighbour that answers with a refusal or a bad answer is not
    asked again. Each request is bounded by the transport's own timeout.
    """
    started = time.monotonic()
    poll = ReceiptsPoll()
    pending = {p.name: p for p in peers}
    first_answer: float | None = None

    async def ask(peer: Peer) -> tuple[str, list[Receipt] | None, str, int]:
        request = ReceiptsRequest.make(identity, peer.public_key, time.time())
        status, body = await transport.request_receipts(peer, request.encode(), MAX_ANSWER_BYTES)
        if status is None:
            return peer.name, None, "no answer", 0
        if status != 200:
            return peer.name, None, f"refused: HTTP {status} {body[:120]!r}", -1
        try:
            receipts, ignored = open_receipts_answer(identity, request, body)
        except RequestError as exc:
            return peer.name, None, f"bad answer: {exc}", -1
        return peer.name, receipts, "answered", ignored

    while pending and not stop.is_set():
        results = await asyncio.gather(*(ask(p) for p in pending.values()))
        for name, receipts, why, ignored in results:
            if receipts is not None:
                poll.answered[name] = receipts
                if ignored:
                    poll.ignored[name] = ignored
                del pending[name]
            else:
                poll.unanswered[name] = why
                if ignored < 0:  # a definite refusal: asking again will not change it
                    del pending[name]
        for name in poll.answered:
            poll.unanswered.pop(name, None)
        now = time.monotonic()
        if first_answer is None and poll.answered:
            first_answer = now
        limit = started + deadline_s
        if first_answer is not None:
            limit = min(limit, first_answer + grace_s)
        if not pending or now >= limit:
            break
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=max(0.0, min(retry_s, limit - now)))
    poll.seconds = time.monotonic() - started
    return poll


def own_state_behind(
    receipt: Receipt,
    *,
    signed_through: int,
    audit_position: Callable[[int, bytes], str],
    dp_steps: int,
    epsilon: float,
) -> list[str]:
    """How this node's state is older than what it signed in ``receipt`` (empty: it is not).

    ``signed_through`` is the newest round the node will never sign again (its signed-round
    record, or its checkpoint's round); ``audit_position`` is ``AuditLog.position``.
    """
    head = receipt.head
    problems = []
    if signed_through < receipt.round:
        problems.append(
            f"its last signed round is {signed_through}, but it signed round {receipt.round}"
        )
    position = audit_position(head.audit_seq, head.audit_hash)
    if position == HEAD_BEYOND_END:
        problems.append(
            f"its audit log ends before record {head.audit_seq}, which it had signed as its "
            f"head (hash {head.audit_hash.hex()})"
        )
    elif position == HEAD_MISMATCH:
        problems.append(
            f"its audit log holds another record at seq {head.audit_seq} than the head it "
            f"signed (hash {head.audit_hash.hex()})"
        )
    if dp_steps < head.dp_steps:
        problems.append(
            f"its privacy ledger has {dp_steps} DP steps, it had signed {head.dp_steps}"
        )
    if head.epsilon - epsilon > EPSILON_TOLERANCE * max(1.0, head.epsilon):
        problems.append(f"its privacy ledger has spent epsilon {epsilon:.4f}, it had signed "
                        f"{head.epsilon:.4f}")  # fmt: skip
    return problems


def describe_receipt(holder: str, receipt: Receipt) -> str:
    """One line naming a neighbour's evidence, for the error and the log."""
    head = receipt.head
    return (
        f"{holder} holds this node's own signed envelope of round {receipt.round} (audit head "
        f"seq {head.audit_seq}, hash {head.audit_hash.hex()[:16]}..., {head.dp_steps} DP steps, "
        f"epsilon {head.epsilon:.4f})"
    )


# --------------------------------------------------------------------------- rebuilding a book


def received_heads_since(state_dir: Path, after_seq: int) -> list[Receipt]:
    """Receipts recorded in this node's own ``message_received`` records after ``after_seq``
    (those that arrived after its last checkpoint, which a crash kept out of its head book)."""
    receipts = []
    for record in records_of_kind(state_dir, "message_received", after_seq=after_seq):
        text = record.fields.get("receipt")
        if isinstance(text, str):
            with contextlib.suppress(ValueError):
                receipts.append(Receipt.decode(bytes.fromhex(text)))
    return receipts


def replay_into(book: HeadBook, receipts: Sequence[Receipt]) -> int:
    """Observe verified ``receipts`` in order; returns how many did not verify (skipped)."""
    bad = 0
    for receipt in receipts:
        if receipt.verify():
            book.observe(receipt)
        else:
            bad += 1
    return bad


# --------------------------------------------------------------------------- murmur audit heads


def _read_checkpoint_heads(state_dir: Path) -> list[Receipt]:
    from node.checkpoint import CheckpointError, checkpoint_path, decode_checkpoint

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


def status_of_proofs(node: HospitalNode) -> dict[str, Any]:
    """The ``rollback.proven`` entry of /status: per peer, what its proof shows."""
    proven = {}
    for key, proof in node.heads.proofs().items():
        peer = node.allowlist.by_key(key)
        evidence = proof.evidence()
        proven[peer.name if peer else key.hex()] = {
            "proof_id": evidence["proof_id"],
            "regressions": evidence["regressions"],
            "earlier": evidence["earlier"],
            "later": evidence["later"],
        }
    return proven
