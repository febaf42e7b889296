"""How far one 2-core machine takes murmur: 4 to 48 hospitals, complete and 8-regular graphs.

Each cell is one `run_cluster.py` run of the small job of bench/peers.py (the embedded breast
cancer data, `--model mlp` = 30→64→32→1, one local epoch per round, plain mean, no DP), with
every hospital a real `murmur node` process on this machine. It reports seconds per round
(median of the intervals between the last node's round ends, rounds 2..R), the first round
(from launching run_cluster.py, start-up included), CPU seconds and peak memory summed over
every process (bench/common.py), the bytes all nodes send per round, and whether the run
failed, with the reason: run_cluster failing or timing out, a node finishing fewer rounds
than planned, or a neighbour's model missing a round's deadline.

An 8-regular graph needs at least 9 hospitals, so it starts at 16. The embedded data has 569
patients and a hospital needs at least 12, so 48 hospitals fail at data loading: that is
reported as the data's limit, not the network's.

Run: python bench/scale.py [--sizes 4,8,16,32,48] [--rounds 5]. The last line printed is one
JSON object: the largest size at which every topology succeeded (in order, stopping at the
first failure), and the 32-hospital complete-graph figures.
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


def measure(nodes: int, topology: str, rounds: int, workdir: Path) -> ScaleResult:
    result = ScaleResult(nodes, topology)
    timeout_s = 120 + 10 * nodes + 20 * rounds
    cluster_args = [
        *("--dataset", "breast-cancer", "--nodes", str(nodes), "--rounds", str(rounds)),
        *("--model", "mlp", "--aggregator", "mean", "--no-dp", "--topology", topology),
        # Start-up of many nodes on two cores takes a while; every node waits for all peers.
        *("--round-timeout", str(max(15.0, nodes * 1.0))),
    ]
    out = workdir / f"{topology.replace(':', '')}-{nodes}"
    run = run_cluster_measured(REPO, cluster_args, out, timeout_s)
    result.failure = failure_reason(run, rounds, timeout_s)
    result.cpu_s, result.rss_gb = run.usage.cpu_s, run.usage.peak_rss_gb
    result.pss_gb = run.usage.peak_pss_gb
    result.round_s, result.first_round_s = run.steady_s, run.first_round_s
    if run.report is not None:
        result.bytes_per_round = run.report["bytes_sent"] / rounds
        result.auc = run.report.get("mean_auc")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="4,8,16,32,48", help="comma-separated node counts")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    if args.rounds < 2:
        parser.error("--rounds must be at least 2 (seconds per round is over rounds 2..R)")
    sizes = sorted(int(s) for s in args.sizes.split(","))
    results: list[ScaleResult] = []
    with tempfile.TemporaryDirectory(prefix="murmur-scale-") as tmp:
        for nodes in sizes:
            for topology in TOPOLOGIES:
                if topology == "regular:8" and nodes <= 8:
                    continue  # 8-regular needs at least 9 nodes
                result = measure(nodes, topology, args.rounds, Path(tmp))
                results.append(result)
                print(
                    f"  {nodes} {topology}: round {fmt(result.round_s, '.3f')} s, "
                    f"{fmt(result.rss_gb)} GB {result.failure or ''}",
                    file=sys.stderr,
                    flush=True,
                )

    print(f"{args.rounds} rounds, embedded breast cancer data, MLP 30→64→32→1, no DP, mean")
    header = (
        f"{'nodes':>5} {'topology':<10} {'round s':>8} {'first s':>8} {'CPU s':>7} "
        f"{'peak GB':>8} {'PSS GB':>7} {'MB/round':>9} {'AUC':>6}  failure"
    )
    print(header)
    print("-" * len(header))
    for r in results:
        mb = None if r.bytes_per_round is None else r.bytes_per_round / 1e6
        print(
            f"{r.nodes:>5} {r.topology:<10} {fmt(r.round_s, '.3f'):>8} "
            f"{fmt(r.first_round_s, '.1f'):>8} {fmt(r.cpu_s, '.1f'):>7} {fmt(r.rss_gb):>8} "
            f"{fmt(r.pss_gb):>7} {fmt(mb, '.3f'):>9} {fmt(r.auc, '.3f'):>6}  {r.failure or ''}"
        )
    first_failure = next((r for r in results if r.failure), None)
    if first_failure is not None:
        print(
            f"first failure: {first_failure.nodes} nodes, {first_failure.topology}: "
            f"{first_failure.failure}"
        )
    ok_sizes = [n for n in sizes if first_failure is None or n < first_failure.nodes]
    at_32 = next((r for r in results if r.nodes == 32 and r.topology == "complete"), None)
    print(
        json.dumps(
            {
                "max_nodes_ok": max(ok_sizes) if ok_sizes else 0,
                "rss_gb_32": None
                if at_32 is None or at_32.rss_gb is None
                else round(at_32.rss_gb, 3),
                "pss_gb_32": None
                if at_32 is None or at_32.pss_gb is None
                else round(at_32.pss_gb, 3),
                "round_s_32": None
                if at_32 is None or at_32.round_s is None
                else round(at_32.round_s, 4),
            }
        )
    )


if __name__ == "__main__":
    main()
