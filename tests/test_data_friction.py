"""What a new user meets with real exports: factor labels, benign-is-1 MedMNIST, tiny sites,
identifier columns, and data errors that must end run_cluster.py with one line."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from murmur.models.data import DataError, load_dataset
from murmur.models.identifiers import identifier_reason
from murmur.node.config import ConfigError, parse_config

from tests.test_data import clinic_rows, write_csv

ROOT = Path(__file__).resolve().parents[1]


def factor_rows(n: int = 40) -> list[list[str]]:
    rows = clinic_rows("north", n, 1)
    for row in rows:
        row[3] = "1_yes" if row[3] == "1" else "0_no"
    return rows


def test_a_factor_label_needs_positive_and_then_loads(tmp_path: Path) -> None:
    file = write_csv(tmp_path / "r.csv", factor_rows())
    with pytest.raises(DataError, match=r"is '1_yes'.*--positive VALUE \(data.positive\)"):
        load_dataset("csv", path=file, label="outcome", site="site")
    (split,) = load_dataset("csv", path=file, label="outcome", site="site", positive="1_yes")
    expected = sum(1 for r in factor_rows() if r[3] == "1_yes")
    assert split.y_train.sum() + split.y_test.sum() == expected
    (flipped,) = load_dataset("csv", path=file, label="outcome", site="site", positive="0_no")
    assert flipped.y_train.sum() + flipped.y_test.sum() == 40 - expected


def test_positive_must_appear_and_labels_stay_binary(tmp_path: Path) -> None:
    file = write_csv(tmp_path / "r.csv", factor_rows())
    with pytest.raises(DataError, match="positive value '1_Yes' never appears"):
        load_dataset("csv", path=file, label="outcome", site="site", positive="1_Yes")
    rows = factor_rows()
    rows[0][3] = "2_maybe"
    file = write_csv(tmp_path / "three.csv", rows)
    with pytest.raises(DataError, match="has 3 values at site 'north'"):
        load_dataset("csv", path=file, label="outcome", site="site", positive="1_yes")
    with pytest.raises(DataError, match="only applies to csv and medmnist"):
        load_dataset("breast-cancer", positive="1")


def test_medmnist_positive_zero_makes_the_sets_zero_the_disease(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    parts = {}
    for which, n in (("train", 40), ("test", 20)):
        parts[f"{which}_images"] = rng.integers(0, 255, (n, 28, 28), dtype=np.uint8)
        parts[f"{which}_labels"] = (np.arange(n) % 4 == 0).astype(np.uint8)[:, None]  # 25% 1s
    npz = tmp_path / "breastmnist.npz"
    np.savez(npz, **parts)
    (default,) = load_dataset("medmnist", path=npz, num_hospitals=1)
    (malignant,) = load_dataset("medmnist", path=npz, num_hospitals=1, positive="0")
    assert default.y_train.mean() == 0.25 and malignant.y_train.mean() == 0.75
    np.testing.assert_array_equal(malignant.y_test, 1 - default.y_test)
    with pytest.raises(DataError, match="label code 0 or 1"):
        load_dataset("medmnist", path=npz, num_hospitals=1, positive="benign")


def test_a_site_too_small_to_split_is_warned_about(tmp_path: Path, caplog) -> None:
    tiny_rows = [["61.0", "no", "A", "0", "tiny"], ["55.0", "yes", "B", "0", "tiny"]]
    rows = [*clinic_rows("north", 40, 1), *tiny_rows, ["70.0", "no", "A", "0", "tiny"]]
    file = write_csv(tmp_path / "all.csv", rows)
    with caplog.at_level(logging.WARNING, logger="murmur.models.csv_data"):
        splits = load_dataset("csv", path=file, label="outcome", site="site")
    tiny = next(s for s in splits if s.name == "tiny")
    assert len(tiny.y_test) == 1
    messages = [r.getMessage() for r in caplog.records if "too small to split" in r.getMessage()]
    assert len(messages) == 1 and "'tiny'" in messages[0]
    assert "describe those 1 patient(s), not the model" in messages[0]


@pytest.mark.parametrize(
    ("column", "values", "what"),
    [
        ("patient_name", ["Ann Smith", "Bo Lee"], "a person's name"),
        ("MRN", ["A100", "A101"], "a record number"),
        ("Subject ID", ["s1", "s2"], "a patient identifier"),
        ("ssn", ["x", "y"], "social security"),
        ("contact", ["ann@example.org", "bo@example.com"], "e-mail addresses"),
        ("reached_at", ["+1 (412) 555-0100", "412-555-0199"], "telephone numbers"),
        ("code", ["123-45-6789", "987-65-4321"], "Social Security numbers"),
        ("DOB", ["1950-02-01", "1961-11-30"], "date of birth"),
        ("seen", ["2019-03-04", "04/05/2020"], "exact dates"),
        ("Street Address", ["1 Main St", "2 Elm Rd"], "a street address"),
    ],
)
def test_identifier_columns_are_recognised(column: str, values: list[str], what: str) -> None:
    assert what in identifier_reason(column, values)


@pytest.mark.parametrize(
    ("column", "values"),
    [
        ("insurance", ["private", "public"]),
        ("systolic_bp", ["120", "135.5"]),
        ("test_name", ["troponin", "CK-MB"]),
        ("year_of_birth", ["1950", "1961"]),
    ],
)
def test_ordinary_clinical_columns_are_not_identifiers(column: str, values: list[str]) -> None:
    assert identifier_reason(column, values) is None


def test_an_identifier_column_is_refused_unless_declared(tmp_path: Path) -> None:
    rows = [
        [*r[:3], f"{i:03d}-55-{1000 + i}", *r[3:]] for i, r in enumerate(clinic_rows("n", 40, 1))
    ]
    header = ["patient_age", "smoker", "ward", "ref", "outcome", "site"]
    file = write_csv(tmp_path / "ids.csv", rows, header)
    with pytest.raises(DataError, match=r"column 'ref' looks like a direct identifier"):
        load_dataset("csv", path=file, label="outcome", site="site")
    (split,) = load_dataset(
        "csv", path=file, label="outcome", site="site", not_identifying=("ref",)
    )
    assert any(name.startswith("ref=") for name in split.feature_names)


def test_config_checks_positive_and_not_identifying() -> None:
    base = {
        "node": {"name": "a", "key_file": "a.key", "state_dir": "s"},
        "data": {"hospital": "hospital_0", "positive": "1"},
    }
    with pytest.raises(ConfigError, match=r"data.positive only applies to csv and medmnist"):
        parse_config(base)
    base["data"] = {"hospital": "h", "dataset": "medmnist", "positive": "benign"}
    with pytest.raises(ConfigError, match=r"data.positive must be the MedMNIST label code"):
        parse_config(base)
    base["data"] = {"hospital": "h", "not_identifying": ["ref"]}
    with pytest.raises(ConfigError, match=r"data.not_identifying only applies to dataset"):
        parse_config(base)


def test_a_data_error_ends_run_cluster_with_one_line(tmp_path: Path) -> None:
    file = write_csv(tmp_path / "r.csv", factor_rows())
    command = [sys.executable, str(ROOT / "run_cluster.py"), "--dataset", "csv", "--data"]
    command += [str(file), "--label", "outcome", "--site", "site", "--no-dp", "--quiet"]
    command += ["--out", str(tmp_path / "run")]
    finished = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert finished.returncode == 2
    assert "Traceback" not in finished.stderr
    lines = [line for line in finished.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("run_cluster: data error: ")
    assert "--positive" in lines[0]
