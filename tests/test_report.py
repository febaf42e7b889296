"""The run report: self-contained HTML with real PNG plots, and the plain-text summary."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import pytest
from matplotlib.figure import Figure
from murmur.node.report import summary_table, write_html_report
from murmur.node.report_plots import (
    AUC_PLOT,
    DISAGREEMENT_PLOT,
    EPSILON_PLOT,
    TRUST_PLOT,
    _legend,
    mean_disagreement,
    mean_trust_held,
)
from murmur.node.report_values import format_value, hospital_warnings

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _history(aucs: list[float | None], distances: list[float | None]) -> list[dict[str, Any]]:
    return [
        {
            "round": r,
            "auc": auc,
            "epsilon": 0.25 * r,
            "neighbour_distance": distance,
            "seconds": 0.4,
        }
        for r, (auc, distance) in enumerate(zip(aucs, distances, strict=True), start=1)
    ]


def _hospital(name: str, *, byzantine: bool = False, **fields: Any) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "name": name,
        "byzantine": byzantine,
        "auc": 0.95,
        "sensitivity": 0.9,
        "specificity": 0.88,
        "ppv": 0.91,
        "npv": 0.86,
        "brier": 0.08,
        "accuracy": 0.89,
        "majority_accuracy": 0.63,
        "threshold": 0.47,
        "n_test": 36,
        "n_train": 106,
        "epsilon": 0.75,
        "delta": 1e-5,
        "noise_multiplier": 1.13,
        "sample_rate": 0.30188,
        "dp_steps": 30,
        "rounds_completed": 3,
        "exit_code": 0,
        "rejected": {},
        "model_sha256": "ab" * 32,
        "history": _history([0.81, 0.9, 0.95], [0.6, 0.3, 0.1]),
    }
    entry.update(fields)
    return entry


def _report() -> dict[str, Any]:
    """Two honest hospitals, one honest hospital whose test split has one class, one attacker."""
    return {
        "dataset": "breast-cancer",
        "data_path": None,
        "model": "logreg",
        "nodes": 4,
        "topology": "complete",
        "spectral_gap": 0.75,
        "aggregator": {"rule": "trimmed_mean", "f": 1},
        "attack": {"name": "sign_flip", "byzantine": 1, "params": {"scale": 3.0}},
        "dp": {
            "enabled": True,
            "epsilon": 1.0,
            "delta": 1e-5,
            "max_grad_norm": 1.0,
            "accountant": "pld",
        },
        "rounds": 3,
        "local_epochs": 1,
        "seed": 0,
        "seconds": 12.5,
        "bytes_sent": 123456,
        "mean_auc": 0.94,
        "failed": [],
        "interrupted": None,
        "exit_code": 0,
        "rounds_completed": 3,
        "hospitals": [
            _hospital("hospital_0", rejected={"bad_signature": 2, "replay": 1}),
            _hospital("hospital_1", auc=0.93),
            _hospital(
                "hospital_2",
                auc=None,
                ppv=None,
                history=_history([None, None, None], [0.5, 0.2, None]),
                trust={"hospital_0": [1.0, 0.9, 0.95], "byzantine_0": [1.0, 0.4, 0.1]},
            ),
            _hospital(
                "byzantine_0",
                byzantine=True,
                auc=0.41,
                history=_history([0.5, 0.45, 0.41], [9.0, 9.5, 9.9]),
            ),
        ],
        "baselines": {
            "local": {
                "mean_auc": 0.9,
                "hospitals": [
                    {"name": f"hospital_{i}", "auc": 0.9, "accuracy": 0.85} for i in range(2)
                ]
                + [{"name": "hospital_2", "auc": None, "accuracy": 0.8}],
            },
            "pooled": {
                "mean_auc": 0.97,
                "hospitals": [
                    {"name": f"hospital_{i}", "auc": 0.97, "accuracy": 0.92} for i in range(2)
                ]
                + [{"name": "hospital_2", "auc": None, "accuracy": 0.9}],
            },
        },
    }


@pytest.fixture
def report() -> dict[str, Any]:
    return _report()


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    """The report written once (plotting is the slow part): (HTML text, run directory)."""
    run_dir = tmp_path_factory.mktemp("run")
    path = write_html_report(_report(), run_dir)
    assert path == run_dir / "report.html"
    return path.read_text(encoding="utf-8"), run_dir


def _row(page: str, name: str) -> list[str]:
    """The cells of the first table row that starts with `name`."""
    match = re.search(rf"<tr><td>{re.escape(name)}</td>(.*?)</tr>", page)
    assert match, f"no row for {name}"
    return re.findall(r"<td>(.*?)</td>", match.group(1))


def test_html_report_has_real_plots_and_every_hospital(
    report: dict[str, Any], written: tuple[str, Path]
):
    page, run_dir = written

    for plot in (AUC_PLOT, EPSILON_PLOT, DISAGREEMENT_PLOT, TRUST_PLOT):
        data = (run_dir / plot).read_bytes()
        assert data.startswith(PNG_MAGIC), plot
        assert len(data) > 5_000, f"{plot} is suspiciously small ({len(data)} bytes)"
        assert f'src="{plot}"' in page
    for hospital in report["hospitals"]:
        assert hospital["name"] in page


def test_html_shows_undefined_for_null_auc_never_zero(written: tuple[str, Path]):
    page, _ = written

    cells = _row(page, "hospital_2")  # first match: the clinical metrics table
    assert cells[0] == "honest"
    assert cells[1] == "undefined"  # AUC
    assert cells[4] == "undefined"  # PPV
    assert cells[2] == "0.900"  # a defined metric beside it still prints
    assert _row(page, "hospital_0")[1] == "0.950"


def test_html_is_self_contained(written: tuple[str, Path]):
    page, run_dir = written

    assert not re.search(r"https?://", page)
    assert "<script" not in page
    assert "<link" not in page
    for src in re.findall(r'src="([^"]+)"', page):
        assert (run_dir / src).is_file(), f"{src} is not a file beside report.html"


def test_html_shows_privacy_inputs_rejections_and_baselines(written: tuple[str, Path]):
    page, _ = written

    assert "1.130" in page  # the noise multiplier the accountant was given
    assert "0.30188" in page  # the sample rate, with enough digits to recompute ε
    assert "1e-05" in page  # δ, not rounded to 0.000
    assert "bad_signature" in page and "replay" in page
    assert "baseline mean AUC, pooled, no DP" in page
    assert "0.970" in page and "0.900" in page


def test_strings_are_escaped(report: dict[str, Any], tmp_path: Path):
    hostile = copy.deepcopy(report)
    hostile["hospitals"][0]["name"] = "<img src=x onerror=alert(1)>"
    hostile["data_path"] = "/data/<b>"

    page = write_html_report(hostile, tmp_path).read_text(encoding="utf-8")

    assert "<img src=x" not in page
    assert "&lt;img src=x onerror=alert(1)&gt;" in page
    assert "/data/&lt;b&gt;" in page


def test_optional_plots_are_left_out_when_there_is_nothing_to_plot(
    report: dict[str, Any], tmp_path: Path
):
    plain = copy.deepcopy(report)
    plain["dp"] = {"enabled": False, "epsilon": None, "delta": None}
    for hospital in plain["hospitals"]:
        hospital.pop("trust", None)
    (tmp_path / TRUST_PLOT).write_bytes(b"stale plot from an earlier run")

    page = write_html_report(plain, tmp_path).read_text(encoding="utf-8")

    assert not (tmp_path / TRUST_PLOT).exists()
    assert not (tmp_path / EPSILON_PLOT).exists()
    assert "Differential privacy was off" in page
    assert (tmp_path / AUC_PLOT).is_file()


def test_mean_disagreement_ignores_byzantine_and_undefined(report: dict[str, Any]):
    means = mean_disagreement(report["hospitals"])

    # Honest distances: round 1 (0.6, 0.6, 0.5), round 2 (0.3, 0.3, 0.2), round 3 (0.1, 0.1).
    assert means == pytest.approx({1: 1.7 / 3, 2: 0.8 / 3, 3: 0.1})


def test_mean_trust_held_averages_honest_holders_per_round():
    hospitals = [
        {"name": "a", "trust": {"b": [1.0, 0.8], "z": [1.0, 0.2, 0.0]}},
        {"name": "b", "trust": {"a": [1.0, 1.0], "z": [0.8, None, 0.4]}},
        {"name": "z", "byzantine": True, "trust": {"a": [0.0, 0.0]}},  # the attacker's view
    ]

    means = mean_trust_held(hospitals)

    assert list(means) == ["a", "b", "z"]
    assert means["a"] == [1.0, 1.0]  # only b's view: z is Byzantine
    assert means["b"] == [1.0, 0.8]
    # z: round 1 (1.0 + 0.8) / 2; round 2 only a's 0.2 (b's is undefined); round 3 (0 + 0.4) / 2
    assert means["z"] == pytest.approx([0.9, 0.2, 0.2])


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC)
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_a_big_network_gets_one_trust_panel(tmp_path: Path):
    """32 hospitals: one 7 x 4 inch trust panel (per-holder panels would be 83 inches tall
    and took 68 MB to draw)."""
    names = [f"hospital_{i}" for i in range(32)]
    big = _report()
    big["hospitals"] = [
        _hospital(name, trust={peer: [1.0, 0.9, 0.8] for peer in names if peer != name})
        for name in names
    ]
    small = _report()

    write_html_report(big, tmp_path / "big")
    write_html_report(small, tmp_path / "small")

    assert _png_size(tmp_path / "big" / TRUST_PLOT) == (700, 400)
    assert _png_size(tmp_path / "big" / AUC_PLOT) == (700, 400)
    # A small network keeps one panel per hospital that holds trust (one here).
    assert _png_size(tmp_path / "small" / TRUST_PLOT) == (700, 260)


@pytest.mark.parametrize(("lines", "has_legend"), [(3, True), (12, True), (13, False)])
def test_legend_only_when_it_fits(lines: int, has_legend: bool):
    ax = Figure().add_subplot()
    for i in range(lines):
        ax.plot([1, 2], [i, i], label=f"hospital_{i}")

    _legend(ax)

    assert (ax.get_legend() is not None) == has_legend


def test_summary_table(report: dict[str, Any]):
    text = summary_table(report)
    lines = text.splitlines()

    assert lines[0].split()[:3] == ["hospital", "AUC", "sensitivity"]
    rows = {line.split()[0]: line.split() for line in lines[2:6]}
    assert set(rows) == {"hospital_0", "hospital_1", "hospital_2", "byzantine_0"}
    assert rows["hospital_2"][1] == "undefined"
    assert rows["hospital_1"][1] == "0.930"
    assert rows["hospital_0"][5] == "0.630"  # majority accuracy beside accuracy
    assert "(Byzantine)" in text
    assert "mean AUC (honest nodes): 0.940" in text
    assert "baseline mean AUC, local only, no DP: 0.900" in text
    assert "baseline mean AUC, pooled, no DP: 0.970" in text


def test_format_value_never_turns_undefined_into_a_number():
    assert format_value(None) == "undefined"
    assert format_value(float("nan")) == "undefined"
    assert format_value(0.0) == "0.000"
    assert format_value(1e-5) == "1e-05"
    assert format_value(3) == "3"
    assert format_value(True) == "yes"


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ([], "must be a dict"),
        ({"dataset": "x"}, r"\['hospitals'\] is missing"),
        ({"hospitals": [{"auc": 0.5}]}, "string 'name'"),
        ({"hospitals": [{"name": "a", "history": "oops"}]}, "'history' must be a list"),
    ],
)
def test_bad_report_gets_a_clear_error(bad: Any, message: str, tmp_path: Path):
    with pytest.raises(ValueError, match=message):
        write_html_report(bad, tmp_path)
    with pytest.raises(ValueError, match=message):
        summary_table(bad)


# ---------------------------------------------------------------- warnings and interrupted runs


def test_a_model_that_does_not_beat_the_majority_rule_is_flagged():
    # Fed-Heart-Disease's Switzerland: accuracy 0.625 against always predicting "disease" 0.938.
    swiss = _hospital("switzerland", accuracy=0.625, majority_accuracy=0.938, n_test_positives=15)
    assert any("does not beat" in w and "0.938" in w for w in hospital_warnings(swiss, 3))
    equal = _hospital("tie", accuracy=0.7, majority_accuracy=0.7, n_test_positives=15)
    assert any("does not beat" in w for w in hospital_warnings(equal, 3))
    better = _hospital("fine", accuracy=0.89, majority_accuracy=0.63, n_test_positives=15)
    assert hospital_warnings(better, 3) == []


@pytest.mark.parametrize(
    ("n_test", "positives", "flagged"),
    [
        (16, 15, True),
        (16, 8, True),
        (36, 4, True),
        (36, 32, True),
        (36, 31, False),
        (36, 13, False),
    ],
)
def test_a_test_split_too_small_to_rank_is_flagged(n_test: int, positives: int, flagged: bool):
    hospital = _hospital("h", n_test=n_test, n_test_positives=positives)
    warnings = [w for w in hospital_warnings(hospital, 3) if "too small to rank" in w]
    assert bool(warnings) is flagged, warnings


def test_a_node_that_stopped_early_is_flagged_unless_its_budget_ran_out():
    stopped = _hospital("h", rounds_completed=2, phase="stopped", n_test_positives=15)
    assert "stopped after 2 of 3 planned rounds" in hospital_warnings(stopped, 3)
    spent = _hospital("h", rounds_completed=2, phase="budget_exhausted", n_test_positives=15)
    assert hospital_warnings(spent, 3) == []
    skipped = _hospital("h", rounds_completed=2, phase="done", n_test_positives=15)
    assert any("took part in 2 of 3 rounds" in w for w in hospital_warnings(skipped, 3))
    complete = _hospital("h", rounds_completed=3, phase="done", n_test_positives=15)
    assert hospital_warnings(complete, 3) == []


def test_an_interrupted_run_says_so_with_its_warnings_and_dp_baselines(tmp_path: Path):
    report = _report()
    report["interrupted"] = "stopped by a signal (Ctrl-C or SIGTERM)"
    report["exit_code"] = 130
    report["rounds_completed"] = 2
    report["warnings"] = ["1 hospital(s) trained with DP noise above 0.4 C per coordinate"]
    report["hospitals"][0]["warnings"] = ["stopped after 2 of 3 planned rounds"]
    report["baselines"]["local_dp"] = {
        "mean_auc": 0.811,
        "hospitals": [{"name": f"hospital_{i}", "auc": 0.811, "accuracy": 0.7} for i in range(3)],
    }
    page = write_html_report(report, tmp_path).read_text()
    assert "INTERRUPTED (stopped by a signal" in page and "exit code 130" in page
    assert "<h2>Warnings</h2>" in page
    assert "hospital_0: stopped after 2 of 3 planned rounds" in page
    assert "AUC local only, DP" in page and "0.811" in page
    text = summary_table(report)
    assert "run INTERRUPTED" in text and "warning: hospital_0: stopped after 2" in text
    assert "baseline mean AUC, local only, DP: 0.811" in text


def test_a_complete_run_has_no_warnings_section(tmp_path: Path):
    page = write_html_report(_report(), tmp_path).read_text()
    assert "<h2>Warnings</h2>" not in page and "complete; exit code" in page
