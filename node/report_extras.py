"""Report parts beyond each node's own split: the whole test split, and personalized models.

A hospital's share of a public benchmark's test split can be tiny (39 PneumoniaMNIST images
with a Dirichlet split), so its AUC moves by several points per image. run_cluster therefore
also scores each hospital's final shared model on every hospital's test rows together, which
for medmnist is the whole official test split (624 images). That is a simulation-only view:
in a real deployment no one holds the other hospitals' test rows. It reads each node's final
checkpoint from its state directory and its data exactly as the node loads it.

`personal_rows` lays out the shared and the personalized model's metrics side by side for the
report (models/personal.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

PERSONAL_FIELDS: tuple[str, ...] = ("auc", "accuracy", "sensitivity", "specificity", "brier")


def whole_test_auc(config_paths: Sequence[Path]) -> dict[str, float | None]:
    """node name -> AUC of its final checkpointed model on all nodes' test rows together."""
    from murmur.models.metrics import roc_auc
    from murmur.models.nets import build_model
    from murmur.models.params import set_state
    from murmur.models.training import predict_proba
    from murmur.node.checkpoint import checkpoint_path, decode_checkpoint
    from murmur.node.config import load_config
    from murmur.node.study import load_splits

    results: dict[str, float | None] = {}
    cache: dict[tuple[Any, ...], tuple[np.ndarray, np.ndarray]] = {}
    for path in config_paths:
        config = load_config(path)
        d = config.data
        preprocessing = d.resolved_preprocessing(config.privacy.enabled)
        key = (d.dataset, str(d.path), d.num_hospitals, d.seed, d.alpha, preprocessing)
        if key not in cache:
            splits = load_splits(config)
            cache[key] = (
                np.concatenate([s.x_test for s in splits]),
                np.concatenate([s.y_test for s in splits]),
            )
        x_test, y_test = cache[key]
        ckpt_file = checkpoint_path(config.node.state_dir)
        if not ckpt_file.exists():
            results[config.node.name] = None
            continue
        ckpt = decode_checkpoint(ckpt_file.read_bytes(), str(ckpt_file))
        params = {"hidden": tuple(config.model.hidden)} if config.model.name == "mlp" else {}
        model = build_model(config.model.name, x_test.shape[1:], config.training.seed, **params)
        set_state(model, ckpt.model_state)
        results[config.node.name] = roc_auc(y_test, predict_proba(model, x_test))
    return results


def personal_rows(hospitals: Sequence[dict[str, Any]]) -> list[tuple[Any, ...]]:
    """(hospital, shared AUC, personal AUC, shared accuracy, personal accuracy) per hospital
    that kept a personalized model; empty when none did."""
    rows = []
    for h in hospitals:
        personal = h.get("personal") or {}
        if not personal:
            continue
        rows.append(
            (
                h["name"],
                h.get("auc"),
                personal.get("auc"),
                h.get("accuracy"),
                personal.get("accuracy"),
            )
        )
    return rows


PERSONAL_HEADINGS: tuple[str, ...] = (
    "hospital",
    "shared AUC",
    "personal AUC",
    "shared accuracy",
    "personal accuracy",
)
