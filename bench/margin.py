"""Does federating beat training alone? Fed-Heart-Disease's margin over local-only, over seeds.

Each seed runs `run_cluster.py --dataset heart-disease --baselines --no-dp --aggregator mean`
(four real node processes, FLamby's split) and reads report.json's `federation_margin`: the
mean per-hospital AUC of the gossip model minus the local-only model's, without the hospitals
that have no local model (Switzerland trains on 30 patients who all have the disease) and with
them counted against a constant prediction (AUC 0.5). The seed changes the shared initial
model and the batches; the split is FLamby's. The interval over seeds is the mean ± t(0.975,
seeds - 1) x sd / sqrt(seeds): how much the margin moves with the seed. Each run's own
interval (DeLong, test-patient sampling) is printed beside it. The tuned reference
(scikit-learn's L2 logistic regression, C by cross-validation on the training rows) is shown
next to murmur and its own pooled baseline.

Run: nice -n 10 python bench/margin.py [--quick] [--seeds 5]
Last line: {"heart_margin_without_one_class": ..., "heart_margin_with_one_class": ...,
"heart_margin_without_one_class_low": ..., "heart_margin_without_one_class_high": ...}
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMMAND = ["--dataset", "heart-disease", "--baselines", "--no-dp", "--aggregator", "mean"]


def run_once(seed: int, work: Path) -> dict:
    out = work / f"seed-{seed}"
    command = [sys.executable, str(ROOT / "run_cluster.py"), *COMMAND, "--seed", str(seed)]
    command += ["--quiet", "--out", str(out)]
    finished = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900)
    if finished.returncode != 0 or not (out / "report.json").exists():
        raise SystemExit(
            f"bench/margin.py: seed {seed} failed (exit {finished.returncode}):\n"
            + finished.stderr[-2000:]
        )
    return json.loads((out / "report.json").read_text())


def t_interval(values: list[float]) -> tuple[float, float]:
    from scipy.stats import t

    if len(values) < 2:
        return values[0], values[0]
    mean, sd = statistics.fmean(values), statistics.stdev(values)
    half = float(t.ppf(0.975, len(values) - 1)) * sd / len(values) ** 0.5
    return mean - half, mean + half


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one seed (CI-sized)")
    parser.add_argument("--seeds", type=int, default=5, help="seeds 42.. (FLamby's 42-46)")
    args = parser.parse_args(argv)
    seeds = [42] if args.quick else list(range(42, 42 + args.seeds))
    margins: dict[str, list[float]] = {"without": [], "with": []}
    print(
        f"{'seed':>4} {'murmur':>7} {'local':>7} {'pooled':>7} {'tuned':>7} "
        f"{'margin w/o 1-class (run 95%)':>30} {'margin with':>12}"
    )
    with tempfile.TemporaryDirectory(prefix="murmur-margin-") as tmp:
        for seed in seeds:
            report = run_once(seed, Path(tmp))
            fm = report["federation_margin"]
            without, with_sites = fm["without_one_class_sites"], fm["with_one_class_sites"]
            margins["without"].append(without["mean"])
            margins["with"].append(with_sites["mean"])
            b = report["baselines"]
            print(
                f"{seed:>4} {report['mean_auc']:7.3f} {b['local']['mean_auc']:7.3f} "
                f"{b['pooled']['mean_auc']:7.3f} {b['reference']['mean_auc']:7.3f} "
                f"{without['mean']:+8.3f} ({without['low']:+.3f} to {without['high']:+.3f})"
                f"{with_sites['mean']:+12.3f}"
            )
            one_class = ", ".join(fm["one_class_sites"]) or "none"
    low, high = t_interval(margins["without"])
    low_w, high_w = t_interval(margins["with"])
    print(f"hospitals without a local model: {one_class}")
    print(
        f"margin over local-only, without them: {statistics.fmean(margins['without']):+.3f} "
        f"(95% over {len(seeds)} seed(s): {low:+.3f} to {high:+.3f})"
    )
    print(
        f"margin over local-only, with them (vs a constant): "
        f"{statistics.fmean(margins['with']):+.3f} ({low_w:+.3f} to {high_w:+.3f})"
    )
    result = {
        "heart_margin_without_one_class": round(statistics.fmean(margins["without"]), 4),
        "heart_margin_with_one_class": round(statistics.fmean(margins["with"]), 4),
        "heart_margin_without_one_class_low": round(low, 4),
        "heart_margin_without_one_class_high": round(high, 4),
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
