"""What a checkpoint is bound to: the configuration fields that decide privacy and the model.

Why: a checkpoint carries privacy budget already spent on one hospital's patients, by one
model, under one plan. Resuming it under another plan (a bigger epsilon, more rounds, other
rows) would spend a budget nobody approved, so those fields must not change. Everything else
in the config file -- peer addresses, comments, timeouts, trust tuning, logging -- is
operations, and an operator must be able to edit it without losing the deployment. Earlier
checkpoints bound the SHA-256 of the file's raw bytes, so even a comment blocked resuming.

The binding is a flat map from a dotted field name to a plain value, stored in the checkpoint
(docs/config.md, "What a checkpoint is bound to", lists the fields). A field this murmur binds
but an older checkpoint does not know is bound from the next checkpoint on.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from murmur.node.config import NodeConfig

# Deliberately not bound: peers (addresses, keys, degrees), node.listen, node.key_file's path,
# data.path and data.reference (the rows, scaled, are bound through the fingerprint, wherever
# the files live), learning rate, momentum, loss, class weighting and the other tuning of
# [training] (data-independent under DP), aggregation f, params and max_weight, and every field of
# [gossip], [audit], [evaluation], [trust], [adversary], [operator], [peer_listener], [logging].


@dataclass(frozen=True)
class BoundField:
    """One bound field: its dotted name, and what changing it would do, for the refusal."""

    name: str
    consequence: str
    # For a number: the direction in which it enlarges the privacy budget ("up"), if any.
    enlarges: str | None = None


BOUND_FIELDS: tuple[BoundField, ...] = (
    BoundField("node.name", "the node's name seeds its local training and names its records"),
    BoundField("node.public_key", "the checkpoint's rounds were signed by another key"),
    BoundField("data.dataset", "the budget was spent on another data set's rows"),
    BoundField("data.hospital", "the budget was spent on another hospital's rows"),
    BoundField("data.num_hospitals", "the split, and so the training rows, would change"),
    BoundField("data.seed", "the split, and so the training rows, would change"),
    BoundField("data.alpha", "the split, and so the training rows, would change"),
    BoundField("data.label", "the training rows' labels would change"),
    BoundField("data.site", "the split, and so the training rows, would change"),
    BoundField("data.test_fraction", "the split, and so the training rows, would change"),
    BoundField(
        "data.preprocessing", "the training rows' features would be scaled and imputed otherwise"
    ),
    BoundField(
        "data.fingerprint",
        "the hospital's training rows are not the ones the budget was spent on (the data "
        "file changed)",
    ),
    BoundField("model.name", "the checkpointed model has another architecture"),
    BoundField("model.hidden", "the checkpointed model has other layer sizes"),
    BoundField("training.rounds", "the privacy budget is spread over the planned rounds", "up"),
    BoundField("training.local_epochs", "each round would take more DP steps", "up"),
    BoundField("training.batch_size", "the DP sampling rate and steps per round would change"),
    BoundField("training.seed", "every node starts from the model this seed builds"),
    BoundField("training.optimizer", "the checkpoint holds another optimizer's state"),
    BoundField("privacy.enabled", "DP-SGD would be switched on or off mid-run", "down"),
    BoundField("privacy.epsilon", "the privacy budget would change", "up"),
    BoundField("privacy.delta", "the privacy budget would change", "up"),
    BoundField("privacy.max_grad_norm", "the DP noise was calibrated to this clipping bound"),
    BoundField("privacy.accountant", "the spend was accounted by another accountant"),
    BoundField("aggregation.rule", "the model was aggregated by another rule"),
    BoundField(
        "aggregation.weighting",
        "the model was mixed with other neighbour weights (Metropolis-Hastings or patients)",
    ),
    BoundField(
        "study.sha256",
        "the rounds so far belong to another study (another manifest hash), approved apart",
    ),
)
_BY_NAME = {f.name: f for f in BOUND_FIELDS}


def data_fingerprint(x_train: np.ndarray, y_train: np.ndarray) -> str:
    """SHA-256 of the hospital's training rows (shapes, dtypes and bytes): the patients the
    privacy budget is spent on. No row leaves the node; only this hash is stored."""
    digest = hashlib.sha256()
    for array in (np.ascontiguousarray(x_train), np.ascontiguousarray(y_train)):
        digest.update(f"{array.dtype.str}{array.shape};".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def config_binding(
    config: NodeConfig, *, public_key: bytes, fingerprint: str, delta: float | None
) -> dict[str, Any]:
    """The bound fields' values for this node. `delta` is the delta actually in force (the
    config's, or the default it resolves to), None without DP."""
    d, t, p = config.data, config.training, config.privacy
    dp = p.enabled
    values: dict[str, Any] = {
        "node.name": config.node.name,
        "node.public_key": public_key.hex(),
        "data.dataset": d.dataset,
        "data.hospital": d.hospital,
        "data.num_hospitals": d.num_hospitals,
        "data.seed": d.seed,
        "data.alpha": d.alpha,
        "data.label": d.label,
        "data.site": d.site,
        "data.test_fraction": d.test_fraction,
        "data.preprocessing": d.resolved_preprocessing(dp),
        "data.fingerprint": fingerprint,
        "model.name": config.model.name,
        "model.hidden": list(config.model.hidden) if config.model.name == "mlp" else None,
        "training.rounds": t.rounds,
        "training.local_epochs": t.local_epochs,
        "training.batch_size": t.batch_size,
        "training.seed": t.seed,
        "training.optimizer": t.optimizer,
        "privacy.enabled": dp,
        "privacy.epsilon": p.epsilon if dp else None,
        "privacy.delta": delta if dp else None,
        "privacy.max_grad_norm": p.max_grad_norm if dp else None,
        "privacy.accountant": p.accountant if dp else None,
        "aggregation.rule": config.aggregation.rule,
        "aggregation.weighting": config.aggregation.weighting,
        "study.sha256": config.study.sha256,  # the manifest's hash (node/studies/), or None
    }
    return values


def binding_problem(old: Mapping[str, Any], new: Mapping[str, Any], config_file: str) -> str | None:
    """Why a checkpoint bound to `old` must not resume under `new`, or None when it may.

    Every changed bound field is named with its old and new value and what the change would
    do; one that would enlarge the privacy budget says so first.
    """
    changed = [
        (name, old[name], new[name])
        for name in _BY_NAME
        if name in old and name in new and old[name] != new[name]
    ]
    if not changed:
        return None
    lines = []
    for name, before, after in changed:
        field = _BY_NAME[name]
        note = field.consequence
        if _enlarges(field, before, after):
            note = f"this would ENLARGE the privacy budget: {note}"
        lines.append(f"  {name}: {before!r} -> {after!r} ({note})")
    restore = "; ".join(
        f"{name} = {before!r}" if before is not None else f"no {name}"
        for name, before, _ in changed
        if name not in ("data.fingerprint", "node.public_key")
    )
    fixes = [f"put back {restore} in {config_file}"] if restore else []
    if any(name == "data.fingerprint" for name, _, _ in changed):
        fixes.append("point data.path at the exact file the node trained on")
    if any(name == "node.public_key" for name, _, _ in changed):
        fixes.append("point node.key_file at the key the node signed with")
    return (
        f"this checkpoint is bound to the configuration its privacy budget was spent under, "
        f"and {len(changed)} bound field{'s' if len(changed) != 1 else ''} changed:\n"
        + "\n".join(lines)
        + f"\nFix: {', and '.join(fixes)} to resume. Peer addresses, comments, timeouts and "
        "the other unbound fields may change freely (docs/config.md). Different values need a "
        "new deployment: a new state directory, with your data protection officer's approval; "
        "never delete this one to reset the budget."
    )


def _enlarges(field: BoundField, before: Any, after: Any) -> bool:
    if field.enlarges is None:
        return False
    if isinstance(before, bool) or isinstance(after, bool):
        return bool(before) and not bool(after) if field.enlarges == "down" else False
    if not isinstance(before, int | float) or not isinstance(after, int | float):
        return False
    return after > before if field.enlarges == "up" else after < before
