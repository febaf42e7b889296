"""Fed-TCGA-BRCA: FLamby's six TCGA-BRCA regions as six hospitals, for survival analysis.

Read from ../shared/data/tcga_brca (its SOURCE.md): ``brca.csv`` (one row per patient:
``pid``, 39 clinical features, ``E`` event, ``T`` days) and FLamby's static split
``train_test_split.csv`` (``fold2`` = ``train_K`` / ``test_K`` for region K = 0..5). Only the
1,088 patients the split names are used, exactly FLamby's, so the C-index compares with its
published table. Region names come from ``centers.csv`` (the tissue source site in
characters 6-7 of the barcode), e.g. ``region_0_northeast``.

Preprocessing uses no statistic of any patient, with or without DP: the 38 one-hot columns
are kept as they are and age is scaled by public constants, (years - 60) / 15, so each
patient's features are a function of that patient's row alone (FLamby feeds raw age; a
constant rescaling changes nothing but the learning rate's meaning).
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
from murmur.models.data import DataError, HospitalSplit

FEATURES = 39
AGE_COLUMN = "age_at_index"
AGE_CENTER, AGE_SCALE = 60.0, 15.0  # public constants (years), not fitted to the patients
REGIONS = 6


def _read(file: Path) -> tuple[list[str], list[list[str]]]:
    if not file.is_file():
        raise DataError(
            f"TCGA-BRCA file {file} not found: put FLamby's brca.csv, centers.csv and "
            "train_test_split.csv there (shared/data/tcga_brca/SOURCE.md)"
        )
    with file.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.reader(handle))
    if not rows:
        raise DataError(f"{file} is empty")
    return rows[0], rows[1:]


def load_tcga_brca(directory: str | Path) -> list[HospitalSplit]:
    """Six `HospitalSplit`s (regions 0..5) with labels (days, event) and FLamby's split."""
    root = Path(directory)
    header, rows = _read(root / "brca.csv")
    if len(header) != FEATURES + 3 or header[0] != "pid" or header[-2:] != ["E", "T"]:
        raise DataError(
            f"{root / 'brca.csv'}: expected pid, {FEATURES} features, E, T "
            f"({FEATURES + 3} columns); got {len(header)} columns"
        )
    names = tuple(header[1 : FEATURES + 1])
    age_at = names.index(AGE_COLUMN)
    patients: dict[str, tuple[np.ndarray, tuple[float, float]]] = {}
    for line, row in enumerate(rows, start=2):
        try:
            values = [float(v) for v in row[1:]]
        except ValueError:
            raise DataError(f"{root / 'brca.csv'}:{line}: a value is not a number") from None
        if len(values) != FEATURES + 2 or not all(math.isfinite(v) for v in values):
            raise DataError(f"{root / 'brca.csv'}:{line}: needs {FEATURES + 2} finite numbers")
        features = np.asarray(values[:FEATURES], dtype=np.float64)
        features[age_at] = (features[age_at] - AGE_CENTER) / AGE_SCALE
        patients[row[0]] = (features, (values[FEATURES + 1], values[FEATURES]))
    regions = _region_names(root)
    _, split_rows = _read(root / "train_test_split.csv")
    parts: dict[tuple[int, str], list[str]] = {}
    for pid, _fold, fold2 in split_rows:
        part, _, region = fold2.partition("_")
        if part not in ("train", "test") or not region.isdigit() or pid not in patients:
            raise DataError(f"train_test_split.csv: bad row {pid},{fold2} (or unknown patient)")
        parts.setdefault((int(region), part), []).append(pid)
    splits = []
    for k in range(REGIONS):
        train, test = parts.get((k, "train"), []), parts.get((k, "test"), [])
        if not train or not test:
            raise DataError(f"train_test_split.csv has no train or test patients for region {k}")
        x_train, y_train = _arrays(patients, train)
        x_test, y_test = _arrays(patients, test)
        splits.append(
            HospitalSplit(regions.get(k, f"region_{k}"), x_train, y_train, x_test, y_test, names)
        )
    return splits


def _arrays(
    patients: dict[str, tuple[np.ndarray, tuple[float, float]]], pids: list[str]
) -> tuple[np.ndarray, np.ndarray]:
    x = np.stack([patients[p][0] for p in pids]).astype(np.float32)
    y = np.asarray([patients[p][1] for p in pids], dtype=np.float32)
    y[:, 0] = np.maximum(y[:, 0], 1.0)  # a death on day 0 is day 1: times must be > 0
    return x, y


def _region_names(root: Path) -> dict[int, str]:
    """Region index -> "region_K_name", K's most common region in centers.csv (by barcode)."""
    file = root / "centers.csv"
    if not file.is_file():
        return {}
    header, rows = _read(file)
    if "TSS Code" not in header or "Region" not in header:
        return {}
    code_at, region_at = header.index("TSS Code"), header.index("Region")
    by_code = {row[code_at]: row[region_at] for row in rows if len(row) == len(header)}
    _, split_rows = _read(root / "train_test_split.csv")
    counts: dict[int, dict[str, int]] = {}
    for pid, _fold, fold2 in split_rows:
        region = by_code.get(pid[5:7])
        k = fold2.partition("_")[2]
        if region and k.isdigit():
            tally = counts.setdefault(int(k), {})
            tally[region] = tally.get(region, 0) + 1
    return {
        k: f"region_{k}_{max(tally, key=tally.get).lower().replace(' ', '_')}"
        for k, tally in counts.items()
    }
