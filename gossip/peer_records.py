"""Signed peer records: where an admitted hospital can be reached, said by the hospital itself.

Why: addresses and relays change (a new host, a second relay), and editing every neighbour's
config for it does not scale. Each node signs a record of its own direct addresses and relay
names, with a sequence number and an expiry, and gossips the records it holds to its
neighbours; a node that receives a newer valid record of a peer reaches that peer where the
record says. The **allowlist stays the authority on who is admitted**: a record only says
*where*, and a record of a key that is not on the allowlist is refused (`not_allowlisted`),
as are unsigned or badly signed ones (`bad_signature`), expired ones (`expired`), ones
valid for longer than `MAX_TTL_S` (`too_long`), malformed ones (`malformed`) and ones no
newer than the record held (`not_newer`). A forwarded record is as good as one received from
its owner: only the owner's signature counts, never who passed it on.

The signed bytes are a domain tag and the canonical JSON of the fields (sorted keys, no
spaces); signatures are Ed25519 through crypto.identity. Pure: no I/O.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import Any

from murmur.crypto.allowlist import Allowlist, Peer
from murmur.crypto.identity import Identity, verify_signature

DOMAIN = b"murmur-peer-record-v1\x00"
MAX_TTL_S = 7 * 24 * 3600
MAX_RECORDS_PER_MESSAGE = 256
MAX_RECORDS_BYTES = 256 * 1024
_ADDRESS = re.compile(r"^https?://[A-Za-z0-9.\-\[\]:]{1,253}(/[A-Za-z0-9._~\-/]*)?$")
_RELAY = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


class RecordRefusal(StrEnum):
    MALFORMED = "malformed"
    BAD_SIGNATURE = "bad_signature"
    EXPIRED = "expired"
    TOO_LONG = "too_long"
    NOT_ALLOWLISTED = "not_allowlisted"
    NOT_NEWER = "not_newer"


class RecordError(ValueError):
    def __init__(self, why: RecordRefusal, detail: str) -> None:
        super().__init__(f"{why}: {detail}")
        self.why = why


@dataclass(frozen=True)
class PeerRecord:
    public_key: bytes
    addresses: tuple[str, ...]
    relays: tuple[str, ...]
    seq: int  # the owner's clock in milliseconds when it signed: newer replaces older
    expires: int  # Unix seconds
    signature: bytes = b""

    def signed_bytes(self) -> bytes:
        fields = {
            "addresses": list(self.addresses),
            "expires": self.expires,
            "key": self.public_key.hex(),
            "relays": list(self.relays),
            "seq": self.seq,
        }
        return DOMAIN + json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def make(
        cls,
        identity: Identity,
        addresses: list[str],
        relays: list[str],
        now: float,
        ttl_s: float = 24 * 3600,
    ) -> PeerRecord:
        unsigned = cls(
            identity.public_key, tuple(addresses), tuple(relays), int(now * 1000), int(now + ttl_s)
        )
        return replace(unsigned, signature=identity.sign(unsigned.signed_bytes()))

    def to_json(self) -> dict[str, Any]:
        return {
            "key": self.public_key.hex(),
            "addresses": list(self.addresses),
            "relays": list(self.relays),
            "seq": self.seq,
            "expires": self.expires,
            "signature": self.signature.hex(),
        }

    @classmethod
    def from_json(cls, obj: Any) -> PeerRecord:
        """Parse one record; ``RecordError(MALFORMED)`` naming what is wrong."""
        try:
            if not isinstance(obj, dict) or set(obj) != {
                "key", "addresses", "relays", "seq", "expires", "signature",
            }:  # fmt: skip
                raise ValueError("not a record object")
            key, signature = bytes.fromhex(obj["key"]), bytes.fromhex(obj["signature"])
            addresses, relays = obj["addresses"], obj["relays"]
            if len(key) != 32 or len(signature) != 64:
                raise ValueError("key or signature of the wrong length")
            if not isinstance(addresses, list) or not isinstance(relays, list):
                raise ValueError("addresses and relays must be lists")
            if len(addresses) > 8 or len(relays) > 8:
                raise ValueError("more than 8 addresses or relays")
            if not all(isinstance(a, str) and _ADDRESS.match(a) for a in addresses):
                raise ValueError("an address is not an http(s) URL")
            if not all(isinstance(r, str) and _RELAY.match(r) for r in relays):
                raise ValueError("a relay is not a short name")
            seq, expires = obj["seq"], obj["expires"]
            if not all(isinstance(v, int) and not isinstance(v, bool) for v in (seq, expires)):
                raise ValueError("seq and expires must be integers")
        except (ValueError, TypeError, AttributeError) as exc:
            raise RecordError(RecordRefusal.MALFORMED, str(exc)) from None
        return cls(key, tuple(addresses), tuple(relays), seq, expires, signature)


class RecordBook:
    """The newest valid record of each admitted peer."""

    def __init__(self, allowlist: Allowlist) -> None:
        self.allowlist = allowlist
        self._records: dict[bytes, PeerRecord] = {}

    def offer(self, record: PeerRecord, now: float) -> None:
        """Keep ``record`` if it is valid and newer; ``RecordError`` saying why not."""
        peer = self.allowlist.by_key(record.public_key)
        if peer is None:
            raise RecordError(RecordRefusal.NOT_ALLOWLISTED, "the key is not on the allowlist")
        if not verify_signature(record.public_key, record.signed_bytes(), record.signature):
            raise RecordError(RecordRefusal.BAD_SIGNATURE, f"not signed by {peer.name}")
        if record.expires <= now:
            raise RecordError(RecordRefusal.EXPIRED, f"{peer.name}'s record has expired")
        if record.expires - record.seq / 1000 > MAX_TTL_S:
            raise RecordError(RecordRefusal.TOO_LONG, f"valid for more than {MAX_TTL_S} s")
        held = self._records.get(record.public_key)
        if held is not None and held.seq >= record.seq:
            raise RecordError(RecordRefusal.NOT_NEWER, f"already holding a newer {peer.name}")
        self._records[record.public_key] = record

    def current(self, peer: Peer, now: float) -> Peer:
        """``peer`` as its newest unexpired record places it (its config entry otherwise)."""
        record = self._records.get(peer.public_key)
        if record is None or record.expires <= now:
            return peer
        address = record.addresses[0] if record.addresses else ""
        if not address and not record.relays:
            return peer
        return Peer(peer.name, address, peer.public_key, record.relays)

    def held(self, now: float) -> list[PeerRecord]:
        return [r for r in self._records.values() if r.expires > now]


def encode_records(records: list[PeerRecord]) -> bytes:
    return json.dumps(
        {"records": [r.to_json() for r in records[:MAX_RECORDS_PER_MESSAGE]]}
    ).encode()


def decode_records(body: bytes) -> list[Any]:
    """The raw record objects of a /records body; ``RecordError(MALFORMED)`` otherwise."""
    if len(body) > MAX_RECORDS_BYTES:
        raise RecordError(RecordRefusal.MALFORMED, "too long")
    try:
        doc = json.loads(body)
    except ValueError:
        raise RecordError(RecordRefusal.MALFORMED, "not JSON") from None
    records = doc.get("records") if isinstance(doc, dict) else None
    if not isinstance(records, list) or len(records) > MAX_RECORDS_PER_MESSAGE:
        raise RecordError(RecordRefusal.MALFORMED, "no list of at most 256 records")
    return records
