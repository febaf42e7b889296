"""The sections of a node's config that say where it listens and whom it talks to: [node],
[operator], [peer_listener], [[peers]], [gossip], [compression], [audit] and [logging]
(docs/config.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from murmur.gossip.compression import CODECS, MAX_BLOCK, CompressionSettings
from murmur.node.config_errors import (
    check_listen,
    is_loopback,
    require,
)


@dataclass(frozen=True)
class NodeSection:
    name: str
    key_file: Path
    state_dir: Path
    listen: str = "127.0.0.1:8700"
    # After the planned rounds: "exit" (status 0; a service manager should then restart the
    # node only on failure), or "serve" (keep answering until SIGTERM, as `murmur node --serve`).
    after_training: str = "exit"
    # False: open no port for peers at all; they reach this node through its [[relays]].
    inbound: bool = True
    # Addresses announced in this node's signed peer record (node/records.py), e.g.
    # ["https://10.0.0.1:8700"]; peers then reach it there without editing their configs.
    advertise: list[str] = field(default_factory=list)

    def validate(self) -> None:
        require(
            self.after_training in ("exit", "serve"),
            "node.after_training",
            f"must be exit or serve (got {self.after_training!r})",
            'after_training = "serve" to stay up for a service manager',
        )
        require(self.name.strip() != "", "node.name", "must not be empty", 'name = "hospital_a"')
        for i, address in enumerate(self.advertise):
            require(
                address.startswith(("http://", "https://")),
                f"node.advertise[{i}]",
                f"must be an http(s) URL (got {address!r})",
                'advertise = ["https://10.0.0.1:8700"]',
            )
        check_listen(self.listen, "node.listen", "127.0.0.1:8700")


@dataclass(frozen=True)
class OperatorSection:
    """The operator listener: /status, /metrics and the dashboard (docs/config.md, [operator]).

    It is separate from the peer listener because what it serves (per-round test metrics with
    exact counts, the decision threshold chosen on training rows) is for the hospital's own
    operators only. It binds loopback by default; anything else must be asked for twice
    (allow_remote) and needs a bearer token, so no typo can publish it.
    """

    listen: str = "127.0.0.1:9700"
    token_file: Path | None = None
    allow_remote: bool = False

    def validate(self) -> None:
        host, _ = check_listen(self.listen, "operator.listen", "127.0.0.1:9700")
        if is_loopback(host):
            return
        require(
            self.allow_remote,
            "operator.listen",
            f"binds {host!r}, which is not a loopback address: anyone who can reach it would "
            "read per-round test metrics and the decision threshold",
            'keep listen = "127.0.0.1:9700" and reach it through an SSH tunnel, or set '
            'allow_remote = true and token_file = "operator.token" (mode 0600)',
        )
        require(
            self.token_file is not None,
            "operator.token_file",
            f"is required when operator.listen binds a non-loopback address ({host!r})",
            'token_file = "operator.token", a file of mode 0600 holding at least 32 random '
            "characters (python3 -c 'import secrets; print(secrets.token_urlsafe(32))')",
        )


@dataclass(frozen=True)
class PeerListenerSection:
    """Limits of the peer listener (POST /gossip, /receipts, GET /health), which anyone who
    can reach the node can talk to; the `peer_*` ones apply to each authenticated peer
    (docs/protocol.md, "HTTP"; gossip/auth.py PeerAllowance)."""

    body_timeout_s: float = 20.0
    idle_timeout_s: float = 15.0
    max_connections: int = 64
    max_connections_per_address: int = 8
    max_uploads_per_address: int = 4
    peer_max_bodies: int = 2
    peer_burst: float = 16.0
    peer_requests_per_round: float = 4.0
    peer_requests_per_s: float = 0.5

    def validate(self) -> None:
        require(
            self.body_timeout_s > 0,
            "peer_listener.body_timeout_s",
            "must be > 0",
            "body_timeout_s = 20 (at least the peers' gossip.send_timeout_s)",
        )
        require(
            self.idle_timeout_s > 0,
            "peer_listener.idle_timeout_s",
            "must be > 0",
            "idle_timeout_s = 15",
        )
        require(
            self.max_connections >= 1,
            "peer_listener.max_connections",
            "must be >= 1",
            "max_connections = 64",
        )
        require(
            1 <= self.max_connections_per_address <= self.max_connections,
            "peer_listener.max_connections_per_address",
            f"must be in 1..max_connections ({self.max_connections})",
            "max_connections_per_address = 8",
        )
        require(
            self.max_uploads_per_address >= 1,
            "peer_listener.max_uploads_per_address",
            "must be >= 1",
            "max_uploads_per_address = 4",
        )
        require(
            self.peer_max_bodies >= 1,
            "peer_listener.peer_max_bodies",
            "must be >= 1",
            "peer_max_bodies = 2",
        )
        require(
            self.peer_burst >= 1,
            "peer_listener.peer_burst",
            "must be >= 1 (a peer must be able to send at least one request)",
            "peer_burst = 16",
        )
        require(
            self.peer_requests_per_round >= 1,
            "peer_listener.peer_requests_per_round",
            "must be >= 1 (an honest peer sends one envelope a round)",
            "peer_requests_per_round = 4",
        )
        require(
            self.peer_requests_per_s >= 0,
            "peer_listener.peer_requests_per_s",
            "must be >= 0",
            "peer_requests_per_s = 0.5",
        )


@dataclass(frozen=True)
class PeerSection:
    name: str
    # Where it listens (empty: reached only through `relays`, names of [[relays]] entries).
    address: str = ""
    public_key: str = ""
    public_key_file: Path | None = None
    degree: int | None = None
    relays: list[str] = field(default_factory=list)

    def validate(self, where: str) -> None:
        require(
            not self.address or self.address.startswith(("http://", "https://")),
            f"{where}.address",
            f"must be an http(s) URL (got {self.address!r})",
            'address = "http://127.0.0.1:8701"',
        )
        require(
            bool(self.public_key) != (self.public_key_file is not None),
            f"{where}",
            "needs exactly one of public_key (hex) or public_key_file",
            'public_key_file = "keys/hospital_b.pub"',
        )
        if self.degree is not None:
            require(self.degree >= 1, f"{where}.degree", "must be >= 1", "degree = 3")


@dataclass(frozen=True)
class GossipSection:
    round_timeout_s: float = 10.0
    startup_timeout_s: float = 60.0
    send_timeout_s: float = 5.0
    max_message_bytes: int = 0
    timestamp_window_s: float = 300.0
    # Neighbours that must be up and admitting this node before it trains a round (None:
    # what the aggregation rule needs to be robust, at least 1); 0 lets a node train alone.
    min_neighbours: int | None = None
    # Rounds in a row a neighbour may stay silent before rounds stop waiting for it.
    down_after_rounds: int = 3
    # Randomized peer sampling (gossip/sampling.py): each round, send to this many peers
    # drawn from the allowlist by a seed every node shares; 0 sends to every peer listed.
    sample_peers: int = 0
    # Asynchronous gossip (docs/protocol.md): no round barrier; each step aggregates what
    # arrived since the last one, dropping models more than max_staleness own steps old.
    asynchronous: bool = False
    max_staleness: int = 3

    def validate(self) -> None:
        require(
            self.round_timeout_s > 0,
            "gossip.round_timeout_s",
            "must be > 0",
            "round_timeout_s = 10",
        )
        require(
            self.startup_timeout_s >= 0,
            "gossip.startup_timeout_s",
            "must be >= 0",
            "startup_timeout_s = 60",
        )
        require(
            self.send_timeout_s > 0, "gossip.send_timeout_s", "must be > 0", "send_timeout_s = 5"
        )
        require(
            self.max_message_bytes >= 0,
            "gossip.max_message_bytes",
            "must be >= 0 (0 derives it from the model size)",
            "max_message_bytes = 0",
        )
        require(
            self.timestamp_window_s > 0,
            "gossip.timestamp_window_s",
            "must be > 0",
            "timestamp_window_s = 300",
        )
        if self.min_neighbours is not None:
            require(
                self.min_neighbours >= 0,
                "gossip.min_neighbours",
                "must be >= 0",
                "min_neighbours = 1, or omit it for what the aggregation rule needs",
            )
        require(
            self.down_after_rounds >= 1,
            "gossip.down_after_rounds",
            "must be >= 1",
            "down_after_rounds = 3",
        )
        require(
            self.max_staleness >= 0,
            "gossip.max_staleness",
            "must be >= 0 (0: only models of this very step)",
            "max_staleness = 3",
        )
        require(
            self.sample_peers >= 0,
            "gossip.sample_peers",
            "must be >= 0 (0: every peer, every round)",
            "sample_peers = 4",
        )
        # An asynchronous step takes whoever's newest model arrived, so it cannot keep the
        # sampled round graph (whose senders of round r are fixed) nor its 1/(s+1) weights.
        require(
            not (self.asynchronous and self.sample_peers),
            "gossip.asynchronous",
            "cannot be combined with gossip.sample_peers (an asynchronous step has no round "
            "graph to sample)",
            "set sample_peers = 0, or asynchronous = false",
        )


@dataclass(frozen=True)
class CompressionSection:
    """How this node compresses the model it shares, and which codecs it decodes
    (gossip/compression.py; docs/config.md, [compression]). Compression runs on the model
    DP-SGD released, so it is post-processing and leaves every privacy figure as it is."""

    codec: str = "none"  # "none" (float32), "int8" or "topk_int8"
    block: int = 256  # values per int8 scale; 0: one scale per tensor
    fraction: float = 0.1  # share of each tensor's entries top-k keeps
    # top-k: the first deltas sent denser (CompressionSettings.warmup_fraction); 6 is the
    # shortest warm-up that kept a 10-round PneumoniaMNIST run's validation AUC within 0.01
    # of float32's (docs/config.md)
    warmup: int = 6
    # Codecs this node decodes; None: "none" and its own codec.
    accept: list[str] | None = None

    def validate(self) -> None:
        require(
            self.codec in CODECS,
            "compression.codec",
            f"unknown codec {self.codec!r}",
            f"use one of {', '.join(CODECS)}",
        )
        require(
            type(self.block) is int and 0 <= self.block <= MAX_BLOCK,
            "compression.block",
            f"must be an integer in [0, {MAX_BLOCK}] (got {self.block!r})",
            "block = 256 (or 0 for one scale per tensor)",
        )
        require(
            0 < self.fraction <= 1,
            "compression.fraction",
            f"must be in (0, 1] (got {self.fraction})",
            "fraction = 0.1",
        )
        require(
            type(self.warmup) is int and self.warmup >= 0,
            "compression.warmup",
            f"must be a whole number >= 0 (got {self.warmup!r})",
            "warmup = 0 (no warm-up) or a few rounds",
        )
        if self.accept is not None:
            unknown = sorted(set(self.accept) - set(CODECS))
            require(
                not unknown,
                "compression.accept",
                f"names unknown codecs {unknown}",
                f"list some of {', '.join(CODECS)}",
            )
            require(
                bool(self.accept),
                "compression.accept",
                "is empty: this node would refuse every update",
                'accept = ["none", "int8", "topk_int8"], or omit it',
            )

    def accepted(self) -> frozenset[str]:
        """The codecs this node decodes (WireLimits.accepted_codecs)."""
        return frozenset(self.accept if self.accept is not None else {"none", self.codec})

    def settings(self) -> CompressionSettings:
        return CompressionSettings(
            codec=self.codec, block=self.block, fraction=self.fraction, warmup=self.warmup
        )


@dataclass(frozen=True)
class AuditSection:
    retention_days: int | None = None

    def validate(self) -> None:
        if self.retention_days is not None:
            require(
                self.retention_days >= 1,
                "audit.retention_days",
                "must be >= 1",
                "omit it to keep everything",
            )


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


@dataclass(frozen=True)
class LoggingSection:
    """Where the node logs: always to stderr, and to `file` with rotation when it is set."""

    level: str = "INFO"
    file: Path | None = None
    max_mb: float = 10.0  # rotate when the file reaches this size
    backups: int = 5  # rotated files kept (node.log.1 ... node.log.5)

    def validate(self) -> None:
        require(
            self.level in LOG_LEVELS,
            "logging.level",
            f"must be one of {', '.join(LOG_LEVELS)} (got {self.level!r})",
            'level = "INFO"',
        )
        require(self.max_mb > 0, "logging.max_mb", "must be > 0", "max_mb = 10")
        require(self.backups >= 1, "logging.backups", "must be >= 1", "backups = 5")
