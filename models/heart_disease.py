"""The heart-disease data set: FLamby's Fed-Heart-Disease, the four real UCI centres with
FLamby's exact preprocessing and split, and its public reference constants.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
from murmur.models.csv_data import csv_lines, parse_number
from murmur.models.data import (
    DataError,
    HospitalSplit,
    scale_with_reference,
    standardise_with_train,
    warn_missing_classes,
)
from murmur.models.splitting import train_test_rows

log = logging.getLogger(__name__)


# Fed-Heart-Disease, as FLamby builds it (owkin/FLamby, flamby/datasets/fed_heart_disease).
HEART_CENTRES: dict[str, str] = {
    "cleveland": "processed.cleveland.data",
    "hungary": "processed.hungarian.data",
    "switzerland": "processed.switzerland.data",
    "va": "processed.va.data",
}
HEART_TRAIN_SIZE = 0.66
HEART_SPLIT_SEED = 43
_HEART_RAW_COLUMNS = (
    "age", "sex", "cp", "trestbps", "chol", "fbs", "restecg",
    "thalach", "exang", "oldpeak", "slope", "ca", "thal", "num",
)  # fmt: skip
_HEART_DROPPED = ("slope", "ca", "thal")
_HEART_NUMERIC = ("age", "sex", "trestbps", "chol", "fbs", "thalach", "exang", "oldpeak")
# One-hot with drop-first; the category codes come from the UCI data dictionary, not the data.
_HEART_CATEGORIES = {"cp": (1.0, 2.0, 3.0, 4.0), "restecg": (0.0, 1.0, 2.0)}
_HEART_ONE_HOT = {column: codes[1:] for column, codes in _HEART_CATEGORIES.items()}


# Clinical reference points for the numeric Fed-Heart-Disease features, (center, scale) in the
# UCI units, from guidelines and textbook physiology, not from any patient of this data set:
# - age: 50 years, per decade (10).
# - trestbps, resting systolic pressure: 120 mm Hg, the upper limit of "normal" (ACC/AHA 2017
#   blood pressure guideline), per 20 mm Hg (120 to 140 spans elevated and stage 1).
# - chol, serum cholesterol: 200 mg/dl, the upper limit of "desirable" (NCEP ATP III), per
#   40 mg/dl (200 to 240 is "borderline high").
# - thalach, maximum heart rate on exercise: 150 bpm, near the age-predicted maximum
#   220 - age at 50 years (170) times the 85% at which a submaximal test counts as adequate,
#   per 20 bpm.
# - oldpeak, exercise ST depression: 1 mm, the conventional threshold of a positive exercise
#   ECG (ACC/AHA exercise testing guideline), per 1 mm.
# The 0/1 columns (sex, fbs, exang and the one-hot codes) map to -1/+1: center 0.5, scale 0.5.
_HEART_NUMERIC_REFERENCE = {
    "age": (50.0, 10.0),
    "trestbps": (120.0, 20.0),
    "chol": (200.0, 40.0),
    "thalach": (150.0, 20.0),
    "oldpeak": (1.0, 1.0),
}


def heart_disease_reference(feature_names: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
    """(centers, scales) for the 13 Fed-Heart-Disease features, from clinical constants only."""
    pairs = [_HEART_NUMERIC_REFERENCE.get(name, (0.5, 0.5)) for name in feature_names]
    return np.array([c for c, _ in pairs]), np.array([s for _, s in pairs])


def load_heart_disease(
    directory: str | os.PathLike[str], *, preprocessing: str = "fitted"
) -> list[HospitalSplit]:
    """Fed-Heart-Disease from the four UCI ``processed.*.data`` files, as FLamby builds it.

    Per centre: drop slope/ca/thal, drop rows still missing a value, label = (num > 0), one-hot
    cp and restecg with drop-first (13 features), split train_size 0.66 with random_state 43
    (stratified when each class has more than 2 rows), then z-score every column with that
    centre's train mean and std (ddof=1, as FLamby's torch ``std``); with
    ``preprocessing="reference"``, scale with `heart_disease_reference`'s clinical constants
    instead. FLamby's split is kept either way: it is the benchmark.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise DataError(f"heart-disease path {directory} is not a directory of UCI files")
    feature_names = _HEART_NUMERIC + tuple(
        f"{column}_{int(code)}" for column, codes in _HEART_ONE_HOT.items() for code in codes
    )
    splits = []
    for centre, filename in HEART_CENTRES.items():
        x, y = _read_heart_centre(directory / filename)
        labels = y.astype(int)
        classes, counts = np.unique(labels, return_counts=True)
        stratify = labels if len(classes) > 1 and counts.min() > 2 else None
        train, test = train_test_rows(  # sorted: FLamby keeps the file's row order
            len(y),
            train_size=HEART_TRAIN_SIZE,
            test_size=1 - HEART_TRAIN_SIZE,
            seed=HEART_SPLIT_SEED,
            stratify=stratify,
        )
        if preprocessing == "reference":
            constants = heart_disease_reference(feature_names)
            x_train, x_test = (scale_with_reference(x[rows], *constants) for rows in (train, test))
        else:
            x_train, x_test = standardise_with_train(x[train], x[test], ddof=1)
        split = HospitalSplit(centre, x_train, y[train], x_test, y[test], feature_names)
        warn_missing_classes(split)
        splits.append(split)
    return splits


def _read_heart_centre(file: Path) -> tuple[np.ndarray, np.ndarray]:
    if not file.is_file():
        raise DataError(
            f"missing {file}: the heart-disease directory needs the four UCI files "
            f"{', '.join(HEART_CENTRES.values())}"
        )
    rows = []
    for line_number, row in csv_lines(file):
        if not row:
            continue
        if len(row) != len(_HEART_RAW_COLUMNS):
            raise DataError(
                f"{file}:{line_number}: expected {len(_HEART_RAW_COLUMNS)} "
                f"comma-separated values, found {len(row)}"
            )
        record = dict(zip(_HEART_RAW_COLUMNS, (v.strip() for v in row), strict=True))
        for dropped in _HEART_DROPPED:
            del record[dropped]
        if "?" in record.values():
            continue  # FLamby drops every row that still has a missing value
        values = {k: parse_number(file, line_number, v) for k, v in record.items()}
        for column, codes in _HEART_CATEGORIES.items():
            if values[column] not in codes:
                raise DataError(
                    f"{file}:{line_number}: {column} = {values[column]:g} is not one of the "
                    f"UCI codes {[int(c) for c in codes]}"
                )
        rows.append(values)
    if not rows:
        raise DataError(f"{file} has no complete rows")
    numeric = np.array([[r[c] for c in _HEART_NUMERIC] for r in rows])
    dummies = np.array(
        [
            [float(r[c] == code) for c, codes in _HEART_ONE_HOT.items() for code in codes]
            for r in rows
        ]
    )
    y = np.array([float(r["num"] > 0) for r in rows], dtype=np.float32)
    return np.hstack([numeric, dummies]), y
