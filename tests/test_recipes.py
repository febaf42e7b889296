"""The image recipe's parts: augmentation, learning-rate schedule, per-dataset defaults."""

from __future__ import annotations

import math

import pytest
import torch
from murmur.models.augment import augment_batch, random_shift
from murmur.models.recipes import RECIPES, recipe_for
from murmur.models.training import LocalTrainer, TrainingSettings, learning_rate_at

import run_cluster


def test_a_shift_moves_each_image_by_its_own_offset_and_fills_with_zeros() -> None:
    x = torch.arange(2 * 5 * 5, dtype=torch.float32).reshape(2, 1, 5, 5) + 1
    out = random_shift(x, 1, torch.Generator().manual_seed(1))
    assert out.shape == x.shape
    for b in range(2):
        # every output is the input translated by some (dy, dx) in [-1, 1]^2, zeros shifted in
        matches = [
            (dy, dx)
            for dy in (-1, 0, 1)
            for dx in (-1, 0, 1)
            if torch.equal(out[b], _translate(x[b], dy, dx))
        ]
        assert len(matches) == 1
    assert (out == 0).any()  # at least one image moved (seeded): zeros came in


def _translate(img: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    padded = torch.nn.functional.pad(img, (1, 1, 1, 1))
    h, w = img.shape[-2:]
    return padded[:, 1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w]


def test_augmentation_none_is_the_identity_and_unknown_names_are_refused() -> None:
    x = torch.rand(3, 1, 8, 8)
    assert augment_batch(x, "none", torch.Generator()) is x
    with pytest.raises(ValueError, match="unknown augmentation"):
        augment_batch(x, "flip", torch.Generator())
    with pytest.raises(ValueError, match="needs images"):
        augment_batch(torch.rand(3, 13), "shift", torch.Generator())


def test_cosine_schedule_starts_at_the_rate_and_decays_over_the_planned_rounds() -> None:
    s = TrainingSettings(learning_rate=0.01, lr_schedule="cosine", schedule_rounds=10)
    assert learning_rate_at(s, 0) == pytest.approx(0.01)
    assert learning_rate_at(s, 5) == pytest.approx(0.005)
    assert learning_rate_at(s, 9) == pytest.approx(0.01 * 0.5 * (1 + math.cos(math.pi * 0.9)))
    assert learning_rate_at(TrainingSettings(learning_rate=0.3), 7) == 0.3
    with pytest.raises(ValueError, match="schedule_rounds"):
        TrainingSettings(lr_schedule="cosine")


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_the_trainer_applies_the_schedule_each_round(optimizer: str) -> None:
    model = torch.nn.Linear(2, 1)
    settings = TrainingSettings(
        learning_rate=0.1, optimizer=optimizer, lr_schedule="cosine", schedule_rounds=4
    )
    trainer = LocalTrainer(model, torch.randn(8, 2), (torch.rand(8) < 0.5).float(), settings)
    seen = []
    for _ in range(3):
        trainer.train_round()
        opt = trainer.optimizer
        seen.append(opt.lr if optimizer == "sgd" else opt.param_groups[0]["lr"])  # type: ignore[attr-defined]
    assert seen == pytest.approx([learning_rate_at(settings, r) for r in range(3)])


def test_tabular_defaults_are_unchanged_and_images_get_the_image_recipe() -> None:
    heart = run_cluster.parse_args(["--dataset", "heart-disease"])
    assert (heart.model, heart.lr, heart.rounds, heart.local_epochs) == ("logreg", 0.5, 20, 1)
    assert heart.batch_size == 32
    assert (heart.optimizer, heart.augment, heart.lr_schedule) == ("sgd", "none", "constant")
    images = run_cluster.parse_args(["--dataset", "medmnist", "--no-dp"])
    recipe = RECIPES["medmnist"]
    assert images.model == recipe.model == "cnn_gn"
    assert (images.lr, images.rounds, images.optimizer) == (
        recipe.learning_rate,
        recipe.rounds,
        recipe.optimizer,
    )
    private = run_cluster.parse_args(["--dataset", "medmnist", "--dp-epsilon", "3"])
    assert private.lr == recipe_for("medmnist", private=True).learning_rate
    assert run_cluster.parse_args(["--dp-epsilon", "3"]).lr == 0.5  # tabular: one recipe
    # an explicit option wins over the recipe; another model gets its own rate
    assert run_cluster.parse_args(["--dataset", "medmnist", "--rounds", "3"]).rounds == 3
    assert recipe_for("medmnist", "cnn").learning_rate == 0.2
