"""The breast-cancer data set: scikit-learn's bundled Wisconsin diagnostic data, partitioned
across N simulated hospitals (IID or Dirichlet label skew), and its public reference constants.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import numpy as np
from murmur.models.data import HospitalSplit, split_across_hospitals, split_hospital

log = logging.getLogger(__name__)


_BREAST_CANCER_MEASURES = (
    "radius", "texture", "perimeter", "area", "smoothness",
    "compactness", "concavity", "concave points", "symmetry", "fractal dimension",
)  # fmt: skip
# The column names load_breast_cancer() gives, in its order (tests/test_data.py checks).
BREAST_CANCER_FEATURES: tuple[str, ...] = (
    tuple(f"mean {m}" for m in _BREAST_CANCER_MEASURES)
    + tuple(f"{m} error" for m in _BREAST_CANCER_MEASURES)
    + tuple(f"worst {m}" for m in _BREAST_CANCER_MEASURES)
)


def _breast_cancer_arrays() -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """scikit-learn's copy of the Wisconsin data, relabelled so that 1 = malignant (disease).

    Read straight from the CSV file scikit-learn ships (what load_breast_cancer() parses),
    so a node does not import scikit-learn (0.8 s, 74 MB: models/splitting.py); falls back
    to load_breast_cancer() if a scikit-learn release moves the file.
    """
    spec = importlib.util.find_spec("sklearn")  # finds the package without importing it
    locations = list(spec.submodule_search_locations or []) if spec else []
    csv_file = Path(locations[0], "datasets", "data", "breast_cancer.csv") if locations else None
    if csv_file is not None and csv_file.is_file():
        # First line: "569,30,malignant,benign"; then 30 features and the target per row.
        raw = np.loadtxt(csv_file, delimiter=",", skiprows=1)
        x, target, names = raw[:, :-1], raw[:, -1].astype(int), BREAST_CANCER_FEATURES
    else:
        from sklearn.datasets import load_breast_cancer

        bunch = load_breast_cancer()
        x, target, names = bunch.data, bunch.target, tuple(str(n) for n in bunch.feature_names)
    malignant = (target == 0).astype(np.float32)  # sklearn codes malignant as 0
    return x.astype(np.float64), malignant, names


# The "Summary Statistics" (min, max) of each feature, copied from the dataset's documentation
# (scikit-learn's breast_cancer.rst, from UCI's wdbc.names), in BREAST_CANCER_FEATURES' order.
# Honest provenance: that table was computed over all 569 patients of this public benchmark,
# the ones murmur trains on included. What DP needs holds: the constants are fixed, so they
# are the same whether or not any one patient is in a hospital's training rows. They are not
# independent of this benchmark's patients; a real deployment takes such ranges from the
# literature or a consortium's data dictionary (the csv reference file).
_BREAST_CANCER_RANGES: tuple[tuple[float, float], ...] = (
    (6.981, 28.11), (9.71, 39.28), (43.79, 188.5), (143.5, 2501.0), (0.053, 0.163),
    (0.019, 0.345), (0.0, 0.427), (0.0, 0.201), (0.106, 0.304), (0.05, 0.097),
    (0.112, 2.873), (0.36, 4.885), (0.757, 21.98), (6.802, 542.2), (0.002, 0.031),
    (0.002, 0.135), (0.0, 0.396), (0.0, 0.053), (0.008, 0.079), (0.001, 0.03),
    (7.93, 36.04), (12.02, 49.54), (50.41, 251.2), (185.2, 4254.0), (0.071, 0.223),
    (0.027, 1.058), (0.0, 1.252), (0.0, 0.291), (0.156, 0.664), (0.055, 0.208),
)  # fmt: skip


def breast_cancer_reference() -> tuple[np.ndarray, np.ndarray]:
    """(centers, scales): the documented range's midpoint, and range / 6.

    range / 6 estimates a standard deviation from a range for samples of a few hundred
    (Hozo, Djulbegovic & Hozo 2005, BMC Med Res Methodol 5:13), so features land on roughly
    the z-score scale fitted preprocessing gives, without fitting anything. Chosen a priori,
    not tuned.
    """
    ranges = np.array(_BREAST_CANCER_RANGES, dtype=np.float64)
    return ranges.mean(axis=1), (ranges[:, 1] - ranges[:, 0]) / 6.0


def load_breast_cancer(
    num_hospitals: int, seed: int, alpha: float | None, test_fraction: float, preprocessing: str
) -> list[HospitalSplit]:
    x, y, names = _breast_cancer_arrays()
    rng = np.random.default_rng(seed)
    parts = split_across_hospitals(y, num_hospitals, rng, alpha=alpha)
    reference = breast_cancer_reference() if preprocessing == "reference" else None
    return [
        split_hospital(
            f"hospital_{i}",
            x[rows],
            y[rows],
            test_fraction=test_fraction,
            seed=seed,
            feature_names=names,
            reference=reference,
        )
        for i, rows in enumerate(parts)
    ]
