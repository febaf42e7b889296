"""Clinical-grade quality targets (issue #24): PneumoniaMNIST, Fed-Heart-Disease, TCGA-BRCA.

Every figure comes from `run_cluster.py` itself (real node processes, signed and encrypted
gossip, the dataset's default recipe from models/recipes.py), one run per seed:

- **pneumonia**: `--dataset medmnist`, 4 hospitals (IID split of the official train images,
  each scored on its share of the official test split), no DP with `--baselines` (the pooled
  baseline trains the same recipe on all training images), and DP at ε = 3. Seeds 0..4.
  The table also shows the AUC of each hospital's final model over the whole official test
  split (624 images), where 156-image shares do not decide the result.
- **heart**: FLamby's protocol for Fed-Heart-Disease: its split, logistic regression, seeds
  42..46, unweighted loss (FLamby's BCE), accuracy at threshold 0.5 averaged over the four
  centres (`--threshold 0.5`), without DP and with DP at ε = 1. What the protocol leaves
  open (feature scaling, an adaptive outer step) is chosen first by bench/heart_select.py on
  a validation split of the training rows, and printed.
- **tcga**: survival on Fed-TCGA-BRCA, six regions, the mean per-region Harrell's C-index,
  without DP and with DP at ε = 1, with bench/survival.py's recipes and runner. Seeds 42..46.

    python bench/quality.py            # 5 seeds (a pneumonia seed takes 10-30 min on 2 cores)
    python bench/quality.py --quick    # 1 seed each
    python bench/quality.py --only heart

The last line is one JSON object with the means over seeds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PNEUMONIA_SEEDS = (0, 1, 2, 3, 4)
HEART_SEEDS = (42, 43, 44, 45, 46)  # FLamby's benchmark seeds
TCGA_SEEDS = (42, 43, 44, 45, 46)  # FLamby's seeds, as bench/survival.py
TARGETS = {  # key -> (bar, what it is)
    "pneumonia_auc": (0.95, "≥ 0.95 (ResNet-18 reference 0.944)"),
    "pneumonia_dp3_auc": (0.92, "≥ 0.92"),
    "tcga_c_index": (0.815, "≥ 0.815"),
    "tcga_dp1_c_index": (0.78, "≥ 0.78"),
    "heart_flamby_acc": (0.735, "≥ 0.735 (FLamby pooled)"),
    "heart_flamby_dp1_acc": (0.731, "≥ 0.731"),
}


def run_cluster(argv: list[str], timeout_s: float) -> dict[str, Any]:
    """One run_cluster.py run; its report.json. A failed run raises with its output's tail."""
    with tempfile.TemporaryDirectory(prefix="murmur-quality-") as tmp:
        cmd = [sys.executable, "run_cluster.py", *argv, "--quiet", "--out", tmp]
        done = subprocess.run(
            cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout_s, check=False
        )
        report_file = Path(tmp) / "report.json"
        if done.returncode != 0 or not report_file.exists():
            tail = (done.stdout + done.stderr)[-2000:]
            raise RuntimeError(f"run_cluster {' '.join(argv)} exited {done.returncode}:\n{tail}")
        return json.loads(report_file.read_text())


def mean_accuracy(report: dict[str, Any]) -> float:
    """FLamby's figure: the unweighted mean over centres of test accuracy at threshold 0.5."""
    hospitals = [h for h in report["hospitals"] if not h["byzantine"]]
    if any(h.get("threshold") != 0.5 for h in hospitals):
        raise RuntimeError("heart accuracies must be at threshold 0.5 (FLamby's protocol)")
    return statistics.fmean(h["accuracy"] for h in hospitals)


def pneumonia(seed: int, timeout_s: float, dp_only: bool = False) -> dict[str, float | None]:
    """One seed's figures; ``dp_only`` skips the no-DP run and its baselines (None then)."""
    common = ["--dataset", "medmnist", "--seed", str(seed), "--round-timeout", "300"]
    private = run_cluster([*common, "--dp-epsilon", "3", "--no-baselines"], timeout_s)
    plain = None if dp_only else run_cluster([*common, "--no-dp", "--baselines"], timeout_s)
    return {
        "auc": plain and plain["mean_auc"],
        "whole_test_auc": plain and plain["whole_test"]["mean_auc"],
        "pooled_auc": plain and plain["baselines"]["pooled"]["mean_auc"],
        "local_auc": plain and plain["baselines"]["local"]["mean_auc"],
        "dp3_auc": private["mean_auc"],
        "dp3_whole_test_auc": private["whole_test"]["mean_auc"],
    }


def heart(seed: int, timeout_s: float, extra: list[str]) -> dict[str, float | None]:
    common = ["--dataset", "heart-disease", "--seed", str(seed), "--threshold", "0.5", *extra]
    # FLamby trains with an unweighted BCE loss; under DP murmur never weights by class.
    plain = run_cluster(
        [*common, "--no-dp", "--class-weights", "1", "1", "--no-baselines"], timeout_s
    )
    private = run_cluster([*common, "--dp-epsilon", "1", "--no-baselines"], timeout_s)
    out = {"acc": mean_accuracy(plain), "dp1_acc": mean_accuracy(private)}
    for name, report in (("", plain), ("dp1_", private)):
        for h in report["hospitals"]:
            out[f"{name}{h['name']}"] = h["accuracy"]
    return out


def fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def mean_of(rows: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in rows if r.get(key) is not None]
    return statistics.fmean(values) if values else None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="one seed per task")
    p.add_argument("--only", choices=["pneumonia", "heart", "tcga"], help="run one task only")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per run_cluster run")
    p.add_argument(
        "--dp-only",
        action="store_true",
        help="PneumoniaMNIST: the DP runs only (the no-DP figures are then null)",
    )
    p.add_argument(
        "--heart-extra",
        help="run_cluster options for the heart runs instead of bench/heart_select.py's choice, "
        "e.g. '--preprocessing fitted --server-optimizer yogi'",
    )
    args = p.parse_args()
    n = 1 if args.quick else 5
    started = time.monotonic()
    pneumonia_rows: list[dict[str, Any]] = []
    heart_rows: list[dict[str, Any]] = []
    if args.only in (None, "pneumonia"):
        print("PneumoniaMNIST, 4 hospitals, recipe of models/recipes.py", flush=True)
        print(
            f"{'seed':>4} {'AUC':>6} {'whole':>6} {'pooled':>6} {'local':>6} {'DP3':>6} "
            f"{'DP3 whole':>9}"
        )
        for seed in PNEUMONIA_SEEDS[:n]:
            row = pneumonia(seed, args.timeout, args.dp_only)
            pneumonia_rows.append(row)
            print(
                f"{seed:>4} {fmt(row['auc']):>6} {fmt(row['whole_test_auc']):>6} "
                f"{fmt(row['pooled_auc']):>6} {fmt(row['local_auc']):>6} {fmt(row['dp3_auc']):>6} "
                f"{fmt(row['dp3_whole_test_auc']):>9}",
                flush=True,
            )
    if args.only in (None, "heart"):
        sites = ("cleveland", "hungary", "switzerland", "va")
        if args.heart_extra is None:
            from bench.heart_select import choose

            print("Fed-Heart-Disease: choosing on a validation split of the training rows")
            extra = choose().argv()
        else:
            extra = args.heart_extra.split()
        print(
            "\nFed-Heart-Disease, FLamby's protocol: accuracy at 0.5, mean over centres", flush=True
        )
        print(f"{'seed':>4} {'no DP':>6} {'DP ε=1':>6}  per centre (no DP | DP)")
        for seed in HEART_SEEDS[:n]:
            row = heart(seed, args.timeout, extra)
            heart_rows.append(row)
            centres = " ".join(
                f"{s[:5]} {fmt(row.get(s))}|{fmt(row.get('dp1_' + s))}" for s in sites
            )
            print(f"{seed:>4} {fmt(row['acc']):>6} {fmt(row['dp1_acc']):>6}  {centres}", flush=True)
    tcga: dict[str, list[float]] = {"tcga_c_index": [], "tcga_dp1_c_index": []}
    if args.only in (None, "tcga"):
        # bench/survival.py's recipes and runner: FLamby's seeds 42.., six regions.
        from bench.survival import RECIPES as TCGA_RECIPES
        from bench.survival import run_once as tcga_run

        print("\nFed-TCGA-BRCA, 6 regions: mean per-region C-index", flush=True)
        print(f"{'seed':>4} {'no DP':>6} {'DP ε=1':>6}")
        with tempfile.TemporaryDirectory(prefix="murmur-quality-tcga-") as tmp:
            for seed in TCGA_SEEDS[:n]:
                for setting in TCGA_RECIPES:
                    report = tcga_run(setting, seed, Path(tmp))
                    tcga[setting].append(report["mean_c_index"])
                print(
                    f"{seed:>4} {fmt(tcga['tcga_c_index'][-1]):>6} "
                    f"{fmt(tcga['tcga_dp1_c_index'][-1]):>6}",
                    flush=True,
                )
    figures = {
        "pneumonia_auc": mean_of(pneumonia_rows, "auc"),
        "pneumonia_pooled_auc": mean_of(pneumonia_rows, "pooled_auc"),
        "pneumonia_dp3_auc": mean_of(pneumonia_rows, "dp3_auc"),
        "tcga_c_index": mean_of([{"c": v} for v in tcga["tcga_c_index"]], "c"),
        "tcga_dp1_c_index": mean_of([{"c": v} for v in tcga["tcga_dp1_c_index"]], "c"),
        "heart_flamby_acc": mean_of(heart_rows, "acc"),
        "heart_flamby_dp1_acc": mean_of(heart_rows, "dp1_acc"),
    }
    print(f"\nmeans over {n} seed(s), {time.monotonic() - started:.0f} s")
    print(f"{'figure':<22} {'value':>6}  target")
    for key, value in figures.items():
        bar, text = TARGETS.get(key, (None, ""))
        if key == "pneumonia_pooled_auc":
            pooled = value
            bar = None if pooled is None else pooled - 0.01
            text = "(pneumonia_auc must be ≥ this − 0.01)"
            verdict = ""
            if pooled is not None and figures["pneumonia_auc"] is not None:
                gap = figures["pneumonia_auc"] - (pooled - 0.01)
                verdict = "met" if gap >= 0 else f"MISSED by {-gap:.3f}"
        elif value is None:
            verdict = "not run"
        else:
            verdict = "met" if value >= bar else f"MISSED by {bar - value:.3f}"
        print(f"{key:<22} {fmt(value):>6}  {text} {verdict}")
    print(json.dumps({k: None if v is None else round(v, 4) for k, v in figures.items()}))


if __name__ == "__main__":
    main()
