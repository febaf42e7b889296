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

import hashlib
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from murmur.models.splitting import train_test_rows

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
# ...unless the pool is too small for that many hospitals (the embedded 569 patients over 48 or
# more): then each is guaranteed this many rows (an IID split gives equal shares anyway), which
# at the default test fraction is 3 training and 2 test rows. A hospital that small has no
# meaningful AUC of its own (its 2 test rows seldom hold both classes), so such networks are
# judged by each node's model on the whole test split, every hospital's test rows together
# (report.json "whole_test", node/report_extras.py). No patient is ever given to two hospitals.
MIN_ROWS_FLOOR = 5


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
    _check_arguments(
        name, num_hospitals=num_hospitals, alpha=alpha, test_fraction=test_fraction,
        positive=positive, not_identifying=not_identifying, label=label, site=site,
        preprocessing=preprocessing, reference=reference,
    )  # fmt: skip
    # Each data set's loader lives in its own module, which imports the shared types from
    # here; importing them on use keeps that one-way.
    if name == "breast-cancer":
        from murmur.models.breast_cancer import load_breast_cancer

        return load_breast_cancer(num_hospitals, seed, alpha, test_fraction, preprocessing)
    if name == "heart-disease":
        from murmur.models.heart_disease import load_heart_disease

        return load_heart_disease(
            path if path is not None else default_data_path(name), preprocessing=preprocessing
        )
    if name == "tcga-brca":
        from murmur.models.tcga import load_tcga_brca

        return load_tcga_brca(path if path is not None else default_data_path(name))
    if name == "medmnist":
        from murmur.models.medmnist_data import load_medmnist

        npz = path if path is not None else default_data_path(name)
        return load_medmnist(
            npz, num_hospitals=num_hospitals, seed=seed, alpha=alpha, positive=positive
        )
    from murmur.models.csv_data import load_csv, read_reference

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


def _check_arguments(
    name: str,
    *,
    num_hospitals: int,
    alpha: float | None,
    test_fraction: float,
    positive: str | None,
    not_identifying: tuple[str, ...],
    label: str | None,
    site: str | None,
    preprocessing: str,
    reference: str | os.PathLike[str] | None,
) -> None:
    """Refuse, naming the argument and the fix, what `load_dataset` cannot do for ``name``."""
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
    ``min_rows`` rows however small alpha is (``MIN_ROWS_FLOOR`` when the pool is too small
    for ``min_rows`` each), that many rows per hospital are first dealt at random from the
    shuffled pool and only the rest follows the skew. Returns sorted index arrays, one per
    hospital.
    """
    n = len(labels)
    if n < num_hospitals * min_rows:  # too small a pool for min_rows each: the floor
        min_rows = MIN_ROWS_FLOOR
    if n < num_hospitals * min_rows:
        raise DataError(
            f"{n} rows cannot give {num_hospitals} hospitals {MIN_ROWS_FLOOR} rows each "
            f"(at most {n // MIN_ROWS_FLOOR} hospitals): use fewer hospitals"
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
    warn_missing_classes(split)
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


def warn_missing_classes(split: HospitalSplit) -> None:
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
