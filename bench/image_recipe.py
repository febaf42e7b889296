"""Choose the image recipe by measurement, on a validation split of the training data only.

An in-process stand-in for the gossip network (no processes, no crypto): N hospitals hold
murmur's IID or Dirichlet split of PneumoniaMNIST's official *train* images and train with
`models.training.LocalTrainer` exactly as a node does; each round every hospital starts from
the plain mean of the models (what the complete graph's Metropolis-Hastings weights give), or
with `--aggregator clipping` from its own self-centred clipping aggregate (f = 1, the nodes'
default rule); the score is then the mean of the hospitals' AUCs.
The score is the AUC on PneumoniaMNIST's official *val* split, which MedMNIST cut from the
source training set (9:1); the official test split is never read. `--pooled` trains one model
on all training images for the same number of epochs instead.

    python bench/image_recipe.py --model cnn_gn --optimizer adam --lr 0.002 --rounds 10
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from murmur.gossip.aggregation import clipping
from murmur.models.data import load_dataset, resolved_data_path
from murmur.models.metrics import roc_auc
from murmur.models.nets import build_model
from murmur.models.params import flatten, get_state, set_state, unflatten
from murmur.models.privacy import PrivacyLedger
from murmur.models.training import LocalTrainer, TrainingSettings, predict_proba


def validation_split() -> tuple[np.ndarray, np.ndarray]:
    with np.load(resolved_data_path("medmnist", None)) as archive:
        x = archive["val_images"][:, None].astype(np.float32) / 255.0
        y = archive["val_labels"].reshape(-1).astype(np.float32)
    return x, y


def attach_ledger(trainer: LocalTrainer, epsilon: float, rounds: int, clip: float) -> None:
    """DP-SGD for ``trainer`` as a node plans it: ``epsilon`` (default delta) over ``rounds``
    rounds of its steps, clipping at ``clip``."""
    trainer.ledger = PrivacyLedger.plan(
        epsilon=epsilon,
        delta=None,
        n_patients=len(trainer.y),
        sample_rate=trainer.sample_rate(),
        planned_steps=trainer.steps_per_round() * rounds,
        max_grad_norm=clip,
    )


def settings_from(args: argparse.Namespace, seed: int) -> TrainingSettings:
    return TrainingSettings(
        batch_size=args.batch_size,
        learning_rate=args.lr,
        local_epochs=args.local_epochs,
        optimizer=args.optimizer,
        momentum=args.momentum,
        augment=args.augment,
        lr_schedule=args.schedule,
        schedule_rounds=args.rounds,
        class_weighting="none" if args.dp_epsilon else "auto",
        seed=seed,
    )


def mix(models: np.ndarray, aggregator: str) -> np.ndarray:
    """Each hospital's aggregate on the complete graph (equal weights): the plain mean, or
    the node's default rule, self-centred clipping with f = 1 (gossip/aggregation.py)."""
    n = len(models)
    weights = np.full(n, 1.0 / n)
    if aggregator == "mean":
        return np.repeat(models.mean(axis=0, keepdims=True), n, axis=0)
    return np.stack(
        [clipping(models[i], np.delete(models, i, axis=0), weights, f=1) for i in range(n)]
    )


def run(args: argparse.Namespace) -> list[float]:
    torch.set_num_threads(1)
    splits = load_dataset("medmnist", num_hospitals=args.nodes, seed=args.seed, alpha=args.alpha)
    if args.pooled:
        x = np.concatenate([s.x_train for s in splits])
        y = np.concatenate([s.y_train for s in splits])
        parts = [(x, y)]
    else:
        parts = [(s.x_train, s.y_train) for s in splits]
    x_val, y_val = validation_split()
    params = {"width": args.width} if args.width else {}
    model = build_model(args.model, (1, 28, 28), args.seed, **params)
    models = [build_model(args.model, (1, 28, 28), args.seed, **params) for _ in parts]
    trainers = []
    for i, ((x, y), m) in enumerate(zip(parts, models, strict=True)):
        trainer = LocalTrainer(m, x, y, settings_from(args, args.seed + i))
        if args.dp_epsilon:
            attach_ledger(trainer, args.dp_epsilon, args.rounds, args.clip)
        trainers.append(trainer)
    aucs = []
    start = time.monotonic()
    starts = [get_state(model) for _ in trainers]
    for r in range(1, args.rounds + 1):
        flat = []
        for trainer, begin in zip(trainers, starts, strict=True):
            set_state(trainer.model, begin)
            trainer.train_round(begin)
            flat.append(flatten(get_state(trainer.model)))
        starts = [unflatten(v, starts[0]) for v in mix(np.stack(flat), args.aggregator)]
        scores = []
        for state in starts:  # each hospital's model, as run_cluster reports them
            set_state(model, state)
            scores.append(roc_auc(y_val, predict_proba(model, x_val)))
        auc = float(np.mean(scores))
        aucs.append(auc)
        print(f"round {r:3d}  val AUC {auc:.4f}  {time.monotonic() - start:6.1f}s", flush=True)
    return aucs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="cnn_gn")
    p.add_argument("--width", type=int, help="cnn_gn's first-stage channels (default 16)")
    p.add_argument("--optimizer", default="adam")
    p.add_argument("--lr", type=float, default=0.002)
    p.add_argument("--momentum", type=float, default=0.0)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--local-epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--augment", default="shift")
    p.add_argument("--schedule", default="cosine")
    p.add_argument("--nodes", type=int, default=4)
    p.add_argument("--alpha", type=float)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dp-epsilon", type=float, default=0.0, help="0: no DP")
    p.add_argument("--clip", type=float, default=1.0)
    p.add_argument("--pooled", action="store_true")
    p.add_argument(
        "--aggregator",
        default="mean",
        choices=["mean", "clipping"],
        help="the plain mean, or the nodes' default (self-centred clipping, f = 1)",
    )
    args = p.parse_args()
    aucs = run(args)
    print(json.dumps({"args": vars(args), "val_auc": aucs, "last": aucs[-1], "best": max(aucs)}))


if __name__ == "__main__":
    main()
