"""The CSV loader keeps information: agreed vocabularies, "." as missing, lines named."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from murmur.models.data import DataError, load_dataset

from tests.test_data import REFERENCE_ROWS, clinic_rows, write_csv, write_reference


def old_bucket(column: str, value: str) -> int:
    """The 16-bucket hash murmur used to apply (only to find values it merged)."""
    digest = hashlib.blake2b(f"{column}\x00{value}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % 16


def colliding_pair(column: str) -> tuple[str, str]:
    values = [f"v{i}" for i in range(64)]
    seen: dict[int, str] = {}
    for value in values:
        bucket = old_bucket(column, value)
        if bucket in seen:
            return seen[bucket], value
        seen[bucket] = value
    raise AssertionError("64 values in 16 buckets always collide")


def test_two_values_the_old_hash_merged_get_their_own_indicators(tmp_path: Path) -> None:
    a, b = colliding_pair("arm")
    rng = np.random.default_rng(0)
    rows = []
    for i in range(80):
        value = a if i % 2 else b
        outcome = int(value == a) if rng.random() < 0.9 else int(value != a)
        rows.append([f"{rng.normal(60, 10):.1f}", value, "A", str(outcome), "north"])
    header = ["patient_age", "arm", "ward", "outcome", "site"]
    file = write_csv(tmp_path / "trial.csv", rows, header)
    (split,) = load_dataset("csv", path=file, label="outcome", site="site")
    ia, ib = split.feature_names.index(f"arm={a}"), split.feature_names.index(f"arm={b}")
    x = np.concatenate([split.x_train, split.x_test])
    y = np.concatenate([split.y_train, split.y_test])
    np.testing.assert_array_equal(x[:, ia] + x[:, ib], 1.0)
    # The column still carries the label (90% agreement): it was not merged into a constant.
    assert np.mean(x[:, ia] == y) > 0.8


def test_a_dot_is_missing_and_a_numeric_column_stays_numeric(tmp_path: Path) -> None:
    rows = clinic_rows("north", 40, 1)
    for row in rows[::5]:
        row[0] = "."
    file = write_csv(tmp_path / "sas.csv", rows)
    (split,) = load_dataset("csv", path=file, label="outcome", site="site")
    assert split.feature_names[0] == "patient_age"
    assert not any(name.startswith("patient_age=") for name in split.feature_names)
    assert np.isfinite(split.x_train).all()


def test_a_dot_label_is_missing(tmp_path: Path) -> None:
    rows = clinic_rows("north", 20, 1)
    rows[3][3] = "."
    with pytest.raises(DataError, match="is missing"):
        load_dataset("csv", path=write_csv(tmp_path / "a.csv", rows), label="outcome", site="site")


def test_a_blank_label_is_named_by_its_line_in_the_file(tmp_path: Path) -> None:
    rows = clinic_rows("north", 10, 1) + clinic_rows("south", 10, 2)
    rows[13][3] = ""  # the 4th south row, on line 15 of the file (line 1 is the header)
    file = write_csv(tmp_path / "all.csv", rows)
    with pytest.raises(DataError) as error:
        load_dataset("csv", path=file, label="outcome", site="site")
    assert f"{file}:15:" in str(error.value)
    assert "line 15 of the file, data row 4 of site 'south'" in str(error.value)


def test_a_value_outside_the_reference_categories_is_refused(tmp_path: Path) -> None:
    rows = clinic_rows("north", 40, 1)
    rows[7][1] = "heavy"
    file = write_csv(tmp_path / "all.csv", rows)
    reference = write_reference(tmp_path / "ref.csv")
    kwargs = {"label": "outcome", "site": "site", "preprocessing": "reference"}
    with pytest.raises(DataError, match=r"'smoker' holds 'heavy'.*agreed categories"):
        load_dataset("csv", path=file, reference=reference, **kwargs)


def test_a_reference_categorical_column_needs_its_categories(tmp_path: Path) -> None:
    file = write_csv(tmp_path / "all.csv", clinic_rows("north", 40, 1))
    rows = [r[:5] for r in REFERENCE_ROWS]  # the old five-column format: no categories
    reference = write_reference(tmp_path / "old.csv", rows)
    kwargs = {"label": "outcome", "site": "site", "preprocessing": "reference"}
    with pytest.raises(DataError, match="no categories for categorical column 'smoker'"):
        load_dataset("csv", path=file, reference=reference, **kwargs)


def test_reference_categories_fix_the_layout_and_fill(tmp_path: Path) -> None:
    rows = clinic_rows("north", 40, 1)
    file = write_csv(tmp_path / "all.csv", rows)
    kwargs = {"label": "outcome", "site": "site", "preprocessing": "reference"}
    (split,) = load_dataset(
        "csv", path=file, reference=write_reference(tmp_path / "r.csv"), **kwargs
    )
    assert split.feature_names == (
        "patient_age", "smoker=yes", "smoker=no", "smoker=former", "ward=A", "ward=B",
    )  # fmt: skip
    smoker = np.concatenate([split.x_train, split.x_test])[:, 1:4]
    np.testing.assert_array_equal(smoker.sum(axis=1), 1.0)  # "NA" took the fill, "no"
