"""Loaders: shapes, per-hospital sizes, determinism, and that no statistic crosses hospitals."""

from __future__ import annotations

import csv
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from murmur.models import breast_cancer, csv_data, data, heart_disease
from murmur.models.data import (
    MIN_ROWS_FLOOR,
    MIN_ROWS_PER_HOSPITAL,
    DataError,
    HospitalSplit,
    load_dataset,
    split_across_hospitals,
)

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
HEART_DIR = SHARED_DATA / "heart_disease"
MEDMNIST_NPZ = SHARED_DATA / "medmnist" / "pneumoniamnist.npz"
needs_heart = pytest.mark.skipif(
    not (HEART_DIR / "processed.cleveland.data").exists(),
    reason=f"Fed-Heart-Disease files not found in {HEART_DIR} (see shared/data SOURCE.md)",
)
needs_medmnist = pytest.mark.skipif(
    not MEDMNIST_NPZ.exists(), reason=f"PneumoniaMNIST not found at {MEDMNIST_NPZ}"
)


def assert_same_split(a: HospitalSplit, b: HospitalSplit) -> None:
    assert a.name == b.name
    assert a.feature_names == b.feature_names
    for part in ("x_train", "y_train", "x_test", "y_test"):
        np.testing.assert_array_equal(getattr(a, part), getattr(b, part), err_msg=part)


def assert_standardised_on_own_train(split: HospitalSplit, ddof: int = 0) -> None:
    """Every column of the train part has mean 0 and std 1 (or is constant 0)."""
    mean = split.x_train.mean(axis=0, dtype=np.float64)
    std = split.x_train.std(axis=0, ddof=ddof, dtype=np.float64)
    np.testing.assert_allclose(mean, 0.0, atol=1e-5)
    constant = std < 1e-6
    np.testing.assert_allclose(std[~constant], 1.0, rtol=1e-4)


# --- breast-cancer ------------------------------------------------------------------------


def test_breast_cancer_iid_shapes_sizes_and_labels() -> None:
    splits = load_dataset("breast-cancer", num_hospitals=4, seed=0)
    assert [s.name for s in splits] == [f"hospital_{i}" for i in range(4)]
    assert sum(len(s.y_train) + len(s.y_test) for s in splits) == 569
    # sklearn codes malignant as 0; murmur relabels so that 1 = malignant (212 patients).
    assert sum(s.y_train.sum() + s.y_test.sum() for s in splits) == 212
    for s in splits:
        assert s.x_train.dtype == np.float32 and s.y_train.dtype == np.float32
        assert s.input_shape == (30,) and len(s.feature_names) == 30
        assert 141 <= len(s.y_train) + len(s.y_test) <= 143  # IID: near-equal shares
        assert len(s.y_test) == pytest.approx(0.25 * (len(s.y_train) + len(s.y_test)), abs=1)
        assert_standardised_on_own_train(s)


def test_breast_cancer_is_deterministic_given_seed() -> None:
    first = load_dataset("breast-cancer", num_hospitals=3, seed=7, alpha=0.5)
    again = load_dataset("breast-cancer", num_hospitals=3, seed=7, alpha=0.5)
    other = load_dataset("breast-cancer", num_hospitals=3, seed=8, alpha=0.5)
    for a, b in zip(first, again, strict=True):
        assert_same_split(a, b)
    assert any(len(a.y_train) != len(b.y_train) for a, b in zip(first, other, strict=True))


def test_label_skew_with_small_alpha_is_skewed_but_keeps_minimum_rows() -> None:
    def positive_rates(splits: list[HospitalSplit]) -> np.ndarray:
        return np.array([np.concatenate([s.y_train, s.y_test]).mean() for s in splits])

    iid = load_dataset("breast-cancer", num_hospitals=5, seed=1)
    skewed = load_dataset("breast-cancer", num_hospitals=5, seed=1, alpha=0.1)
    assert positive_rates(skewed).std() > 3 * positive_rates(iid).std()
    for s in skewed:
        assert len(s.y_train) + len(s.y_test) >= MIN_ROWS_PER_HOSPITAL
        assert len(s.y_train) >= 1 and len(s.y_test) >= 1


def test_split_across_hospitals_partitions_every_row_once() -> None:
    labels = np.repeat([0.0, 1.0], [300, 100])
    for alpha in (None, 0.05, 10.0):
        parts = split_across_hospitals(labels, 8, np.random.default_rng(3), alpha=alpha)
        joined = np.concatenate(parts)
        assert sorted(joined.tolist()) == list(range(400))
        assert min(len(p) for p in parts) >= MIN_ROWS_PER_HOSPITAL
    # 400 rows cannot give 40 hospitals the usual 12 each: each is guaranteed the floor of 5
    # instead; 81 hospitals cannot have even that, refused.
    parts = split_across_hospitals(labels, 40, np.random.default_rng(0), alpha=0.05)
    assert min(len(p) for p in parts) >= MIN_ROWS_FLOOR
    assert min(len(p) for p in parts) < 400 // 40  # the skew is not flattened to equal shares
    assert sorted(np.concatenate(parts).tolist()) == list(range(400))
    with pytest.raises(DataError, match="use fewer hospitals"):
        split_across_hospitals(labels, 81, np.random.default_rng(0))


def test_breast_cancer_statistics_stay_inside_each_hospital(monkeypatch) -> None:
    x, y, names = breast_cancer._breast_cancer_arrays()
    seed, alpha = 4, 0.7
    parts = split_across_hospitals(y, 4, np.random.default_rng(seed), alpha=alpha)
    baseline = load_dataset("breast-cancer", num_hospitals=4, seed=seed, alpha=alpha)

    # Distort every other hospital's patients (non-linearly, so their own z-scores change
    # too): hospital_0 must not notice.
    changed = x.copy()
    others = np.concatenate(parts[1:])
    changed[others] = np.sqrt(changed[others]) * 1000.0 + 77.0
    monkeypatch.setattr(breast_cancer, "_breast_cancer_arrays", lambda: (changed, y, names))
    after = load_dataset("breast-cancer", num_hospitals=4, seed=seed, alpha=alpha)
    assert_same_split(baseline[0], after[0])
    assert not np.allclose(baseline[1].x_test, after[1].x_test)

    # Hospital_0's own test rows are not used to fit anything either.
    _, test = data.train_test_positions("hospital_0", y[parts[0]], test_fraction=0.25, seed=seed)
    changed = x.copy()
    changed[parts[0][test]] *= -50.0
    monkeypatch.setattr(breast_cancer, "_breast_cancer_arrays", lambda: (changed, y, names))
    after = load_dataset("breast-cancer", num_hospitals=4, seed=seed, alpha=alpha)
    np.testing.assert_array_equal(baseline[0].x_train, after[0].x_train)
    assert not np.allclose(baseline[0].x_test, after[0].x_test)


# --- heart-disease (Fed-Heart-Disease) ----------------------------------------------------

HEART_SIZES = {  # FLamby's published train/test sizes and the positives SOURCE.md counts
    "cleveland": (199, 104, 139),
    "hungary": (172, 89, 98),
    "switzerland": (30, 16, 45),
    "va": (85, 45, 101),
}


@needs_heart
def test_heart_disease_matches_flamby_sizes_and_features() -> None:
    splits = load_dataset("heart-disease", path=str(HEART_DIR))
    assert [s.name for s in splits] == list(HEART_SIZES)
    for s in splits:
        train, test, positives = HEART_SIZES[s.name]
        assert (len(s.y_train), len(s.y_test)) == (train, test)
        assert s.y_train.sum() + s.y_test.sum() == positives
        assert s.input_shape == (13,)
        assert s.feature_names == (
            "age", "sex", "trestbps", "chol", "fbs", "thalach", "exang", "oldpeak",
            "cp_2", "cp_3", "cp_4", "restecg_1", "restecg_2",
        )  # fmt: skip
        assert_standardised_on_own_train(s, ddof=1)
    # Stratified where each class has more than 2 rows: class balance is kept in test.
    cleveland = splits[0]
    assert abs(cleveland.y_train.mean() - cleveland.y_test.mean()) < 0.01
    # Switzerland has one negative patient and is not stratified; it lands in test.
    assert splits[2].y_train.sum() == 30 and splits[2].y_test.sum() == 15
    # chol is recorded as 0 (missing) for every Swiss patient: a constant column stays 0.
    chol = splits[2].feature_names.index("chol")
    assert not splits[2].x_train[:, chol].any() and not splits[2].x_test[:, chol].any()


@needs_heart
def test_heart_disease_default_path_finds_shared_data() -> None:
    assert data.default_data_path("heart-disease") == HEART_DIR
    by_default = load_dataset("heart-disease")
    explicit = load_dataset("heart-disease", path=HEART_DIR, seed=123)  # fixed FLamby split
    for a, b in zip(by_default, explicit, strict=True):
        assert_same_split(a, b)


@needs_heart
def test_heart_disease_statistics_stay_inside_each_centre(tmp_path: Path) -> None:
    shutil.copytree(HEART_DIR, tmp_path / "hd", dirs_exist_ok=True)
    baseline = load_dataset("heart-disease", path=tmp_path / "hd")
    # Double every age, blood pressure and cholesterol at Hungary and the VA.
    for filename in ("processed.hungarian.data", "processed.va.data"):
        file = tmp_path / "hd" / filename
        file.chmod(0o644)
        rows = [line.split(",") for line in file.read_text().splitlines() if line]
        for row in rows:
            for column in (0, 3, 4):
                if row[column] != "?":
                    row[column] = str(float(row[column]) * 2 + 5)
        file.write_text("\n".join(",".join(row) for row in rows) + "\n")
    after = load_dataset("heart-disease", path=tmp_path / "hd")
    assert_same_split(baseline[0], after[0])  # cleveland untouched
    assert_same_split(baseline[2], after[2])  # switzerland untouched
    # Hungary's own z-scores are invariant to an affine change of its own columns...
    np.testing.assert_allclose(baseline[1].x_train, after[1].x_train, atol=1e-5)
    # ...which would not hold if any other centre's statistics had been used.


@needs_heart
def test_heart_disease_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    shutil.copytree(HEART_DIR, tmp_path / "hd")
    (tmp_path / "hd" / "processed.va.data").unlink()
    with pytest.raises(DataError, match=r"processed\.va\.data"):
        load_dataset("heart-disease", path=tmp_path / "hd")


# --- medmnist -----------------------------------------------------------------------------


@needs_medmnist
def test_medmnist_split_across_hospitals() -> None:
    splits = load_dataset("medmnist", path=MEDMNIST_NPZ, num_hospitals=3, seed=0)
    assert sum(len(s.y_train) for s in splits) == 4708
    assert sum(len(s.y_test) for s in splits) == 624
    assert sum(s.y_train.sum() for s in splits) == 3494  # pneumonia in the official train
    for s in splits:
        assert s.input_shape == (1, 28, 28)
        assert s.x_train.dtype == np.float32
        assert s.x_train.min() >= 0.0 and s.x_train.max() <= 1.0
        assert s.x_train.max() > 0.9  # scaled by 255, not standardised away


@needs_medmnist
def test_medmnist_label_skew_is_deterministic_and_keeps_minimum() -> None:
    first = load_dataset("medmnist", path=MEDMNIST_NPZ, num_hospitals=4, seed=5, alpha=0.2)
    again = load_dataset("medmnist", path=MEDMNIST_NPZ, num_hospitals=4, seed=5, alpha=0.2)
    for a, b in zip(first, again, strict=True):
        assert_same_split(a, b)
    rates = [s.y_train.mean() for s in first]
    assert max(rates) - min(rates) > 0.3
    for s in first:
        assert len(s.y_train) >= MIN_ROWS_PER_HOSPITAL and len(s.y_test) >= MIN_ROWS_PER_HOSPITAL
        # Train and test of one hospital follow the same label mix (one Dirichlet draw).
        assert abs(s.y_train.mean() - s.y_test.mean()) < 0.25


def test_medmnist_rejects_a_non_medmnist_file(tmp_path: Path) -> None:
    bogus = tmp_path / "x.npz"
    np.savez(bogus, images=np.zeros((3, 28, 28)))
    with pytest.raises(DataError, match="not a MedMNIST file"):
        load_dataset("medmnist", path=bogus)


# --- csv ----------------------------------------------------------------------------------

HEADER = ["patient_age", "smoker", "ward", "outcome", "site"]


def clinic_rows(site: str, n: int, seed: int, shift: float = 0.0) -> list[list[str]]:
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        age = "" if i % 7 == 3 else f"{rng.normal(60 + shift, 10):.1f}"
        smoker = "NA" if i % 11 == 5 else str(rng.choice(["yes", "no", "former"]))
        ward = str(rng.choice(["A", "B"]))
        rows.append([age, smoker, ward, str(int(i % 3 == 0)), site])
    return rows


def write_csv(path: Path, rows: list[list[str]], header: list[str] = HEADER) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def test_csv_single_file_encodes_numeric_and_categorical(tmp_path: Path) -> None:
    file = write_csv(
        tmp_path / "all.csv", clinic_rows("north", 40, 1) + clinic_rows("south", 30, 2)
    )
    splits = load_dataset("csv", path=file, label="outcome", site="site", seed=3)
    assert [s.name for s in splits] == ["north", "south"]  # sorted site values
    names = ("patient_age", "smoker=former", "smoker=no", "smoker=yes", "ward=A", "ward=B")
    for s, n in zip(splits, (40, 30), strict=True):
        assert len(s.y_train) + len(s.y_test) == n
        assert s.feature_names == names and s.input_shape == (len(names),)
        assert not np.isnan(s.x_train).any() and not np.isnan(s.x_test).any()
        age = s.x_train[:, 0]
        assert abs(age.mean()) < 1e-5 and abs(age.std() - 1) < 1e-4
        # Each categorical column is one indicator per row, one column per agreed value.
        for block in (slice(1, 4), slice(4, 6)):
            np.testing.assert_array_equal(s.x_train[:, block].sum(axis=1), 1.0)
        assert s.x_train[:, names.index("smoker=yes")].any()


def test_csv_imputes_with_own_train_median_and_mode(tmp_path: Path) -> None:
    ages = [50, 60, 70, 80, 55, 65, 75, 85]
    smokers = ["yes", "yes", "no", "yes"] * 2
    rows = [[str(a), s, "A", str(a % 2), "x"] for a, s in zip(ages, smokers, strict=True)]
    rows += [["", "", "A", "0", "x"], ["?", "NA", "A", "1", "x"]]
    file = write_csv(tmp_path / "one.csv", rows)
    (split,) = load_dataset("csv", path=file, label="outcome", site="site", test_fraction=0.2)
    labels = np.array([float(r[3]) for r in rows])
    train, test = data.train_test_positions("x", labels, test_fraction=0.2, seed=0)
    ages = np.array([float(r[0]) if r[0] not in ("", "?") else np.nan for r in rows])
    median = np.nanmedian(ages[train])  # the train median, never the test rows' values
    filled = np.where(np.isnan(ages), median, ages)
    mean, std = filled[train].mean(), filled[train].std()
    np.testing.assert_allclose(split.x_train[:, 0], (filled[train] - mean) / std, rtol=1e-5)
    np.testing.assert_allclose(split.x_test[:, 0], (filled[test] - mean) / std, rtol=1e-5)
    # A missing smoker value becomes the train mode ("yes", 6 of 8 known values).
    yes = split.feature_names.index("smoker=yes")
    blank_rows = [
        k for k, row in enumerate(np.concatenate([train, test])) if rows[row][1] in ("", "NA")
    ]
    both = np.concatenate([split.x_train, split.x_test])
    assert all(both[k, yes] == 1.0 for k in blank_rows)


def test_csv_statistics_stay_inside_each_site(tmp_path: Path) -> None:
    north = clinic_rows("north", 40, 1)
    file = write_csv(tmp_path / "a.csv", north + clinic_rows("south", 30, 2))
    before = load_dataset("csv", path=file, label="outcome", site="site")
    # South's ages shift by 40 years and it gains a new ward and smoking category.
    south = clinic_rows("south", 30, 2, shift=40.0)
    for row in south[:10]:
        row[1], row[2] = "heavy", "ICU"
    write_csv(file, north + south)
    after = load_dataset("csv", path=file, label="outcome", site="site")
    # The vocabulary is schema shared by all (which values exist, never how often): North
    # gains two all-zero indicators and every number it had stays as it was.
    new = {"smoker=heavy", "ward=ICU"}
    assert set(after[0].feature_names) - set(before[0].feature_names) == new
    old = [after[0].feature_names.index(n) for n in before[0].feature_names]
    np.testing.assert_array_equal(after[0].x_train[:, old], before[0].x_train)
    np.testing.assert_array_equal(after[0].x_test[:, old], before[0].x_test)
    added = [after[0].feature_names.index(n) for n in new]
    assert not after[0].x_train[:, added].any()
    assert not np.array_equal(before[1].x_train, after[1].x_train[:, old])
    assert after[0].feature_names == after[1].feature_names  # one layout everywhere


def test_csv_directory_equals_single_file(tmp_path: Path) -> None:
    north, south = clinic_rows("north", 40, 1), clinic_rows("south", 30, 2)
    single = write_csv(tmp_path / "all.csv", north + south)
    (tmp_path / "sites").mkdir()
    header = ["outcome", "ward", "smoker", "patient_age"]  # column order may differ per file
    for name, rows in (("north", north), ("south", south)):
        reordered = [[r[3], r[2], r[1], r[0]] for r in rows]
        write_csv(tmp_path / "sites" / f"{name}.csv", reordered, header)
    from_file = load_dataset("csv", path=single, label="outcome", site="site", seed=9)
    from_dir = load_dataset("csv", path=tmp_path / "sites", label="outcome", seed=9)
    assert [s.name for s in from_dir] == ["north", "south"]
    for a, b in zip(from_file, from_dir, strict=True):
        assert_same_split(a, b)


@pytest.mark.parametrize(
    ("rows", "kwargs", "message"),
    [
        (None, {"label": "death"}, "unknown label column 'death'"),
        (None, {"label": "outcome", "site": "hospital"}, "unknown site column 'hospital'"),
        ([["60", "no", "A", "1", "x"]] * 6, {}, "single value"),
        ([["60", "no", "A", "1", ""], ["61", "no", "A", "0", "x"]], {}, "no value in site"),
        ([["60", "no", "A", "2", "x"], ["61", "no", "A", "0", "x"]], {}, "labels must be 0/1"),
        ([["60", "no", "A", "", "x"], ["61", "no", "A", "0", "x"]], {}, "is missing"),
        (
            [["60", "no", "A", "1", "x"], ["61", "no", "A", "0", "x"], ["62", "no", "A", "0", "y"]],
            {},
            "'y' has 1 row",
        ),
        (
            [
                ["60", "no", "A", "1", "x"],
                ["60", "no", "A", "0", "x"],
                ["old", "no", "A", "0", "y"],
                ["7", "no", "A", "0", "y"],
            ],
            {},
            "numeric at some sites and text at others",
        ),
    ],
)
def test_csv_bad_input_gives_clear_errors(tmp_path: Path, rows, kwargs, message) -> None:
    file = write_csv(tmp_path / "bad.csv", rows if rows is not None else clinic_rows("x", 10, 0))
    arguments = {"label": "outcome", "site": "site"} | kwargs
    with pytest.raises(DataError, match=message):
        load_dataset("csv", path=file, **arguments)


def test_csv_directory_errors(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    write_csv(tmp_path / "d" / "a.csv", clinic_rows("a", 10, 0))
    write_csv(tmp_path / "d" / "b.csv", [])
    with pytest.raises(DataError, match=r"site 'b'.*has no rows"):
        load_dataset("csv", path=tmp_path / "d", label="outcome")
    write_csv(tmp_path / "d" / "b.csv", [r[:3] + r[4:] for r in clinic_rows("b", 10, 0)],
              ["patient_age", "smoker", "ward", "outcome"])  # fmt: skip
    with pytest.raises(DataError, match=r"different columns.*extra \[\]|missing \['site'\]"):
        load_dataset("csv", path=tmp_path / "d", label="outcome")
    with pytest.raises(DataError, match="drop site="):
        load_dataset("csv", path=tmp_path / "d", label="outcome", site="site")
    with pytest.raises(DataError, match=r"no \*\.csv files"):
        load_dataset("csv", path=tmp_path, label="outcome")


# --- load_dataset arguments -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "kwargs", "message"),
    [
        ("mnist", {}, "unknown dataset 'mnist'"),
        ("breast-cancer", {"alpha": 0.0}, "alpha must be > 0"),
        ("breast-cancer", {"test_fraction": 1.0}, "test_fraction"),
        ("breast-cancer", {"num_hospitals": 0}, "num_hospitals"),
        ("breast-cancer", {"label": "y"}, "only apply to dataset 'csv'"),
        ("breast-cancer", {"num_hospitals": 114}, "use fewer hospitals"),
        ("heart-disease", {"alpha": 0.5}, "real hospitals"),
        ("csv", {}, "needs path"),
    ],
)
def test_load_dataset_rejects_bad_arguments(name, kwargs, message) -> None:
    with pytest.raises(DataError, match=message):
        load_dataset(name, **kwargs)


def test_default_data_path_says_where_it_looked(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv(data.DATA_DIR_ENV, str(tmp_path))
    with pytest.raises(DataError, match=str(tmp_path / "heart_disease")):
        data.default_data_path("heart-disease")


def test_hospital_split_validates_its_arrays() -> None:
    ok = np.zeros((4, 2), dtype=np.float32)
    labels = np.array([0, 1, 0, 1], dtype=np.float32)
    with pytest.raises(DataError, match="float32"):
        HospitalSplit("h", ok.astype(np.float64), labels, ok, labels)
    with pytest.raises(DataError, match="0 or 1"):
        HospitalSplit("h", ok, labels * 2, ok, labels)
    with pytest.raises(DataError, match="rows but labels"):
        HospitalSplit("h", ok[:3], labels, ok, labels)


# --- bad bytes ----------------------------------------------------------------------------


@settings(max_examples=150, deadline=None, derandomize=True)
@given(st.binary(max_size=40), st.integers(min_value=0, max_value=400))
def test_corrupted_csv_bytes_raise_only_data_errors(junk: bytes, position: int) -> None:
    good = "patient_age,smoker,outcome,site\n" + "".join(
        f"{50 + i},{'yes' if i % 3 else 'no'},{i % 2},{'ab'[i % 2]}\n" for i in range(12)
    )
    raw = good.encode()
    position = min(position, len(raw))
    with tempfile.TemporaryDirectory() as directory:
        file = Path(directory) / "x.csv"
        file.write_bytes(raw[:position] + junk + raw[position:])
        try:
            splits = load_dataset("csv", path=file, label="outcome", site="site")
        except DataError:
            return
        for split in splits:
            assert np.isfinite(split.x_train).all() and np.isfinite(split.x_test).all()


@pytest.mark.parametrize(
    "content", [b"", b"\xff\xfe\x00garbage", b"PK\x03\x04truncated zip", b"\x00" * 64]
)
def test_corrupted_npz_and_heart_files_raise_data_errors(tmp_path: Path, content: bytes) -> None:
    bogus = tmp_path / "bad.npz"
    bogus.write_bytes(content)
    with pytest.raises(DataError):
        load_dataset("medmnist", path=bogus)
    (tmp_path / "hd").mkdir()
    for filename in heart_disease.HEART_CENTRES.values():
        (tmp_path / "hd" / filename).write_bytes(content + b"\n1,2,3")
    with pytest.raises(DataError):
        load_dataset("heart-disease", path=tmp_path / "hd")


def test_heart_values_outside_the_uci_codes_are_rejected(tmp_path: Path) -> None:
    (tmp_path / "hd").mkdir()
    row = "63,1,{cp},145,233,1,2,150,0,2.3,3,0,6,0\n"
    for filename in heart_disease.HEART_CENTRES.values():
        (tmp_path / "hd" / filename).write_text(row.format(cp=1) * 4)
    (tmp_path / "hd" / "processed.va.data").write_text(row.format(cp=7) * 4)
    with pytest.raises(DataError, match=r"cp = 7 is not one of the UCI codes"):
        load_dataset("heart-disease", path=tmp_path / "hd")
    (tmp_path / "hd" / "processed.va.data").write_text(row.format(cp="inf") * 4)
    with pytest.raises(DataError, match="not a finite number"):
        load_dataset("heart-disease", path=tmp_path / "hd")


# --- preprocessing="reference": public constants, nothing fitted (what DP needs) ------------

REFERENCE_ROWS = [
    ["column", "kind", "center", "scale", "fill", "categories"],
    ["patient_age", "numeric", "60", "10", "", ""],
    ["smoker", "categorical", "", "", "no", "yes|no|former"],
    ["ward", "categorical", "", "", "", "A|B"],
]


def write_reference(path: Path, rows: list[list[str]] = REFERENCE_ROWS) -> Path:
    with path.open("w", newline="") as handle:
        csv.writer(handle).writerows(rows)
    return path


def test_csv_reference_scales_and_imputes_with_its_constants_only(tmp_path: Path) -> None:
    rows = clinic_rows("north", 40, 1)
    file = write_csv(tmp_path / "all.csv", rows)
    reference = write_reference(tmp_path / "reference.csv")
    (split,) = load_dataset(
        "csv", path=file, label="outcome", site="site", preprocessing="reference",
        reference=reference,
    )  # fmt: skip
    train, test = data.row_split_positions(
        "north", [r[:3] for r in rows], np.array([float(r[3]) for r in rows]),
        test_fraction=0.25, seed=0,
    )  # fmt: skip
    ages = np.array([float(r[0]) if r[0] else 60.0 for r in rows])  # missing -> the center
    np.testing.assert_array_equal(split.x_train[:, 0], ((ages[train] - 60) / 10).astype(np.float32))
    np.testing.assert_array_equal(split.x_test[:, 0], ((ages[test] - 60) / 10).astype(np.float32))
    smoker_no = split.feature_names.index("smoker=no")
    for position, row in zip(train, split.x_train, strict=True):
        if rows[position][1] == "NA":
            assert row[smoker_no] == 1.0  # the reference's fill, not the train mode
    assert split.feature_names[0] == "patient_age"


def test_row_split_places_each_row_by_itself() -> None:
    rng = np.random.default_rng(0)
    rows = [[f"{v:.3f}", "a"] for v in rng.random(400)]
    y = (rng.random(400) < 0.3).astype(np.float32)
    train, test = data.row_split_positions("h", rows, y, test_fraction=0.25, seed=0)
    assert 60 < len(test) < 140 and len(train) + len(test) == 400
    # One more patient, anywhere: every other row stays on its side.
    more = [*rows[:200], ["9.999", "b"], *rows[200:]]
    y_more = np.r_[y[:200], 1.0, y[200:]].astype(np.float32)
    train_more, _ = data.row_split_positions("h", more, y_more, test_fraction=0.25, seed=0)
    others = [p if p < 200 else p - 1 for p in train_more if p != 200]
    np.testing.assert_array_equal(others, train)
    other_seed, _ = data.row_split_positions("h", rows, y, test_fraction=0.25, seed=1)
    assert not np.array_equal(other_seed, train)
    with pytest.raises(DataError, match="put all 1 rows"):
        data.row_split_positions("h", rows[:1], y[:1], test_fraction=0.25, seed=0)


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([["column", "kind", "center"]], "exactly the columns"),
        ([*REFERENCE_ROWS, ["bmi", "numeric", "25", "0", "", ""]], "scale > 0"),
        ([*REFERENCE_ROWS, ["bmi", "numeric", "x", "1", "", ""]], "center 'x' is not a finite"),
        ([*REFERENCE_ROWS, ["bmi", "ordinal", "", "", "", ""]], "use numeric or categorical"),
        ([*REFERENCE_ROWS, ["bmi", "categorical", "1", "", "", ""]], "has no center or scale"),
        ([*REFERENCE_ROWS, ["smoker", "categorical", "", "", "", "a"]], "each named once"),
        ([*REFERENCE_ROWS, ["bmi", "categorical", "", "", "", "a||b"]], "list each value once"),
        ([*REFERENCE_ROWS, ["bmi", "categorical", "", "", "c", "a|b"]], "not one of its"),
    ],
)
def test_bad_reference_files_are_refused_by_row(tmp_path: Path, rows, message: str) -> None:
    with pytest.raises(DataError, match=message):
        csv_data.read_reference(write_reference(tmp_path / "ref.csv", rows))


def test_reference_must_name_exactly_the_data_columns(tmp_path: Path) -> None:
    file = write_csv(tmp_path / "all.csv", clinic_rows("north", 40, 1))
    kwargs = {"label": "outcome", "site": "site", "preprocessing": "reference"}
    short = write_reference(tmp_path / "short.csv", REFERENCE_ROWS[:3])
    with pytest.raises(DataError, match=r"not in the reference \['ward'\]"):
        load_dataset("csv", path=file, reference=short, **kwargs)
    text = write_reference(
        tmp_path / "text.csv",
        [*REFERENCE_ROWS[:2], ["smoker", "numeric", "0", "1", "", ""], REFERENCE_ROWS[3]],
    )
    with pytest.raises(DataError, match="'smoker' is numeric but holds"):
        load_dataset("csv", path=file, reference=text, **kwargs)
    with pytest.raises(DataError, match="needs a reference file"):
        load_dataset("csv", path=file, **kwargs)
    with pytest.raises(DataError, match="only applies to dataset 'csv'"):
        load_dataset("breast-cancer", reference=short)
    with pytest.raises(DataError, match="unknown preprocessing"):
        load_dataset("breast-cancer", preprocessing="zscore")


def test_breast_cancer_reference_is_the_documented_range_per_row() -> None:
    fitted = load_dataset("breast-cancer", num_hospitals=4, seed=0)
    reference = load_dataset("breast-cancer", num_hospitals=4, seed=0, preprocessing="reference")
    x, y, _ = breast_cancer._breast_cancer_arrays()
    parts = split_across_hospitals(y, 4, np.random.default_rng(0))
    centers, scales = breast_cancer.breast_cancer_reference()
    assert centers[3] == pytest.approx((143.5 + 2501.0) / 2)  # mean area, from the documentation
    assert scales[3] == pytest.approx((2501.0 - 143.5) / 6)
    for rows, a, b in zip(parts, fitted, reference, strict=True):
        train, _ = data.train_test_positions(a.name, y[rows], test_fraction=0.25, seed=0)
        np.testing.assert_array_equal(a.y_train, b.y_train)  # the same patients, split alike
        expected = ((x[rows][train] - centers) / scales).astype(np.float32)
        np.testing.assert_array_equal(b.x_train, expected)
        assert 0.2 < b.x_train.std() < 3  # on roughly the z-score scale


@needs_heart
def test_heart_disease_reference_keeps_each_patients_features_when_one_joins(
    tmp_path: Path,
) -> None:
    shutil.copytree(HEART_DIR, tmp_path / "hd", dirs_exist_ok=True)
    before = {p: load_dataset("heart-disease", path=tmp_path / "hd", preprocessing=p)
              for p in ("fitted", "reference")}  # fmt: skip
    cleveland = tmp_path / "hd" / "processed.cleveland.data"
    cleveland.chmod(0o644)
    with cleveland.open("a") as handle:  # one more patient at Cleveland
        handle.write("47.5,0.0,3.0,131.0,247.0,0.0,0.0,163.0,0.0,0.7,1.0,0.0,3.0,1\n")
    after = {p: load_dataset("heart-disease", path=tmp_path / "hd", preprocessing=p)
             for p in ("fitted", "reference")}  # fmt: skip

    def rows(split: HospitalSplit) -> set[bytes]:
        return {r.tobytes() for r in np.concatenate([split.x_train, split.x_test])}

    # FLamby's split re-deals Cleveland's patients, but with reference constants each one's
    # features are bit-identical wherever it lands; with fitted statistics none of them is.
    assert rows(before["reference"][0]) < rows(after["reference"][0])
    assert not rows(before["fitted"][0]) & rows(after["fitted"][0])
    centers, scales = heart_disease.heart_disease_reference(before["reference"][0].feature_names)
    assert dict(zip(before["reference"][0].feature_names[:3], centers[:3], strict=True)) == {
        "age": 50.0, "sex": 0.5, "trestbps": 120.0,
    }  # fmt: skip
    assert scales.min() > 0
