"""The medmnist data set: a MedMNIST ``.npz`` (PneumoniaMNIST by default) partitioned across N
simulated hospitals, the official test images kept as the held-out rows.
"""

from __future__ import annotations

import logging
import os
import zipfile
from pathlib import Path

import numpy as np
from murmur.models.data import (
    DataError,
    HospitalSplit,
    dirichlet_proportions,
    split_across_hospitals,
    warn_missing_classes,
)

log = logging.getLogger(__name__)


def load_medmnist(
    npz_path: str | os.PathLike[str],
    *,
    num_hospitals: int = 4,
    seed: int = 0,
    alpha: float | None = None,
    positive: str | None = None,
) -> list[HospitalSplit]:
    """A binary MedMNIST ``.npz`` split across hospitals: images in [0, 1], shape (N, C, H, W).

    ``positive`` is the label code that means disease, "1" by default; give "0" for a set
    whose 1 means benign or normal (BreastMNIST: 0 = malignant), so that sensitivity and PPV
    describe the disease class.

    The official train images are partitioned into the hospitals' train rows and the official
    test images into their test rows, with the same Dirichlet draw for both so each hospital's
    test rows follow its own label mix. The official val images are not used.
    """
    npz_path = Path(npz_path)
    if not npz_path.is_file():
        raise DataError(f"MedMNIST file {npz_path} not found (expected e.g. pneumoniamnist.npz)")
    needed = ("train_images", "train_labels", "test_images", "test_labels")
    try:
        with np.load(npz_path) as archive:
            parts = {key: archive[key] for key in needed if key in archive.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
        raise DataError(f"{npz_path} is not a readable .npz file: {error}") from None
    absent = [key for key in needed if key not in parts]
    if absent:
        raise DataError(f"{npz_path} lacks {', '.join(absent)}: not a MedMNIST file")
    if positive not in (None, "0", "1"):
        raise DataError(f"MedMNIST positive must be the label code 0 or 1, got {positive!r}")
    x_train, y_train = _medmnist_images(parts["train_images"]), _medmnist_labels(parts, "train")
    x_test, y_test = _medmnist_images(parts["test_images"]), _medmnist_labels(parts, "test")
    if positive == "0":  # the set's 0 is the disease: make it murmur's class 1
        y_train, y_test = 1.0 - y_train, 1.0 - y_test
    rng = np.random.default_rng(seed)
    shares = None if alpha is None else dirichlet_proportions(2, num_hospitals, alpha, rng)
    train_parts = split_across_hospitals(y_train, num_hospitals, rng, proportions=shares)
    test_parts = split_across_hospitals(y_test, num_hospitals, rng, proportions=shares)
    splits = []
    for i, (train, test) in enumerate(zip(train_parts, test_parts, strict=True)):
        split = HospitalSplit(
            f"hospital_{i}",
            x_train[train].astype(np.float32) / 255.0,
            y_train[train],
            x_test[test].astype(np.float32) / 255.0,
            y_test[test],
        )
        warn_missing_classes(split)
        splits.append(split)
    return splits


def _medmnist_images(images: np.ndarray) -> np.ndarray:
    if images.ndim == 3:  # (N, H, W) grayscale
        return images[:, None]
    if images.ndim == 4:  # (N, H, W, C) colour
        return images.transpose(0, 3, 1, 2)
    raise DataError(f"MedMNIST images must be (N, H, W) or (N, H, W, C), got {images.shape}")


def _medmnist_labels(parts: dict[str, np.ndarray], which: str) -> np.ndarray:
    labels = parts[f"{which}_labels"].reshape(-1)
    if len(labels) != len(parts[f"{which}_images"]):
        raise DataError(
            f"MedMNIST {which}: {len(labels)} labels for {len(parts[f'{which}_images'])} images"
        )
    if not np.isin(labels, (0, 1)).all():
        raise DataError(
            f"MedMNIST {which} labels are {np.unique(labels)}: murmur's models are "
            "binary, use a binary subset such as pneumoniamnist or breastmnist"
        )
    return labels.astype(np.float32)
