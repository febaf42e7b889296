"""Local-only and pooled baselines: the two numbers a federated result must be read against.

- **local**: each hospital trains alone on its own training rows. Federation is only worth its
  cost if it beats this.
- **pooled**: one model trained on every hospital's training rows together, as if the
  hospitals had shared their patients. This is the reference a data-sharing network would
  reach; federation tries to get close to it without moving the data.

Both use the same splits (`models.data.load_dataset`), model, optimiser settings and number of
epochs as the nodes (`rounds * local_epochs`), are trained without DP, and are evaluated the
way a node evaluates itself: on each hospital's own test split, at a threshold chosen on
that hospital's training rows with the model's own predictions. The majority-class baseline
is always that hospital's own training majority, so it is the same constant model in every
row of the report.

When the network trained with DP, the same two are also trained **with DP-SGD at the same
budget** (`local_dp`, `pooled_dp`): each hospital alone spends the ε a node spends, and the
pooled model spends that ε over the pooled rows. Only these answer "did federating help, at
this privacy level": a DP federation read against non-DP baselines always looks worse.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from murmur.models.data import HospitalSplit, load_dataset
from murmur.models.metrics import (
    DP_DEFAULT_THRESHOLD,
    REPORTED_METRICS,
    SURVIVAL_METRICS,
    UNCERTAINTY_METRICS,
)
from murmur.models.nets import build_model
from murmur.models.privacy import DPConfig, PrivacyLedger
from murmur.models.training import LocalTrainer, TrainingSettings, evaluate


def run_baselines(
    dataset_kwargs: dict[str, Any],
    model_name: str,
    model_params: dict[str, Any],
    training: TrainingSettings,
    rounds: int,
    seed: int,
    dp: DPConfig | None = None,
) -> dict[str, dict[str, Any]]:
    """Train and evaluate both baselines; return `{"local": {...}, "pooled": {...}}`, plus
    `"local_dp"` and `"pooled_dp"` trained with DP-SGD at `dp`'s budget when `dp` is given.

    `dataset_kwargs` are the keyword arguments of `load_dataset`, including `name`
    (e.g. `{"name": "breast-cancer", "num_hospitals": 4, "seed": 0}`). Each baseline is
    `{"mean_auc": float | None, "hospitals": [entry per hospital]}` (docs/report.md).
    """
    if "name" not in dataset_kwargs:
        raise ValueError(
            "dataset_kwargs has no 'name'; fix: pass the load_dataset arguments including the "
            "dataset name, e.g. {'name': 'breast-cancer', 'num_hospitals': 4, 'seed': 0}"
        )
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1 (got {rounds}); fix: pass the run's planned rounds")
    splits = load_dataset(**dataset_kwargs)
    result = {
        "local": local_baseline(splits, model_name, model_params, training, rounds, seed),
        "pooled": pooled_baseline(splits, model_name, model_params, training, rounds, seed),
    }
    if splits[0].task == "classification":
        from murmur.models.reference import reference_baseline  # imports scikit-learn

        result["reference"] = reference_baseline(splits, seed)
    if dp is not None:
        # Trained as a DP node trains: on data scaled by the reference constants, never by
        # statistics of the training rows (docs/privacy.md, "What training computes from the
        # data"); the ledger makes the trainer's class weighting DP-safe by itself.
        private_splits = load_dataset(**{**dataset_kwargs, "preprocessing": "reference"})
        args = (private_splits, model_name, model_params, training, rounds, seed)
        result["local_dp"] = local_baseline(*args, dp=dp)
        result["pooled_dp"] = pooled_baseline(*args, dp=dp)
    return result


def local_baseline(
    splits: Sequence[HospitalSplit],
    model_name: str,
    model_params: dict[str, Any],
    training: TrainingSettings,
    rounds: int,
    seed: int,
    dp: DPConfig | None = None,
) -> dict[str, Any]:
    """Each hospital trains its own model on its own training rows only (with DP-SGD at
    `dp`'s budget when given, as its node would).

    A hospital whose training split holds one class has no local model: a classifier cannot
    be fitted to one class, and an AUC from whatever the optimiser left (measured: 0.33 to
    0.93 with the seed, Fed-Heart-Disease's Switzerland) would be noise. Its entry says so
    (`no_model`) and carries no metrics."""
    entries = []
    for split in splits:
        reason = no_local_model(split)
        if reason is not None:
            entries.append({"name": split.name, "auc": None, "no_model": reason})
            continue
        model = build_model(model_name, split.input_shape, seed, **model_params)
        _train(model, split.x_train, split.y_train, training, rounds, dp)
        entries.append(_evaluate(model, split, len(split.y_train), private=dp is not None))
    return _baseline(entries)


def no_local_model(split: HospitalSplit) -> str | None:
    """Why `split` cannot have a local classifier (one class in its training rows), or None."""
    if split.task != "classification":
        return None
    positives, n = int(split.y_train.sum()), len(split.y_train)
    if 0 < positives < n:
        return None
    which = "positive" if positives else "negative"
    return (
        f"its training split has one class ({n} patients, all {which}): no local model can "
        "be trained, so there is no local AUC to report"
    )


def pooled_baseline(
    splits: Sequence[HospitalSplit],
    model_name: str,
    model_params: dict[str, Any],
    training: TrainingSettings,
    rounds: int,
    seed: int,
    dp: DPConfig | None = None,
) -> dict[str, Any]:
    """One model on all hospitals' training rows together, evaluated at every hospital
    (with DP-SGD at `dp`'s budget over the pooled rows when given).

    Each hospital's features are used as its loader prepared them (standardised on its own
    training rows), which is what each hospital would contribute to a shared data set.
    An entry's `n_train` is the number of rows the pooled model was trained on.
    """
    shapes = {split.name: split.input_shape for split in splits}
    if len(set(shapes.values())) > 1:
        raise ValueError(
            f"hospitals have different feature shapes {shapes}, so their rows cannot be pooled; "
            "fix: give every hospital the same columns"
        )
    x = np.concatenate([split.x_train for split in splits])
    y = np.concatenate([split.y_train for split in splits])
    model = build_model(model_name, splits[0].input_shape, seed, **model_params)
    _train(model, x, y, training, rounds, dp)
    private = dp is not None
    return _baseline([_evaluate(model, split, len(y), private) for split in splits])


def _train(
    model: torch.nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    training: TrainingSettings,
    rounds: int,
    dp: DPConfig | None = None,
) -> None:
    """`rounds` rounds of `local_epochs` epochs, as a node would train alone: without DP, or
    with a ledger planned for the whole run at `dp`'s budget, exactly as a node plans its own.

    The FedProx term is switched off: it pulls towards a federated reference model, and a
    baseline has none.
    """
    settings = dataclasses.replace(training, fedprox_mu=0.0)
    trainer = LocalTrainer(model, x, y, settings, None)
    if dp is not None:
        trainer.ledger = PrivacyLedger.plan(
            epsilon=dp.epsilon,
            delta=dp.delta,
            n_patients=len(y),
            sample_rate=trainer.sample_rate(),
            planned_steps=trainer.steps_per_round() * rounds,
            max_grad_norm=dp.max_grad_norm,
            accountant=dp.accountant,
        )
    for _ in range(rounds):
        trainer.train_round()


def _evaluate(
    model: torch.nn.Module, split: HospitalSplit, n_train: int, private: bool
) -> dict[str, Any]:
    """The node's evaluation rule (`models.training.evaluate`): without DP a threshold from
    the hospital's training rows, with DP the fixed 0.5 a DP node uses; test on its own rows."""
    metrics = evaluate(
        model,
        split.x_train,
        split.y_train,
        split.x_test,
        split.y_test,
        DP_DEFAULT_THRESHOLD if private else None,
    )
    if split.task == "survival":
        scores = {field: metrics[field] for field in SURVIVAL_METRICS}
    else:
        fields = (*REPORTED_METRICS, *UNCERTAINTY_METRICS, "threshold")
        scores = {field: metrics[field] for field in fields}
    return {"name": split.name, **scores, "n_train": int(n_train), "n_test": len(split.y_test)}


def _baseline(entries: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean AUC (survival: mean C-index) over the hospitals where it is defined (None if
    nowhere), as for the nodes."""
    if entries and "c_index" in entries[0]:
        values = [e["c_index"] for e in entries if e["c_index"] is not None]
        return {"mean_c_index": float(np.mean(values)) if values else None, "hospitals": entries}
    aucs = [e.get("auc") for e in entries if e.get("auc") is not None]
    return {"mean_auc": float(np.mean(aucs)) if aucs else None, "hospitals": entries}
