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
from pathlib import Path

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


def run_network(argv: list[str], run_dir: Path) -> tuple[np.ndarray, float]:
    """(mean whole-test AUC over the nodes after each round, bytes sent per round)."""
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

    def scoring(index: int, hospital: HospitalNode) -> None:
        checkpoint = hospital.rounds.checkpoint

        def after_round(r: int) -> None:
            aucs[index, r - 1] = roc_auc(y_test, predict_proba(hospital.study.model, x_test))
            checkpoint(r)

        hospital.rounds.checkpoint = after_round

    for i, h in enumerate(hospitals):
        scoring(i, h)
    by_address = {n.address: h for n, h in zip(nodes, hospitals, strict=True)}

    async def run_all() -> None:
        await asyncio.gather(
            *(h.run_rounds(MemoryTransport(by_address, h.identity)) for h in hospitals)
        )

    try:
        asyncio.run(run_all())
    finally:
        for h in hospitals:
            h.audit.close()
    if np.isnan(aucs).any():
        raise RuntimeError(f"{int(np.isnan(aucs).sum())} node-rounds did not finish")
    sent = sum(h.state.bytes_sent for h in hospitals)
    return aucs.mean(axis=0), sent / args.rounds


def rounds_to_reach(curve: np.ndarray, bar: float) -> int | None:
    hits = np.nonzero(curve >= bar - 1e-12)[0]
    return int(hits[0]) + 1 if len(hits) else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--nodes", type=int, default=64)
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--local-epochs", type=int, default=1)
    parser.add_argument("--model", default="logreg")
    args = parser.parse_args()
    logging.disable(logging.WARNING)  # 64 nodes' small-split warnings
    curves: dict[str, list[np.ndarray]] = {name: [] for name in SETTINGS}
    bytes_per_round: dict[str, list[float]] = {name: [] for name in SETTINGS}
    started = time.monotonic()
    base = Path("/dev/shm") if Path("/dev/shm").is_dir() else None
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
                curve, per_round = run_network(argv, Path(tmp))
            curves[name].append(curve)
            bytes_per_round[name].append(per_round)
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
        f"{args.nodes} hospitals, embedded data, Dirichlet alpha={args.alpha}, logreg, no DP, "
        f"mean, {args.rounds} rounds, {args.seeds} seeds; mean over nodes of the whole-test AUC"
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
    print("asynchronous gossip: not built (async_time_ratio, async_auc_gap: null)")
    print(
        json.dumps(
            {
                "epidemic_round_ratio": None if ratio is None else round(ratio, 3),
                "async_time_ratio": None,
                "async_auc_gap": None,
            }
        )
    )


if __name__ == "__main__":
    main()
