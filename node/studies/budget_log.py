"""The site budget's hash-chained, signed log, and the signed head its peers keep of it.

Why: the site budget store (node/studies/site_budget.py) is the only record of what the
hospital's finished studies spent. Deleting it, or putting back an older copy, while no study
runs would give the patients' privacy budget back. A node's own audit log cannot catch that
for a *new* study (its state directory is new too). So every write to the store appends an
entry to a log in the same transaction: the entry names the previous entry's hash and is
signed by the node key that wrote it. The newest entry is the log's **head**; the node signs
``{hospital, instance, seq, hash}`` as a :class:`BudgetHead` and offers it to its
neighbours, which keep the newest one of each hospital in *their* site budget store
(node/studies/witness.py), whatever study they run. A node that starts asks them for it
(inside the ``POST /receipts`` answer, node/rollback.py) and refuses to admit a study when
its store does not reach that head (deleted, replaced or put back), and its neighbours
refuse a hospital whose head goes back.

The log makes the store tamper-evident on its own too: a row changed without its entry, an
entry changed or removed from the middle, fails :func:`verify_log` at the next open.

Pure: no I/O. Canonical JSON as for manifests (node/studies/manifest.py); signatures are
Ed25519 through crypto.identity.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

from murmur.crypto.identity import Identity, IdentityError, check_public_key, verify_signature
from murmur.node.studies.manifest import canonical_json

ENTRY_DOMAIN = b"murmur-site-budget-log/1\x00"
GENESIS_DOMAIN = b"murmur-site-budget-log/1\x00genesis\x00"
HEAD_FORMAT = "murmur-site-budget-head/1"
HEAD_DOMAIN = b"murmur-site-budget-head/1\x00"
MAX_HEAD_BYTES = 1024
ROW_FIELDS = (
    "dataset",
    "study",
    "name",
    "noise_multiplier",
    "sample_rate",
    "planned_steps",
    "steps_taken",
    "finished",
    "admitted_at",
    "public_key",
)


class LogError(ValueError):
    """The store's log does not verify, or a head is not a well-formed signed head."""


def genesis_hash(instance: str) -> str:
    """The ``prev`` of a store's first entry: bound to the store's random instance id."""
    return hashlib.sha256(GENESIS_DOMAIN + instance.encode()).hexdigest()


def entry_hash(entry: Mapping[str, Any]) -> str:
    return hashlib.sha256(ENTRY_DOMAIN + canonical_json(dict(entry))).hexdigest()


def make_entry(
    signer: Identity, *, instance: str, seq: int, prev: str, op: str, row: Mapping[str, Any]
) -> tuple[str, str, str]:
    """(entry JSON, its hash, the signer's signature over the hash, hex)."""
    entry = {
        "instance": instance,
        "seq": seq,
        "prev": prev,
        "op": op,
        "row": {k: row[k] for k in ROW_FIELDS},
        "public_key": signer.public_key.hex(),
    }
    digest = entry_hash(entry)
    return canonical_json(entry).decode(), digest, signer.sign(bytes.fromhex(digest)).hex()


def verify_log(
    instance: str, entries: Iterable[tuple[int, str, str, str]]
) -> tuple[int, str, dict[tuple[str, str], dict[str, Any]]]:
    """Check ``(seq, entry JSON, hash, signature)`` rows in order; return (newest seq, head
    hash, the rows the log says the ``studies`` table holds, by (dataset, study)).

    ``LogError`` naming the first entry that breaks the chain: a gap in the sequence, a
    ``prev`` that is not the previous hash, a hash that is not the entry's, a signature that
    does not verify under the key the entry names, or another store's instance.
    """
    seq, head = 0, genesis_hash(instance)
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    for number, text, digest, signature in entries:
        try:
            entry = json.loads(text)
            key = bytes.fromhex(entry["public_key"])
            row = entry["row"]
            ok_sig = verify_signature(key, bytes.fromhex(digest), bytes.fromhex(signature))
        except (ValueError, KeyError, TypeError) as exc:
            raise LogError(f"entry {number} is not a budget log entry ({exc})") from None
        if number != seq + 1 or entry.get("seq") != number:
            raise LogError(f"entry {number} follows entry {seq}: the log has a gap")
        if entry.get("instance") != instance:
            raise LogError(f"entry {number} belongs to another store ({entry.get('instance')})")
        if entry.get("prev") != head:
            raise LogError(f"entry {number} does not follow entry {seq} (its prev differs)")
        if entry_hash(entry) != digest:
            raise LogError(f"entry {number} was changed after it was written (hash differs)")
        if not ok_sig:
            raise LogError(f"entry {number}'s signature does not verify")
        rows[(row["dataset"], row["study"])] = row
        seq, head = number, digest
    return seq, head, rows


@dataclass(frozen=True)
class BudgetHead:
    """A node's signed claim: hospital ``hospital``'s store ``instance`` had reached entry
    ``seq`` with hash ``hash`` (seq 0: the genesis hash, an empty log)."""

    hospital: str
    instance: str
    seq: int
    hash: str
    issued_at: float
    public_key: str
    signature: str = ""
    format: str = HEAD_FORMAT

    def _signed_bytes(self) -> bytes:
        fields = {k: v for k, v in asdict(self).items() if k != "signature"}
        return HEAD_DOMAIN + canonical_json(fields)

    @classmethod
    def make(
        cls, signer: Identity, *, hospital: str, instance: str, seq: int, hash_: str, now: float
    ) -> BudgetHead:
        head = cls(hospital, instance, seq, hash_, float(now), signer.public_key.hex())
        signature = signer.sign(head._signed_bytes()).hex()
        return cls(hospital, instance, seq, hash_, float(now), head.public_key, signature)

    def verify(self) -> bool:
        try:
            return verify_signature(
                bytes.fromhex(self.public_key), self._signed_bytes(), bytes.fromhex(self.signature)
            )
        except ValueError:
            return False

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def encode(self) -> bytes:
        return canonical_json(self.to_json())

    @classmethod
    def from_json(cls, value: Any) -> BudgetHead:
        """Parse a head's JSON object; ``LogError`` for anything else (types, sizes, keys)."""
        if not isinstance(value, dict) or set(value) != {f for f in cls.__dataclass_fields__}:
            raise LogError(f"a budget head is an object of {sorted(cls.__dataclass_fields__)}")
        if value["format"] != HEAD_FORMAT:
            raise LogError(f"unknown budget head format {str(value['format'])[:40]!r}")
        try:
            hospital, instance = str(value["hospital"]), str(value["instance"])
            seq, issued = value["seq"], value["issued_at"]
            if type(seq) is not int or not 0 <= seq < 2**63:
                raise ValueError("seq must be an integer >= 0")
            if not isinstance(issued, int | float) or not math.isfinite(issued):
                raise ValueError("issued_at must be a finite number")
            if not 1 <= len(hospital) <= 64 or not 1 <= len(instance) <= 64:
                raise ValueError("hospital and instance are 1..64 characters")
            if len(bytes.fromhex(value["hash"])) != 32:
                raise ValueError("hash must be 32 bytes of hex")
            check_public_key(bytes.fromhex(value["public_key"]))
            if len(bytes.fromhex(value["signature"])) != 64:
                raise ValueError("signature must be 64 bytes of hex")
        except (ValueError, TypeError, IdentityError) as exc:
            raise LogError(f"not a budget head: {exc}") from None
        return cls(
            hospital,
            instance,
            seq,
            str(value["hash"]),
            float(issued),
            str(value["public_key"]),
            str(value["signature"]),
        )

    @classmethod
    def decode(cls, data: bytes) -> BudgetHead:
        if len(data) > MAX_HEAD_BYTES:
            raise LogError(f"a budget head is at most {MAX_HEAD_BYTES} bytes")
        try:
            return cls.from_json(json.loads(data))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise LogError(f"a budget head is JSON: {exc}") from None
