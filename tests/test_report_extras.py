"""The report's whole-test-split AUC and personalized rows (node/report_extras.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from murmur.models.data import load_dataset
from murmur.models.metrics import roc_auc
from murmur.models.training import predict_proba
from murmur.node.report import summary_table
from murmur.node.report_extras import personal_rows, whole_test_auc

from tests.netutil import run_in_process


def test_whole_test_auc_scores_each_final_model_on_every_hospitals_test_rows(
    tmp_path: Path,
) -> None:
    _, hospitals = run_in_process(["--no-dp", "--rounds", "2", "--aggregator", "mean"], tmp_path)
    configs = sorted((tmp_path / "configs").glob("*.toml"))
    got = whole_test_auc(configs)
    splits = load_dataset("breast-cancer", num_hospitals=4, seed=0)
    x = np.concatenate([s.x_test for s in splits])
    y = np.concatenate([s.y_test for s in splits])
    assert len(y) > max(len(s.y_test) for s in splits)
    for h in hospitals:
        expected = roc_auc(y, predict_proba(h.model, x))
        assert got[h.config.node.name] == pytest.approx(expected)


def test_personal_rows_pair_each_hospitals_shared_and_personal_metrics() -> None:
    report = {
        "hospitals": [
            {
                "name": "va",
                "auc": 0.77,
                "accuracy": 0.82,
                "personal": {"auc": 0.69, "accuracy": 0.76},
            },
            {"name": "hungary", "auc": 0.88, "accuracy": 0.81, "personal": None},
        ],
        "mean_auc": 0.8,
        "whole_test": {"mean_auc": 0.9},
    }
    assert personal_rows(report["hospitals"]) == [("va", 0.77, 0.69, 0.82, 0.76)]
    text = summary_table(report)
    assert "personalized va: AUC 0.690 (shared 0.770), accuracy 0.760 (shared 0.820)" in text
    assert "mean AUC on all hospitals' test rows: 0.900" in text
