"""Choose the Fed-Heart-Disease configuration on a validation split of the training rows.

FLamby's protocol fixes the split, the model (logistic regression), the loss (unweighted BCE)
and the metric (accuracy at 0.5); it leaves open how features are scaled and whether the
nodes' outer step is plain (FedAvg-like) or adaptive. bench/quality.py asks this module,
which holds out a stratified quarter of every centre's *training* rows (seeded, per FLamby
seed), trains on the rest in an in-process stand-in for the complete-graph network (each
round every centre starts from the plain mean of the models, then optionally takes the
server optimizer's step, as a node does), and keeps the candidate with the best mean
validation accuracy over the centres and the seeds. The test rows are never read.

    python bench/heart_select.py
"""

from __future__ import annotations

import json
import logging
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from murmur.models.data import load_dataset
from murmur.models.nets import build_model
from murmur.models.optimizers import ServerOptimizer, ServerOptimizerSettings
from murmur.models.params import flatten, get_state, set_state, unflatten
from murmur.models.training import LocalTrainer, TrainingSettings, predict_proba

SEEDS = (42, 43, 44, 45, 46)
ROUNDS = 20


@dataclass(frozen=True)
class Candidate:
    preprocessing: str  # "fitted" (per-centre z-scores) or "reference" (clinical constants)
    server_optimizer: str = "none"
    server_lr: float = 0.01

    def argv(self) -> list[str]:
        out = ["--preprocessing", self.preprocessing]
        if self.server_optimizer != "none":
            out += ["--server-optimizer", self.server_optimizer, "--server-lr", str(self.server_lr)]
        return out


CANDIDATES = (
    Candidate("fitted"),
    Candidate("reference"),
    Candidate("fitted", "yogi", 0.01),
    Candidate("reference", "yogi", 0.01),
    Candidate("fitted", "adam", 0.01),
    Candidate("reference", "adam", 0.01),
)


def _validation_split(y: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified: a quarter of each class (at least one row of a class with 2+ rows)."""
    rng = np.random.default_rng(seed)
    held = []
    for label in (0.0, 1.0):
        rows = np.flatnonzero(y == label)
        rng.shuffle(rows)
        k = len(rows) // 4 if len(rows) >= 4 else min(1, len(rows) - 1)
        held.extend(rows[:k].tolist())
    val = np.zeros(len(y), dtype=bool)
    val[held] = True
    return np.flatnonzero(~val), np.flatnonzero(val)


def validation_accuracy(candidate: Candidate, seed: int) -> float:
    torch.manual_seed(seed)
    splits = load_dataset("heart-disease", preprocessing=candidate.preprocessing)
    parts = []
    for s in splits:
        train, val = _validation_split(s.y_train, seed)
        parts.append((s.x_train[train], s.y_train[train], s.x_train[val], s.y_train[val]))
    shared = build_model("logreg", (splits[0].x_train.shape[1],), seed)
    settings = TrainingSettings(learning_rate=0.5, class_weights=(1.0, 1.0), seed=seed)
    trainers = [
        LocalTrainer(build_model("logreg", (x.shape[1],), seed), x, y, settings)
        for x, y, _, _ in parts
    ]
    server = (
        None
        if candidate.server_optimizer == "none"
        else ServerOptimizer(
            ServerOptimizerSettings(candidate.server_optimizer, candidate.server_lr)
        )
    )
    for _ in range(ROUNDS):
        start = get_state(shared)
        states = []
        for trainer in trainers:
            set_state(trainer.model, start)
            trainer.train_round(start)
            states.append(get_state(trainer.model))
        mean = {k: np.mean([st[k] for st in states], axis=0) for k in start}
        if server is not None:
            mean = unflatten(server.step(flatten(start), flatten(mean)), start)
        set_state(shared, mean)
    accuracies = []
    for _, _, x_val, y_val in parts:
        if len(y_val):
            predicted = predict_proba(shared, x_val) >= 0.5
            accuracies.append(float(np.mean(predicted == (y_val > 0.5))))
    return statistics.fmean(accuracies)


def choose(verbose: bool = True) -> Candidate:
    """The candidate with the best mean validation accuracy (ties: the earlier, simpler one)."""
    logging.getLogger("murmur.models.data").setLevel(logging.ERROR)  # Switzerland's one class, 30x
    scores = {}
    for candidate in CANDIDATES:
        scores[candidate] = statistics.fmean(validation_accuracy(candidate, s) for s in SEEDS)
        if verbose:
            print(f"  validation accuracy {scores[candidate]:.4f}  {' '.join(candidate.argv())}")
    best = max(CANDIDATES, key=lambda c: (scores[c], -CANDIDATES.index(c)))
    if verbose:
        print(f"  chosen: {' '.join(best.argv())}", flush=True)
    return best


if __name__ == "__main__":
    chosen = choose()
    print(json.dumps({"argv": chosen.argv()}))
