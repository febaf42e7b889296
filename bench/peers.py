"""murmur against Flower on the same small job: speed per round, start-up, CPU, memory, AUC.

The job: the MLP of murmur's `--model mlp` (hidden layers 64 and 32; 13→64→32→1 = 3,009
parameters on Fed-Heart-Disease, 30→64→32→1 = 4,097 on the embedded breast cancer data), one
local epoch per round, SGD at learning rate 0.2, expected batch 32, class-weighted BCE, no
DP, every hospital starting from the same seeded weights, aggregated by a plain mean over all
hospitals, for R rounds (default 10). Both frameworks run murmur's own data split and local
training code (models/), so they differ only in the federation around it:

- murmur: `run_cluster.py --model mlp --aggregator mean --no-dp --topology complete`: one real
  `murmur node` process per hospital, every model signed, encrypted and POSTed to every other
  hospital, each node averaging what it received (the Metropolis-Hastings weights of a
  complete graph are all 1/n, so every node computes FedAvg's unweighted mean).
- Flower: `flwr run` of the hand-written app in bench/flower_app/ (a ServerApp with FedAvg
  weighted equally, a ClientApp that trains and evaluates one hospital), on a local SuperLink
  in simulation mode (Flower's default local federation: Ray actors; `flwr run` starts the
  same SuperLink itself when its connection is the default `:local:`). Flower is installed
  from PyPI into a virtual environment under the cache directory, never into murmur's.

Definitions, identical for both:
- first round: wall time from launching the framework's first process (murmur:
  `run_cluster.py`, which writes keys and configs and starts the nodes; Flower: the
  SuperLink, then `flwr run`) to the end of round 1 (murmur: the last node's "round 1 done";
  Flower: the ServerApp's end of round 1's evaluation). It includes every process start-up.
- steady round: median over rounds 2..R of the interval between consecutive round ends.
- CPU seconds: user + system time summed over every process of the run (bench/common.py).
- peak memory: the sum over every process of the run of its peak resident set (VmHWM).
- bytes per model message: murmur: the envelope a node POSTs to each neighbour; Flower: the
  ClientApp's model ArrayRecord as Flower serializes it (its object tree).
- final mean AUC: mean over hospitals of the AUC on each hospital's held-out split, after the
  last round.

Run: python bench/peers.py [--rounds 10] [--repeat N] [--quick]. The last line printed is one
JSON object; each headline figure is the worst over the data sets measured at that size.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from common import (  # bench/common.py: run as python bench/peers.py
    TreeSampler,
    fmt,
    free_port,
    run_cluster_measured,
    steady_round_s,
    stop_tree,
    wait_for_port,
)

REPO = Path(__file__).resolve().parents[1]
FLOWER_APP = REPO / "bench" / "flower_app"
FLOWER_VERSION = "1.41.0"
LEARNING_RATE = 0.2
BATCH_SIZE = 32
SEED = 0
# Fed-Heart-Disease has exactly four real hospitals, so it runs at 4 nodes only.
JOBS = (("breast-cancer", 4), ("breast-cancer", 10), ("heart-disease", 4))


@dataclass
class RunResult:
    framework: str
    dataset: str
    nodes: int
    rounds: int
    first_round_s: float | None = None
    steady_s: float | None = None
    cpu_s: float | None = None
    rss_gb: float | None = None
    pss_gb: float | None = None
    message_bytes: float | None = None
    auc: float | None = None
    wall_s: float | None = None
    processes: int | None = None
    error: str | None = None


# ------------------------------------------------------------------------------ murmur


def run_murmur(dataset: str, nodes: int, rounds: int, workdir: Path, timeout_s: float) -> RunResult:
    result = RunResult("murmur", dataset, nodes, rounds)
    cluster_args = [
        *("--dataset", dataset, "--nodes", str(nodes), "--rounds", str(rounds)),
        *("--model", "mlp", "--aggregator", "mean", "--no-dp", "--topology", "complete"),
        *("--lr", str(LEARNING_RATE), "--batch-size", str(BATCH_SIZE), "--seed", str(SEED)),
    ]
    run = run_cluster_measured(REPO, cluster_args, workdir / f"murmur-{dataset}-{nodes}", timeout_s)
    result.wall_s, result.cpu_s = run.wall_s, run.usage.cpu_s
    result.rss_gb, result.processes = run.usage.peak_rss_gb, run.usage.processes
    result.pss_gb = run.usage.peak_pss_gb
    if run.returncode is None:
        result.error = f"no result within {timeout_s:.0f}s"
    if run.report is None:
        result.error = result.error or f"run_cluster wrote no report: {run.output_tail[-300:]}"
        return result
    if run.report.get("failed"):
        result.error = f"nodes failed: {run.report['failed']}"
    result.first_round_s, result.steady_s = run.first_round_s, run.steady_s
    result.auc = run.report.get("mean_auc")
    result.message_bytes = run.message_bytes()
    return result


# ------------------------------------------------------------------------------ Flower


def flower_venv(cache_dir: Path) -> Path:
    """The Flower virtual environment's bin/ (created on first use, then reused)."""
    venv = cache_dir / f"flower-{FLOWER_VERSION}-venv"
    bin_dir = venv / "bin"
    marker = venv / "murmur-bench-ready"
    if marker.exists():
        return bin_dir
    import torch  # the same torch as murmur's, so local training costs the same

    torch_version = torch.__version__.split("+")[0]
    print(f"creating the Flower environment in {venv} (once)", file=sys.stderr)
    steps = [
        [sys.executable, "-m", "venv", str(venv)],
        [str(bin_dir / "pip"), "install", "-q", f"torch=={torch_version}"],
        [
            str(bin_dir / "pip"),
            "install",
            "-q",
            f"flwr[simulation]=={FLOWER_VERSION}",
            "numpy",
            "scikit-learn",
        ],
    ]
    for step in steps:
        done = subprocess.run(step, capture_output=True, text=True, timeout=1200)
        if done.returncode != 0:
            raise SystemExit(
                f"could not build the Flower environment ({' '.join(step)}):\n{done.stderr[-2000:]}"
                "\nfix: check that PyPI is reachable, or pass --skip-flower"
            )
    marker.write_text(FLOWER_VERSION + "\n")
    return bin_dir


def flower_env(bin_dir: Path, home: Path) -> dict[str, str]:
    env = {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
        # The apps import murmur's models/ (data split, MLP, LocalTrainer) and their own code.
        "PYTHONPATH": os.pathsep.join([str(REPO), str(FLOWER_APP)]),
        "FLWR_HOME": str(home),
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    env.pop("VIRTUAL_ENV", None)
    return env


def run_flower(
    bin_dir: Path,
    dataset: str,
    nodes: int,
    rounds: int,
    workdir: Path,
    timeout_s: float,
    client_cpus: int | None,
) -> RunResult:
    result = RunResult("flower", dataset, nodes, rounds)
    home = workdir / f"flower-{dataset}-{nodes}"
    home.mkdir(parents=True, exist_ok=True)
    http_port, control_port, fleet_port = free_port(), free_port(), free_port()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "bench"\n\n[superlink.bench]\n'
        f'address = "127.0.0.1:{http_port}"\ninsecure = true\n'
    )
    result_file = home / "result.json"
    env = flower_env(bin_dir, home)
    superlink_cmd = [
        str(bin_dir / "flower-superlink"),
        *("--insecure", "--simulation", "--isolation", "subprocess"),
        *("--host", "127.0.0.1", "--port", str(http_port)),
        *("--control-api-address", f"127.0.0.1:{control_port}"),
        *("--fleet-api-address", f"127.0.0.1:{fleet_port}"),
    ]
    federation = [f"num-supernodes={nodes}"]
    if client_cpus is not None:
        federation.append(f"client-resources-num-cpus={client_cpus}")
    run_config = (
        f"num-server-rounds={rounds} num-hospitals={nodes} dataset={json.dumps(dataset)} "
        f"seed={SEED} learning-rate={LEARNING_RATE} batch-size={BATCH_SIZE} local-epochs=1 "
        f"result-file={json.dumps(str(result_file))}"
    )
    run_cmd = [
        str(bin_dir / "flwr"),
        "run",
        str(FLOWER_APP),
        "bench",
        *(arg for item in federation for arg in ("--federation-config", item)),
        *("--run-config", run_config, "--stream"),
    ]
    sampler = TreeSampler().start()
    log = open(home / "flower.log", "w")  # noqa: SIM115 - closed in finally
    started = time.time()
    deadline = time.monotonic() + timeout_s
    superlink = subprocess.Popen(
        superlink_cmd, cwd=home, env=env, stdout=log, stderr=subprocess.STDOUT
    )
    sampler.add_root(superlink.pid)
    runner = None
    try:
        if not wait_for_port(http_port, timeout_s=60):
            result.error = "the SuperLink did not open its port within 60 s"
            return result
        runner = subprocess.Popen(run_cmd, cwd=home, env=env, stdout=log, stderr=subprocess.STDOUT)
        sampler.add_root(runner.pid)
        while not result_file.exists() and time.monotonic() < deadline:
            if superlink.poll() is not None:
                result.error = f"the SuperLink exited with {superlink.returncode}"
                break
            if runner.poll() is not None and runner.returncode != 0:
                result.error = f"flwr run exited with {runner.returncode}"
                break
            time.sleep(0.1)
        if not result_file.exists() and result.error is None:
            result.error = f"no result within {timeout_s:.0f}s"
    finally:
        result.wall_s = time.time() - started
        stop_tree(sampler)
        for process in (superlink, runner):
            if process is not None:
                process.wait()
        log.close()
        usage = sampler.stop()
        result.cpu_s, result.rss_gb = usage.cpu_s, usage.peak_rss_gb
        result.pss_gb = usage.peak_pss_gb
        result.processes = usage.processes
    if result.error:
        lines = [x for x in (home / "flower.log").read_text(errors="replace").splitlines() if x]
        result.error += f": {lines[-1][:200]}" if lines else ""
    if result_file.exists():
        time.sleep(0.2)  # the ServerApp writes the file in one call; let it finish
        data = json.loads(result_file.read_text())
        ends = {int(r): t for r, t in data["round_ends"].items()}
        result.first_round_s = ends[1] - started if 1 in ends else None
        result.steady_s = steady_round_s(ends)
        aucs = {int(r): a for r, a in data["mean_auc"].items()}
        result.auc = aucs[max(aucs)] if aucs else None
        sizes = list(data["message_bytes"].values())
        result.message_bytes = statistics.mean(sizes) if sizes else None
        if len(ends) < rounds:
            result.error = f"only {len(ends)} of {rounds} rounds finished"
    return result


# ------------------------------------------------------------------------------ report


def median_result(runs: list[RunResult]) -> RunResult:
    """Field-wise median over repetitions (errors: the first one)."""
    merged = RunResult(runs[0].framework, runs[0].dataset, runs[0].nodes, runs[0].rounds)
    fields = ("first_round_s", "steady_s", "cpu_s", "rss_gb", "pss_gb", "message_bytes", "auc")
    for name in fields:
        values = [getattr(r, name) for r in runs if getattr(r, name) is not None]
        setattr(merged, name, statistics.median(values) if values else None)
    merged.wall_s = statistics.median(r.wall_s for r in runs if r.wall_s is not None)
    merged.processes = max((r.processes or 0) for r in runs)
    merged.error = next((r.error for r in runs if r.error), None)
    return merged


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def print_table(results: list[RunResult]) -> None:
    header = (
        f"{'data set':<14} {'nodes':>5} {'framework':<9} {'first s':>8} {'steady s':>9} "
        f"{'CPU s':>7} {'peak GB':>8} {'PSS GB':>7} {'procs':>5} {'msg bytes':>9} {'AUC':>6}  error"
    )
    print(header)
    print("-" * len(header))
    for r in results:
        print(
            f"{r.dataset:<14} {r.nodes:>5} {r.framework:<9} {fmt(r.first_round_s):>8} "
            f"{fmt(r.steady_s, '.3f'):>9} {fmt(r.cpu_s, '.1f'):>7} {fmt(r.rss_gb):>8} "
            f"{fmt(r.pss_gb):>7} {r.processes or 0:>5} {fmt(r.message_bytes, '.0f'):>9} "
            f"{fmt(r.auc, '.3f'):>6}  "
            f"{r.error or ''}"
        )


def print_ratios(pairs: dict[tuple[str, int], tuple[RunResult, RunResult]]) -> None:
    print()
    header = (
        f"{'data set':<14} {'nodes':>5} {'first':>7} {'steady':>7} {'CPU':>7} {'memory':>7} "
        f"{'bytes':>7} {'AUC diff':>8}"
    )
    print("murmur / Flower")
    print(header)
    print("-" * len(header))
    for (dataset, nodes), (m, f) in pairs.items():
        auc_diff = None if m.auc is None or f.auc is None else m.auc - f.auc
        print(
            f"{dataset:<14} {nodes:>5} {fmt(ratio(m.first_round_s, f.first_round_s)):>7} "
            f"{fmt(ratio(m.steady_s, f.steady_s)):>7} {fmt(ratio(m.cpu_s, f.cpu_s)):>7} "
            f"{fmt(ratio(m.rss_gb, f.rss_gb)):>7} "
            f"{fmt(ratio(m.message_bytes, f.message_bytes)):>7} {fmt(auc_diff, '+.3f'):>8}"
        )


def headline(pairs: dict[tuple[str, int], tuple[RunResult, RunResult]]) -> dict[str, float | None]:
    """The worst figure over the data sets measured at each size."""

    def worst(values: list[float | None], pick=max) -> float | None:
        present = [v for v in values if v is not None]
        return round(pick(present), 4) if present and len(present) == len(values) else None

    def at(nodes: int) -> list[tuple[RunResult, RunResult]]:
        return [pair for (_, n), pair in pairs.items() if n == nodes]

    return {
        "steady_ratio_4": worst([ratio(m.steady_s, f.steady_s) for m, f in at(4)]),
        "steady_ratio_10": worst([ratio(m.steady_s, f.steady_s) for m, f in at(10)]),
        "first_round_s_4": worst([m.first_round_s for m, _ in at(4)]),
        "rss_gb_4": worst([m.rss_gb for m, _ in at(4)]),
        "pss_gb_4": worst([m.pss_gb for m, _ in at(4)]),
        "auc_diff": worst(
            [
                None if m.auc is None or f.auc is None else abs(m.auc - f.auc)
                for m, f in pairs.values()
            ]
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--repeat", type=int, default=1, help="runs per cell (median reported)")
    parser.add_argument("--quick", action="store_true", help="embedded data at 4 nodes only")
    parser.add_argument(
        "--job",
        action="append",
        metavar="DATASET:NODES",
        help="measure only these cells, e.g. --job breast-cancer:10 (repeatable)",
    )
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "murmur-bench",
        help="where the Flower virtual environment is kept",
    )
    parser.add_argument(
        "--flower-client-cpus",
        type=int,
        help="Ray CPUs per Flower client (default: Flower's own default, 2)",
    )
    parser.add_argument("--skip-flower", action="store_true", help="measure murmur only")
    parser.add_argument("--json-out", type=Path, help="also write every result here")
    args = parser.parse_args()
    if args.rounds < 2:
        parser.error("--rounds must be at least 2 (the steady round needs rounds 2..R)")
    jobs = [JOBS[0]] if args.quick else list(JOBS)
    if args.job:
        jobs = [(text.partition(":")[0], int(text.partition(":")[2] or 4)) for text in args.job]
    heart = REPO.parent / "shared" / "data" / "heart_disease"
    if not heart.is_dir():
        print(f"skipping heart-disease: {heart} is absent", file=sys.stderr)
        jobs = [job for job in jobs if job[0] != "heart-disease"]
    bin_dir = None if args.skip_flower else flower_venv(args.cache_dir)
    timeout_s = 240 + 15 * args.rounds
    results: list[RunResult] = []
    pairs: dict[tuple[str, int], tuple[RunResult, RunResult]] = {}
    with tempfile.TemporaryDirectory(prefix="murmur-peers-") as tmp:
        for dataset, nodes in jobs:
            murmur_runs, flower_runs = [], []
            for repetition in range(args.repeat):
                # Alternate the order so that neither framework always runs on a warmer cache.
                order = ["murmur", "flower"] if repetition % 2 == 0 else ["flower", "murmur"]
                for framework in order:
                    workdir = Path(tmp) / f"{framework}-{repetition}"
                    workdir.mkdir(exist_ok=True)
                    if framework == "murmur":
                        run = run_murmur(dataset, nodes, args.rounds, workdir, timeout_s)
                        murmur_runs.append(run)
                    elif bin_dir is not None:
                        run = run_flower(
                            bin_dir,
                            dataset,
                            nodes,
                            args.rounds,
                            workdir,
                            timeout_s,
                            args.flower_client_cpus,
                        )
                        flower_runs.append(run)
                    else:
                        continue
                    print(
                        f"  {framework} {dataset} {nodes} nodes: steady {fmt(run.steady_s, '.3f')}"
                        f" s, first {fmt(run.first_round_s)} s {run.error or ''}",
                        file=sys.stderr,
                        flush=True,
                    )
            m = median_result(murmur_runs)
            results.append(m)
            if flower_runs:
                f = median_result(flower_runs)
                results.append(f)
                pairs[(dataset, nodes)] = (m, f)
    print(
        f"{args.rounds} rounds, 1 local epoch, MLP hidden (64, 32), lr {LEARNING_RATE}, "
        f"batch {BATCH_SIZE}, no DP, plain mean; median of {args.repeat} run(s) per cell"
    )
    print_table(results)
    if pairs:
        print_ratios(pairs)
    if args.json_out:
        args.json_out.write_text(json.dumps([asdict(r) for r in results], indent=2))
    print(json.dumps(headline(pairs)))


if __name__ == "__main__":
    main()
