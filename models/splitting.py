"""The train/test split scikit-learn's ``train_test_split`` makes, without importing scikit-learn.

Why this exists: importing scikit-learn costs every node process about 0.8 s of CPU and
74 MB resident (measured, docs/performance.md), and a node needs nothing else from it: its
clinical metrics are computed in numpy (models/metrics.py). The split must stay exactly
scikit-learn's, row for row, because published results (FLamby's Fed-Heart-Disease split,
docs/results.md, docs/robustness.md) are defined by it; tests/test_splitting.py compares the
two over hundreds of sizes, seeds and label mixes, so a change on either side is caught.

The algorithm is scikit-learn's ShuffleSplit / StratifiedShuffleSplit (one split): sizes are
``ceil(test_size * n)`` and ``floor(train_size * n)`` (train defaults to the rest); without
strata the rows are one ``RandomState(seed).permutation``; with strata each class gets its
share by largest remainders (ties drawn at random), then each class's rows are permuted.
"""

from __future__ import annotations

import math

import numpy as np


def train_test_rows(
    n: int,
    *,
    test_size: float,
    seed: int,
    train_size: float | None = None,
    stratify: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Sorted row positions ``(train, test)`` of ``n`` rows, as
    ``train_test_split(np.arange(n), test_size=..., train_size=..., random_state=seed,
    stratify=...)`` would choose them."""
    n_test = math.ceil(test_size * n)
    n_train = math.floor(train_size * n) if train_size is not None else n - n_test
    if n_test < 1 or n_train < 1 or n_train + n_test > n:
        raise ValueError(
            f"cannot split {n} rows into {n_train} train and {n_test} test rows: "
            "use more rows or a test fraction nearer 0.5"
        )
    rng = np.random.RandomState(seed)
    if stratify is None:
        order = rng.permutation(n)
        return np.sort(order[n_test : n_test + n_train]), np.sort(order[:n_test])

    labels = np.asarray(stratify)
    if labels.shape != (n,):
        raise ValueError(f"stratify needs one label per row ({n}), got shape {labels.shape}")
    classes, class_of_row = np.unique(labels, return_inverse=True)
    class_counts = np.bincount(class_of_row)
    if class_counts.min() < 2:
        raise ValueError("every class needs at least 2 rows to stratify; pass stratify=None")
    if n_train < len(classes) or n_test < len(classes):
        raise ValueError(
            f"{n_train} train / {n_test} test rows cannot hold all {len(classes)} classes"
        )
    rows_of_class = np.split(
        np.argsort(class_of_row, kind="mergesort"), np.cumsum(class_counts)[:-1]
    )
    train_per_class = _share_draws(class_counts, n_train, rng)
    test_per_class = _share_draws(class_counts - train_per_class, n_test, rng)
    train: list[np.ndarray] = []
    test: list[np.ndarray] = []
    for rows, count, n_tr, n_te in zip(
        rows_of_class, class_counts, train_per_class, test_per_class, strict=True
    ):
        shuffled = rows[rng.permutation(count)]
        train.append(shuffled[:n_tr])
        test.append(shuffled[n_tr : n_tr + n_te])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def _share_draws(counts: np.ndarray, draws: int, rng: np.random.RandomState) -> np.ndarray:
    """Split ``draws`` across classes in proportion to ``counts``: the floors first, then one
    more for each of the largest remainders, choosing at random among equal remainders."""
    exact = counts / counts.sum() * draws
    shares = np.floor(exact)
    missing = int(draws - shares.sum())
    remainder = exact - shares
    for value in np.unique(remainder)[::-1]:
        if missing <= 0:
            break
        (tied,) = np.where(remainder == value)
        take = min(len(tied), missing)
        shares[rng.choice(tied, size=take, replace=False)] += 1
        missing -= take
    return shares.astype(int)
