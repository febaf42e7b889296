"""The admitted peers: who may send to this node and where each one listens.

Admission is an explicit, offline decision by the hospitals (they exchange ``.pub`` files), so
the allowlist is static configuration. Any key that is not on it is rejected everywhere,
before any expensive work is done for it.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from murmur.crypto.identity import (
    IdentityError,
    check_name,
    check_public_key,
    fingerprint,
    load_public_key,
)


@dataclass(frozen=True)
class Peer:
    """One admitted hospital: its node name, its HTTP base address (empty when it is reached
    only through relays), its Ed25519 key, and the names of the relays it is reachable
    through (gossip/relay.py)."""

    name: str
    address: str
    public_key: bytes
    relays: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        try:
            check_name(self.name)
            check_public_key(self.public_key)
        except IdentityError as exc:
            raise ValueError(f"peer {self.name!r}: {exc}") from None
        if not isinstance(self.address, str) or (not self.address.strip() and not self.relays):
            raise ValueError(
                f"peer {self.name!r}: address must be a non-empty string such as "
                "http://10.0.0.2:8470, unless the peer is reached through relays"
            )

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.public_key)


class Allowlist:
    """A set of peers, looked up by public key or by name.

    Static configuration never changes it; a consortium's membership (gossip/membership.py)
    does, through `replace`, which swaps the whole set at once so that every part holding
    this object (request authentication, the envelope opener, evidence, rollback) sees the
    new membership from its next lookup. Keys the consortium revoked are remembered apart,
    so a refusal can say `revoked_key` rather than `unknown_sender`.
    """

    def __init__(self, peers: Iterable[Peer], revoked: Iterable[bytes] = ()) -> None:
        self._by_key, self._by_name = self._index(peers)
        self._revoked = frozenset(revoked)

    def replace(self, peers: Iterable[Peer], revoked: Iterable[bytes] = ()) -> None:
        """Make ``peers`` the admitted set (checked as in the constructor) and ``revoked``
        the refused keys, in one step."""
        by_key, by_name = self._index(peers)
        self._by_key, self._by_name, self._revoked = by_key, by_name, frozenset(revoked)

    def is_revoked(self, public_key: bytes) -> bool:
        return public_key in self._revoked

    @staticmethod
    def _index(peers: Iterable[Peer]) -> tuple[dict[bytes, Peer], dict[str, Peer]]:
        by_key: dict[bytes, Peer] = {}
        by_name: dict[str, Peer] = {}
        for peer in peers:
            if not isinstance(peer, Peer):
                raise TypeError(f"allowlist entries must be Peer objects, got {peer!r}")
            if peer.name in by_name:
                raise ValueError(f"allowlist names peer {peer.name!r} twice; names must be unique")
            other = by_key.get(peer.public_key)
            if other is not None:
                raise ValueError(
                    f"peers {other.name!r} and {peer.name!r} have the same public key; "
                    "every node needs its own key (murmur keygen)"
                )
            by_key[peer.public_key] = peer
            by_name[peer.name] = peer
        return by_key, by_name

    @classmethod
    def from_config(
        cls, entries: Iterable[Mapping[str, Any]], base_dir: str | Path | None = None
    ) -> Allowlist:
        """Build from config tables ``{name, address, public_key}``.

        ``public_key`` is 64 hex characters or the path of a ``.pub`` file, relative paths
        being resolved against ``base_dir`` (normally the config file's directory).
        """
        peers = []
        for index, entry in enumerate(entries):
            missing = {"name", "address", "public_key"} - set(entry)
            if missing:
                raise ValueError(f"peer entry {index} lacks {', '.join(sorted(missing))}")
            key_source = entry["public_key"]
            if not isinstance(key_source, str):
                raise ValueError(f"peer {entry['name']!r}: public_key must be a string")
            if base_dir is not None and not _looks_like_hex_key(key_source):
                key_source = str(Path(base_dir) / key_source)
            try:
                public_key = load_public_key(key_source)
            except IdentityError as exc:
                raise ValueError(f"peer {entry['name']!r}: {exc}") from None
            peers.append(Peer(entry["name"], entry["address"], public_key))
        return cls(peers)

    def by_key(self, public_key: bytes) -> Peer | None:
        return self._by_key.get(public_key)

    def by_name(self, name: str) -> Peer | None:
        return self._by_name.get(name)

    def __contains__(self, public_key: object) -> bool:
        return public_key in self._by_key

    def __iter__(self) -> Iterator[Peer]:
        return iter(self._by_name.values())

    def __len__(self) -> int:
        return len(self._by_name)

    def __repr__(self) -> str:
        return f"Allowlist({sorted(self._by_name)})"


def _looks_like_hex_key(text: str) -> bool:
    stripped = text.strip()
    return len(stripped) == 64 and all(c in "0123456789abcdefABCDEF" for c in stripped)
