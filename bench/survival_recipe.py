"""Choose the Fed-TCGA-BRCA recipe by measurement, on validation splits of the training rows.

An in-process stand-in for the gossip network (no processes, no crypto), as
bench/image_recipe.py is for images: each of FLamby's six regions holds its *training*
patients only, cut 4/5 : 1/5 (seeded, per region) into fit and validation rows. Every round
each region trains with `models.training.LocalTrainer` from the shared model exactly as a node
does (DP-SGD with its own ledger under `--dp-epsilon`), each region averages the regions'
models with the complete graph's weights (equal, or with `--weighting patients` by training
patients, capped per neighbour by node/mixing.py as a node does), and with
`--server-optimizer` each region then steps its adaptive outer optimizer
(models/optimizers.py) on that mean, as a node does. The score is the mean over
regions of Harrell's C-index on their validation rows; FLamby's test splits are never read.

    python bench/survival_recipe.py --dp-epsilon 1 --lr 0.25 --rounds 20 --splits 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from murmur.models.data import load_dataset
from murmur.models.nets import build_model
from murmur.models.optimizers import ServerOptimizer, ServerOptimizerSettings
from murmur.models.params import flatten, get_state, set_state, unflatten
from murmur.models.survival import concordance_index, predict_risk
from murmur.models.training import LocalTrainer, TrainingSettings
from murmur.node.mixing import DEFAULT_MAX_WEIGHT, patient_weights

from bench.image_recipe import attach_ledger


def fit_and_validation(split_seed: int) -> list[tuple[np.ndarray, ...]]:
    """(x_fit, y_fit, x_val, y_val) per region, from its training rows only."""
    out = []
    for k, region in enumerate(load_dataset("tcga-brca", num_hospitals=6, seed=0)):
        rng = np.random.default_rng([split_seed, k])
        order = rng.permutation(len(region.y_train))
        cut = len(order) // 5
        val, fit = order[:cut], order[cut:]
        out.append(
            (region.x_train[fit], region.y_train[fit], region.x_train[val], region.y_train[val])
        )
    return out


def mixing_rows(counts: list[int], weighting: str, max_weight: float) -> np.ndarray:
    """The complete graph's mixing matrix as the nodes build it: row i is region i's weights
    on every region's model, equal (1/n) or by patients, capped (node/mixing.py)."""
    n = len(counts)
    if weighting == "equal":
        return np.full((n, n), 1.0 / n)
    names = [str(i) for i in range(n)]
    table = dict(zip(names, counts, strict=True))
    rows = np.zeros((n, n))
    for i, own in enumerate(names):
        others = [j for j in range(n) if j != i]
        w = patient_weights(own, [names[j] for j in others], table, [1.0] * (n - 1), max_weight)
        rows[i, i] = w[0]
        rows[i, others] = w[1:]
    return rows


def run(args: argparse.Namespace, split_seed: int, seed: int) -> float:
    torch.set_num_threads(1)
    regions = fit_and_validation(split_seed)
    settings = TrainingSettings(
        batch_size=args.batch_size,
        learning_rate=args.lr,
        local_epochs=args.local_epochs,
        momentum=args.momentum,
        seed=seed,
    )
    shared_model = build_model("cox", (regions[0][0].shape[1],), seed)
    trainers = []
    for i, (x, y, _, _) in enumerate(regions):
        trainer = LocalTrainer(
            build_model("cox", (x.shape[1],), seed),
            x,
            y,
            TrainingSettings(**{**vars(settings), "seed": seed + i}),
        )
        if args.dp_epsilon:
            attach_ledger(trainer, args.dp_epsilon, args.rounds, args.clip)
        trainers.append(trainer)
    outer = [
        ServerOptimizer(
            ServerOptimizerSettings(name=args.server_optimizer, learning_rate=args.server_lr)
        )
        if args.server_optimizer != "none"
        else None
        for _ in regions
    ]
    models = [get_state(shared_model) for _ in regions]
    mixing = mixing_rows([len(r[1]) for r in regions], args.weighting, args.max_weight)
    template = models[0]
    for _ in range(args.rounds):
        trained = []
        for trainer, start in zip(trainers, models, strict=True):
            set_state(trainer.model, start)
            trainer.train_round(start)
            trained.append(flatten(get_state(trainer.model)))
        means = mixing @ np.stack(trained)
        models = [
            unflatten(mean if opt is None else opt.step(flatten(start), mean), template)
            for opt, start, mean in zip(outer, models, means, strict=True)
        ]
    scores = []
    for trainer, state, (_, _, x_val, y_val) in zip(trainers, models, regions, strict=True):
        set_state(trainer.model, state)
        c = concordance_index(y_val[:, 0], predict_risk(trainer.model, x_val), y_val[:, 1])
        if c is not None:
            scores.append(c)
    return statistics.fmean(scores)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--lr", type=float, default=0.25)
    p.add_argument("--momentum", type=float, default=0.0)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--local-epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--dp-epsilon", type=float, default=0.0, help="0: no DP")
    p.add_argument("--clip", type=float, default=1.0)
    p.add_argument(
        "--server-optimizer", default="none", choices=["none", "adam", "yogi", "adagrad"]
    )
    p.add_argument("--server-lr", type=float, default=0.01)
    p.add_argument(
        "--weighting",
        default="equal",
        choices=["equal", "patients"],
        help="mean of the regions' models: equal weights, or by training patients (FedAvg), "
        "each other region capped at --max-weight as a node caps it",
    )
    p.add_argument(
        "--max-weight", type=float, default=DEFAULT_MAX_WEIGHT, help="the per-neighbour cap"
    )
    p.add_argument("--splits", type=int, default=3, help="validation splits (seeds 0..)")
    p.add_argument("--repeats", type=int, default=2, help="runs per split (fresh DP noise)")
    args = p.parse_args()
    scores = [run(args, split, 42 + r) for split in range(args.splits) for r in range(args.repeats)]
    mean, sd = statistics.fmean(scores), statistics.pstdev(scores)
    print(f"validation C-index {mean:.4f} ± {sd:.4f} over {len(scores)} runs")
    print(json.dumps({"args": vars(args), "val_c_index": scores, "mean": mean, "sd": sd}))


if __name__ == "__main__":
    main()
