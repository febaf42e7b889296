"""Epidemic-style peer sampling against a static graph, at n = 64 hospitals (issue #23).

Each run is the network run_cluster.py writes (the embedded breast-cancer data, label-skewed
across 64 hospitals by Dirichlet(alpha), logistic regression, no DP, plain mean), with every
node's real round loop in this process and envelopes handed over by the in-memory transport
(gossip/memory_transport.py), as bench/byzantine.py runs its matrix:

* static: a random 4-regular graph (`--topology regular:4`), Metropolis-Hastings weights;
* epidemic: every node sends each round to s = 4 peers sampled from all 63 others
  (`--sample-peers 4`, gossip/sampling.py), weights 1/(s+1).

Both send four envelopes per node per round, each sealed for its four recipients, so equal
rounds are equal bytes (the table shows the bytes per round of each). A hospital holds 8 or 9
patients (569 / 64), 2 of them test rows, so its own AUC is mostly undefined: each node's
model is scored after every round on the whole test split (every hospital's test rows
together, public reference scaling so that every row is scaled alike), and the network's
figure is the mean over its nodes. The static graph's final mean AUC (round R) is the bar;
`epidemic_round_ratio` = R / (first round at which the epidemic network's mean AUC reaches
it), from the mean curve over the seeds (per seed beside it).

Asynchronous gossip (issue #23, item 3) is not built: `async_time_ratio` and
`async_auc_gap` are null.

Run: python bench/async.py [--seeds 5] [--rounds 20] [--nodes 64]. The last line is one
JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from murmur.gossip.memory_transport import MemoryTransport  # noqa: E402
from murmur.models.metrics import roc_auc  # noqa: E402
from murmur.models.training import predict_proba  # noqa: E402

import run_cluster  # noqa: E402

TARGET_RATIO = 1.5
SETTINGS = {
    "static regular:4": ["--topology", "regular:4"],
    "epidemic s=4": ["--sample-peers", "4"],
}


@dataclass
class NetworkRun:
    """One network's run: every node's whole-test AUC and time after each of its steps."""

    aucs: np.ndarray  # (nodes, rounds)
    times: np.ndarray  # (nodes, rounds): seconds from the start to the end of that step
    byzantine: np.ndarray  # (nodes,) bool
    bytes_per_round: float


def run_network(
    argv: list[str], run_dir: Path, delays: dict[int, float] | None = None
) -> NetworkRun:
    """run_cluster's network for ``argv``, every node's real round loop in this process.
    ``delays``: node index -> seconds each of its training steps takes on top of the real
    training (a sleep in the worker thread: a slower hospital's compute, not this CPU's)."""
    from murmur.node.config import load_config
    from murmur.node.node import HospitalNode
    from murmur.node.study import load_splits

    args = run_cluster.parse_args([*argv, "--quiet", "--out", str(run_dir)])
    nodes, _ = run_cluster.write_network(args, run_dir)
    hospitals = [HospitalNode(load_config(n.config_path)) for n in nodes]
    splits = load_splits(hospitals[0].config)
    x_test = np.concatenate([s.x_test for s in splits])
    y_test = np.concatenate([s.y_test for s in splits])
    aucs = np.full((len(hospitals), args.rounds), np.nan)
    times = np.full((len(hospitals), args.rounds), np.nan)
    started = time.monotonic()

    def instrument(index: int, hospital: HospitalNode) -> None:
        checkpoint = hospital.rounds.checkpoint
        train = hospital.study.train_round
        delay = (delays or {}).get(index, 0.0)

        def after_round(r: int) -> None:
            aucs[index, r - 1] = roc_auc(y_test, predict_proba(hospital.study.model, x_test))
            times[index, r - 1] = time.monotonic() - started
            checkpoint(r)

        def slow_train(reference: Any) -> Any:
            time.sleep(delay)
            return train(reference)

        hospital.rounds.checkpoint = after_round
        if delay:
            hospital.study.train_round = slow_train

    for i, h in enumerate(hospitals):
        instrument(i, h)
    by_address = {n.address: h for n, h in zip(nodes, hospitals, strict=True)}

    async def run_all() -> None:
        # a worker thread per node: sleeping "compute" must not queue behind other nodes'
        asyncio.get_running_loop().set_default_executor(
            ThreadPoolExecutor(max_workers=len(hospitals) + 4)
        )
        await asyncio.gather(
            *(h.run_rounds(MemoryTransport(by_address, h.identity)) for h in hospitals)
        )

    started = time.monotonic()
    try:
        asyncio.run(run_all())
    finally:
        for h in hospitals:
            h.audit.close()
    if np.isnan(aucs).any():
        raise RuntimeError(f"{int(np.isnan(aucs).sum())} node-rounds did not finish")
    sent = sum(h.state.bytes_sent for h in hospitals)
    byzantine = np.array([h.config.adversary.enabled for h in hospitals])
    return NetworkRun(aucs, times, byzantine, sent / args.rounds)


def rounds_to_reach(curve: np.ndarray, bar: float) -> int | None:
    hits = np.nonzero(curve >= bar - 1e-12)[0]
    return int(hits[0]) + 1 if len(hits) else None


def epidemic(args: argparse.Namespace, base: Path | None) -> float | None:
    """Part 1: the epidemic network's round ratio against the static graph (prints a table)."""
    curves: dict[str, list[np.ndarray]] = {name: [] for name in SETTINGS}
    bytes_per_round: dict[str, list[float]] = {name: [] for name in SETTINGS}
    started = time.monotonic()
    for seed in range(args.seeds):
        for name, flags in SETTINGS.items():
            argv = [
                *("--nodes", str(args.nodes), "--alpha", str(args.alpha), "--seed", str(seed)),
                *("--rounds", str(args.rounds), "--no-dp", "--aggregator", "mean"),
                *("--lr", str(args.lr), "--preprocessing", "reference"),
                *("--local-epochs", str(args.local_epochs), "--model", args.model),
                *("--round-timeout", "60", "--no-trust", *flags),
            ]
            with tempfile.TemporaryDirectory(prefix="murmur-async-", dir=base) as tmp:
                run = run_network(argv, Path(tmp))
            curve = run.aucs.mean(axis=0)
            curves[name].append(curve)
            bytes_per_round[name].append(run.bytes_per_round)
            print(
                f"  seed {seed} {name}: final mean AUC {curve[-1]:.4f} "
                f"({time.monotonic() - started:.0f} s)",
                file=sys.stderr,
                flush=True,
            )

    static_name, epidemic_name = SETTINGS
    mean_curve = {name: np.mean(c, axis=0) for name, c in curves.items()}
    bar = float(mean_curve[static_name][-1])
    reached = rounds_to_reach(mean_curve[epidemic_name], bar)
    ratio = args.rounds / reached if reached else None
    per_seed = [
        rounds_to_reach(e, float(s[-1]))
        for s, e in zip(curves[static_name], curves[epidemic_name], strict=True)
    ]
    print(
        f"Epidemic sampling: {args.nodes} hospitals, embedded data, Dirichlet "
        f"alpha={args.alpha}, {args.model}, lr {args.lr}, {args.local_epochs} local epochs, "
        f"no DP, mean, {args.rounds} rounds, {args.seeds} seeds; mean over nodes of the "
        "whole-test AUC"
    )
    header = f"{'round':>5} " + " ".join(f"{name:>18}" for name in SETTINGS)
    print(header)
    print("-" * len(header))
    for r in range(args.rounds):
        print(f"{r + 1:>5} " + " ".join(f"{mean_curve[n][r]:>18.4f}" for n in SETTINGS))
    for name in SETTINGS:
        print(f"{name}: {np.mean(bytes_per_round[name]) / 1e6:.3f} MB sent per round")
    print(
        f"static final mean AUC {bar:.4f}; epidemic reaches it at round {reached} "
        f"(per seed: {per_seed}); ratio {ratio if ratio is None else round(ratio, 2)} "
        f"(target >= {TARGET_RATIO}: {'met' if ratio and ratio >= TARGET_RATIO else 'MISSED'})"
    )
    return ratio


def asynchronous(args: argparse.Namespace, base: Path | None) -> tuple[float | None, float]:
    """Part 2: one hospital 5x slower; (time ratio, final AUC gap), means over the seeds."""
    delays = {0: 5 * args.step_s, **{i: args.step_s for i in range(1, args.async_nodes)}}
    ratios: list[float | None] = []
    gaps: list[float] = []
    print(
        f"\nAsynchronous gossip: {args.async_nodes} hospitals (complete graph, default rule "
        f"clipping:1, no DP, {args.rounds} steps), each step {args.step_s:g} s of simulated "
        f"compute, hospital_0's {5 * args.step_s:g} s"
    )
    print(
        f"{'seed':>4} {'sync AUC':>9} {'sync s':>7} {'async AUC':>10} {'others reach s':>15} "
        f"{'ratio':>6} {'gap':>7} {'stale':>6}"
    )
    for seed in range(args.async_seeds):
        argv = [
            *("--nodes", str(args.async_nodes), "--seed", str(seed), "--alpha", "0.5"),
            *("--rounds", str(args.rounds), "--no-dp", "--preprocessing", "reference"),
            *("--round-timeout", "60"),
        ]
        with tempfile.TemporaryDirectory(prefix="murmur-async-", dir=base) as tmp:
            sync = run_network(argv, Path(tmp) / "sync", delays)
            run = run_network([*argv, "--asynchronous"], Path(tmp) / "async", delays)
            stale = sum(
                json.loads(p.read_text()).get("rejected", {}).get("stale_model", 0)
                for p in (Path(tmp) / "async" / "nodes").glob("*/status.json")
            )
        sync_auc = float(sync.aucs[:, -1].mean())
        sync_s = float(sync.times[:, -1].max())
        others = list(range(1, args.async_nodes))
        curve = run.aucs[others].mean(axis=0)
        when = run.times[others].max(axis=0)
        step = rounds_to_reach(curve, sync_auc)
        reach_s = None if step is None else float(when[step - 1])
        ratio = None if reach_s is None else reach_s / sync_s
        gap = float(run.aucs[:, -1].mean()) - sync_auc
        ratios.append(ratio)
        gaps.append(gap)
        print(
            f"{seed:>4} {sync_auc:>9.4f} {sync_s:>7.2f} {run.aucs[:, -1].mean():>10.4f} "
            f"{fmt(reach_s):>15} {fmt(ratio):>6} {gap:>+7.4f} {stale:>6}"
        )
    ratio = None if any(r is None for r in ratios) else float(np.mean(ratios))
    gap = float(np.mean(gaps))
    print(
        f"others reach the synchronous final AUC in {fmt(ratio)} of its wall time (target <= "
        f"0.5: {'met' if ratio is not None and ratio <= 0.5 else 'MISSED'}); final mean AUC "
        f"gap {gap:+.4f} (target within 0.01: {'met' if abs(gap) <= 0.01 else 'MISSED'})"
    )
    return ratio, gap


BYZANTINE_ATTACKS = (
    ("sign_flip", []),
    ("alie", []),
    ("ipm", ["epsilon=100"]),
    ("gaussian", []),
    ("label_flip", []),
)


def byzantine(args: argparse.Namespace, base: Path | None) -> float:
    """Part 3: bench/byzantine.py's default rule (clipping, trust on) in asynchronous mode,
    8 honest hospitals + K attackers on a complete graph; the largest |gap| to clean."""
    print(
        f"\nAsynchronous, Byzantine: 8 honest + K on a complete graph, clipping:K with trust, "
        f"{args.rounds} steps, each {args.step_s / 5:g} s; gap of the honest final mean AUC "
        "to the clean asynchronous run"
    )
    worst = 0.0
    delays = {i: args.step_s / 5 for i in range(12)}
    for k in (1, 2):
        common = [
            *("--nodes", "8", "--alpha", "0.5", "--rounds", str(args.rounds), "--no-dp"),
            *("--aggregator", f"clipping:{k}", "--asynchronous", "--round-timeout", "60"),
        ]
        with tempfile.TemporaryDirectory(prefix="murmur-async-", dir=base) as tmp:
            clean = run_network(common, Path(tmp) / "clean", delays)
        clean_auc = float(clean.aucs[:, -1].mean())
        for attack, params in BYZANTINE_ATTACKS:
            extra = ["--byzantine", str(k), "--attack", attack]
            extra += [a for p in params for a in ("--attack-param", p)]
            with tempfile.TemporaryDirectory(prefix="murmur-async-", dir=base) as tmp:
                run = run_network([*common, *extra], Path(tmp) / "run", delays)
            auc = float(run.aucs[~run.byzantine, -1].mean())
            worst = max(worst, abs(auc - clean_auc))
            print(
                f"  K={k} {attack:<11} honest AUC {auc:.4f} clean {clean_auc:.4f} "
                f"gap {auc - clean_auc:+.4f}"
            )
    print(f"largest |gap| {worst:.4f} (target <= 0.03: {'met' if worst <= 0.03 else 'MISSED'})")
    return worst


def fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--nodes", type=int, default=64)
    parser.add_argument("--alpha", type=float, default=0.1)
    parser.add_argument("--lr", type=float, default=0.2)
    parser.add_argument("--local-epochs", type=int, default=5)
    parser.add_argument("--model", default="mlp")
    parser.add_argument("--async-nodes", type=int, default=8)
    parser.add_argument("--async-seeds", type=int, default=3)
    parser.add_argument("--step-s", type=float, default=0.1, help="simulated compute per step")
    parser.add_argument("--part", choices=["all", "epidemic", "async", "byzantine"], default="all")
    args = parser.parse_args()
    logging.disable(logging.WARNING)  # 64 nodes' small-split warnings, attack warnings
    base = Path("/dev/shm") if Path("/dev/shm").is_dir() else None
    ratio = epidemic(args, base) if args.part in ("all", "epidemic") else None
    time_ratio, gap = asynchronous(args, base) if args.part in ("all", "async") else (None, None)
    worst = byzantine(args, base) if args.part in ("all", "byzantine") else None
    print(
        json.dumps(
            {
                "epidemic_round_ratio": None if ratio is None else round(ratio, 3),
                "async_time_ratio": None if time_ratio is None else round(time_ratio, 3),
                "async_auc_gap": None if gap is None else round(gap, 4),
                "async_byzantine_max_gap": None if worst is None else round(worst, 4),
            }
        )
    )


if __name__ == "__main__":
    main()
