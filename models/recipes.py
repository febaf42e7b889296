"""The default training recipe of each data set: model, optimizer, schedule, rounds.

run_cluster.py fills every option the user left out from here, for the network and for the
pooled and local-only baselines alike, so a comparison always uses one recipe. The tabular
recipes are the ones murmur always had (logistic regression, SGD at lr 0.5, 20 rounds of one
epoch). The image recipe was chosen by measurement on PneumoniaMNIST's official validation
split, which MedMNIST cut from the source training set, never on its test split
(`bench/image_recipe.py`; the runs are in docs/models.md).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Recipe:
    model: str
    learning_rate: float
    optimizer: str = "sgd"
    momentum: float = 0.0
    augment: str = "none"
    lr_schedule: str = "constant"
    rounds: int = 20
    local_epochs: int = 1
    batch_size: int = 32


_TABULAR = Recipe(model="logreg", learning_rate=0.5)

RECIPES: dict[str, Recipe] = {
    "breast-cancer": _TABULAR,
    "heart-disease": _TABULAR,
    "csv": _TABULAR,
    # Linear Cox model (models/survival.py), plain SGD at 0.5: bench/survival.py sets its own.
    "tcga-brca": Recipe(model="cox", learning_rate=0.5),
    # GroupNorm CNN, Adam at 0.005 with cosine decay, 20 rounds of one epoch, no augmentation
    # (random shifts lowered the validation AUC: docs/models.md).
    "medmnist": Recipe(
        model="cnn_gn",
        learning_rate=0.005,
        optimizer="adam",
        lr_schedule="cosine",
        rounds=20,
        local_epochs=1,
    ),
}

# Under DP-SGD a recipe may differ (noise favours other rates and fewer steps); chosen the
# same way, at ε = 3 (docs/models.md, "Under DP").
DP_RECIPES: dict[str, Recipe] = {
    # Logistic regression on the raw pixels, SGD at 1.0 with cosine decay, 20 rounds of one
    # epoch: 785 parameters pay far less noise than the CNN's ~25,000, and on the validation
    # split it beat every CNN recipe tried under DP (0.975-0.978 against 0.889 at best), run
    # after run (docs/models.md, "Under DP").
    "medmnist": Recipe(
        model="logreg",
        learning_rate=1.0,
        lr_schedule="cosine",
        rounds=20,
        local_epochs=1,
    ),
}

# Learning rates for a model named explicitly with a recipe built for another (e.g. --model
# mlp on images): the rates murmur used before recipes existed.
MODEL_LEARNING_RATES: dict[str, float] = {
    "logreg": 0.5,
    "mlp": 0.2,
    "cnn": 0.2,
    "cnn_gn": 0.005,
    "multimodal": 0.2,
    "cox": 0.5,
    "resnet18": 0.001,
    "resnet18_25m": 0.001,
}


def recipe_for(dataset: str, model: str | None = None, *, private: bool = False) -> Recipe:
    """The data set's recipe (its DP-SGD variant when ``private``); with another ``model`` than
    its own, that model's learning rate with plain SGD, no augmentation, 20 rounds of one
    epoch (murmur's defaults before recipes)."""
    recipe = (DP_RECIPES if private else RECIPES).get(dataset) or RECIPES.get(dataset, _TABULAR)
    if model is None or model == recipe.model:
        return recipe
    return Recipe(model=model, learning_rate=MODEL_LEARNING_RATES.get(model, 0.05))
