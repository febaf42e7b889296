"""Helpers for the study tests: signed manifests built from the configs run_cluster writes,
approvals through the `murmur study` command, site budgets in node configs."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

from tests.netutil import REPO, Network, make_network

DELTA = 1e-5
SITE = "site_budget"
SITE_KEYS = {"hospital", "path", "reference"}  # the node's own, never the study's


def murmur(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "murmur.node.cli", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )


def propose(tmp: Path, name: str, config_path: Path, key: Path) -> Path:
    """A manifest signed with ``key``, built from the sections run_cluster wrote into
    ``config_path``, so that the manifest and the configs agree."""
    from run_cluster import to_toml

    config = tomllib.loads(config_path.read_text())
    draft = {"study": {"name": name, "topology": "both hospitals, complete graph"}}
    for section in ("data", "model", "training", "privacy", "aggregation"):
        draft[section] = {k: v for k, v in config[section].items() if k not in SITE_KEYS}
    draft_path = tmp / f"{name}.toml"
    draft_path.write_text(to_toml(draft))
    manifest = tmp / f"{name}.json"
    done = murmur("study", "propose", str(draft_path), "--key", str(key), "--out", str(manifest))
    assert done.returncode == 0, done.stderr
    return manifest


def study_network(tmp: Path, name: str, epsilon: float, rounds: int = 2) -> tuple[Network, Path]:
    """A 2-hospital network whose configs name one manifest, proposed by hospital_0."""
    net = make_network(
        tmp / name,
        *("--nodes", "2", "--rounds", str(rounds), "--round-timeout", "5"),
        *("--aggregator", "mean", "--dp-epsilon", str(epsilon), "--dp-delta", str(DELTA)),
    )
    key = net.run_dir / "keys" / "hospital_0.key"
    manifest = propose(tmp, name, net.node("hospital_0").config_path, key)
    for node in net.nodes:
        net.edit_config(node.name, "study", manifest=str(manifest))
        net.edit_config(node.name, "gossip", startup_timeout_s=3.0)
    return net, manifest


def approve(net: Network, name: str, manifest: Path) -> None:
    node = net.node(name)
    key = net.run_dir / "keys" / f"{name}.key"
    done = murmur(
        "study", "approve", str(manifest), "--state", str(node.state_dir), "--key", str(key)
    )
    assert done.returncode == 0 and "kept: study" in done.stdout, done.stderr


def site_budget(net: Network, name: str, store: Path, max_epsilon: float) -> None:
    net.edit_config(
        name,
        SITE,
        store=str(store),
        datasets={"breast-cancer": {"max_epsilon": max_epsilon, "delta": DELTA}},
    )


# ------------------------------------------------------------------ several studies, one process

STUDY_SECTIONS = ("data", "model", "training", "privacy", "aggregation")


def murmur_here(*args: str) -> str:
    """`murmur ARGS` in this process (no interpreter start per command); its stdout."""
    import contextlib
    import io

    from murmur.node.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(list(args))
    assert code == 0, (args, out.getvalue())
    return out.getvalue()


def propose_study(tmp: Path, net: Network, name: str, epsilon: float) -> tuple[Path, str]:
    """A manifest signed by hospital_0's key from the sections run_cluster wrote, with its
    own name and ε (so several differ); returns the file and the study id."""
    from murmur.node.studies.manifest import load_manifest

    from run_cluster import to_toml

    config = tomllib.loads(net.node("hospital_0").config_path.read_text())
    draft: dict = {"study": {"name": name, "topology": "every hospital, complete graph"}}
    for section in STUDY_SECTIONS:
        draft[section] = {k: v for k, v in config[section].items() if k not in SITE_KEYS}
    draft["privacy"]["epsilon"] = epsilon
    draft_path = tmp / f"{name}.toml"
    draft_path.write_text(to_toml(draft))
    manifest = tmp / f"{name}.json"
    key = net.run_dir / "keys" / "hospital_0.key"
    murmur_here("study", "propose", str(draft_path), "--key", str(key), "--out", str(manifest))
    return manifest, load_manifest(manifest).id


def run_studies(
    net: Network, name: str, manifests: list[Path], store: Path | None, max_epsilon: float = 3.2
) -> None:
    """Rewrite the node's config for `[[studies]]`: the study sections come from the
    manifests only, one entry each; the hospital's site budget in ``store``."""
    from run_cluster import to_toml

    path = net.node(name).config_path
    doc = tomllib.loads(path.read_text())
    doc.pop("study", None)
    for section in STUDY_SECTIONS:
        doc[section] = {k: v for k, v in doc.get(section, {}).items() if k in SITE_KEYS}
        if not doc[section]:
            del doc[section]
    doc.setdefault("gossip", {})["startup_timeout_s"] = 3.0
    if store is not None:
        budget = {"max_epsilon": max_epsilon, "delta": DELTA}
        doc[SITE] = {"store": str(store), "datasets": {"breast-cancer": budget}}
    doc["studies"] = [{"manifest": str(m)} for m in manifests]
    path.write_text(to_toml(doc))


def approve_study(net: Network, name: str, manifest: Path, study: str) -> None:
    """The operator's approval, kept in that study's own state directory."""
    state = net.node(name).state_dir / "studies" / study[:16]
    key = net.run_dir / "keys" / f"{name}.key"
    out = murmur_here("study", "approve", str(manifest), "--state", str(state), "--key", str(key))
    assert "kept: study" in out, out
