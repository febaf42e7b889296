"""The csv data set: any CSV file with a label column and a site column, or a directory with
one CSV per hospital; its column schema (kinds, shared vocabularies) and the reference file
(`read_reference`) that `preprocessing="reference"` scales by.
"""

from __future__ import annotations

import csv
import logging
import math
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from murmur.models.data import (
    REFERENCE_CATEGORIES,
    REFERENCE_FIELDS,
    ColumnReference,
    DataError,
    HospitalSplit,
    row_split_positions,
    scale_with_reference,
    standardise_with_train,
    train_test_positions,
    warn_missing_classes,
)
from murmur.models.identifiers import identifier_columns
from murmur.models.vocabulary import (
    VocabularyError,
    indicator_names,
    one_hot,
    parse_categories,
    shared_vocabulary,
)

log = logging.getLogger(__name__)


# CSV: what reads as a missing value. "." is SAS's, Stata's and R's (haven) missing code.
_MISSING_TOKENS = frozenset({"", "?", ".", "na", "n/a", "nan", "null", "none"})
_LABEL_WORDS = {
    "0": 0, "1": 1, "false": 0, "true": 1, "no": 0, "yes": 1,
    "negative": 0, "positive": 1, "neg": 0, "pos": 1,
}  # fmt: skip


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
    tables = _read_tables(path, label, site, positive)
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
    return [
        _split_table(table, kinds, vocabularies, reference, test_fraction, seed) for table in tables
    ]


def _read_tables(path: Path, label: str, site: str | None, positive: str | None) -> list[_CsvTable]:
    """One `_CsvTable` per hospital: from a directory (one CSV each) or one file's ``site``."""
    if path.is_dir():
        if site is not None:
            raise DataError(
                f"{path} is a directory (one CSV per hospital): drop site=, "
                "the file names are the hospitals"
            )
        return _read_csv_directory(path, label, positive)
    if path.is_file():
        if site is None:
            raise DataError(
                f"{path} is one CSV file: pass site=<column naming each row's "
                "hospital>, or point path at a directory with one CSV per hospital"
            )
        return _read_csv_with_site(path, label, site, positive)
    raise DataError(f"CSV path {path} does not exist")


def _split_table(
    table: _CsvTable,
    kinds: dict[str, str],
    vocabularies: dict[str, tuple[str, ...]],
    reference: dict[str, ColumnReference] | None,
    test_fraction: float,
    seed: int,
) -> HospitalSplit:
    """One hospital's train/test split, its features encoded with the shared schema."""
    x, y = (
        np.asarray(table.cells, dtype=object).reshape(len(table.y), len(table.columns)),
        table.y,
    )
    if reference is None:
        train, test = train_test_positions(table.name, y, test_fraction=test_fraction, seed=seed)
    else:
        train, test = row_split_positions(
            table.name, table.cells, y, test_fraction=test_fraction, seed=seed
        )
    x_train, x_test, names = _encode_features(
        x[train], x[test], table.columns, kinds, table.name, reference, vocabularies
    )
    split = HospitalSplit(table.name, x_train, y[train], x_test, y[test], names)
    warn_missing_classes(split)
    warn_small_site(split)
    return split


def csv_lines(file: Path) -> list[tuple[int, list[str]]]:
    """(line number, cells) of a UTF-8 CSV file; unreadable bytes become a DataError."""
    try:
        with file.open(newline="", encoding="utf-8-sig") as handle:
            return list(enumerate(csv.reader(handle), start=1))
    except (UnicodeDecodeError, csv.Error) as error:
        raise DataError(f"{file} is not a readable UTF-8 CSV file: {error}") from None


def parse_number(file: Path, line_number: int, value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    if not math.isfinite(number):
        raise DataError(f"{file}:{line_number}: {value!r} is not a finite number")
    return number


def _read_rows(file: Path) -> tuple[list[str], list[list[str]], list[int]]:
    """Header, data rows (cells stripped; blank rows skipped) and each row's line number."""
    lines = csv_lines(file)
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
