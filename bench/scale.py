"""How far one 2-core machine takes murmur: 4 to 100 hospitals, complete and 8-regular graphs.

Each cell is one `run_cluster.py` run of the small job of bench/peers.py (the embedded breast
cancer data, `--model mlp` = 30→64→32→1, one local epoch per round, plain mean, no DP). Two
ways to place the hospitals (the `mode` column):

* `process` — every hospital a real `murmur node` process, as deployed (about 260 MB each,
  mostly the interpreter and torch), for sizes up to `--max-process-nodes` (32);
* `hosts:K` — `run_cluster.py --hosts-per-process K` (`murmur hosts`, node/host.py): K
  hospital nodes per process, the same node code over loopback HTTP, one process per core
  by default (K = n / 2), so a simulated hospital costs what its own model, data, keys, audit
  log and listeners need.

The complete graph is measured up to 32 hospitals (at 100 it is 9,900 envelopes a round on
two cores); the 8-regular graph at every size from 16. It reports seconds per round
(median of the intervals between the last node's round ends, rounds 2..R), the first round
(from launching run_cluster.py, start-up included), CPU seconds and peak memory summed over
every process (bench/common.py), the bytes all nodes send per round, and whether the run
failed, with the reason: run_cluster failing or timing out, a node finishing fewer rounds
than planned, or a neighbour's model missing a round's deadline.

An 8-regular graph needs at least 9 hospitals, so it starts at 16. The embedded data has 569
patients: up to 47 hospitals each gets at least 12; beyond, each gets at least 5 (3 training
and 2 test rows, models/data.py MIN_ROWS_FLOOR), so 100 hospitals is about the most the
embedded data supports (113 at most) without giving one patient to two hospitals. Per-hospital
AUCs on 2 test rows are mostly undefined; the AUC column is then the mean of each node's model
on the whole test split (report.json "whole_test").

Run: python bench/scale.py [--sizes 4,16,32,64,100] [--rounds 5] [--hosts-per-process K].
The last line printed is one JSON object: the largest size at which every cell succeeded (in
order, stopping at the first failure), summed peak PSS at 64 and 100 hospitals (8-regular,
hosts mode), and seconds per round at 100.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from common import ClusterRun, fmt, run_cluster_measured  # bench/common.py

REPO = Path(__file__).resolve().parents[1]
TOPOLOGIES = ("complete", "regular:8")


@dataclass
class ScaleResult:
    nodes: int
    topology: str
    mode: str  # "process" or "hosts:K"
    round_s: float | None = None
    first_round_s: float | None = None
    cpu_s: float | None = None
    rss_gb: float | None = None
    pss_gb: float | None = None
    bytes_per_round: float | None = None
    auc: float | None = None
    failure: str | None = None


def failure_reason(run: ClusterRun, rounds: int, timeout_s: float) -> str | None:
    if run.returncode is None:
        return f"timed out after {timeout_s:.0f}s"
    if run.report is None:
        lines = [line for line in run.output_tail.splitlines() if line.strip()]
        return f"run_cluster exited {run.returncode}: {lines[-1] if lines else 'no output'}"
    if run.report.get("failed"):
        return f"nodes failed: {', '.join(run.report['failed'][:5])}"
    short = [h["name"] for h in run.report["hospitals"] if h["rounds_completed"] < rounds]
    if short:
        return f"{len(short)} nodes finished fewer than {rounds} rounds"
    missed = run.missed_messages()
    if missed:
        return f"{missed} neighbour models missed a round deadline"
    return None


def measure(
    nodes: int, topology: str, rounds: int, workdir: Path, per_process: int = 1
) -> ScaleResult:
    result = ScaleResult(nodes, topology, "process" if per_process == 1 else f"hosts:{per_process}")
    timeout_s = 120 + 10 * nodes + 20 * rounds
    cluster_args = [
        *("--dataset", "breast-cancer", "--nodes", str(nodes), "--rounds", str(rounds)),
        *("--model", "mlp", "--aggregator", "mean", "--no-dp", "--topology", topology),
        # Start-up of many nodes on two cores takes a while; every node waits for all peers.
        *("--round-timeout", str(max(15.0, nodes * 1.0))),
        *("--hosts-per-process", str(per_process), "--no-baselines"),
    ]
    out = workdir / f"{topology.replace(':', '')}-{nodes}-{per_process}"
    run = run_cluster_measured(REPO, cluster_args, out, timeout_s)
    result.failure = failure_reason(run, rounds, timeout_s)
    result.cpu_s, result.rss_gb = run.usage.cpu_s, run.usage.peak_rss_gb
    result.pss_gb = run.usage.peak_pss_gb
    result.round_s, result.first_round_s = run.steady_s, run.first_round_s
    if run.report is not None:
        result.bytes_per_round = run.report["bytes_sent"] / rounds
        result.auc = run.report.get("mean_auc")
        whole = (run.report.get("whole_test") or {}).get("mean_auc")
        if whole is not None and (result.auc is None or nodes > 47):
            result.auc = whole  # tiny hospitals: their own AUCs are mostly undefined
    return result


def cells(sizes: list[int], max_process: int, per_process: int) -> list[tuple[int, str, int]]:
    """(nodes, topology, hospitals per process) of every cell, in order of size."""
    out = []
    for nodes in sizes:
        k = per_process or -(-nodes // 2)  # default: one process per core
        for topology in TOPOLOGIES:
            if topology == "regular:8" and nodes <= 8:
                continue  # 8-regular needs at least 9 nodes
            if topology == "complete" and nodes > 32:
                continue  # n (n - 1) envelopes a round
            if nodes <= max_process:
                out.append((nodes, topology, 1))
            if k > 1:
                out.append((nodes, topology, k))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="4,16,32,64,100", help="comma-separated node counts")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--hosts-per-process",
        type=int,
        default=0,
        metavar="K",
        help="hospitals per process in the hosts cells (default 0: n / 2, one process per core)",
    )
    parser.add_argument(
        "--max-process-nodes",
        type=int,
        default=32,
        help="largest size also measured with one process per hospital",
    )
    args = parser.parse_args()
    if args.rounds < 2:
        parser.error("--rounds must be at least 2 (seconds per round is over rounds 2..R)")
    sizes = sorted(int(s) for s in args.sizes.split(","))
    results: list[ScaleResult] = []
    with tempfile.TemporaryDirectory(prefix="murmur-scale-") as tmp:
        for nodes, topology, k in cells(sizes, args.max_process_nodes, args.hosts_per_process):
            result = measure(nodes, topology, args.rounds, Path(tmp), k)
            results.append(result)
            print(
                f"  {nodes} {topology} {result.mode}: round {fmt(result.round_s, '.3f')} s, "
                f"PSS {fmt(result.pss_gb)} GB {result.failure or ''}",
                file=sys.stderr,
                flush=True,
            )

    print(f"{args.rounds} rounds, embedded breast cancer data, MLP 30→64→32→1, no DP, mean")
    header = (
        f"{'nodes':>5} {'topology':<10} {'mode':<9} {'round s':>8} {'first s':>8} "
        f"{'CPU s':>7} {'peak GB':>8} {'PSS GB':>7} {'MB/PSS':>7} {'MB/round':>9} {'AUC':>6}"
        "  failure"
    )
    print(header)
    print("-" * len(header))
    for r in results:
        mb = None if r.bytes_per_round is None else r.bytes_per_round / 1e6
        per_node = None if r.pss_gb is None else r.pss_gb * 1024 / r.nodes
        print(
            f"{r.nodes:>5} {r.topology:<10} {r.mode:<9} {fmt(r.round_s, '.3f'):>8} "
            f"{fmt(r.first_round_s, '.1f'):>8} {fmt(r.cpu_s, '.1f'):>7} {fmt(r.rss_gb):>8} "
            f"{fmt(r.pss_gb):>7} {fmt(per_node, '.0f'):>7} {fmt(mb, '.3f'):>9} "
            f"{fmt(r.auc, '.3f'):>6}  {r.failure or ''}"
        )
    print("MB/PSS: summed peak PSS per hospital (MiB)")
    first_failure = next((r for r in results if r.failure), None)
    if first_failure is not None:
        print(
            f"first failure: {first_failure.nodes} nodes, {first_failure.topology}, "
            f"{first_failure.mode}: {first_failure.failure}"
        )
    ok_sizes = [n for n in sizes if first_failure is None or n < first_failure.nodes]

    def hosts_cell(nodes: int) -> ScaleResult | None:
        return next(
            (
                r
                for r in results
                if r.nodes == nodes and r.mode != "process" and r.topology == "regular:8"
            ),
            None,
        )

    def rounded(value: float | None, digits: int) -> float | None:
        return None if value is None else round(value, digits)

    at_64, at_100 = hosts_cell(64), hosts_cell(100)
    print(
        json.dumps(
            {
                "max_nodes_ok": max(ok_sizes) if ok_sizes else 0,
                "pss_gb_64": rounded(at_64 and at_64.pss_gb, 3),
                "pss_gb_100": rounded(at_100 and at_100.pss_gb, 3),
                "round_s_100": rounded(at_100 and at_100.round_s, 4),
            }
        )
    )


if __name__ == "__main__":
    main()
