"""A node's TOML configuration, validated before anything starts.

A hospital operator writes one file per node (docs/config.md). Every mistake is caught at
start with a message that names the field and says how to fix it, because a node that
starts with a typo'd privacy budget or a misspelt peer key does real harm.

This module reads the file and checks the whole (`NodeConfig.validate`: what one section
cannot know alone); each section checks itself, in node/config_network.py (where the node
listens, whom it talks to) and node/config_learning.py (what it learns, how privately), with
the error type and shared field checks of node/config_errors.py.
"""

from __future__ import annotations

import dataclasses
import hashlib
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from murmur.node.config_errors import (
    ConfigError,
    did_you_mean,
    expect,
    is_loopback,
    require,
    split_listen,
)
from murmur.node.config_learning import (
    AdversarySection,
    AggregationSection,
    DataSection,
    EvaluationSection,
    ModelSection,
    PersonalizationSection,
    PrivacySection,
    ServerOptimizerSection,
    TrainingSection,
    TrustSection,
)
from murmur.node.config_network import (
    AuditSection,
    CompressionSection,
    GossipSection,
    LoggingSection,
    NodeSection,
    OperatorSection,
    PeerListenerSection,
    PeerSection,
)
from murmur.node.config_release import ConsensusSection
from murmur.node.net_config import ConsortiumSection, RelaySection, TlsSection, check_network
from murmur.node.studies.config import SiteBudgetSection, StudySection, merge_manifest

__all__ = [  # what callers import from here; each section lives in its own module
    "CompressionSection",
    "ConfigError",
    "GossipSection",
    "LoggingSection",
    "NodeConfig",
    "OperatorSection",
    "is_loopback",
    "load_config",
    "load_configs",
    "parse_config",
    "split_listen",
]


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
    study: StudySection = field(default_factory=StudySection)
    site_budget: SiteBudgetSection = field(default_factory=SiteBudgetSection)
    consortium: ConsortiumSection = field(default_factory=ConsortiumSection)
    compression: CompressionSection = field(default_factory=CompressionSection)
    consensus: ConsensusSection = field(default_factory=ConsensusSection)
    source: Path | None = None
    sha256: str = ""
    # For one entry of `[[studies]]` (load_configs): the hospital's state directory, of which
    # this study's `node.state_dir` is `studies/<first 16 hex of its id>/`; else None.
    studies_root: Path | None = None

    def validate(self) -> None:
        self.node.validate()
        names = [p.name for p in self.peers]
        for i, peer in enumerate(self.peers):
            peer.validate(f"peers[{i}] ({peer.name})")
        dupes = {n for n in names if names.count(n) > 1}
        require(
            not dupes,
            "peers",
            f"duplicate peer names {sorted(dupes)}",
            "give each peer a unique name",
        )
        require(
            self.node.name not in names,
            "peers",
            f"lists the node itself ({self.node.name})",
            "remove that entry",
        )
        self.aggregation.check_counts(self.node.name, names)
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
            self.study,
            self.site_budget,
            self.consortium,
            self.compression,
            self.consensus,
        ):
            section.validate()
        _, peer_port = split_listen(self.node.listen)
        _, operator_port = split_listen(self.operator.listen, "operator.listen")
        require(
            peer_port == 0 or peer_port != operator_port,
            "operator.listen",
            f"uses port {operator_port}, which node.listen (the peer listener) already uses",
            'give the operator listener a port of its own, e.g. listen = "127.0.0.1:9700"',
        )
        if self.privacy.enabled:
            self._check_data_independent_training()
        self._check_site_budget()
        host, _ = split_listen(self.node.listen)
        check_network(
            listen_host=host,
            loopback=is_loopback(host),
            inbound=self.node.inbound,
            tls=self.tls,
            relays=self.relays,
            peers=[(p.name, p.address, p.relays) for p in self.peers],
        )

    def _check_site_budget(self) -> None:
        """A node with a site budget trains only on data sets it names, and only under DP (a
        study without DP has no ε to charge, so it would spend the data set without bound)."""
        budget = self.site_budget
        if budget.store is None:
            return
        dataset = self.data.dataset
        require(
            dataset in budget.datasets,
            f"site_budget.datasets.{dataset}",
            f"is missing: this node trains on {dataset!r}, and the site budget names only "
            f"{sorted(budget.datasets) or 'no data set'}",
            f"add [site_budget.datasets.{dataset}] with max_epsilon and delta",
        )
        require(
            self.privacy.enabled,
            "privacy.enabled",
            f"= false, but data set {dataset!r} has a site budget",
            "run the study with DP (privacy.enabled = true), or remove its site budget entry",
        )

    def _check_data_independent_training(self) -> None:
        """Under DP, refuse every setting that makes training use a statistic of the training
        rows: such a statistic lets one patient move every other patient's clipped gradient,
        so the noise calibrated for max_grad_norm no longer covers them (docs/privacy.md)."""
        require(
            self.training.class_weighting != "balanced",
            "training.class_weighting",
            '= "balanced" computes loss weights from this hospital\'s training labels, which '
            "DP-SGD's sensitivity does not cover",
            'omit it ("auto": no weighting under DP), or fix the weights from a published '
            "prevalence: class_weights = [w_neg, w_pos], or set privacy.enabled = false",
        )
        require(
            self.training.survival_loss != "cox",
            "training.survival_loss",
            '= "cox" (the partial likelihood) puts every patient in other patients\' risk '
            "sets, which DP-SGD's per-patient clipping does not cover",
            'omit it ("auto": the per-patient exponential likelihood under DP), or set '
            "privacy.enabled = false",
        )
        require(
            self.data.preprocessing != "fitted",
            "data.preprocessing",
            '= "fitted" scales and imputes with this hospital\'s training means, standard '
            "deviations, medians and modes, which DP-SGD's sensitivity does not cover",
            'omit it ("auto": public reference constants under DP), or set privacy.enabled = false',
        )
        if self.data.dataset == "csv":
            require(
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
    "study": StudySection,
    "site_budget": SiteBudgetSection,
    "consortium": ConsortiumSection,
    "compression": CompressionSection,
    "consensus": ConsensusSection,
}


def _read_toml(path: Path) -> tuple[bytes, dict[str, Any]]:
    try:
        raw_bytes = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror}") from exc
    try:
        return raw_bytes, tomllib.loads(raw_bytes.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from exc


def load_config(path: str | Path) -> NodeConfig:
    """Read, type-check and validate a node config; relative paths are relative to the file.
    A file with several `[[studies]]` is refused here: `load_configs` reads it."""
    path = Path(path)
    raw_bytes, raw = _read_toml(path)
    if STUDIES_KEY in raw:
        configs = load_configs(path)
        if len(configs) > 1:
            raise ConfigError(
                f"{path} runs {len(configs)} [[studies]]; this command takes one study's "
                "config (`murmur node` runs all of them in one process)"
            )
        return configs[0]
    config = parse_config(raw, base_dir=path.parent)
    return dataclasses.replace(config, source=path, sha256=hashlib.sha256(raw_bytes).hexdigest())


def load_configs(path: str | Path) -> list[NodeConfig]:
    """One validated config per study the file runs (node/multistudy.py runs them in one
    process): each `[[studies]]` entry is a `[study]` of its own, merged with its manifest
    as a `[study]` is, with its state under `STATE/studies/<first 16 hex of its id>/`; a file
    with one `[study]` (or none) is the one-entry list of `load_config`."""
    path = Path(path)
    raw_bytes, raw = _read_toml(path)
    if STUDIES_KEY not in raw:
        return [load_config(path)]
    entries = raw[STUDIES_KEY]
    if not isinstance(entries, list) or not entries:
        raise ConfigError(
            "studies must be an array of tables: write each study as [[studies]] with "
            'manifest = "study.json"'
        )
    if "study" in raw:
        raise ConfigError(
            "the config has both [study] and [[studies]]: fix: write the [study] as one more "
            "[[studies]] entry"
        )
    rest = {k: v for k, v in raw.items() if k != STUDIES_KEY}
    configs: list[NodeConfig] = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or "manifest" not in entry:
            raise ConfigError(
                f'studies[{i}] lacks manifest: add manifest = "study.json" (a signed study)'
            )
        try:
            config = parse_config({**rest, "study": entry}, base_dir=path.parent)
        except ConfigError as exc:
            raise ConfigError(f"studies[{i}] ({entry['manifest']}): {exc}") from None
        study_id = str(config.study.sha256)
        node = dataclasses.replace(
            config.node, state_dir=config.node.state_dir / "studies" / study_id[:16]
        )
        digest = hashlib.sha256(raw_bytes + study_id.encode()).hexdigest()
        configs.append(
            dataclasses.replace(
                config,
                node=node,
                source=path,
                sha256=digest,
                studies_root=config.node.state_dir,
            )
        )
    ids = [c.study.sha256 for c in configs]
    dupes = sorted({str(i)[:16] for i in ids if ids.count(i) > 1})
    require(not dupes, STUDIES_KEY, f"names study {dupes} twice", "list each study once")
    if len(configs) > 1:
        first = configs[0]
        # Not built with several studies in one process (docs/governance.md); [consortium]
        # is: one membership log for the hospital (node/multistudy.py).
        require(
            not first.consensus.enabled,
            "consensus",
            "is enabled with several [[studies]], which is not built yet",
            "run the consensus phase with one study per process",
        )
    return configs


STUDIES_KEY = "studies"


def parse_config(raw: dict[str, Any], base_dir: Path = Path(".")) -> NodeConfig:
    """Build a NodeConfig from a parsed TOML document (also used by tests and run_cluster)."""
    allowed = [*_SECTIONS, "peers", "relays"]
    for key in raw:
        if key not in allowed:
            raise ConfigError(
                f"unknown section [{key}]{did_you_mean(key, allowed)}; known: {', '.join(allowed)}"
            )
    if "node" not in raw:
        raise ConfigError(
            'missing section [node]: add name, key_file and state_dir, e.g. name = "hospital_a"'
        )
    raw = merge_manifest(raw, base_dir)  # a [study] manifest fills the sections it fixes
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


def _build(cls: type, table: Any, where: str, base_dir: Path) -> Any:
    if not isinstance(table, dict):
        raise ConfigError(f"[{where}] must be a table of key = value lines")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in table:
        if key not in fields:
            raise ConfigError(
                f"[{where}] unknown key {key!r}{did_you_mean(key, list(fields))}; "
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
        expect(False, where, value, wanted)
    if hint is Path:
        expect(isinstance(value, str), where, value, "a path string")
        p = Path(value).expanduser()
        return p if p.is_absolute() else (base_dir / p)
    if hint is bool:
        expect(isinstance(value, bool), where, value, "true or false")
        return value
    if hint is int:
        expect(isinstance(value, int) and not isinstance(value, bool), where, value, "an integer")
        return value
    if hint is float:
        expect(
            isinstance(value, int | float) and not isinstance(value, bool), where, value, "a number"
        )
        return float(value)
    if hint is str:
        if isinstance(value, int) and not isinstance(value, bool) and where.endswith("hospital"):
            return str(value)
        expect(isinstance(value, str), where, value, "a string in quotes")
        return value
    origin = typing.get_origin(hint)
    if origin is list:
        expect(isinstance(value, list), where, value, "an array like [64, 32]")
        return [_coerce(v, args[0], f"{where}[{i}]", base_dir) for i, v in enumerate(value)]
    if origin is dict:
        expect(isinstance(value, dict), where, value, "a table")
        return {k: _coerce(v, args[1], f"{where}.{k}", base_dir) for k, v in value.items()}
    raise TypeError(
        f"unsupported config type {hint} at {where}"
    )  # a bug in this module, not in the file


_WANTED: dict[Any, str] = {str: "a string in quotes", bool: "true or false"}
