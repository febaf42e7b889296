"""models/splitting.py picks exactly the rows scikit-learn's train_test_split picks."""

from __future__ import annotations

import numpy as np
import pytest
from murmur.models.splitting import train_test_rows
from sklearn.model_selection import train_test_split


def sklearn_rows(n, *, test_size, seed, train_size=None, stratify=None):
    train, test = train_test_split(
        np.arange(n),
        test_size=test_size,
        train_size=train_size,
        random_state=seed,
        stratify=stratify,
    )
    return np.sort(train), np.sort(test)


@pytest.mark.parametrize("n", [2, 3, 7, 10, 31, 100, 143, 569])
@pytest.mark.parametrize("test_size", [0.2, 0.25, 0.34, 0.5])
def test_unstratified_split_matches_scikit_learn(n: int, test_size: float) -> None:
    for seed in range(5):
        ours = train_test_rows(n, test_size=test_size, seed=seed)
        theirs = sklearn_rows(n, test_size=test_size, seed=seed)
        assert np.array_equal(ours[0], theirs[0]) and np.array_equal(ours[1], theirs[1])


def test_stratified_split_matches_scikit_learn_over_many_label_mixes() -> None:
    rng = np.random.default_rng(0)
    checked = 0
    for _ in range(300):
        n = int(rng.integers(8, 400))
        classes = int(rng.integers(2, 4))
        labels = rng.integers(0, classes, n).astype(float)
        if np.bincount(labels.astype(int), minlength=classes).min() < 2:
            continue
        test_size = float(rng.choice([0.2, 0.25, 0.3, 0.34]))
        seed = int(rng.integers(0, 2**31 - 1))
        try:
            theirs = sklearn_rows(n, test_size=test_size, seed=seed, stratify=labels)
        except ValueError:  # too few rows per class for scikit-learn too
            with pytest.raises(ValueError):
                train_test_rows(n, test_size=test_size, seed=seed, stratify=labels)
            continue
        ours = train_test_rows(n, test_size=test_size, seed=seed, stratify=labels)
        assert np.array_equal(ours[0], theirs[0]), (n, test_size, seed)
        assert np.array_equal(ours[1], theirs[1]), (n, test_size, seed)
        checked += 1
    assert checked > 200


def test_flamby_heart_disease_sizes_match_scikit_learn() -> None:
    """train_size=0.66, test_size=1 - 0.66 (floats that do not add up exactly), seed 43."""
    for n, positives in [(303, 139), (261, 98), (46, 42), (130, 99)]:  # the four centres
        labels = np.r_[np.ones(positives), np.zeros(n - positives)]
        np.random.default_rng(n).shuffle(labels)
        stratify = labels if min(positives, n - positives) > 2 else None
        ours = train_test_rows(n, train_size=0.66, test_size=1 - 0.66, seed=43, stratify=stratify)
        theirs = sklearn_rows(n, train_size=0.66, test_size=1 - 0.66, seed=43, stratify=stratify)
        assert np.array_equal(ours[0], theirs[0]) and np.array_equal(ours[1], theirs[1])


def test_impossible_splits_are_refused_with_the_reason() -> None:
    with pytest.raises(ValueError, match="cannot split 1 rows"):
        train_test_rows(1, test_size=0.25, seed=0)
    with pytest.raises(ValueError, match="at least 2 rows"):
        train_test_rows(5, test_size=0.4, seed=0, stratify=np.array([0, 0, 0, 0, 1.0]))
    with pytest.raises(ValueError, match="one label per row"):
        train_test_rows(5, test_size=0.4, seed=0, stratify=np.zeros(4))
