"""A node's TOML configuration, validated before anything starts.

A hospital operator writes one file per node (docs/config.md). Every mistake is caught at
start with a message that names the field and says how to fix it, because a node that
starts with a typo'd privacy budget or a misspelt peer key does real harm.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import ipaddress
import math
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from murmur.gossip.trust import TrustSettings
from murmur.models.metrics import DP_DEFAULT_THRESHOLD
from murmur.models.optimizers import SERVER_OPTIMIZERS, ServerOptimizerSettings
from murmur.node.net_config import RelaySection, TlsSection, check_network

# Kept here, not imported from models/, so reading a config does not import torch.
CLASS_WEIGHTING = ("auto", "balanced", "none")
PREPROCESSING = ("auto", "fitted", "reference")
DATASETS = ("breast-cancer", "heart-disease", "medmnist", "csv", "tcga-brca")  # models.data
MODEL_NAMES = ("logreg", "mlp", "cnn", "multimodal", "cox")  # models.nets
SURVIVAL_LOSSES = ("auto", "cox", "exponential")  # models.survival


class ConfigError(ValueError):
    """A configuration problem, phrased for the operator: which field, what is wrong, the fix."""


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
        _require(
            self.after_training in ("exit", "serve"),
            "node.after_training",
            f"must be exit or serve (got {self.after_training!r})",
            'after_training = "serve" to stay up for a service manager',
        )
        _require(self.name.strip() != "", "node.name", "must not be empty", 'name = "hospital_a"')
        for i, address in enumerate(self.advertise):
            _require(
                address.startswith(("http://", "https://")),
                f"node.advertise[{i}]",
                f"must be an http(s) URL (got {address!r})",
                'advertise = ["https://10.0.0.1:8700"]',
            )
        _check_listen(self.listen, "node.listen", "127.0.0.1:8700")


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
        host, _ = _check_listen(self.listen, "operator.listen", "127.0.0.1:9700")
        if is_loopback(host):
            return
        _require(
            self.allow_remote,
            "operator.listen",
            f"binds {host!r}, which is not a loopback address: anyone who can reach it would "
            "read per-round test metrics and the decision threshold",
            'keep listen = "127.0.0.1:9700" and reach it through an SSH tunnel, or set '
            'allow_remote = true and token_file = "operator.token" (mode 0600)',
        )
        _require(
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
        _require(
            self.body_timeout_s > 0,
            "peer_listener.body_timeout_s",
            "must be > 0",
            "body_timeout_s = 20 (at least the peers' gossip.send_timeout_s)",
        )
        _require(
            self.idle_timeout_s > 0,
            "peer_listener.idle_timeout_s",
            "must be > 0",
            "idle_timeout_s = 15",
        )
        _require(
            self.max_connections >= 1,
            "peer_listener.max_connections",
            "must be >= 1",
            "max_connections = 64",
        )
        _require(
            1 <= self.max_connections_per_address <= self.max_connections,
            "peer_listener.max_connections_per_address",
            f"must be in 1..max_connections ({self.max_connections})",
            "max_connections_per_address = 8",
        )
        _require(
            self.max_uploads_per_address >= 1,
            "peer_listener.max_uploads_per_address",
            "must be >= 1",
            "max_uploads_per_address = 4",
        )
        _require(
            self.peer_max_bodies >= 1,
            "peer_listener.peer_max_bodies",
            "must be >= 1",
            "peer_max_bodies = 2",
        )
        _require(
            self.peer_burst >= 1,
            "peer_listener.peer_burst",
            "must be >= 1 (a peer must be able to send at least one request)",
            "peer_burst = 16",
        )
        _require(
            self.peer_requests_per_round >= 1,
            "peer_listener.peer_requests_per_round",
            "must be >= 1 (an honest peer sends one envelope a round)",
            "peer_requests_per_round = 4",
        )
        _require(
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
        _require(
            not self.address or self.address.startswith(("http://", "https://")),
            f"{where}.address",
            f"must be an http(s) URL (got {self.address!r})",
            'address = "http://127.0.0.1:8701"',
        )
        _require(
            bool(self.public_key) != (self.public_key_file is not None),
            f"{where}",
            "needs exactly one of public_key (hex) or public_key_file",
            'public_key_file = "keys/hospital_b.pub"',
        )
        if self.degree is not None:
            _require(self.degree >= 1, f"{where}.degree", "must be >= 1", "degree = 3")


@dataclass(frozen=True)
class DataSection:
    dataset: str = "breast-cancer"
    path: Path | None = None
    hospital: str = ""
    num_hospitals: int = 4
    seed: int = 0
    alpha: float | None = None
    label: str | None = None
    site: str | None = None
    test_fraction: float = 0.25
    # How features are scaled and imputed: "fitted" on this hospital's training rows, or from
    # public "reference" constants (built in, or the csv `reference` file). "auto": fitted
    # without DP, reference under DP, where fitted statistics are refused (docs/privacy.md).
    preprocessing: str = "auto"
    reference: Path | None = None  # csv only: column,kind,center,scale,fill (docs/data.md)
    # The label value that means disease: an R factor's "1_yes" (csv), or "0" for a MedMNIST
    # set whose 1 means benign. Default: 1 / yes / true / positive.
    positive: str | None = None
    # csv columns that look like identifiers (models/identifiers.py) but identify no one.
    not_identifying: list[str] = field(default_factory=list)

    def resolved_preprocessing(self, private: bool) -> str:
        """ "fitted" or "reference": what "auto" means with or without DP."""
        if self.preprocessing == "auto":
            return "reference" if private else "fitted"
        return self.preprocessing

    def validate(self) -> None:
        known = DATASETS
        _require(
            self.dataset in known,
            "data.dataset",
            f"unknown dataset {self.dataset!r}",
            f"use one of {', '.join(known)}",
        )
        _require(self.hospital != "", "data.hospital", "is required", 'hospital = "hospital_0"')
        _require(self.num_hospitals >= 1, "data.num_hospitals", "must be >= 1", "num_hospitals = 4")
        if self.alpha is not None:
            _require(
                self.alpha > 0,
                "data.alpha",
                "must be > 0 (omit it for an IID split)",
                "alpha = 0.5",
            )
        _require(
            0 < self.test_fraction < 1,
            "data.test_fraction",
            "must be in (0, 1)",
            "test_fraction = 0.25",
        )
        if self.dataset == "csv":
            _require(
                self.path is not None,
                "data.path",
                "is required for dataset = 'csv'",
                'path = "site_data.csv"',
            )
            _require(
                self.label is not None,
                "data.label",
                "is required for dataset = 'csv'",
                'label = "outcome"',
            )
        _require(
            self.preprocessing in PREPROCESSING,
            "data.preprocessing",
            f"unknown preprocessing {self.preprocessing!r}",
            f"use one of {', '.join(PREPROCESSING)}",
        )
        if self.positive is not None:
            _require(
                self.dataset in ("csv", "medmnist"),
                "data.positive",
                f"only applies to csv and medmnist ({self.dataset!r} defines its own labels)",
                "remove positive",
            )
            _require(
                self.dataset != "medmnist" or self.positive in ("0", "1"),
                "data.positive",
                'must be the MedMNIST label code "0" or "1"',
                'positive = "0"',
            )
        _require(
            not self.not_identifying or self.dataset == "csv",
            "data.not_identifying",
            f"only applies to dataset = 'csv', not {self.dataset!r}",
            "remove not_identifying",
        )
        if self.reference is not None:
            _require(
                self.dataset == "csv",
                "data.reference",
                f"only applies to dataset = 'csv' ({self.dataset!r} ships its own constants)",
                "remove reference",
            )
        if self.dataset == "csv" and self.preprocessing == "reference":
            _require(
                self.reference is not None,
                "data.reference",
                "is required for preprocessing = \"reference\" with dataset = 'csv'",
                'reference = "reference.csv" (columns column,kind,center,scale,fill)',
            )


@dataclass(frozen=True)
class ModelSection:
    name: str = "logreg"
    hidden: list[int] = field(default_factory=lambda: [64, 32])

    def validate(self) -> None:
        known = MODEL_NAMES
        _require(
            self.name in known,
            "model.name",
            f"unknown model {self.name!r}",
            f"use one of {', '.join(known)}",
        )
        _require(
            all(h >= 1 for h in self.hidden),
            "model.hidden",
            "sizes must be >= 1",
            "hidden = [64, 32]",
        )


@dataclass(frozen=True)
class TrainingSection:
    rounds: int = 20
    local_epochs: int = 1
    batch_size: int = 32
    learning_rate: float = 0.05
    optimizer: str = "sgd"
    momentum: float = 0.0
    loss: str = "bce"
    focal_gamma: float = 2.0
    # "auto": balanced n / (2 n_class) without DP, none under DP; "balanced" (refused under
    # DP); "none". Older configs' true / false mean "balanced" / "none".
    class_weighting: str | bool = "auto"
    class_weights: list[float] | None = None  # fixed [w_neg, w_pos]: data-independent, DP-safe
    fedprox_mu: float = 0.0
    # Survival data only: "auto" (Cox partial likelihood without DP, the per-patient
    # exponential likelihood under DP), "cox" (refused under DP) or "exponential".
    survival_loss: str = "auto"
    seed: int = 0
    augment: str = "none"  # "shift": random translation by up to 2 pixels (images)
    lr_schedule: str = "constant"  # "cosine": decays over the planned rounds (no privacy cost)

    def __post_init__(self) -> None:
        if isinstance(self.class_weighting, bool):
            object.__setattr__(
                self, "class_weighting", "balanced" if self.class_weighting else "none"
            )

    def validate(self) -> None:
        _require(self.rounds >= 1, "training.rounds", "must be >= 1", "rounds = 20")
        _require(
            self.local_epochs >= 1, "training.local_epochs", "must be >= 1", "local_epochs = 1"
        )
        _require(self.batch_size >= 1, "training.batch_size", "must be >= 1", "batch_size = 32")
        _require(
            self.learning_rate > 0, "training.learning_rate", "must be > 0", "learning_rate = 0.05"
        )
        _require(
            self.optimizer in ("sgd", "adam"),
            "training.optimizer",
            "unknown optimizer",
            'use "sgd" or "adam"',
        )
        _require(0 <= self.momentum < 1, "training.momentum", "must be in [0, 1)", "momentum = 0.9")
        _require(
            self.loss in ("bce", "focal"), "training.loss", "unknown loss", 'use "bce" or "focal"'
        )
        _require(self.fedprox_mu >= 0, "training.fedprox_mu", "must be >= 0", "fedprox_mu = 0.01")
        _require(
            self.survival_loss in SURVIVAL_LOSSES,
            "training.survival_loss",
            f"unknown survival loss {self.survival_loss!r}",
            f"use one of {', '.join(SURVIVAL_LOSSES)}",
        )
        _require(
            self.class_weighting in CLASS_WEIGHTING,
            "training.class_weighting",
            f"unknown class weighting {self.class_weighting!r}",
            'use "auto", "balanced" or "none", or fixed class_weights = [1.0, 2.0]',
        )
        if self.class_weights is not None:
            _require(
                len(self.class_weights) == 2
                and all(math.isfinite(w) and w > 0 for w in self.class_weights),
                "training.class_weights",
                f"must be two numbers > 0, [negative, positive] (got {self.class_weights})",
                "class_weights = [1.0, 2.0]",
            )
            _require(
                self.class_weighting == "auto",
                "training.class_weights",
                f"conflicts with class_weighting = {self.class_weighting!r}",
                "remove class_weighting (fixed weights replace it) or remove class_weights",
            )


@dataclass(frozen=True)
class PrivacySection:
    enabled: bool = True
    epsilon: float = 1.0
    delta: float | None = None
    max_grad_norm: float = 1.0
    accountant: str = "pld"

    def validate(self) -> None:
        if not self.enabled:
            return
        _require(
            self.epsilon > 0, "privacy.epsilon", "must be > 0", "epsilon = 1.0 (or enabled = false)"
        )
        if self.delta is not None:
            _require(
                0 < self.delta < 1, "privacy.delta", "must be in (0, 1)", "delta = 1e-5, or omit it"
            )
        _require(
            self.max_grad_norm > 0, "privacy.max_grad_norm", "must be > 0", "max_grad_norm = 1.0"
        )
        _require(
            self.accountant in ("pld", "rdp"),
            "privacy.accountant",
            f"unknown accountant {self.accountant!r}",
            'use "pld" or "rdp"',
        )


@dataclass(frozen=True)
class EvaluationSection:
    """How the node evaluates its model on its held-out split (the metrics it reports)."""

    # The decision threshold. Omitted: Youden's J on the training rows without DP; under DP 0.5,
    # because Youden's threshold is one training patient's score and metrics are published.
    threshold: float | None = None

    def resolved_threshold(self, private: bool) -> float | None:
        """The fixed threshold to use, or None for Youden's J on the training rows."""
        if self.threshold is not None:
            return self.threshold
        return DP_DEFAULT_THRESHOLD if private else None

    def validate(self) -> None:
        if self.threshold is not None:
            _require(
                0 <= self.threshold <= 1,
                "evaluation.threshold",
                "must be in [0, 1]",
                "threshold = 0.5, or omit it",
            )


@dataclass(frozen=True)
class AggregationSection:
    rule: str = "clipping"
    f: int = 0
    params: dict[str, float] = field(default_factory=dict)

    def validate(self) -> None:
        from murmur.gossip.aggregation import AGGREGATORS

        _require(
            self.rule in AGGREGATORS,
            "aggregation.rule",
            f"unknown rule {self.rule!r}",
            f"use one of {', '.join(sorted(AGGREGATORS))}",
        )
        _require(self.f >= 0, "aggregation.f", "must be >= 0", "f = 1")


@dataclass(frozen=True)
class ServerOptimizerSection:
    """An optional FedAdam/FedYogi/FedAdagrad step each node applies to (its robust aggregate
    - its previous model); models/optimizers.py. Post-processing of DP outputs: no privacy cost."""

    name: str = "none"  # none | adam | yogi | adagrad
    learning_rate: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3

    def validate(self) -> None:
        _require(
            self.name in SERVER_OPTIMIZERS,
            "server_optimizer.name",
            f"unknown server optimizer {self.name!r}",
            f"use one of {', '.join(SERVER_OPTIMIZERS)}",
        )
        try:
            self.settings()
        except ValueError as exc:
            raise ConfigError(
                f"[server_optimizer] {exc}; fix: e.g. learning_rate = 0.01, beta1 = 0.9, "
                "beta2 = 0.99, tau = 0.001"
            ) from None

    def settings(self) -> ServerOptimizerSettings:
        return ServerOptimizerSettings(
            self.name, self.learning_rate, self.beta1, self.beta2, self.tau
        )


@dataclass(frozen=True)
class PersonalizationSection:
    """An optional personalized model per hospital that never leaves the node
    (models/personal.py): "ditto" trains it on local rows pulled towards the shared model."""

    method: str = "none"  # none | ditto
    mu: float = 0.1  # Ditto's lambda: (mu / 2) ||v - w_shared||^2
    learning_rate: float | None = None  # default: training.learning_rate

    def validate(self) -> None:
        _require(
            self.method in ("none", "ditto"),
            "personalization.method",
            f"unknown method {self.method!r}",
            'use "none" or "ditto"',
        )
        _require(self.mu >= 0, "personalization.mu", "must be >= 0", "mu = 0.1")
        if self.learning_rate is not None:
            _require(
                self.learning_rate > 0,
                "personalization.learning_rate",
                "must be > 0",
                "learning_rate = 0.05, or omit it to use training.learning_rate",
            )


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

    def validate(self) -> None:
        _require(
            self.round_timeout_s > 0,
            "gossip.round_timeout_s",
            "must be > 0",
            "round_timeout_s = 10",
        )
        _require(
            self.startup_timeout_s >= 0,
            "gossip.startup_timeout_s",
            "must be >= 0",
            "startup_timeout_s = 60",
        )
        _require(
            self.send_timeout_s > 0, "gossip.send_timeout_s", "must be > 0", "send_timeout_s = 5"
        )
        _require(
            self.max_message_bytes >= 0,
            "gossip.max_message_bytes",
            "must be >= 0 (0 derives it from the model size)",
            "max_message_bytes = 0",
        )
        _require(
            self.timestamp_window_s > 0,
            "gossip.timestamp_window_s",
            "must be > 0",
            "timestamp_window_s = 300",
        )
        if self.min_neighbours is not None:
            _require(
                self.min_neighbours >= 0,
                "gossip.min_neighbours",
                "must be >= 0",
                "min_neighbours = 1, or omit it for what the aggregation rule needs",
            )
        _require(
            self.down_after_rounds >= 1,
            "gossip.down_after_rounds",
            "must be >= 1",
            "down_after_rounds = 3",
        )


@dataclass(frozen=True)
class AuditSection:
    retention_days: int | None = None

    def validate(self) -> None:
        if self.retention_days is not None:
            _require(
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
        _require(
            self.level in LOG_LEVELS,
            "logging.level",
            f"must be one of {', '.join(LOG_LEVELS)} (got {self.level!r})",
            'level = "INFO"',
        )
        _require(self.max_mb > 0, "logging.max_mb", "must be > 0", "max_mb = 10")
        _require(self.backups >= 1, "logging.backups", "must be >= 1", "backups = 5")


@dataclass(frozen=True)
class TrustSection(TrustSettings):
    """Per-peer trust scores (gossip/trust.py, docs/robustness.md): the fields and defaults are
    TrustSettings' own, so the config cannot drift from what the tracker uses."""

    def __post_init__(self) -> None:
        try:
            super().__post_init__()
        except ValueError as exc:
            raise ConfigError(
                f"[trust] {exc}; fix: omit the section for the defaults "
                "(decay 0.7, tolerance 3, cutoff 6, downweight_below 0.5, quarantine_below 0.2, "
                "max_relative_distance 1.5 without DP, off with DP)"
            ) from None

    def validate(self) -> None:
        """Checked when the section is built (TrustSettings.__post_init__)."""

    def settings(self) -> TrustSettings:
        """The tracker's plain settings value (without the config-only methods)."""
        return TrustSettings(**dataclasses.asdict(self))


@dataclass(frozen=True)
class AdversarySection:
    """Turns this node into a Byzantine attacker. For tests and demos only, never on by default:
    `run_cluster.py --byzantine K --attack NAME` writes it (docs/robustness.md)."""

    attack: str = ""
    params: dict[str, float] = field(default_factory=dict)
    colluders: list[str] = field(default_factory=list)
    seed: int = 0
    # For dissensus: how many Byzantine neighbours each honest neighbour has.
    byzantine_neighbours: dict[str, int] = field(default_factory=dict)

    @property
    def enabled(self) -> bool:
        return self.attack != ""

    def validate(self) -> None:
        if not self.enabled:
            return
        from murmur.gossip.attacks import ATTACKS, attack_params

        _require(
            self.attack in ATTACKS,
            "adversary.attack",
            f"unknown attack {self.attack!r}",
            f"use one of {', '.join(ATTACKS)}, or remove [adversary]",
        )
        try:
            attack_params(self.attack, self.params)
        except ValueError as exc:
            raise ConfigError(f"adversary.params: {exc}") from None


@dataclass(frozen=True)
class NodeConfig:
    """The whole validated configuration of one hospital node."""

    node: NodeSection
    peers: list[PeerSection]
    data: DataSection
    model: ModelSection
    training: TrainingSection
    privacy: PrivacySection
    aggregation: AggregationSection
    gossip: GossipSection
    audit: AuditSection
    evaluation: EvaluationSection = field(default_factory=EvaluationSection)
    trust: TrustSection = field(default_factory=TrustSection)
    adversary: AdversarySection = field(default_factory=AdversarySection)
    operator: OperatorSection = field(default_factory=OperatorSection)
    peer_listener: PeerListenerSection = field(default_factory=PeerListenerSection)
    logging: LoggingSection = field(default_factory=LoggingSection)
    tls: TlsSection = field(default_factory=TlsSection)
    relays: list[RelaySection] = field(default_factory=list)
    server_optimizer: ServerOptimizerSection = field(default_factory=ServerOptimizerSection)
    personalization: PersonalizationSection = field(default_factory=PersonalizationSection)
    source: Path | None = None
    sha256: str = ""

    def validate(self) -> None:
        self.node.validate()
        names = [p.name for p in self.peers]
        for i, peer in enumerate(self.peers):
            peer.validate(f"peers[{i}] ({peer.name})")
        dupes = {n for n in names if names.count(n) > 1}
        _require(
            not dupes,
            "peers",
            f"duplicate peer names {sorted(dupes)}",
            "give each peer a unique name",
        )
        _require(
            self.node.name not in names,
            "peers",
            f"lists the node itself ({self.node.name})",
            "remove that entry",
        )
        for section in (
            self.data,
            self.model,
            self.training,
            self.privacy,
            self.aggregation,
            self.gossip,
            self.audit,
            self.evaluation,
            self.trust,
            self.adversary,
            self.operator,
            self.peer_listener,
            self.logging,
            self.server_optimizer,
            self.personalization,
        ):
            section.validate()
        _, peer_port = split_listen(self.node.listen)
        _, operator_port = split_listen(self.operator.listen, "operator.listen")
        _require(
            peer_port == 0 or peer_port != operator_port,
            "operator.listen",
            f"uses port {operator_port}, which node.listen (the peer listener) already uses",
            'give the operator listener a port of its own, e.g. listen = "127.0.0.1:9700"',
        )
        if self.privacy.enabled:
            self._check_data_independent_training()
        host, _ = split_listen(self.node.listen)
        check_network(
            listen_host=host,
            loopback=is_loopback(host),
            inbound=self.node.inbound,
            tls=self.tls,
            relays=self.relays,
            peers=[(p.name, p.address, p.relays) for p in self.peers],
        )

    def _check_data_independent_training(self) -> None:
        """Under DP, refuse every setting that makes training use a statistic of the training
        rows: such a statistic lets one patient move every other patient's clipped gradient,
        so the noise calibrated for max_grad_norm no longer covers them (docs/privacy.md)."""
        _require(
            self.training.class_weighting != "balanced",
            "training.class_weighting",
            '= "balanced" computes loss weights from this hospital\'s training labels, which '
            "DP-SGD's sensitivity does not cover",
            'omit it ("auto": no weighting under DP), or fix the weights from a published '
            "prevalence: class_weights = [w_neg, w_pos], or set privacy.enabled = false",
        )
        _require(
            self.training.survival_loss != "cox",
            "training.survival_loss",
            '= "cox" (the partial likelihood) puts every patient in other patients\' risk '
            "sets, which DP-SGD's per-patient clipping does not cover",
            'omit it ("auto": the per-patient exponential likelihood under DP), or set '
            "privacy.enabled = false",
        )
        _require(
            self.data.preprocessing != "fitted",
            "data.preprocessing",
            '= "fitted" scales and imputes with this hospital\'s training means, standard '
            "deviations, medians and modes, which DP-SGD's sensitivity does not cover",
            'omit it ("auto": public reference constants under DP), or set privacy.enabled = false',
        )
        if self.data.dataset == "csv":
            _require(
                self.data.reference is not None,
                "data.reference",
                "is required under DP for dataset = 'csv': without it features would be scaled "
                "and imputed with statistics of the training rows",
                'reference = "reference.csv" with columns column,kind,center,scale,fill taken '
                "from a public source (docs/data.md), or set privacy.enabled = false",
            )


_SECTIONS: dict[str, type] = {
    "node": NodeSection,
    "data": DataSection,
    "model": ModelSection,
    "training": TrainingSection,
    "privacy": PrivacySection,
    "aggregation": AggregationSection,
    "gossip": GossipSection,
    "audit": AuditSection,
    "evaluation": EvaluationSection,
    "trust": TrustSection,
    "adversary": AdversarySection,
    "operator": OperatorSection,
    "peer_listener": PeerListenerSection,
    "logging": LoggingSection,
    "tls": TlsSection,
    "server_optimizer": ServerOptimizerSection,
    "personalization": PersonalizationSection,
}


def load_config(path: str | Path) -> NodeConfig:
    """Read, type-check and validate a node config; relative paths are relative to the file."""
    path = Path(path)
    try:
        raw_bytes = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror}") from exc
    try:
        raw = tomllib.loads(raw_bytes.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from exc
    config = parse_config(raw, base_dir=path.parent)
    return dataclasses.replace(config, source=path, sha256=hashlib.sha256(raw_bytes).hexdigest())


def parse_config(raw: dict[str, Any], base_dir: Path = Path(".")) -> NodeConfig:
    """Build a NodeConfig from a parsed TOML document (also used by tests and run_cluster)."""
    allowed = [*_SECTIONS, "peers", "relays"]
    for key in raw:
        if key not in allowed:
            raise ConfigError(
                f"unknown section [{key}]{_did_you_mean(key, allowed)}; known: {', '.join(allowed)}"
            )
    if "node" not in raw:
        raise ConfigError(
            'missing section [node]: add name, key_file and state_dir, e.g. name = "hospital_a"'
        )
    sections = {
        name: _build(cls, raw.get(name, {}), name, base_dir) for name, cls in _SECTIONS.items()
    }
    peers_raw = raw.get("peers", [])
    if not isinstance(peers_raw, list):
        raise ConfigError("peers must be an array of tables: write each peer as [[peers]]")
    peers = [_build(PeerSection, p, f"peers[{i}]", base_dir) for i, p in enumerate(peers_raw)]
    relays_raw = raw.get("relays", [])
    if not isinstance(relays_raw, list):
        raise ConfigError("relays must be an array of tables: write each relay as [[relays]]")
    relays = [_build(RelaySection, r, f"relays[{i}]", base_dir) for i, r in enumerate(relays_raw)]
    config = NodeConfig(peers=peers, relays=relays, **sections)
    config.validate()
    return config


def split_listen(listen: str, where: str = "node.listen") -> tuple[str, int]:
    """'127.0.0.1:8700' -> ('127.0.0.1', 8700), with a config-phrased error naming `where`."""
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit():
        raise ConfigError(f'{where} {listen!r} must be HOST:PORT, e.g. listen = "127.0.0.1:8700"')
    return host.strip("[]"), int(port)


def is_loopback(host: str) -> bool:
    """Whether binding `host` only accepts connections from this machine.

    "localhost" counts (it resolves to loopback on every sane system); any other name, an
    empty host and the wildcards 0.0.0.0 / :: do not.
    """
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check_listen(listen: str, where: str, example: str) -> tuple[str, int]:
    host, port = split_listen(listen, where)
    _require(0 <= port <= 65535, where, "port must be 0..65535", f'listen = "{example}"')
    _require(host != "", where, "needs a host", f'listen = "{example}"')
    return host, port


def _build(cls: type, table: Any, where: str, base_dir: Path) -> Any:
    if not isinstance(table, dict):
        raise ConfigError(f"[{where}] must be a table of key = value lines")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in table:
        if key not in fields:
            raise ConfigError(
                f"[{where}] unknown key {key!r}{_did_you_mean(key, list(fields))}; "
                f"known: {', '.join(fields)}"
            )
    values = {}
    for name, f in fields.items():
        if name not in table:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(f"[{where}] missing required key {name!r}")
            continue
        values[name] = _coerce(table[name], hints[name], f"{where}.{name}", base_dir)
    return cls(**values)


def _coerce(value: Any, hint: Any, where: str, base_dir: Path) -> Any:
    """Check a TOML value against a field's type; TOML already parsed it, so only narrow."""
    args = typing.get_args(hint)
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return _coerce(value, inner[0], where, base_dir)
        for candidate in inner:  # e.g. str | bool: the first type the value is
            try:
                return _coerce(value, candidate, where, base_dir)
            except ConfigError:
                continue
        wanted = " or ".join(_WANTED.get(c, str(c)) for c in inner)
        _expect(False, where, value, wanted)
    if hint is Path:
        _expect(isinstance(value, str), where, value, "a path string")
        p = Path(value).expanduser()
        return p if p.is_absolute() else (base_dir / p)
    if hint is bool:
        _expect(isinstance(value, bool), where, value, "true or false")
        return value
    if hint is int:
        _expect(isinstance(value, int) and not isinstance(value, bool), where, value, "an integer")
        return value
    if hint is float:
        _expect(
            isinstance(value, int | float) and not isinstance(value, bool), where, value, "a number"
        )
        return float(value)
    if hint is str:
        if isinstance(value, int) and not isinstance(value, bool) and where.endswith("hospital"):
            return str(value)
        _expect(isinstance(value, str), where, value, "a string in quotes")
        return value
    origin = typing.get_origin(hint)
    if origin is list:
        _expect(isinstance(value, list), where, value, "an array like [64, 32]")
        return [_coerce(v, args[0], f"{where}[{i}]", base_dir) for i, v in enumerate(value)]
    if origin is dict:
        _expect(isinstance(value, dict), where, value, "a table")
        return {k: _coerce(v, args[1], f"{where}.{k}", base_dir) for k, v in value.items()}
    raise TypeError(
        f"unsupported config type {hint} at {where}"
    )  # a bug in this module, not in the file


_WANTED: dict[Any, str] = {str: "a string in quotes", bool: "true or false"}


def _expect(ok: bool, where: str, value: Any, wanted: str) -> None:
    if not ok:
        raise ConfigError(
            f"{where} must be {wanted} (got {value!r} of type {type(value).__name__})"
        )


def _require(ok: bool, where: str, problem: str, fix: str) -> None:
    if not ok:
        raise ConfigError(f"{where} {problem}; fix: {fix}")


def _did_you_mean(key: str, options: list[str]) -> str:
    close = difflib.get_close_matches(key, options, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""
