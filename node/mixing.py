"""Mixing weights proportional to each hospital's patient count, capped per neighbour.

Why: under DP-SGD a region with 40 training patients contributes a model that is mostly
noise (its averaged gradient's noise is sigma C / (q n), so it shrinks with n), yet
Metropolis-Hastings weights on a complete graph give it as much of every neighbour's model
as a region with 250. Weighting by patients (FedAvg's n_k / n) gives the noisy models the
least weight: +0.058 validation C-index on Fed-TCGA-BRCA at eps = 1 (docs/results.md).

Where the counts come from: `aggregation.patients` in the config, which a study's signed
manifest fixes field by field (node/studies/config.py), so every node uses the counts the
consortium approved. A peer never reports its own count in a message: a Byzantine peer that
claims more patients changes nothing, and a count the config does not give weighs 0.

Why the cap (`aggregation.max_weight`): with weights from counts, a hospital holding most of
the patients would also hold most of each neighbour's mixing weight. If it is Byzantine,
the mean hands it the result and self-centred clipping lets it move each neighbour by up to
``w_j * tau`` a round. Capping every neighbour at ``max_weight`` with ``f * max_weight < 1/2``
(checked in the config) keeps the f Byzantine neighbours the rule tolerates below half of
the weight together, whatever counts were agreed, which is what Metropolis-Hastings weights
give on a graph where every node has more than 2f neighbours. A capped share, like a missing
or distrusted neighbour's, stays with this node.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

METROPOLIS = "metropolis"
PATIENTS = "patients"
WEIGHTINGS = (METROPOLIS, PATIENTS)
DEFAULT_MAX_WEIGHT = 1.0 / 3.0


def patient_weights(
    own: str,
    heard: Sequence[str],
    counts: Mapping[str, int],
    trust: Sequence[float],
    max_weight: float,
) -> np.ndarray:
    """``[w_own, *w_j for j in heard]``: each heard neighbour's share of the patients of
    this node and the counted neighbours heard this round, capped at ``max_weight`` and scaled
    by its trust factor (0 in quarantine); the rest stays with this node. A neighbour with no
    count in ``counts`` weighs 0. Non-negative and summing to 1."""
    if own not in counts:
        raise ValueError(f"no patient count for this node {own!r}")
    if len(trust) != len(heard):
        raise ValueError(f"{len(heard)} neighbours but {len(trust)} trust factors")
    n = np.array([float(counts.get(name, 0)) for name in heard])
    share = n / (float(counts[own]) + n.sum())
    w = np.minimum(share, max_weight) * np.clip(np.asarray(trust, dtype=np.float64), 0.0, 1.0)
    return np.concatenate([[1.0 - w.sum()], w])


def uncounted(heard: Sequence[str], counts: Mapping[str, int]) -> list[str]:
    """The heard neighbours the config gives no patient count (weight 0), for the audit."""
    return [name for name in heard if name not in counts]
