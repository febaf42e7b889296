#!/usr/bin/env python3
"""Run a whole murmur network on this machine with one command.

It writes a key pair and a config file per hospital into the run directory, starts each
hospital as its own `murmur node --config ...` process (exactly what a hospital runs), follows
them through the /status endpoints of their operator listeners, and writes report.json and
report.html.

    python run_cluster.py                       # 4 hospitals, breast cancer data, DP on
    python run_cluster.py --dataset heart-disease --baselines --no-dp

No node process outlives this script: Ctrl-C or SIGTERM stops every node cleanly, a crash
here kills them, and each node also watches its parent and stops itself if it disappears.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
from murmur.models.recipes import MODEL_LEARNING_RATES
from murmur.node.config_learning import MODEL_NAMES

if TYPE_CHECKING:
    from murmur.node.progress import Progress

DEFAULT_MODEL = {
    "breast-cancer": "logreg",
    "heart-disease": "logreg",
    "medmnist": "cnn_gn",
    "csv": "logreg",
    "tcga-brca": "cox",
}


@dataclass
class NodeProcess:
    name: str
    index: int
    config_path: Path
    state_dir: Path
    log_path: Path
    address: str  # the peer listener: /gossip and /health
    operator_address: str  # the operator listener: /status, /metrics and the dashboard
    byzantine: bool = False
    process: asyncio.subprocess.Process | None = None
    exit_code: int | None = None
    restarts: int = 0
    status: dict[str, Any] = field(default_factory=dict)
    # The nodes sharing this one's process (--hosts-per-process), itself included.
    members: list[NodeProcess] = field(default_factory=list)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a default only where there is one to show: argparse's own formatter appends
    "(default: None)" to options whose help already says what happens when they are omitted."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        default = action.default
        if default is None or default is False or default == [] or default == argparse.SUPPRESS:
            return action.help
        return super()._get_help_string(action)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Run a local multi-hospital murmur network (real node processes on 127.0.0.1).",
        formatter_class=_HelpFormatter,
    )
    p.add_argument(
        "--nodes", type=int, default=4, help="hospitals (ignored for heart-disease: 4 real sites)"
    )
    p.add_argument(
        "--dataset",
        default="breast-cancer",
        choices=["breast-cancer", "heart-disease", "medmnist", "csv", "tcga-brca"],
        help="breast-cancer is embedded (needs nothing beside the repo); heart-disease, "
        "medmnist and tcga-brca (survival, six regions) read ../shared/data; csv reads --data "
        "with --label (docs/data.md)",
    )
    p.add_argument(
        "--data", type=Path, help="data file or directory (default: the embedded or ../shared data)"
    )
    p.add_argument("--label", help="label column (csv)")
    p.add_argument(
        "--reference",
        type=Path,
        help="csv: reference constants (column,kind,center,scale,fill), required with DP",
    )
    p.add_argument("--site", help="site column, one hospital per value (csv)")
    p.add_argument(
        "--positive",
        metavar="VALUE",
        help="the label value that means disease: e.g. 1_yes for an R factor (csv), or 0 for a "
        "MedMNIST set whose 1 means benign (default: 1 / yes / true / positive)",
    )
    p.add_argument(
        "--not-identifying",
        action="append",
        default=[],
        metavar="COLUMN",
        help="csv: a column that looks like a direct identifier but identifies no one "
        "(repeatable); without it such columns are refused",
    )
    p.add_argument(
        "--preprocessing",
        choices=["auto", "fitted", "reference"],
        help="feature scaling: fitted on each hospital's rows, or public reference constants "
        "(default auto: fitted without DP, reference with DP; docs/data.md)",
    )
    p.add_argument(
        "--alpha", type=float, help="Dirichlet label skew across hospitals (omit for IID)"
    )
    p.add_argument(
        "--model",
        choices=MODEL_NAMES,
        help="default: per dataset (models/recipes.py)",
    )
    p.add_argument(
        "--topology",
        default="complete",
        help="complete, ring, regular:K, erdos:P, smallworld:K,P, torus, exponential, edges:FILE",
    )
    p.add_argument(
        "--sample-peers",
        type=int,
        default=0,
        metavar="S",
        help="randomized peer sampling (Epidemic Learning, gossip/sampling.py): each round every "
        "node sends to S peers drawn from its allowlist (the --topology graph, complete by "
        "default) by a shared seed, and hears from S; 0 sends to every neighbour",
    )
    p.add_argument(
        "--asynchronous",
        action="store_true",
        help="asynchronous gossip: no round barrier; each node trains, sends and aggregates "
        "what arrived since its last step (docs/protocol.md, 'Asynchronous gossip')",
    )
    p.add_argument(
        "--consensus",
        action="store_true",
        help="after the last round, run the consensus phase and the pooled evaluation over "
        "POST /consensus ([consensus] enabled; needs the complete topology): every node "
        "writes <state_dir>/agreed/ (docs/release.md, `murmur model show`)",
    )
    p.add_argument(
        "--max-staleness",
        type=int,
        default=3,
        help="with --asynchronous: models more than this many of the receiver's own steps "
        "old are dropped and counted",
    )
    p.add_argument(
        "--rounds",
        type=int,
        help="rounds of train-share-aggregate (default: the dataset's recipe, 20 for tabular "
        "data); under DP the budget covers all of them, so more rounds mean more noise per "
        "round (docs/results.md, 'Rounds under a fixed ε')",
    )
    p.add_argument(
        "--local-steps",
        type=int,
        default=0,
        help="steps per round instead of whole epochs (0: --local-epochs epochs)",
    )
    p.add_argument(
        "--local-epochs", type=int, help="passes over local data per round (default: recipe)"
    )
    p.add_argument("--optimizer", choices=["sgd", "adam"], help="local optimizer (default: recipe)")
    p.add_argument("--momentum", type=float, help="SGD momentum (default: recipe)")
    p.add_argument(
        "--augment", choices=["none", "shift"], help="image augmentation (default: recipe)"
    )
    p.add_argument(
        "--lr-schedule", choices=["constant", "cosine"], help="over the rounds (default: recipe)"
    )
    p.add_argument(
        "--server-optimizer",
        choices=["none", "adam", "yogi", "adagrad"],
        default="none",
        help="each node steps its model by FedAdam/FedYogi/FedAdagrad on (robust aggregate - "
        "previous model); post-processing, no privacy cost (models/optimizers.py)",
    )
    p.add_argument("--server-lr", type=float, default=0.01, help="the server optimizer's rate")
    p.add_argument(
        "--personalize",
        choices=["none", "ditto"],
        default="none",
        help="also keep a Ditto personalized model per hospital, never sent (models/personal.py)",
    )
    p.add_argument(
        "--personal-mu", type=float, default=0.1, help="Ditto's pull towards the shared model"
    )
    p.add_argument(
        "--batch-size",
        type=int,
        help="expected (Poisson) batch size per step (default: recipe, 32)",
    )
    p.add_argument("--lr", type=float, help="learning rate (default: per model)")
    p.add_argument(
        "--class-weights",
        type=float,
        nargs=2,
        metavar=("W_NEG", "W_POS"),
        help="fixed loss weights, e.g. from a published prevalence (default: balanced without "
        "DP, none with DP)",
    )
    p.add_argument(
        "--aggregator",
        default="clipping:1",
        help="RULE[:f], e.g. mean, trimmed_mean:1, krum:1, clipping:1",
    )
    p.add_argument(
        "--weighting",
        choices=["metropolis", "patients"],
        default="metropolis",
        help="mixing weights of mean and clipping: Metropolis-Hastings on the degrees, or each "
        "hospital's share of the training patients (public counts written into every config, "
        "as a study manifest fixes them; node/mixing.py)",
    )
    p.add_argument(
        "--max-weight",
        type=float,
        help="with --weighting patients: the most any one neighbour weighs (default 1/3)",
    )
    p.add_argument(
        "--compression",
        choices=["none", "int8", "topk_int8"],
        default="none",
        help="how each node compresses the model it shares, after DP-SGD (gossip/compression.py)",
    )
    p.add_argument(
        "--compression-block", type=int, default=256, help="values per int8 scale (0: per tensor)"
    )
    p.add_argument("--topk-fraction", type=float, default=0.1, help="share of entries top-k keeps")
    p.add_argument(
        "--topk-warmup",
        type=int,
        help="top-k's first deltas keep a larger share (default: [compression] warmup's, 6)",
    )
    dp = p.add_mutually_exclusive_group()
    dp.add_argument(
        "--dp-epsilon",
        type=float,
        default=1.0,
        help="privacy budget per hospital for the whole run",
    )
    dp.add_argument("--no-dp", action="store_true", help="train without differential privacy")
    p.add_argument("--dp-delta", type=float, help="default: min(1e-5, 1/(10 n_train)) per hospital")
    p.add_argument(
        "--min-site-patients",
        type=int,
        help="[privacy] min_site_patients, the smallest site the plan admits, which caps the "
        "DP noise a node may announce (default: the smallest honest hospital's training rows; "
        "0: none, so no node is measured with more noise than its own)",
    )
    p.add_argument(
        "--baselines",
        action=argparse.BooleanOptionalAction,
        help="also train local-only and pooled references, with DP at the same ε when DP is "
        "on (default: on, except for medmnist, whose CNN baselines take minutes)",
    )
    p.add_argument(
        "--threshold",
        type=float,
        help="fixed decision threshold for the reported metrics, e.g. 0.5 as FLamby reports "
        "accuracy (default: Youden's J on training rows without DP, 0.5 with DP)",
    )
    p.add_argument(
        "--round-timeout",
        type=float,
        default=15.0,
        help="seconds a node waits for neighbours per round",
    )
    p.add_argument("--out", type=Path, help="run directory (default: runs/<timestamp>)")
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the hospital split and of the initial model every node shares",
    )
    p.add_argument(
        "--restarts", type=int, default=2, help="restarts of a node killed by a signal, per node"
    )
    p.add_argument(
        "--hosts-per-process",
        type=int,
        default=1,
        metavar="K",
        help="simulation: run K hospital nodes per process (`murmur hosts`, same node code, "
        "loopback HTTP), so a simulated hospital costs its model and data, not a Python and "
        "torch of its own; 1 runs each as its own `murmur node` process, as deployed",
    )
    p.add_argument("--quiet", action="store_true", help="no live progress, only the summary")
    p.add_argument(
        "--no-trust", action="store_true", help="turn off per-peer trust scores and quarantine"
    )
    p.add_argument(
        "--max-relative-distance",
        type=float,
        help="mute (weight 0, still an input), each round, a model far from the robust centre "
        "and farther from a node's own than this times its length (default 1.5, under DP at "
        "least 4 x the DP noise length; inf turns it off; docs/robustness.md)",
    )
    adv = p.add_argument_group(
        "adversary mode (tests and demos only; docs/robustness.md)",
        "Adds K Byzantine nodes to the honest hospitals. Each trains on a copy of an honest "
        "hospital's split and attacks its neighbours.",
    )
    adv.add_argument("--byzantine", type=int, default=0, metavar="K", help="attacker nodes to add")
    adv.add_argument("--attack", help="attack name (see gossip/attacks.py ATTACKS)")
    adv.add_argument(
        "--attack-param",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="attack parameter, repeatable, e.g. --attack-param epsilon=100",
    )
    adv.add_argument(
        "--attack-noise-claim",
        choices=["loudest", "own"],
        default="loudest",
        help="the DP noise the attackers announce: the most the plan accepts, or their own",
    )
    args = p.parse_args(argv)
    if args.hosts_per_process < 1:
        p.error("--hosts-per-process must be >= 1 (1: one process per hospital)")
    if args.sample_peers < 0:
        p.error("--sample-peers must be >= 0 (0: every neighbour, every round)")
    if args.sample_peers and args.topology != "complete":
        p.error(
            "--sample-peers draws from every node of the network, so it needs --topology "
            "complete (every node allowlists every other)"
        )
    if args.max_staleness < 0:
        p.error("--max-staleness must be >= 0 (0: only models of the receiver's own step)")
    if args.asynchronous and args.sample_peers:
        p.error(
            "--asynchronous cannot be combined with --sample-peers: an asynchronous step "
            "aggregates whoever's newest model arrived, with no round graph to sample"
        )
    apply_recipe(args)
    check_adversary_args(p, args)
    if args.dataset == "csv" and not args.no_dp and args.reference is None:
        p.error(
            "--dataset csv with DP needs --reference FILE: per-hospital means, medians and "
            "modes would make one patient move every other patient's features (docs/data.md)"
        )
    return args


def apply_recipe(args: argparse.Namespace) -> None:
    """Fill every training option left out from the dataset's recipe (models/recipes.py)."""
    from murmur.models.recipes import recipe_for

    recipe = recipe_for(args.dataset, args.model, private=not args.no_dp)
    args.model = recipe.model
    fields = ("rounds", "local_epochs", "batch_size", "optimizer", "momentum", "augment")
    for name in (*fields, "lr_schedule"):
        if getattr(args, name) is None:
            setattr(args, name, getattr(recipe, name))
    if args.lr is None:
        args.lr = recipe.learning_rate


def check_adversary_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Adversary options make sense together; parameters parse and are known to the attack."""
    if args.byzantine < 0:
        parser.error("--byzantine must be >= 0")
    if args.byzantine == 0:
        if args.attack or args.attack_param:
            parser.error("--attack and --attack-param need --byzantine K (K >= 1 attackers)")
        args.attack_params = {}
        return
    from murmur.gossip.attacks import ATTACKS, attack_params  # imports torch: only when attacking

    if not args.attack:
        parser.error(f"--byzantine needs --attack NAME; attacks: {', '.join(ATTACKS)}")
    params: dict[str, float] = {}
    for item in args.attack_param:
        key, sep, value = item.partition("=")
        try:
            params[key.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep or not key.strip():
            parser.error(f"--attack-param {item!r} must be KEY=NUMBER, e.g. epsilon=100")
    try:
        attack_params(args.attack, params)
    except ValueError as exc:
        parser.error(str(exc))
    args.attack_params = params


def free_ports(n: int) -> list[int]:
    """Ports the OS says are free now (held open together so they are distinct)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def hospital_counts(args: argparse.Namespace) -> dict[str, int]:
    """Each hospital's training-patient count, by name, in the data set's order."""
    from murmur.models.data import load_dataset

    splits = load_dataset(args.dataset, **dataset_kwargs(args))
    return {s.name: len(s.y_train) for s in splits}


def dataset_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    kw: dict[str, Any] = {"num_hospitals": args.nodes, "seed": args.seed, "alpha": args.alpha}
    if args.data is not None:
        kw["path"] = str(args.data.resolve())
    if args.label:
        kw["label"] = args.label
    if args.site:
        kw["site"] = args.site
    if args.reference is not None:
        kw["reference"] = str(args.reference.resolve())
    if args.positive is not None:
        kw["positive"] = args.positive
    if args.not_identifying:
        kw["not_identifying"] = tuple(args.not_identifying)
    return kw


def parse_aggregator(text: str) -> tuple[str, int]:
    rule, _, f = text.partition(":")
    return rule, int(f) if f else 0


def write_network(args: argparse.Namespace, run_dir: Path) -> tuple[list[NodeProcess], Any]:
    """Keys, topology and one TOML config per hospital."""
    from murmur.crypto.identity import generate_identity, save_identity
    from murmur.gossip.feasibility import check_feasibility
    from murmur.topologies.graphs import build_topology

    counts = hospital_counts(args)
    honest_names = list(counts)
    # The consortium knows its sites: the plan admits none smaller than its smallest, which
    # caps the DP noise any node may announce (node/noise_plan.py).
    # 0: the plan sets none (no neighbour is measured with more noise than a node's own).
    wanted = getattr(args, "min_site_patients", None)
    min_site = None if wanted == 0 else (wanted or min(counts.values()))
    attackers = [f"byzantine_{i}" for i in range(args.byzantine)]
    names = honest_names + attackers
    # An attacker trains on a copy of an honest hospital's split (below), and the study
    # manifest counts its patients as any member's: the count is agreed, never self-reported.
    for i, name in enumerate(attackers):
        counts[name] = counts[honest_names[i % len(honest_names)]]
    n = len(names)
    topology = build_topology(args.topology, n, seed=args.seed)
    rule, f = parse_aggregator(args.aggregator)
    if args.sample_peers >= n:
        raise SystemExit(f"--sample-peers {args.sample_peers} needs more than {n} nodes")
    problems = check_feasibility(
        # With sampling a round brings S inputs, whatever the allowlist (gossip/sampling.py).
        {
            names[i]: [names[j] for j in topology.neighbours(i)][: args.sample_peers or None]
            for i in range(n)
        },
        rule,
        f,
    )
    if problems:
        raise SystemExit("infeasible network:\n  " + "\n  ".join(problems))
    keys_dir = run_dir / "keys"
    identities = [generate_identity(name) for name in names]
    public_files = []
    for ident in identities:
        _, pub = save_identity(ident, keys_dir)
        public_files.append(pub)
    ports = free_ports(2 * n)  # a peer port and an operator port per node
    operator_ports = ports[n:]
    model = args.model or DEFAULT_MODEL[args.dataset]
    nodes = []
    for i, name in enumerate(names):
        byzantine = name in attackers
        state_dir = run_dir / "nodes" / name
        state_dir.mkdir(parents=True, exist_ok=True)
        config_path = run_dir / "configs" / f"{name}.toml"
        config_path.parent.mkdir(exist_ok=True)
        peers = [
            {
                "name": names[j],
                "address": f"http://127.0.0.1:{ports[j]}",
                "public_key_file": str(public_files[j]),
                "degree": topology.degree(j),
            }
            for j in topology.neighbours(i)
        ]
        config = {
            "node": {
                "name": name,
                "key_file": str(keys_dir / f"{name}.key"),
                "state_dir": str(state_dir),
                "listen": f"127.0.0.1:{ports[i]}",
            },
            "operator": {"listen": f"127.0.0.1:{operator_ports[i]}"},
            # Every node of this network connects from 127.0.0.1, so the per-address limits
            # (sized for one peer per address) must cover all of them.
            "peer_listener": {
                "max_connections": max(64, 4 * n),
                "max_connections_per_address": max(8, 4 * n),
                "max_uploads_per_address": max(4, 2 * n),
            },
            "data": {
                "dataset": args.dataset,
                # An attacker trains on a copy of an honest hospital's split.
                "hospital": honest_names[i % len(honest_names)] if byzantine else name,
                "num_hospitals": args.nodes,
                "seed": args.seed,
                **({"path": str(args.data.resolve())} if args.data else {}),
                **({"alpha": args.alpha} if args.alpha is not None else {}),
                **({"label": args.label} if args.label else {}),
                **({"site": args.site} if args.site else {}),
                **({"reference": str(args.reference.resolve())} if args.reference else {}),
                **({"positive": args.positive} if args.positive is not None else {}),
                **({"not_identifying": args.not_identifying} if args.not_identifying else {}),
                **({"preprocessing": args.preprocessing} if args.preprocessing else {}),
            },
            "model": {"name": model},
            "training": {
                "rounds": args.rounds,
                "local_epochs": args.local_epochs,
                **({"local_steps": args.local_steps} if args.local_steps else {}),
                "batch_size": args.batch_size,
                "learning_rate": args.lr or MODEL_LEARNING_RATES[model],
                "optimizer": args.optimizer,
                "momentum": args.momentum,
                "augment": args.augment,
                "lr_schedule": args.lr_schedule,
                "seed": args.seed,
                **({"class_weights": list(args.class_weights)} if args.class_weights else {}),
            },
            "privacy": (
                {"enabled": False}
                if args.no_dp
                else {
                    "enabled": True,
                    "epsilon": args.dp_epsilon,
                    **({"delta": args.dp_delta} if args.dp_delta else {}),
                    **({"min_site_patients": min_site} if min_site is not None else {}),
                }
            ),
            "aggregation": {"rule": rule, "f": f, **weighting_section(args, counts)},
            **(
                {
                    "server_optimizer": {
                        "name": args.server_optimizer,
                        "learning_rate": args.server_lr,
                    }
                }
                if args.server_optimizer != "none"
                else {}
            ),
            **(
                {"personalization": {"method": args.personalize, "mu": args.personal_mu}}
                if args.personalize != "none"
                else {}
            ),
            "gossip": {
                "round_timeout_s": args.round_timeout,
                "startup_timeout_s": 60.0,
                **({"sample_peers": args.sample_peers} if args.sample_peers else {}),
                **(
                    {"asynchronous": True, "max_staleness": args.max_staleness}
                    if args.asynchronous
                    else {}
                ),
            },
            **(
                {
                    "compression": {
                        "codec": args.compression,
                        "block": args.compression_block,
                        "fraction": args.topk_fraction,
                        **({"warmup": args.topk_warmup} if args.topk_warmup is not None else {}),
                    }
                }
                if args.compression != "none"
                else {}
            ),
            **({"evaluation": {"threshold": args.threshold}} if args.threshold is not None else {}),
            **({"consensus": {"enabled": True}} if args.consensus else {}),
            **trust_section(args),
            **(
                {"adversary": adversary_section(args, i, names, attackers, topology)}
                if byzantine
                else {}
            ),
            "peers": peers,
        }
        config_path.write_text(to_toml(config))
        nodes.append(
            NodeProcess(
                name=name,
                index=i,
                config_path=config_path,
                state_dir=state_dir,
                log_path=run_dir / "logs" / f"{name}.log",
                address=f"http://127.0.0.1:{ports[i]}",
                operator_address=f"http://127.0.0.1:{operator_ports[i]}",
                byzantine=byzantine,
            )
        )
    return nodes, topology


def weighting_section(args: argparse.Namespace, counts: dict[str, int]) -> dict[str, Any]:
    """[aggregation] weighting keys: the public patient counts with --weighting patients."""
    if args.weighting != "patients":
        return {}
    return {
        "weighting": "patients",
        "patients": counts,
        **({"max_weight": args.max_weight} if args.max_weight is not None else {}),
    }


def adversary_section(
    args: argparse.Namespace, i: int, names: list[str], attackers: list[str], topology: Any
) -> dict[str, Any]:
    """The [adversary] table of attacker i: the attack, and what the colluders know.

    They know each other, the network size n and their number f (ALIE's z), and for each
    honest neighbour how many attackers it has (dissensus splits its push among them).
    """
    index = {name: k for k, name in enumerate(names)}
    byzantine_neighbours = {
        names[j]: sum(1 for k in topology.neighbours(j) if names[k] in attackers)
        for j in topology.neighbours(i)
        if names[j] not in attackers
    }
    return {
        "attack": args.attack,
        "params": {**args.attack_params, "n": float(len(names)), "f": float(len(attackers))},
        "colluders": [a for a in attackers if a != names[i]],
        "seed": args.seed + index[names[i]],
        "byzantine_neighbours": byzantine_neighbours,
        **(
            {"noise_claim": args.attack_noise_claim}
            if getattr(args, "attack_noise_claim", "loudest") != "loudest"
            else {}
        ),
    }


def trust_section(args: argparse.Namespace) -> dict[str, Any]:
    """The [trust] table, when the flags change the node's defaults."""
    trust: dict[str, Any] = {}
    if args.no_trust:
        trust["enabled"] = False
    if args.max_relative_distance is not None:
        trust["max_relative_distance"] = args.max_relative_distance
    return {"trust": trust} if trust else {}


def to_toml(doc: dict[str, Any]) -> str:
    """Write the small, flat TOML documents this script needs (tables and arrays of tables)."""
    lines: list[str] = []

    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, int | float):
            return repr(v)
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        if isinstance(v, dict):
            return "{" + ", ".join(f"{json.dumps(str(k))} = {value(x)}" for k, x in v.items()) + "}"
        return json.dumps(str(v))

    for key, table in doc.items():
        if isinstance(table, list):
            for item in table:
                lines.append(f"\n[[{key}]]")
                lines.extend(f"{k} = {value(v)}" for k, v in item.items())
        else:
            lines.append(f"\n[{key}]")
            lines.extend(f"{k} = {value(v)}" for k, v in table.items())
    return "\n".join(lines).lstrip() + "\n"


def group_hosts(nodes: list[NodeProcess], per_process: int) -> list[list[NodeProcess]]:
    """Nodes in consecutive groups of ``per_process``, one process each; every node's
    `members` is its group and its log is the group's (one process, one log)."""
    groups = [nodes[i : i + per_process] for i in range(0, len(nodes), per_process)]
    for group in groups:
        for node in group:
            node.members = group
            if len(group) > 1:
                node.log_path = node.log_path.with_name(f"host-{group[0].name}.log")
    return groups


async def start_node(node: NodeProcess) -> None:
    """Start the process of ``node`` and of the other members of its group: `murmur node`
    for one hospital (what a hospital runs), `murmur hosts` for several (simulation)."""
    members = node.members or [node]
    node.log_path.parent.mkdir(parents=True, exist_ok=True)
    log = open(node.log_path, "ab")  # noqa: SIM115 - the child process owns it from here
    env = {**os.environ, "MURMUR_PARENT_PID": str(os.getpid()), "PYTHONUNBUFFERED": "1"}
    if len(members) == 1:
        command = ["node", "--config", str(node.config_path)]
    else:
        command = ["hosts", *(a for m in members for a in ("--config", str(m.config_path)))]
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "murmur.node.cli",
        *command,
        stdout=log,
        stderr=asyncio.subprocess.STDOUT,
        env=env,
        cwd=str(Path(__file__).resolve().parent),
    )
    log.close()
    for member in members:
        member.process = process


async def poll_status(session: aiohttp.ClientSession, node: NodeProcess) -> None:
    with contextlib.suppress(
        aiohttp.ClientError, TimeoutError, asyncio.TimeoutError, ValueError, OSError
    ):
        async with session.get(
            f"{node.operator_address}/status", timeout=aiohttp.ClientTimeout(total=2)
        ) as r:
            if r.status == 200:
                node.status = await r.json()


def progress_line(nodes: list[NodeProcess], rounds: int, width: int | None = None) -> str:
    """One line of progress that fits the terminal: every hospital's round, AUC and ε when
    that fits in `width` columns, else a summary of the network (rounds, AUC range, ε, done)."""
    width = width or shutil.get_terminal_size((100, 24)).columns
    parts = []
    for n in nodes:
        s = n.status
        metric, auc = headline(s.get("last_metrics", {}))
        eps = s.get("privacy", {}).get("epsilon_spent")
        done = "✓" if n.exit_code == 0 else ("✗" if n.exit_code not in (None, 0) else "")
        parts.append(
            f"{n.name} r{s.get('round', 0)}/{rounds} "
            f"{metric}={'-' if auc is None else f'{auc:.3f}'}"
            f"{'' if eps is None else f' ε={eps:.2f}'}{done}"
        )
    line = " | ".join(parts)
    if len(line) <= width:
        return line
    reached = [n.status.get("round", 0) for n in nodes]
    aucs = [a for n in nodes if (a := headline(n.status.get("last_metrics", {}))[1]) is not None]
    epsilons = [
        e for n in nodes if (e := n.status.get("privacy", {}).get("epsilon_spent")) is not None
    ]
    finished = sum(1 for n in nodes if n.exit_code is not None)
    summary = f"{len(nodes)} hospitals: round {min(reached)}-{max(reached)}/{rounds}"
    if aucs:
        metric = headline(nodes[0].status.get("last_metrics", {}))[0]
        summary += f", {metric} {min(aucs):.3f}-{max(aucs):.3f}"
    if epsilons:
        summary += f", ε ≤ {max(epsilons):.2f}"
    summary += f", {finished} finished"
    return summary[:width]


def headline(metrics: dict[str, Any]) -> tuple[str, float | None]:
    """The one figure progress shows: ("c", C-index) for survival, else ("auc", AUC)."""
    if "c_index" in metrics:
        return "c", metrics["c_index"]
    return "auc", metrics.get("auc")


def live_progress(args: argparse.Namespace) -> Progress:
    """A table per hospital redrawn in place when stdout is a terminal; otherwise
    `progress_line` once per change, so logs and CI stay line-based (node/progress.py)."""
    from murmur.node.alerts import AlertSettings
    from murmur.node.progress import Progress

    settings = AlertSettings(round_timeout_s=args.round_timeout)
    return Progress(sys.stdout, args.rounds, settings, lambda ns: progress_line(ns, args.rounds))


async def follow(
    nodes: list[NodeProcess], progress: Progress | None, deadline_s: float, max_restarts: int
) -> str | None:
    """Poll /status until every node process has exited (or the deadline passes), showing it
    on `progress` (node/progress.py, or None for --quiet); return why the run was cut short
    (None when every node exited by itself).

    A node killed by a signal (SIGKILL, the OOM killer) is restarted from its last checkpoint,
    as a service manager would restart a hospital's node; one that exits with an error is not.
    """
    end = time.monotonic() + deadline_s
    async with aiohttp.ClientSession() as session:
        while any(n.exit_code is None for n in nodes):
            for n in nodes:
                if n.exit_code is not None or n.process is None or n.process.returncode is None:
                    continue
                code = n.process.returncode
                if code < 0 and n.restarts < max_restarts:
                    members = n.members or [n]
                    for member in members:
                        member.restarts += 1
                    if progress is not None:
                        progress.interrupt()
                    print(
                        f"run_cluster: {', '.join(m.name for m in members)} "
                        f"{'was' if len(members) == 1 else 'were'} killed by signal {-code}; "
                        f"restarting from the last checkpoint ({n.restarts}/{max_restarts})",
                        file=sys.stderr,
                    )
                    await start_node(n)
                else:
                    n.exit_code = code
            await asyncio.gather(*(poll_status(session, n) for n in nodes if n.exit_code is None))
            if progress is not None:
                progress.update(nodes)
            if time.monotonic() > end:
                if progress is not None:
                    progress.interrupt()
                print(
                    f"run_cluster: deadline of {deadline_s:.0f}s passed; stopping", file=sys.stderr
                )
                return f"deadline of {deadline_s:.0f} s passed"
            await asyncio.sleep(0.5)
    return None


async def stop_all(nodes: list[NodeProcess], grace_s: float = 10.0) -> None:
    """SIGTERM every running node, then SIGKILL whatever has not exited after the grace time."""
    # One process may host several nodes (--hosts-per-process): signal each process once.
    processes = {id(n.process): n.process for n in nodes if n.process is not None}
    running = [p for p in processes.values() if p.returncode is None]
    for process in running:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)
    for process in running:
        try:
            await asyncio.wait_for(process.wait(), timeout=grace_s)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()
    for n in nodes:
        if n.process is not None and n.exit_code is None:
            n.exit_code = n.process.returncode


def final_status(node: NodeProcess) -> dict[str, Any]:
    path = node.state_dir / "status.json"
    if path.exists():
        with contextlib.suppress(ValueError):
            return json.loads(path.read_text())
    return node.status


def build_report(
    args: argparse.Namespace,
    nodes: list[NodeProcess],
    topology: Any,
    seconds: float,
    cut_short: str | None = None,
) -> dict[str, Any]:
    """report.json (docs/report.md) from each node's final status. `cut_short` says why the
    run stopped before every node exited by itself (a signal, the deadline), if it did."""
    from murmur.models.metrics import REPORTED_METRICS, SURVIVAL_METRICS, UNCERTAINTY_METRICS
    from murmur.node.report_extras import PERSONAL_FIELDS
    from murmur.node.report_values import FINISHED_PHASES, hospital_warnings

    rule, f = parse_aggregator(args.aggregator)
    hospitals = []
    for n in nodes:
        s = final_status(n)
        m = s.get("last_metrics", {})
        personal = s.get("personal") or {}
        priv = s.get("privacy", {})
        data = s.get("data", {})
        hospitals.append(
            {
                "name": n.name,
                "byzantine": n.byzantine,
                **{k: m.get(k) for k in (*REPORTED_METRICS, "threshold")},
                **{k: m[k] for k in (*SURVIVAL_METRICS, *UNCERTAINTY_METRICS) if k in m},
                "n_train": data.get("n_train"),
                "n_test": m.get("n", data.get("n_test")),
                "n_test_positives": m.get("positives"),
                "phase": s.get("phase"),
                "epsilon": priv.get("epsilon_spent"),
                "delta": priv.get("delta"),
                "noise_multiplier": priv.get("noise_multiplier"),
                "sample_rate": priv.get("sample_rate"),
                "dp_steps": priv.get("steps_taken"),
                "rounds_completed": len(s.get("history", [])),
                "exit_code": n.exit_code,
                "restarts": n.restarts,
                "rejected": s.get("rejected", {}),
                "trust": s.get("trust_history", {}),
                "quarantined": s.get("quarantined", []),
                # peer -> rounds its model was left out as too far from this node's own
                "too_far": s.get("too_far", {}),
                # peer -> round of the proof: peers proven to have signed two different
                # envelopes for one round (docs/protocol.md, "Equivocation")
                "proven_equivocation": (s.get("equivocation") or {}).get("proven", {}),
                "adversary": s.get("adversary"),
                "model_sha256": s.get("model_sha256"),
                # the personalized model's metrics (--personalize); the model is never sent
                "personal": {k: personal.get(k) for k in PERSONAL_FIELDS} if personal else None,
                "history": [
                    {
                        k: h.get(k)
                        for k in ("round", "auc", "epsilon", "neighbour_distance", "seconds")
                    }
                    | (
                        {"c_index": h["metrics"].get("c_index")}
                        if "c_index" in h.get("metrics", {})
                        else {}
                    )
                    for h in s.get("history", [])
                ],
            }
        )
        hospitals[-1]["warnings"] = hospital_warnings(hospitals[-1], args.rounds)
    honest = [h for h in hospitals if not h["byzantine"]]
    aucs = [h["auc"] for h in honest if h["auc"] is not None]
    c_indices = [h["c_index"] for h in honest if h.get("c_index") is not None]
    failed = [h["name"] for h in honest if h["exit_code"] != 0 or h["rounds_completed"] == 0]
    # An honest node that stopped before its planned rounds for any reason but its budget.
    incomplete = [h["name"] for h in honest if h["phase"] not in FINISHED_PHASES]
    interrupted = cut_short or (
        f"{', '.join(incomplete)} stopped before round {args.rounds}" if incomplete else None
    )
    statuses = [final_status(n).get("data", {}) for n in nodes]
    data_path = next((d["path"] for d in statuses if d.get("path")), None)
    return {
        "dataset": args.dataset,
        "task": "survival" if any("c_index" in h for h in honest) else "classification",
        "data_path": data_path or (str(args.data) if args.data else None),
        "model": args.model or DEFAULT_MODEL[args.dataset],
        "nodes": len(nodes),
        "topology": args.topology,
        "sample_peers": args.sample_peers or None,
        "asynchronous": args.asynchronous,
        "spectral_gap": float(topology.spectral_gap()),
        "aggregator": {"rule": rule, "f": f, "weighting": args.weighting},
        "attack": (
            {"name": args.attack, "byzantine": args.byzantine, "params": args.attack_params}
            if args.byzantine
            else None
        ),
        "dp": {
            "enabled": not args.no_dp,
            "epsilon": None if args.no_dp else args.dp_epsilon,
            "delta": None
            if args.no_dp
            else (args.dp_delta or (honest[0]["delta"] if honest else None)),
            "max_grad_norm": None if args.no_dp else 1.0,
            "accountant": None if args.no_dp else "pld",
        },
        "rounds": args.rounds,
        "rounds_completed": min((h["rounds_completed"] for h in honest), default=0),
        "interrupted": interrupted,
        "exit_code": 0,
        "warnings": run_warnings(args, hospitals),
        "local_epochs": args.local_epochs,
        "seed": args.seed,
        "seconds": round(seconds, 2),
        "bytes_sent": sum(final_status(n).get("bytes_sent", 0) for n in nodes),
        "mean_auc": sum(aucs) / len(aucs) if aucs else None,
        **({"mean_c_index": sum(c_indices) / len(c_indices)} if c_indices else {}),
        "failed": failed,
        "hospitals": hospitals,
    }


async def run(args: argparse.Namespace) -> int:
    # Absolute, because each config names its keys and state relative to its own directory.
    run_dir = (args.out or Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S")).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    nodes, topology = write_network(args, run_dir)
    print(f"run directory: {run_dir}")
    print(
        f"{len(nodes)} hospitals, topology {args.topology} "
        f"(spectral gap {topology.spectral_gap():.3f})"
    )
    for n in nodes:
        print(
            f"  {n.name}: dashboard {n.operator_address}/"
            f"{'   <- BYZANTINE ATTACKER' if n.byzantine else ''}"
        )
    if args.byzantine:
        print(
            f"ADVERSARY MODE (tests and demos only): {args.byzantine} Byzantine node(s) attack "
            f"with {args.attack} {args.attack_params or ''}; their metrics are left out of the "
            "honest mean"
        )
    started = time.monotonic()
    loop = asyncio.get_running_loop()
    stop_requested = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop_requested.set)
    cut_short: str | None = None
    progress = None if args.quiet else live_progress(args)
    try:
        for group in group_hosts(nodes, args.hosts_per_process):
            await start_node(group[0])
        deadline = 120 + args.rounds * (args.round_timeout + 30)
        follower = asyncio.ensure_future(follow(nodes, progress, deadline, args.restarts))
        stopper = asyncio.ensure_future(stop_requested.wait())
        await asyncio.wait({follower, stopper}, return_when=asyncio.FIRST_COMPLETED)
        if stop_requested.is_set():
            if progress is not None:
                progress.interrupt()
            print("\nrun_cluster: stopping every node", file=sys.stderr)
            cut_short = "stopped by a signal (Ctrl-C or SIGTERM)"
        elif follower.done() and not follower.cancelled():
            cut_short = follower.result()
        follower.cancel()
        stopper.cancel()
    finally:
        await stop_all(nodes)
    seconds = time.monotonic() - started
    for n in nodes:  # the last word of each node is its status.json, written as it stopped
        n.status = final_status(n)
    if progress is not None:
        progress.final(nodes)
    report = build_report(args, nodes, topology, seconds, cut_short)
    report["whole_test"] = whole_test_section(nodes)
    if want_baselines(args):
        from murmur.models.baselines import run_baselines
        from murmur.models.privacy import DPConfig
        from murmur.models.training import TrainingSettings

        model = args.model or DEFAULT_MODEL[args.dataset]
        settings = TrainingSettings(
            batch_size=args.batch_size,
            learning_rate=args.lr or MODEL_LEARNING_RATES[model],
            local_epochs=args.local_epochs,
            local_steps=args.local_steps,
            optimizer=args.optimizer,
            momentum=args.momentum,
            augment=args.augment,
            lr_schedule=args.lr_schedule,
            schedule_rounds=args.rounds,
            seed=args.seed,
            class_weights=tuple(args.class_weights) if args.class_weights else None,
        )
        dp = None if args.no_dp else DPConfig(epsilon=args.dp_epsilon, delta=args.dp_delta)
        # As many rounds as the network trained: an interrupted run is read against
        # baselines of the same length (and Ctrl-C is not kept waiting for 500 rounds).
        rounds = report["rounds_completed"] if report["interrupted"] else args.rounds
        if rounds > 0:
            report["baselines"] = run_baselines(
                dataset_kwargs_for(args), model, {}, settings, rounds, args.seed, dp=dp
            )
            report["baselines"]["rounds"] = rounds
            report["federation_margin"] = margin_over_local(report, dp is not None)
    if stop_requested.is_set():
        report["exit_code"] = 130
    elif report["failed"] or report["interrupted"]:
        report["exit_code"] = 1
    (run_dir / "report.json").write_text(json.dumps(report, indent=2))
    from murmur.node.report import summary_table, write_html_report

    html = write_html_report(report, run_dir)
    print()
    print(summary_table(report))
    print(f"\nreport: {run_dir / 'report.json'}\n        {html}")
    if report["failed"]:
        print(
            f"run_cluster: honest nodes failed: {', '.join(report['failed'])} "
            f"(see {run_dir / 'logs'})",
            file=sys.stderr,
        )
    return report["exit_code"]


# Above this, the DP noise on each coordinate of a step's averaged gradient, σ C / (q n), is
# more than 0.4 C: measured on the embedded data at ε = 1, 20 rounds (0.30) gave AUC 0.979 and
# 200 rounds (0.47) gave 0.955 (docs/results.md, "Rounds under a fixed ε").
NOISY_STEP_RATIO = 0.4


def run_warnings(args: argparse.Namespace, hospitals: list[dict[str, Any]]) -> list[str]:
    """Run-level advice: under a fixed ε, too many rounds drown each step in noise."""
    warnings = []
    ratios = {
        h["name"]: h["noise_multiplier"] / (h["sample_rate"] * h["n_train"])
        for h in hospitals
        if not h["byzantine"] and h.get("noise_multiplier") and h.get("sample_rate")
        if h.get("n_train")
    }
    noisy = {name: r for name, r in ratios.items() if r > NOISY_STEP_RATIO}
    if noisy:
        worst = max(noisy, key=noisy.get)
        warnings.append(
            f"{len(noisy)} hospital(s) trained with DP noise above {NOISY_STEP_RATIO} C per "
            f"coordinate of each averaged gradient ({worst}: {noisy[worst]:.2f}): the ε budget "
            f"is spread over {args.rounds} rounds. Fewer rounds (or more local data per step) "
            "usually give a better model at the same ε; see docs/results.md, "
            "'Rounds under a fixed ε'"
        )
    return warnings


def margin_over_local(report: dict[str, Any], private: bool) -> dict[str, Any] | None:
    """murmur's mean AUC margin over local-only training (at the same ε under DP), with and
    without hospitals that have no local model (models/uncertainty.py)."""
    from murmur.models.uncertainty import federation_margins

    kind = "local_dp" if private and "local_dp" in report["baselines"] else "local"
    honest = [h for h in report["hospitals"] if not h["byzantine"]]
    margins = federation_margins(honest, report["baselines"][kind]["hospitals"])
    return None if margins is None else {"against": kind, **margins}


def whole_test_section(nodes: list[NodeProcess]) -> dict[str, Any]:
    """Each honest hospital's final model scored on every hospital's test rows together (for
    medmnist: the whole official test split); node/report_extras.py."""
    from murmur.node.report_extras import whole_test_auc

    try:
        per_node = whole_test_auc([n.config_path for n in nodes if not n.byzantine])
    except Exception as exc:  # a damaged checkpoint must not cost the rest of the report
        return {"error": f"{type(exc).__name__}: {exc}"}
    aucs = [a for a in per_node.values() if a is not None]
    return {"auc": per_node, "mean_auc": sum(aucs) / len(aucs) if aucs else None}


def want_baselines(args: argparse.Namespace) -> bool:
    """--baselines / --no-baselines, else on wherever they are cheap (not the CNN on images)."""
    return args.baselines if args.baselines is not None else args.dataset != "medmnist"


def dataset_kwargs_for(args: argparse.Namespace) -> dict[str, Any]:
    """load_dataset's arguments for the baselines (their non-DP rows scaled as the nodes')."""
    chosen = args.preprocessing if args.preprocessing in ("fitted", "reference") else None
    return {
        "name": args.dataset,
        **dataset_kwargs(args),
        **({"preprocessing": chosen} if chosen else {}),
    }


def main(argv: list[str] | None = None) -> int:
    """Run the network; a data set that cannot be loaded ends it with one line, exit 2."""
    from murmur.models.data import DataError

    args = parse_args(argv)
    try:
        return asyncio.run(run(args))
    except DataError as error:
        print(f"run_cluster: data error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
