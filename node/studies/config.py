"""The node config's `[study]` and `[site_budget]` sections, and how a study's manifest
fills the config sections it fixes.

Why the manifest fills the config rather than the config repeating it: what a node runs must
be what its operator approved, field by field. `merge_manifest` copies every value of the
manifest's `[data]`, `[model]`, `[training]`, `[privacy]`, `[aggregation]`, ... tables into the
node config before it is validated; a node config that sets one of those keys to another
value is refused, naming the key, so no site setting can quietly widen an approved study.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from murmur.node.config_errors import ConfigError, require
from murmur.node.studies.manifest import STUDY_SECTIONS, ManifestError, load_manifest


@dataclass(frozen=True)
class StudySection:
    """`[study]`: the signed manifest this node runs, and the consortium's approval policy."""

    manifest: Path | None = None
    sha256: str | None = None  # a pin: the manifest file must hash to it
    required_approvals: int = 0  # approvals from members other than this node, besides its own
    approval_wait_s: float = 60.0  # how long to wait for them at start

    def validate(self) -> None:
        require(
            self.required_approvals >= 0,
            "study.required_approvals",
            "must be >= 0",
            "required_approvals = 0 (only this node's own approval) or the consortium's m",
        )
        require(
            self.approval_wait_s > 0,
            "study.approval_wait_s",
            "must be > 0",
            "approval_wait_s = 60",
        )
        if self.sha256 is not None:
            require(
                len(self.sha256) == 64 and all(c in "0123456789abcdefABCDEF" for c in self.sha256),
                "study.sha256",
                "must be a hex SHA-256 (64 characters)",
                "copy it from `murmur study show STUDY.json`",
            )
        if self.manifest is None:
            require(
                self.sha256 is None and self.required_approvals == 0,
                "study",
                "sets sha256 or required_approvals without a manifest",
                'add manifest = "study.json" (a file signed by `murmur study propose`)',
            )


@dataclass(frozen=True)
class SiteBudgetSection:
    """`[site_budget]`: the hospital's lifetime budget per local data set, shared by every
    study that uses it (`datasets.NAME = {max_epsilon, delta}`; NAME is `data.dataset`)."""

    store: Path | None = None
    datasets: dict[str, dict[str, float]] = field(default_factory=dict)

    def validate(self) -> None:
        if self.store is None:
            require(
                not self.datasets,
                "site_budget.store",
                "is missing while site_budget.datasets are set",
                'store = "/var/lib/murmur/site_budget.sqlite", one file for all the '
                "hospital's nodes",
            )
            return
        for name, entry in self.datasets.items():
            where = f"site_budget.datasets.{name}"
            unknown = sorted(set(entry) - {"max_epsilon", "delta"})
            require(not unknown, where, f"has unknown keys {unknown}", "use max_epsilon and delta")
            for key in ("max_epsilon", "delta"):
                require(
                    key in entry,
                    where,
                    f"lacks {key}",
                    "set max_epsilon = 8.0 and delta = 1e-5 (the lifetime budget)",
                )
            require(
                math.isfinite(entry["max_epsilon"]) and entry["max_epsilon"] > 0,
                f"{where}.max_epsilon",
                "must be a finite number > 0",
                "max_epsilon = 8.0",
            )
            require(0 < entry["delta"] < 1, f"{where}.delta", "must be in (0, 1)", "delta = 1e-5")


def merge_manifest(raw: dict[str, Any], base_dir: Path) -> dict[str, Any]:
    """The raw node config with the `[study]` manifest's sections filled in (unchanged when
    there is no manifest); ConfigError naming the key for a conflict or a bad manifest."""
    study = raw.get("study")
    if not isinstance(study, dict) or "manifest" not in study:
        return raw
    path = study["manifest"]
    if not isinstance(path, str):
        raise ConfigError('study.manifest must be a path string, e.g. manifest = "study.json"')
    full = Path(path).expanduser()
    full = full if full.is_absolute() else base_dir / full
    pin = study.get("sha256")
    try:
        manifest = load_manifest(full, pin if isinstance(pin, str) else None)
    except ManifestError as exc:
        raise ConfigError(f"study.manifest {full}: {exc}; fix: use the file as signed") from None
    # The hash the config was loaded with, as a pin: the checkpoint binds it (node/binding.py).
    merged = {**raw, "study": {**study, "sha256": manifest.id}}
    for section in STUDY_SECTIONS:
        fixed = manifest.section(section)
        if not fixed:
            continue
        own = raw.get(section, {})
        if not isinstance(own, dict):
            raise ConfigError(f"[{section}] must be a table of key = value lines")
        for key, value in fixed.items():
            if key in own and own[key] != value:
                raise ConfigError(
                    f"{section}.{key} = {own[key]!r} in the node config, but study "
                    f"{manifest.name} ({manifest.id[:16]}...) fixes {value!r}; fix: remove "
                    f"{section}.{key} from the node config (the approved manifest sets it)"
                )
        merged[section] = {**own, **fixed}
    return merged
