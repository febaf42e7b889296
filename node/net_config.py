"""How a node is reached: `[tls]` for its peer listener and `[[relays]]` it dials out to.

Kept apart from node/config.py (which validates everything else) because these two sections
are about the network path, not about training or privacy: nothing here is bound to a
checkpoint (node/binding.py), and an operator moves a hospital behind a relay, or gives its
listener a certificate, without touching the study.

Defaults stay secure: a peer listener that binds anything but loopback needs `[tls]` cert and
key, unless `[tls] allow_plaintext = true` waives it (and the node then says so loudly in its
log at every start).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

RELAY_SCHEMES = ("nats://", "tls://", "ws://", "wss://")
_RELAY_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def _fail(where: str, problem: str, fix: str) -> NoReturn:
    from murmur.node.config import ConfigError  # node.config imports this module

    raise ConfigError(f"{where} {problem}; fix: {fix}")


@dataclass(frozen=True)
class TlsSection:
    """`[tls]`: HTTPS on the peer listener (node/tls.py), and how strict its clients are.

    `cert` and `key` are PEM files (`murmur tls-selfsigned` writes a certificate for the
    node's own Ed25519 identity, so that its key is the allowlisted key). With `client_certs`
    the listener asks every client for a certificate and admits the connection only if that
    certificate's key is an allowlisted peer key (`murmur tls-selfsigned` certificates of the
    peers, listed in `peer_certs`, are the trust anchors).
    """

    cert: Path | None = None
    key: Path | None = None
    client_certs: bool = False
    peer_certs: list[Path] | None = None
    # Waiver: serve plain HTTP off loopback anyway (a VPN or a TLS-terminating proxy in front).
    allow_plaintext: bool = False

    @property
    def enabled(self) -> bool:
        return self.cert is not None

    def validate(self) -> None:
        if (self.cert is None) != (self.key is None):
            _fail(
                "tls",
                "needs both cert and key (or neither)",
                'cert = "certs/hospital_a.crt" and key = "certs/hospital_a.tls.key" '
                "(murmur tls-selfsigned writes both)",
            )
        for name in ("cert", "key"):
            path = getattr(self, name)
            if path is not None and not path.is_file():
                _fail(
                    f"tls.{name}",
                    f"{path} is not a readable file",
                    "murmur tls-selfsigned --key KEYFILE --out DIR writes one",
                )
        if self.client_certs and not self.enabled:
            _fail("tls.client_certs", "needs tls.cert and tls.key", "set both, or drop it")
        if self.client_certs and not self.peer_certs:
            _fail(
                "tls.peer_certs",
                "is required with client_certs = true (the peers' certificates, which are the "
                "only ones admitted)",
                'peer_certs = ["certs/hospital_b.crt", "certs/hospital_c.crt"]',
            )
        for i, path in enumerate(self.peer_certs or []):
            if not path.is_file():
                _fail(
                    f"tls.peer_certs[{i}]",
                    f"{path} is not a readable file",
                    "ask that hospital for its certificate (murmur tls-selfsigned)",
                )


@dataclass(frozen=True)
class RelaySection:
    """One `[[relays]]` entry: a NATS broker this node dials out to (gossip/relay.py).

    `url` is nats:// or tls:// (NATS over TLS), ws:// or wss:// (NATS's WebSocket listener,
    for buildings where only HTTPS may leave); for a NATS cluster of relay brokers, their
    URLs comma-separated (the node fails over between them). `ca_file` verifies a broker
    whose certificate is not signed by a public CA.
    """

    name: str
    url: str
    ca_file: Path | None = None
    connect_timeout_s: float = 5.0

    def validate(self, where: str) -> None:
        if not _RELAY_NAME.match(self.name):
            _fail(f"{where}.name", f"{self.name!r} is not a short name", 'name = "relay_a"')
        urls = [part.strip() for part in self.url.split(",")]
        for url in urls:
            if not url.startswith(RELAY_SCHEMES):
                _fail(
                    f"{where}.url",
                    f"must start with one of {', '.join(RELAY_SCHEMES)} (got {url!r})",
                    'url = "tls://relay.example.org:4222"',
                )
        if len({url.startswith(("tls://", "wss://")) for url in urls}) > 1:
            _fail(
                f"{where}.url",
                "mixes encrypted (tls://, wss://) and plain brokers in one relay",
                "give every broker of the cluster the same kind of URL",
            )
        if self.ca_file is not None and not self.ca_file.is_file():
            _fail(f"{where}.ca_file", f"{self.ca_file} is not a readable file", "point it at a PEM")
        if not self.connect_timeout_s > 0:
            _fail(f"{where}.connect_timeout_s", "must be > 0", "connect_timeout_s = 5")


def check_network(
    *,
    listen_host: str,
    loopback: bool,
    inbound: bool,
    tls: TlsSection,
    relays: list[RelaySection],
    peers: list[tuple[str, str, list[str]]],
) -> None:
    """The checks across sections: TLS off loopback, relays named by peers exist, a node
    with no inbound port has a relay. `peers`: (name, address, relay names) per peer."""
    tls.validate()
    names = [r.name for r in relays]
    for i, relay in enumerate(relays):
        relay.validate(f"relays[{i}]")
    if len(set(names)) != len(names):
        _fail("relays", "names a relay twice", "give each [[relays]] entry its own name")
    if inbound and not loopback and not tls.enabled and not tls.allow_plaintext:
        _fail(
            "node.listen",
            f"binds {listen_host!r}, off loopback, without TLS: anyone on the path would see "
            "who sends what to whom",
            "add [tls] cert and key (murmur tls-selfsigned), or bind 127.0.0.1, or, behind a "
            "VPN or TLS proxy, waive it with [tls] allow_plaintext = true",
        )
    if not inbound and not relays:
        _fail(
            "node.inbound",
            "= false opens no port for peers, so this node needs a relay to be reached",
            'add a [[relays]] entry (name = "relay_a", url = "tls://relay.example.org:4222")',
        )
    for name, address, via in peers:
        if not address and not via:
            _fail(
                f"peers ({name})",
                "has neither an address nor relays, so it cannot be reached",
                'address = "https://10.0.0.2:8470" or relays = ["relay_a"]',
            )
        for relay in via:
            if relay not in names:
                _fail(
                    f"peers ({name}).relays",
                    f"names relay {relay!r}, which no [[relays]] entry defines",
                    f"add [[relays]] name = {relay!r} with its url, or use one of {names}",
                )


@dataclass(frozen=True)
class ConsortiumSection:
    """`[consortium]`: run under a consortium's membership (gossip/membership.py) instead
    of a static allowlist. `manifest` is the founders' signed manifest (`murmur consortium
    init`); `consortium_id`, when given, is its hash as the founders published it, and a
    manifest that does not hash to it is refused. With a consortium the node's peers are the
    current members (every member is every member's neighbour); `[[peers]]` entries only
    add relays for members of the same name."""

    manifest: Path | None = None
    consortium_id: str = ""
    exchange_interval_s: float = 30.0

    @property
    def enabled(self) -> bool:
        return self.manifest is not None

    def validate(self) -> None:
        if not self.exchange_interval_s > 0:
            _fail(
                "consortium.exchange_interval_s",
                f"is {self.exchange_interval_s}",
                "give a positive number of seconds, e.g. 30",
            )
        if self.consortium_id and not re.fullmatch(r"[0-9a-fA-F]{64}", self.consortium_id):
            _fail(
                "consortium.consortium_id",
                "is not 64 hex characters",
                "copy it from `murmur consortium show MANIFEST`",
            )
        if self.manifest is not None and not self.manifest.is_file():
            _fail(
                "consortium.manifest",
                f"{self.manifest} is not a file",
                "point it at the manifest `murmur consortium init` wrote",
            )
