"""Per-hospital datasets: every loader returns one seeded train/test split per hospital.

The rule that shapes this module: **nothing is computed across hospitals**. Every fitted
number (means, standard deviations, medians, modes) comes from one hospital's own training
rows and is applied only to that hospital's rows, exactly as it would be if each hospital ran
the loader on its own machine. Only the schema (column names, column types, the category
buckets below) is shared, and schema is what a consortium agrees on in its data dictionary.

Under DP even one hospital's own statistics are too much: a training mean moves when one
patient joins, and with it every other patient's features, which DP-SGD's per-patient clipping
does not cover. So `preprocessing="reference"` replaces every fitted number with a public,
data-independent constant (`ColumnReference`: built in for breast-cancer and heart-disease, a
reference file for csv), making each patient's features a function of that patient's row
alone; csv rows are then also split train/test one row at a time (`row_split_positions`), so
a new patient never moves another between the two. ``"fitted"`` is the default without DP.

Datasets (`DATASETS`), all through `load_dataset(name, ...)`:

- ``breast-cancer``: scikit-learn's bundled Wisconsin diagnostic data (569 real patients),
  partitioned across N simulated hospitals, IID or label-skewed with a Dirichlet(alpha).
- ``heart-disease``: FLamby's Fed-Heart-Disease, the four real UCI centres with FLamby's
  exact preprocessing and split.
- ``medmnist``: a MedMNIST ``.npz`` (PneumoniaMNIST by default) partitioned across N hospitals.
- ``csv``: any CSV file with a label column and a site column, or a directory with one CSV per
  hospital.
- ``tcga-brca``: FLamby's Fed-TCGA-BRCA, six real regions, survival labels (days, event)
  (models/tcga.py, models/survival.py).

docs/data.md lists the preprocessing, sizes and class balance of each.
"""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import logging
import math
import os
import zipfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from murmur.models.identifiers import identifier_columns
from murmur.models.splitting import train_test_rows
from murmur.models.vocabulary import (
    VocabularyError,
    indicator_names,
    one_hot,
    parse_categories,
    shared_vocabulary,
)

log = logging.getLogger(__name__)

DATASETS: tuple[str, ...] = ("breast-cancer", "heart-disease", "medmnist", "csv", "tcga-brca")
PREPROCESSING: tuple[str, ...] = ("fitted", "reference")
"""fitted: scale and impute with the hospital's own training statistics. reference: with public
constants only, so that no patient's features depend on another patient (required under DP)."""

# Where the real data lives: ../shared/data next to the repository (see its SOURCE.md files).
DATA_DIR_ENV = "MURMUR_DATA_DIR"
_DEFAULT_DATA_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data"
_DEFAULT_PATHS = {
    "heart-disease": Path("heart_disease"),
    "medmnist": Path("medmnist") / "pneumoniamnist.npz",
    "tcga-brca": Path("tcga_brca"),
}

# A simulated hospital never gets fewer rows than this (before its train/test split), so that
# even a strongly skewed Dirichlet partition leaves every hospital something to train and test.
MIN_ROWS_PER_HOSPITAL = 12

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

# CSV: what reads as a missing value. "." is SAS's, Stata's and R's (haven) missing code.
_MISSING_TOKENS = frozenset({"", "?", ".", "na", "n/a", "nan", "null", "none"})
_LABEL_WORDS = {
    "0": 0, "1": 1, "false": 0, "true": 1, "no": 0, "yes": 1,
    "negative": 0, "positive": 1, "neg": 0, "pos": 1,
}  # fmt: skip


class DataError(ValueError):
    """A dataset cannot be loaded as asked; the message names the problem and the fix."""


COLUMN_KINDS = ("numeric", "categorical")
REFERENCE_FIELDS = ("column", "kind", "center", "scale", "fill")
REFERENCE_CATEGORIES = "categories"  # the agreed values of a categorical column: yes|no|former


@dataclass(frozen=True)
class ColumnReference:
    """Public constants for one feature column: how it is read, scaled and imputed.

    A numeric value v becomes (v - center) / scale, a missing one `fill` (default: center,
    i.e. 0 after scaling). A categorical value becomes one indicator per value of
    `categories` (models/vocabulary.py), a missing one `fill` (default: no indicator). None of
    it is computed from patients, so one patient's features never depend on another's.
    """

    kind: str
    center: float = 0.0
    scale: float = 1.0
    fill: str = ""
    categories: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in COLUMN_KINDS:
            raise DataError(f"reference kind {self.kind!r}: use one of {', '.join(COLUMN_KINDS)}")
        if not (math.isfinite(self.center) and math.isfinite(self.scale) and self.scale > 0):
            raise DataError(
                f"reference center {self.center} and scale {self.scale} must be finite with "
                "scale > 0"
            )

    def numeric_fill(self) -> float:
        return self.center if self.fill == "" else float(self.fill)

    def category_fill(self) -> str | None:
        return self.fill or None


@dataclass
class HospitalSplit:
    """One hospital's data: float32 features, float32 labels, already preprocessed.

    Labels are 0/1 per patient (classification) or, for survival, two columns per patient,
    (days, event) (`models.survival`). ``feature_names`` names the columns of a tabular
    ``x`` (empty for images).
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    feature_names: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        for part in ("x_train", "y_train", "x_test", "y_test"):
            array = getattr(self, part)
            if not isinstance(array, np.ndarray) or array.dtype != np.float32:
                raise DataError(f"{self.name}: {part} must be a float32 numpy array")
        for x, y, part in (
            (self.x_train, self.y_train, "train"),
            (self.x_test, self.y_test, "test"),
        ):
            if y.ndim not in (1, 2) or len(x) != len(y):
                raise DataError(f"{self.name}: {part} has {len(x)} rows but labels {y.shape}")
            if y.ndim == 2:
                _check_survival(self.name, part, y)
            elif not np.isin(y, (0.0, 1.0)).all():
                raise DataError(f"{self.name}: {part} labels must be 0 or 1")
        if self.x_train.shape[1:] != self.x_test.shape[1:]:
            raise DataError(f"{self.name}: train and test rows have different shapes")

    @property
    def task(self) -> str:
        """ "survival" when the labels are (days, event), else "classification"."""
        return "survival" if self.y_train.ndim == 2 else "classification"

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one sample, e.g. ``(13,)`` or ``(1, 28, 28)``: what `build_model` needs."""
        return tuple(int(d) for d in self.x_train.shape[1:])

    def summary(self) -> dict[str, int | str]:
        """Sizes and class balance, for logs and docs (no patient-level data)."""
        if self.task == "survival":
            return {
                "name": self.name,
                "train": len(self.y_train),
                "train_events": int(self.y_train[:, 1].sum()),
                "test": len(self.y_test),
                "test_events": int(self.y_test[:, 1].sum()),
            }
        return {
            "name": self.name,
            "train": len(self.y_train),
            "train_positives": int(self.y_train.sum()),
            "test": len(self.y_test),
            "test_positives": int(self.y_test.sum()),
        }


def _check_survival(name: str, part: str, y: np.ndarray) -> None:
    from murmur.models.survival import check_survival_labels

    try:
        check_survival_labels(y, f"{part} labels")
    except ValueError as error:
        raise DataError(f"{name}: {error}") from None


def load_dataset(
    name: str,
    *,
    path: str | os.PathLike[str] | None = None,
    num_hospitals: int = 4,
    seed: int = 0,
    alpha: float | None = None,
    label: str | None = None,
    site: str | None = None,
    test_fraction: float = 0.25,
    preprocessing: str = "fitted",
    reference: str | os.PathLike[str] | None = None,
    positive: str | None = None,
    not_identifying: tuple[str, ...] = (),
) -> list[HospitalSplit]:
    """Load ``name`` and return one `HospitalSplit` per hospital, deterministic given ``seed``.

    ``preprocessing`` is one of `PREPROCESSING`; "reference" (what DP needs) uses the built-in
    constants of breast-cancer and heart-disease, nothing for medmnist (whose scaling is a
    constant anyway), and for csv the ``reference`` file (`read_reference`).

    tcga-brca (survival: labels are (days, event)) keeps FLamby's six regions and static
    split and scales by public constants only, so it ignores the partition arguments and
    ``preprocessing``.

    ``num_hospitals``, ``alpha`` (Dirichlet label skew; None = IID) and ``test_fraction`` apply
    to the simulated partitions (breast-cancer, medmnist). Datasets with real hospitals
    (heart-disease, csv) take their hospitals from the data and ignore ``num_hospitals``;
    heart-disease also keeps FLamby's fixed split (train 0.66, random_state 43) so results
    compare with FLamby, so it ignores ``seed`` and ``test_fraction``. MedMNIST keeps its
    official test images as the held-out rows, so it ignores ``test_fraction``.
    """
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}: use one of {', '.join(DATASETS)}")
    if isinstance(num_hospitals, bool) or not isinstance(num_hospitals, int) or num_hospitals < 1:
        raise DataError(f"num_hospitals must be an integer >= 1, got {num_hospitals!r}")
    if alpha is not None and not alpha > 0:
        raise DataError(f"alpha must be > 0 (or None for an IID split), got {alpha!r}")
    if not 0 < test_fraction < 1:
        raise DataError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
    if positive is not None and name not in ("csv", "medmnist"):
        raise DataError(
            f"positive (which label value means disease) only applies to csv and medmnist; "
            f"{name!r} defines its own labels: remove positive"
        )
    if not_identifying and name != "csv":
        raise DataError(f"not_identifying only applies to dataset 'csv', not {name!r}")
    if name != "csv" and (label is not None or site is not None):
        raise DataError(f"label/site columns only apply to dataset 'csv', not {name!r}")
    if alpha is not None and name in ("heart-disease", "csv", "tcga-brca"):
        raise DataError(
            f"{name!r} has real hospitals; alpha (label skew) only applies to "
            "simulated partitions (breast-cancer, medmnist): remove alpha"
        )
    if preprocessing not in PREPROCESSING:
        raise DataError(
            f"unknown preprocessing {preprocessing!r}: use one of {', '.join(PREPROCESSING)}"
        )
    if reference is not None and name != "csv":
        raise DataError(
            f"a reference file only applies to dataset 'csv'; {name!r} ships its own "
            "constants: remove reference"
        )

    if name == "breast-cancer":
        return _load_breast_cancer(num_hospitals, seed, alpha, test_fraction, preprocessing)
    if name == "heart-disease":
        return load_heart_disease(
            path if path is not None else default_data_path(name), preprocessing=preprocessing
        )
    if name == "tcga-brca":
        from murmur.models.tcga import load_tcga_brca

        return load_tcga_brca(path if path is not None else default_data_path(name))
    if name == "medmnist":
        npz = path if path is not None else default_data_path(name)
        return load_medmnist(
            npz, num_hospitals=num_hospitals, seed=seed, alpha=alpha, positive=positive
        )
    if path is None or label is None:
        raise DataError("dataset 'csv' needs path (a CSV file or a directory of CSVs) and label")
    if preprocessing == "reference" and reference is None:
        raise DataError(
            "csv with preprocessing 'reference' needs a reference file (columns "
            "column,kind,center,scale,fill from a public source, docs/data.md): pass reference="
        )
    columns = read_reference(reference) if preprocessing == "reference" else None
    return load_csv(
        path,
        label=label,
        site=site,
        seed=seed,
        test_fraction=test_fraction,
        reference=columns,
        positive=positive,
        not_identifying=tuple(not_identifying),
    )


EMBEDDED_DATA = "embedded: scikit-learn's breast cancer data (shipped with scikit-learn)"


def resolved_data_path(name: str, path: str | Path | None) -> str:
    """Where `load_dataset(name, path=path)` reads from, for reports: the path given, else the
    default location, or the embedded data set's description. Never raises."""
    if path is not None:
        return str(Path(path).resolve())
    if name in _DEFAULT_PATHS:
        try:
            return str(default_data_path(name).resolve())
        except DataError as err:
            return f"not found ({err})"
    return EMBEDDED_DATA if name == "breast-cancer" else "none"


def default_data_path(name: str) -> Path:
    """Where ``name``'s real data lives: $MURMUR_DATA_DIR, else ../shared/data by the repo."""
    if name not in _DEFAULT_PATHS:
        raise DataError(f"dataset {name!r} has no default location; pass path=...")
    root = Path(os.environ.get(DATA_DIR_ENV, _DEFAULT_DATA_DIR))
    candidate = root / _DEFAULT_PATHS[name]
    if not candidate.exists():
        raise DataError(
            f"{name} data not found: looked for {candidate}. Put the files there (see "
            f"shared/data/*/SOURCE.md), set {DATA_DIR_ENV}, or pass path=..."
        )
    return candidate


# --- Partitioning simulated hospitals -------------------------------------------------------


def split_across_hospitals(
    labels: np.ndarray,
    num_hospitals: int,
    rng: np.random.Generator,
    *,
    alpha: float | None = None,
    proportions: np.ndarray | None = None,
    min_rows: int = MIN_ROWS_PER_HOSPITAL,
) -> list[np.ndarray]:
    """Assign row indices to hospitals: IID (alpha None) or label-skewed.

    Label skew follows Hsu et al. 2019: for each class c a Dirichlet(alpha) vector says which
    share of class c each hospital gets (pass ``proportions``, shape (classes, hospitals), to
    reuse one draw, e.g. for a train and a test pool). To guarantee every hospital
    ``min_rows`` rows however small alpha is, ``min_rows`` rows per hospital are first dealt
    at random from the shuffled pool and only the rest follows the skew. Returns sorted
    index arrays, one per hospital.
    """
    n = len(labels)
    if n < num_hospitals * min_rows:
        raise DataError(
            f"{n} rows cannot give {num_hospitals} hospitals {min_rows} rows each: "
            "use fewer hospitals"
        )
    order = rng.permutation(n)
    if alpha is None and proportions is None:
        return [np.sort(part) for part in np.array_split(order, num_hospitals)]

    reserved, rest = order[: num_hospitals * min_rows], order[num_hospitals * min_rows :]
    parts = [list(reserved[i * min_rows : (i + 1) * min_rows]) for i in range(num_hospitals)]
    classes = np.unique(labels)
    if proportions is None:
        proportions = dirichlet_proportions(len(classes), num_hospitals, alpha, rng)
    for c, share in zip(classes, proportions, strict=True):
        rows = rest[labels[rest] == c]
        cuts = (np.cumsum(share)[:-1] * len(rows)).astype(int)
        for hospital, chunk in enumerate(np.split(rows, cuts)):
            parts[hospital].extend(chunk)
    return [np.sort(np.asarray(part, dtype=np.int64)) for part in parts]


def dirichlet_proportions(
    num_classes: int, num_hospitals: int, alpha: float | None, rng: np.random.Generator
) -> np.ndarray:
    """One Dirichlet(alpha) row per class: the share of that class each hospital receives."""
    if alpha is None or not alpha > 0:
        raise DataError(f"alpha must be > 0 for a label-skewed split, got {alpha!r}")
    return rng.dirichlet(np.full(num_hospitals, float(alpha)), size=num_classes)


def split_hospital(
    name: str,
    x: np.ndarray,
    y: np.ndarray,
    *,
    test_fraction: float,
    seed: int,
    feature_names: tuple[str, ...] = (),
    reference: tuple[np.ndarray, np.ndarray] | None = None,
) -> HospitalSplit:
    """Split one hospital's rows into train/test and z-score them with its own train rows, or,
    given `reference` (centers, scales), with those public constants."""
    train, test = train_test_positions(name, y, test_fraction=test_fraction, seed=seed)
    if reference is None:
        x_train, x_test = standardise_with_train(x[train], x[test])
    else:
        x_train, x_test = (scale_with_reference(part, *reference) for part in (x[train], x[test]))
    labels = y.astype(np.float32)
    split = HospitalSplit(name, x_train, labels[train], x_test, labels[test], feature_names)
    _warn_missing_classes(split)
    return split


def train_test_positions(
    name: str, y: np.ndarray, *, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Sorted row positions of one hospital's train and test parts.

    Stratified on the label when each class has at least 2 rows, so small hospitals keep
    both classes in both parts whenever they can.
    """
    if len(y) < 2:
        raise DataError(f"hospital {name!r} has {len(y)} row(s); it needs at least 2 to split")
    counts = np.unique(y, return_counts=True)[1]
    stratify = y if len(counts) > 1 and counts.min() >= 2 else None
    return train_test_rows(len(y), test_size=test_fraction, seed=seed, stratify=stratify)


def standardise_with_train(
    x_train: np.ndarray, x_test: np.ndarray, *, ddof: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Z-score both parts with the train part's mean and std (std 0 -> 1: column centred only)."""
    mean = x_train.mean(axis=0, dtype=np.float64)
    std = x_train.std(axis=0, ddof=ddof, dtype=np.float64) if len(x_train) > ddof else 0 * mean
    std = np.where(std > 0, std, 1.0)
    return (
        ((x_train - mean) / std).astype(np.float32),
        ((x_test - mean) / std).astype(np.float32),
    )


def scale_with_reference(x: np.ndarray, centers: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """(x - center) / scale per column, with constants: each row depends on itself only."""
    return ((np.asarray(x, dtype=np.float64) - centers) / scales).astype(np.float32)


def row_split_positions(
    name: str, rows: list[list[str]], y: np.ndarray, *, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Sorted train and test positions, each row placed by a keyed hash of its own cells.

    Unlike a (stratified) permutation, where one more patient re-deals every other patient,
    a row's side depends on that row and the seed only: adding or removing a patient leaves
    every other patient where it was. That is what DP needs, because the guarantee is about
    training sets that differ in one patient. The sizes are random (about test_fraction of the
    rows go to test) and the split is not stratified. Identical rows land on the same side.
    """
    key = hashlib.blake2b(f"murmur row split {seed}".encode(), digest_size=32).digest()
    in_test = np.array(
        [
            int.from_bytes(
                hashlib.blake2b(
                    "\x1f".join([*row, f"{label:g}"]).encode(), key=key, digest_size=8
                ).digest(),
                "little",
            )
            < test_fraction * 2**64
            for row, label in zip(rows, y, strict=True)
        ],
        dtype=bool,
    )
    train, test = np.flatnonzero(~in_test), np.flatnonzero(in_test)
    if len(train) == 0 or len(test) == 0:
        raise DataError(
            f"hospital {name!r}: the per-row split put all {len(rows)} rows in "
            f"{'test' if len(train) == 0 else 'training'}; fix: add patients, or change "
            "test_fraction or seed"
        )
    return train, test


def _warn_missing_classes(split: HospitalSplit) -> None:
    for part, y in (("train", split.y_train), ("test", split.y_test)):
        missing = [str(c) for c in (0, 1) if not (y == c).any()]
        if missing:
            log.warning(
                "hospital %s: %s split has no rows of class %s (%d rows)",
                split.name,
                part,
                "/".join(missing),
                len(y),
            )


# --- breast-cancer --------------------------------------------------------------------------


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


def _load_breast_cancer(
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


# --- heart-disease (FLamby's Fed-Heart-Disease) ---------------------------------------------


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
        _warn_missing_classes(split)
        splits.append(split)
    return splits


def _read_heart_centre(file: Path) -> tuple[np.ndarray, np.ndarray]:
    if not file.is_file():
        raise DataError(
            f"missing {file}: the heart-disease directory needs the four UCI files "
            f"{', '.join(HEART_CENTRES.values())}"
        )
    rows = []
    for line_number, row in _csv_lines(file):
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
        values = {k: _parse_number(file, line_number, v) for k, v in record.items()}
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


# --- medmnist -------------------------------------------------------------------------------


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
        _warn_missing_classes(split)
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


# --- csv ------------------------------------------------------------------------------------


@dataclass
class _CsvTable:
    """Raw text cells of one hospital, label already parsed."""

    name: str
    columns: tuple[str, ...]
    cells: list[list[str]]  # rows x feature columns
    y: np.ndarray


def load_csv(
    path: str | os.PathLike[str],
    *,
    label: str,
    site: str | None = None,
    seed: int = 0,
    test_fraction: float = 0.25,
    reference: dict[str, ColumnReference] | None = None,
    positive: str | None = None,
    not_identifying: tuple[str, ...] = (),
) -> list[HospitalSplit]:
    """Hospitals from CSV: one file with a ``site`` column, or a directory of one CSV each.

    Every column other than ``label`` and ``site`` is a feature, in alphabetical order so the
    layout does not depend on how each hospital ordered its columns. A column whose values all
    parse as numbers is numeric (missing -> the hospital's train median, then z-scored with
    its train mean and std); any other column is categorical (missing -> the hospital's train
    mode, then one indicator per value of the column's vocabulary: the values the loaded
    sites use, the same layout everywhere, models/vocabulary.py). Everything fitted comes from
    that hospital's own training rows. ``.``, blank, ``NA``, ``?`` and the like are missing.

    ``positive`` names the label value that means disease (e.g. ``1_yes`` for an R factor);
    every other value is 0. Columns that look like direct identifiers (models/identifiers.py)
    are refused unless listed in ``not_identifying``.

    With a ``reference`` (`read_reference`; what DP needs) nothing is fitted or inferred: the
    reference names every feature column with its kind, center, scale, fill and (categorical)
    categories, and each row goes to train or test by itself (`row_split_positions`).
    """
    path = Path(path)
    if path.is_dir():
        if site is not None:
            raise DataError(
                f"{path} is a directory (one CSV per hospital): drop site=, "
                "the file names are the hospitals"
            )
        tables = _read_csv_directory(path, label, positive)
    elif path.is_file():
        if site is None:
            raise DataError(
                f"{path} is one CSV file: pass site=<column naming each row's "
                "hospital>, or point path at a directory with one CSV per hospital"
            )
        tables = _read_csv_with_site(path, label, site, positive)
    else:
        raise DataError(f"CSV path {path} does not exist")
    _refuse_identifiers(path, tables, not_identifying)
    if positive is not None and not any(t.y.any() for t in tables):
        raise DataError(
            f"positive value {positive!r} never appears in label column {label!r}; fix: "
            "give the value that means disease exactly as the file writes it"
        )

    if len({v for t in tables for v in np.unique(t.y)}) < 2:
        raise DataError(
            f"label column {label!r} has a single value in every row: a classifier "
            "needs both classes (0 and 1)"
        )
    if not tables[0].columns:
        raise DataError(f"{path} has no feature columns besides the label (and site)")
    if reference is None:
        kinds = _column_kinds(tables)
    else:
        _check_reference_columns(path, tables[0].columns, reference)
        kinds = {column: reference[column].kind for column in tables[0].columns}
    vocabularies = _vocabularies(tables, kinds, reference)
    splits = []
    for table in tables:
        x, y = (
            np.asarray(table.cells, dtype=object).reshape(len(table.y), len(table.columns)),
            table.y,
        )
        if reference is None:
            train, test = train_test_positions(
                table.name, y, test_fraction=test_fraction, seed=seed
            )
        else:
            train, test = row_split_positions(
                table.name, table.cells, y, test_fraction=test_fraction, seed=seed
            )
        x_train, x_test, names = _encode_features(
            x[train], x[test], table.columns, kinds, table.name, reference, vocabularies
        )
        split = HospitalSplit(table.name, x_train, y[train], x_test, y[test], names)
        _warn_missing_classes(split)
        warn_small_site(split)
        splits.append(split)
    return splits


def _csv_lines(file: Path) -> list[tuple[int, list[str]]]:
    """(line number, cells) of a UTF-8 CSV file; unreadable bytes become a DataError."""
    try:
        with file.open(newline="", encoding="utf-8-sig") as handle:
            return list(enumerate(csv.reader(handle), start=1))
    except (UnicodeDecodeError, csv.Error) as error:
        raise DataError(f"{file} is not a readable UTF-8 CSV file: {error}") from None


def _parse_number(file: Path, line_number: int, value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    if not math.isfinite(number):
        raise DataError(f"{file}:{line_number}: {value!r} is not a finite number")
    return number


def _read_rows(file: Path) -> tuple[list[str], list[list[str]], list[int]]:
    """Header, data rows (cells stripped; blank rows skipped) and each row's line number."""
    lines = _csv_lines(file)
    if not lines:
        raise DataError(f"{file} is empty: it needs a header row and data rows")
    header = [h.strip() for h in lines[0][1]]
    duplicated = sorted(h for h, n in Counter(header).items() if n > 1)
    if duplicated:
        raise DataError(f"{file}: duplicated column names {duplicated}")
    rows, numbers = [], []
    for line_number, row in lines[1:]:
        if not any(cell.strip() for cell in row):
            continue
        if len(row) != len(header):
            raise DataError(f"{file}:{line_number}: {len(row)} values for {len(header)} columns")
        rows.append([cell.strip() for cell in row])
        numbers.append(line_number)
    return header, rows, numbers


def _require_columns(file: Path, header: list[str], wanted: dict[str, str]) -> None:
    for role, column in wanted.items():
        if column not in header:
            raise DataError(
                f"{file}: unknown {role} column {column!r}; the columns are {', '.join(header)}"
            )


def _parse_labels(
    file: Path,
    column: str,
    values: list[str],
    lines: list[int],
    site: str,
    positive: str | None = None,
) -> np.ndarray:
    """0/1 labels; a bad one is named by its line in the file (and its place in its site).
    With ``positive``, that value is 1 and any other present value 0 (two values at most)."""
    if positive is not None:
        return _parse_positive(file, column, values, lines, site, positive)
    parsed = []
    for i, value in enumerate(values):
        key = value.lower()
        if key in _LABEL_WORDS:
            parsed.append(_LABEL_WORDS[key])
            continue
        try:
            number = float(value)
        except ValueError:
            number = math.nan
        if number not in (0.0, 1.0):
            what = "missing" if key in _MISSING_TOKENS else f"{value!r}"
            raise DataError(
                f"{file}:{lines[i]}: label column {column!r} is {what} (line {lines[i]} of the "
                f"file, data row {i + 1} of site {site!r}); labels must be 0/1 (or yes/no, "
                "true/false, positive/negative): recode or remove the row"
                + (
                    ""
                    if key in _MISSING_TOKENS
                    else ", or name the value that means disease (an R factor's 1_yes, say): "
                    "--positive VALUE (data.positive)"
                )
            )
        parsed.append(int(number))
    return np.asarray(parsed, dtype=np.float32)


def _parse_positive(
    file: Path, column: str, values: list[str], lines: list[int], site: str, positive: str
) -> np.ndarray:
    for i, value in enumerate(values):
        if _is_missing(value):
            raise DataError(
                f"{file}:{lines[i]}: label column {column!r} is missing (line {lines[i]} of the "
                f"file, data row {i + 1} of site {site!r}): recode or remove the row"
            )
    distinct = sorted(set(values))
    if len(distinct) > 2:
        raise DataError(
            f"{file}: label column {column!r} has {len(distinct)} values at site {site!r} "
            f"({', '.join(distinct[:5])}); murmur's models are binary: recode it to two values"
        )
    return np.asarray([value == positive for value in values], dtype=np.float32)


def _refuse_identifiers(
    path: Path, tables: list[_CsvTable], not_identifying: tuple[str, ...]
) -> None:
    """Refuse to train on columns that look like direct identifiers (models/identifiers.py)."""
    rows = [row for table in tables for row in table.cells]
    found = identifier_columns(tables[0].columns, rows, not_identifying)
    if not found:
        return
    column, reason = next(iter(found.items()))
    others = sorted(found)[1:] if len(found) > 1 else []
    raise DataError(
        f"{path}: column {column!r} looks like a direct identifier ({reason}); a model must "
        "not train on identifiers (HIPAA Safe Harbor). Fix: remove the column, or, if it "
        f"identifies no one, declare it: data.not_identifying = [{column!r}] "
        f"(run_cluster.py --not-identifying {column})"
        + (f"; also flagged: {', '.join(others)}" if others else "")
    )


SMALL_TEST_SPLIT = 10
"""Fewer test patients than this (or a test split with one class) and a site's metrics
describe a handful of patients, not the model: the loader says so."""


def warn_small_site(split: HospitalSplit) -> str | None:
    """Log (and return) a warning when a site's test split is too small to mean anything."""
    n = len(split.y_test)
    positives = int(split.y_test.sum())
    if n >= SMALL_TEST_SPLIT and 0 < positives < n:
        return None
    message = (
        f"hospital {split.name!r} is too small to split well: {len(split.y_train)} training "
        f"patients ({int(split.y_train.sum())} positive) and {n} test patient(s) ({positives} "
        f"positive). Its test metrics describe those {n} patient(s), not the model: AUC is "
        "undefined without both classes, and accuracy, sensitivity and specificity move by "
        f"{1 / n:.0%} per patient. Read the federation's result at the other sites, or add "
        "patients"
    )
    log.warning(message)
    return message


def _read_csv_with_site(
    file: Path, label: str, site: str, positive: str | None = None
) -> list[_CsvTable]:
    header, rows, numbers = _read_rows(file)
    _require_columns(file, header, {"label": label, "site": site})
    if label == site:
        raise DataError(f"{file}: label and site must be different columns, both are {label!r}")
    site_at, label_at = header.index(site), header.index(label)
    features = tuple(sorted(h for h in header if h not in (label, site)))
    keep = [header.index(h) for h in features]
    by_site: dict[str, list[list[str]]] = {}
    lines_of: dict[str, list[int]] = {}
    for row, line in zip(rows, numbers, strict=True):
        if row[site_at].lower() in _MISSING_TOKENS:
            raise DataError(
                f"{file}:{line}: no value in site column {site!r}; every row must name its hospital"
            )
        by_site.setdefault(row[site_at], []).append(row)
        lines_of.setdefault(row[site_at], []).append(line)
    if not by_site:
        raise DataError(f"{file} has a header but no data rows")
    tables = []
    for name in sorted(by_site):
        site_rows = by_site[name]
        labels = [r[label_at] for r in site_rows]
        y = _parse_labels(file, label, labels, lines_of[name], name, positive)
        tables.append(_CsvTable(name, features, [[r[j] for j in keep] for r in site_rows], y))
    return tables


def _read_csv_directory(
    directory: Path, label: str, positive: str | None = None
) -> list[_CsvTable]:
    files = sorted(directory.glob("*.csv"))
    if not files:
        raise DataError(f"{directory} has no *.csv files (one per hospital expected)")
    tables: list[_CsvTable] = []
    features: tuple[str, ...] = ()
    for file in files:
        header, rows, numbers = _read_rows(file)
        _require_columns(file, header, {"label": label})
        if not rows:
            raise DataError(
                f"site {file.stem!r} ({file}) has no rows: remove the file or add its patients"
            )
        these = tuple(sorted(h for h in header if h != label))
        if not tables:
            features = these
        elif these != features:
            raise DataError(
                f"{file} has different columns from {files[0]}: missing "
                f"{sorted(set(features) - set(these))}, extra "
                f"{sorted(set(these) - set(features))}"
            )
        keep = [header.index(h) for h in features]
        labels = [r[header.index(label)] for r in rows]
        y = _parse_labels(file, label, labels, numbers, file.stem, positive)
        tables.append(_CsvTable(file.stem, features, [[r[j] for j in keep] for r in rows], y))
    return tables


def _is_missing(value: str) -> bool:
    return value.lower() in _MISSING_TOKENS


def _is_number(value: str) -> bool:
    try:
        return math.isfinite(float(value))
    except ValueError:
        return False


def _column_kinds(tables: list[_CsvTable]) -> dict[str, str]:
    """'numeric' or 'categorical' per column: the schema, which must agree across hospitals.

    Only the *type* of a column is compared between hospitals; no value or statistic is.
    """
    kinds: dict[str, str] = {}
    for j, column in enumerate(tables[0].columns):
        seen: dict[str, str] = {}
        for table in tables:
            present = [row[j] for row in table.cells if not _is_missing(row[j])]
            if present:
                numeric = all(_is_number(v) for v in present)
                seen[table.name] = "numeric" if numeric else "categorical"
        if not seen:
            raise DataError(f"column {column!r} has no values at any site: drop it")
        if len(set(seen.values())) > 1:
            raise DataError(
                f"column {column!r} is numeric at some sites and text at others "
                f"({seen}): fix the values so every site uses one type"
            )
        kinds[column] = next(iter(seen.values()))
    return kinds


def _vocabularies(
    tables: list[_CsvTable], kinds: dict[str, str], reference: dict[str, ColumnReference] | None
) -> dict[str, tuple[str, ...]]:
    """Each categorical column's agreed values: the reference's categories, else the sorted
    values the loaded sites use (the schema, shared like the kinds; models/vocabulary.py)."""
    vocabularies = {}
    for j, column in enumerate(tables[0].columns):
        if kinds[column] != "categorical":
            continue
        if reference is not None:
            if not reference[column].categories:
                raise DataError(
                    f"the reference lists no categories for categorical column {column!r}; "
                    f"fix: add a {REFERENCE_CATEGORIES!r} column to the reference file with "
                    "its values, e.g. yes|no (docs/data.md)"
                )
            vocabularies[column] = reference[column].categories
        else:
            seen = [{row[j] for row in t.cells if not _is_missing(row[j])} for t in tables]
            vocabularies[column] = shared_vocabulary(seen)
    return vocabularies


def _encode_features(
    train: np.ndarray,
    test: np.ndarray,
    columns: tuple[str, ...],
    kinds: dict[str, str],
    hospital: str,
    reference: dict[str, ColumnReference] | None = None,
    vocabularies: dict[str, tuple[str, ...]] | None = None,
) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """Impute, scale and one-hot one hospital's features: fitted on its own train rows only,
    or, given a reference, with its constants only (then each row depends on itself alone).

    ``vocabularies`` are the agreed categories per categorical column (`_vocabularies`);
    without them, the reference's categories, else the values in these rows."""
    train_blocks, test_blocks, names = [], [], []
    for j, column in enumerate(columns):
        if kinds[column] == "numeric":
            to_float = np.vectorize(
                lambda v, c=column: math.nan if _is_missing(v) else _cell_number(hospital, c, v),
                otypes=[float],
            )
            a, b = to_float(train[:, j]), to_float(test[:, j])
            if reference is None:
                observed = a[~np.isnan(a)]
                fill = float(np.median(observed)) if len(observed) else 0.0
            else:
                fill = reference[column].numeric_fill()
            a, b = np.where(np.isnan(a), fill, a), np.where(np.isnan(b), fill, b)
            if reference is None:
                a, b = standardise_with_train(a[:, None], b[:, None])
            else:
                ref = reference[column]
                a, b = (
                    scale_with_reference(part[:, None], ref.center, ref.scale) for part in (a, b)
                )
            names.append(column)
        else:
            observed = [v for v in train[:, j] if not _is_missing(v)]
            if reference is None:
                fill = _most_common(observed) if observed else None
            else:
                fill = reference[column].category_fill()
            vocabulary = _vocabulary_for(column, train[:, j], test[:, j], reference, vocabularies)
            try:
                a, b = (
                    one_hot(column, part[:, j], vocabulary, fill, _is_missing, hospital)
                    for part in (train, test)
                )
            except VocabularyError as error:
                raise DataError(str(error)) from None
            names.extend(indicator_names(column, vocabulary))
        train_blocks.append(a)
        test_blocks.append(b)
    return (
        np.hstack(train_blocks).astype(np.float32),
        np.hstack(test_blocks).astype(np.float32),
        tuple(names),
    )


def _vocabulary_for(
    column: str,
    train: np.ndarray,
    test: np.ndarray,
    reference: dict[str, ColumnReference] | None,
    vocabularies: dict[str, tuple[str, ...]] | None,
) -> tuple[str, ...]:
    if vocabularies is not None:
        return vocabularies[column]
    if reference is not None and reference[column].categories:
        return reference[column].categories
    return shared_vocabulary([{v for v in (*train, *test) if not _is_missing(v)}])


def _cell_number(hospital: str, column: str, value: str) -> float:
    """A numeric cell as a float (a reference may call a column numeric that holds text)."""
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    if not math.isfinite(number):
        raise DataError(
            f"hospital {hospital!r}: column {column!r} is numeric but holds {value!r}; fix: "
            "correct the value, or make the column categorical in the reference file"
        )
    return number


def read_reference(path: str | os.PathLike[str]) -> dict[str, ColumnReference]:
    """A csv reference file: one row per feature column, with the columns
    ``column,kind,center,scale,fill`` (`ColumnReference`).

    kind is numeric or categorical. A numeric row needs center and scale (> 0); its fill is
    empty (use center) or a number. A categorical row leaves center and scale empty, lists its
    agreed values in the ``categories`` column (``yes|no|former``; needed for every
    categorical column) and its fill is the category for a missing value (empty: no
    indicator set). The constants must come
    from a public source (guidelines, literature, a consortium's published data dictionary),
    never from the patients the node trains on: then they are the same with or without any
    one patient, which DP needs.
    """
    file = Path(path)
    if not file.is_file():
        raise DataError(f"reference file {file} not found (columns {','.join(REFERENCE_FIELDS)})")
    header, rows, _ = _read_rows(file)
    if sorted(set(header) - {REFERENCE_CATEGORIES}) != sorted(REFERENCE_FIELDS):
        raise DataError(
            f"{file}: a reference file has exactly the columns {','.join(REFERENCE_FIELDS)} "
            f"(and {REFERENCE_CATEGORIES} for categorical columns); it has {','.join(header)}"
        )
    at = {name: header.index(name) for name in REFERENCE_FIELDS}
    cats_given = REFERENCE_CATEGORIES in header
    columns: dict[str, ColumnReference] = {}
    for i, row in enumerate(rows, start=2):
        column, kind = row[at["column"]], row[at["kind"]].lower()
        center, scale, fill = row[at["center"]], row[at["scale"]], row[at["fill"]]
        where = f"{file}:{i} ({column!r})"
        if not column or column in columns:
            raise DataError(f"{where}: every row needs a column name, each named once")
        try:
            if kind == "numeric":
                if fill != "":
                    _reference_float("fill", fill)
                entry = ColumnReference(
                    kind, _reference_float("center", center), _reference_float("scale", scale), fill
                )
            elif kind == "categorical":
                if center or scale:
                    raise DataError("a categorical column has no center or scale: leave them empty")
                text = row[header.index(REFERENCE_CATEGORIES)] if cats_given else ""
                categories = parse_categories(text, column)
                if fill and categories and fill not in categories:
                    raise DataError(f"fill {fill!r} is not one of its categories {categories}")
                entry = ColumnReference(kind, fill=fill, categories=categories)
            else:
                raise DataError(f"kind {kind!r}: use numeric or categorical")
        except (DataError, VocabularyError) as error:
            raise DataError(f"{where}: {error}") from None
        columns[column] = entry
    if not columns:
        raise DataError(f"{file} has a header but no columns listed")
    return columns


def _reference_float(field: str, value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    if not math.isfinite(number):
        raise DataError(f"{field} {value!r} is not a finite number")
    return number


def _check_reference_columns(
    path: Path, columns: tuple[str, ...], reference: dict[str, ColumnReference]
) -> None:
    missing, extra = sorted(set(columns) - set(reference)), sorted(set(reference) - set(columns))
    if missing or extra:
        raise DataError(
            f"the reference does not match the feature columns of {path}: "
            f"not in the reference {missing}, not in the data {extra}; fix: list exactly the "
            "data's feature columns (every column but the label and site) in the reference"
        )


def _most_common(values: list[str]) -> str:
    """The train mode; ties go to the alphabetically first value so the result is stable."""
    counts = Counter(values)
    return min(counts, key=lambda value: (-counts[value], value))
