"""`murmur config check`: everything that can be known about a node's config without starting it.

A node that starts with a wrong peer key, a degree that is not its peer's real degree, or a
training seed the other hospitals do not share federates silently and badly: envelopes are
refused as `unknown_sender`, the mixing weights stop being doubly stochastic, or round 1
averages models that did not start from the same point. This module finds those mistakes
before the node runs. Given one config it checks that config and the keys it names; given
the configs of several hospitals (a consortium's, or run_cluster's `configs/`), it also checks
that they agree with each other where they must.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from murmur.crypto.identity import IdentityError, fingerprint, load_identity, load_public_key
from murmur.node.config import ConfigError, NodeConfig, load_config, split_listen

# Fields every node of one study must share, with why (printed beside a mismatch).
SHARED_FIELDS: tuple[tuple[str, str], ...] = (
    (
        "training.seed",
        "every node builds its initial model from it: round 1 averages models "
        "that must start from the same point",
    ),
    ("model.name", "peers refuse envelopes whose tensors do not fit their model"),
    ("model.hidden", "peers refuse envelopes whose tensors do not fit their model"),
    ("data.dataset", "hospitals of one study train on one data set's features"),
    ("training.rounds", "a node that plans fewer rounds stops sharing before its peers"),
    (
        "consensus.enabled",
        "the consensus phase runs between every member: one that skips it is left out and "
        "the others wait for it at every step",
    ),
    (
        "consensus.max_byzantine",
        "t sets the number of agreement steps (t + 1): nodes with different t stop at "
        "different steps",
    ),
    (
        "study.sha256",
        "each node refuses the envelopes of a study it does not run (unknown_study): they must "
        "name the same signed manifest",
    ),
)


@dataclass(frozen=True)
class Finding:
    """One problem: `error` means the network will not work as configured, `warning` that it
    may not."""

    level: str  # "error" or "warning"
    where: str  # the config file (and field) it is about
    message: str

    def __str__(self) -> str:
        return f"{self.level}: {self.where}: {self.message}"


def check_configs(paths: Sequence[Path]) -> tuple[list[NodeConfig], list[Finding]]:
    """Load and check each config, then check them against each other."""
    configs: list[NodeConfig] = []
    findings: list[Finding] = []
    for path in paths:
        try:
            configs.append(load_config(path))
        except (ConfigError, OSError) as exc:
            findings.append(Finding("error", str(path), str(exc)))
    own_keys: dict[str, bytes] = {}
    for config in configs:
        own_key, problems = _check_one(config)
        findings += problems
        if own_key is not None:
            own_keys[config.node.name] = own_key
    findings += _check_agreement(configs, own_keys)
    return configs, findings


def _check_one(config: NodeConfig) -> tuple[bytes | None, list[Finding]]:
    """The node's own key (mode 0600, loadable) and every peer key it names."""
    where = str(config.source)
    findings = []
    own_key = None
    try:
        identity = load_identity(config.node.key_file)
        own_key = identity.public_key
        if identity.name and identity.name != config.node.name:
            findings.append(
                Finding(
                    "warning",
                    f"{where}: node.key_file",
                    f"the key is named {identity.name!r} but node.name is {config.node.name!r}",
                )
            )
    except IdentityError as exc:
        findings.append(Finding("error", f"{where}: node.key_file", str(exc)))
    for peer in config.peers:
        try:
            load_public_key(peer.public_key or str(peer.public_key_file))
        except IdentityError as exc:
            findings.append(Finding("error", f"{where}: peer {peer.name}", str(exc)))
    return own_key, findings


def _check_agreement(configs: list[NodeConfig], own_keys: dict[str, bytes]) -> list[Finding]:
    findings = []
    by_name = {c.node.name: c for c in configs}
    for field_name, why in SHARED_FIELDS if len(configs) > 1 else ():
        values = {c.node.name: _field(c, field_name) for c in configs}
        if len({repr(v) for v in values.values()}) > 1:
            shown = ", ".join(f"{name} = {value!r}" for name, value in sorted(values.items()))
            findings.append(Finding("error", field_name, f"the nodes disagree ({shown}): {why}"))
    for config in configs:
        where = str(config.source)
        for peer in config.peers:
            other = by_name.get(peer.name)
            if other is None:
                if peer.degree is None:
                    findings.append(
                        Finding(
                            "warning",
                            f"{where}: peer {peer.name}",
                            f"degree is not set, so it is taken as this node's own degree "
                            f"({len(config.peers)}); set it to {peer.name}'s number of "
                            "neighbours, or pass its config too so it can be checked",
                        )
                    )
                continue
            findings += _check_edge(config, peer, other, own_keys.get(peer.name))
    findings += _check_consensus_graph(configs)
    return findings


def _check_consensus_graph(configs: list[NodeConfig]) -> list[Finding]:
    """With `[consensus] enabled` and a static allowlist, every node must list every other
    (node/consensus_net.py: its members are itself and its allowlist)."""
    names = {c.node.name for c in configs}
    findings = []
    for config in configs:
        if not config.consensus.enabled or config.consortium.enabled:
            continue
        missing = sorted(names - {p.name for p in config.peers} - {config.node.name})
        if missing:
            findings.append(
                Finding(
                    "error",
                    f"{config.source}: consensus.enabled",
                    f"the consensus phase's members are this node and its peers, but it does "
                    f"not list {', '.join(missing)}: add them as [[peers]] (the complete "
                    "graph), or run under a [consortium]",
                )
            )
    return findings


def _check_edge(
    config: NodeConfig, peer: Any, other: NodeConfig, key: bytes | None
) -> list[Finding]:
    """What `config` says about its peer `other` against what `other`'s own config says."""
    where = f"{config.source}: peer {peer.name}"
    findings = []
    try:
        listed = load_public_key(peer.public_key or str(peer.public_key_file))
    except IdentityError:
        listed = None  # already reported by _check_one
    if key is not None and listed is not None and listed != key:
        findings.append(
            Finding(
                "error",
                where,
                f"the key listed here ({fingerprint(listed)}) is not {peer.name}'s own key "
                f"({fingerprint(key)}): its envelopes would be refused as unknown_sender",
            )
        )
    real_degree = len(other.peers)
    declared = peer.degree if peer.degree is not None else len(config.peers)
    if declared != real_degree:
        source = "degree" if peer.degree is not None else "degree (not set: this node's own)"
        findings.append(
            Finding(
                "error",
                where,
                f"{source} is {declared} but {peer.name} has {real_degree} neighbours: the "
                f"mixing weights would not be doubly stochastic; fix: degree = {real_degree}",
            )
        )
    if config.node.name not in {p.name for p in other.peers}:
        findings.append(
            Finding(
                "error",
                where,
                f"{peer.name} does not list {config.node.name} as a peer, so it refuses "
                f"{config.node.name}'s envelopes (unknown_sender)",
            )
        )
    findings += _check_path(config, peer, other, where)
    host, port = split_listen(other.node.listen)
    if peer.address and not peer.address.rstrip("/").endswith(f":{port}") and port != 0:
        findings.append(
            Finding(
                "warning",
                where,
                f"address {peer.address} does not end in the port {peer.name} listens on "
                f"({host}:{port}); fine behind a proxy, wrong otherwise",
            )
        )
    return findings


def _check_path(config: NodeConfig, peer: Any, other: NodeConfig, where: str) -> list[Finding]:
    """Whether the way `config` reaches `other` (address, relays) can work at all."""
    findings = []
    if peer.address and not other.node.inbound and not peer.relays:
        findings.append(
            Finding(
                "error",
                where,
                f"{peer.name} has inbound = false (no peer port), so its address can never "
                f"answer; fix: relays = [...] naming a relay {peer.name} connects to",
            )
        )
    if peer.address.startswith("http://") and other.tls.enabled:
        findings.append(
            Finding(
                "error",
                where,
                f"address is http:// but {peer.name} serves HTTPS ([tls]); fix: https://",
            )
        )
    own_urls = {r.name: r.url for r in config.relays}
    theirs = {r.name: r.url for r in other.relays}
    for relay in peer.relays:
        if relay not in theirs:
            findings.append(
                Finding(
                    "error",
                    where,
                    f"reaches {peer.name} through relay {relay!r}, which {peer.name}'s config "
                    f"does not connect to; fix: add [[relays]] name = {relay!r} there",
                )
            )
        elif own_urls.get(relay) != theirs[relay]:
            findings.append(
                Finding(
                    "warning",
                    where,
                    f"relay {relay!r} is {own_urls.get(relay)} here but {theirs[relay]} for "
                    f"{peer.name}: fine for two listeners of one broker or cluster, wrong "
                    "otherwise",
                )
            )
    return findings


def _field(config: NodeConfig, dotted: str) -> Any:
    section, name = dotted.split(".")
    return getattr(getattr(config, section), name)


def config_check_command(paths: Sequence[Path], out: Any) -> int:
    """Print each finding and a verdict; 0 when nothing is wrong, 1 on any error."""
    configs, findings = check_configs(paths)
    for finding in findings:
        print(finding, file=out)
    errors = sum(1 for f in findings if f.level == "error")
    warnings = len(findings) - errors
    names = ", ".join(c.node.name for c in configs) or "none"
    verdict = "OK" if not errors else "NOT OK"
    print(
        f"{verdict}: {len(paths)} config(s) checked ({names}): {errors} error(s), "
        f"{warnings} warning(s)",
        file=out,
    )
    return 1 if errors else 0
