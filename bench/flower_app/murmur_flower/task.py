"""What the Flower ServerApp and ClientApp share with a murmur node: data, model, training.

Everything here comes from murmur's own models/ package, so both frameworks train the same
MLP from the same initial weights on the same per-hospital splits with the same local
training code (LocalTrainer, no DP); only the federation around it differs.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from murmur.models.data import HospitalSplit, load_dataset
from murmur.models.nets import build_model
from murmur.models.training import LocalTrainer, TrainingSettings

HIDDEN = (64, 32)  # murmur's default [model] hidden for "mlp" (node/config.py)


@functools.lru_cache(maxsize=8)
def hospital(dataset: str, num_hospitals: int, seed: int, index: int) -> HospitalSplit:
    """One hospital's split, loaded once per process (as a murmur node loads it once)."""
    splits = load_dataset(dataset, num_hospitals=num_hospitals, seed=seed)
    return splits[index]


def build_mlp(split: HospitalSplit, seed: int) -> torch.nn.Module:
    """The MLP every murmur node starts from: same architecture, same seed, same weights."""
    return build_model("mlp", tuple(split.x_train.shape[1:]), seed, hidden=HIDDEN)


def stable_int(text: str) -> int:
    """The per-node seed offset murmur's node uses (node.study.stable_int)."""
    return int.from_bytes(text.encode()[:4].ljust(4, b"\0"), "little") % 10_000


def make_trainer(
    model: torch.nn.Module, split: HospitalSplit, config: dict[str, Any], server_round: int
) -> LocalTrainer:
    """A LocalTrainer with murmur's node settings. A ClientApp keeps no state between rounds,
    so the batch-sampling seed moves on with the round instead of continuing one stream."""
    settings = TrainingSettings(
        batch_size=int(config["batch-size"]),
        learning_rate=float(config["learning-rate"]),
        local_epochs=int(config["local-epochs"]),
        seed=int(config["seed"]) + stable_int(split.name) + 7919 * server_round,
    )
    return LocalTrainer(model, split.x_train, split.y_train, settings)
