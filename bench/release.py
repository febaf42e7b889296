"""End of a study (issue #21): the consensus phase and the private pooled evaluation.

For each setting, the real nodes train in one process (bench/byzantine.py's engine: the
`HospitalNode` round loop, envelopes signed, encrypted and verified, HTTP replaced by direct
calls) with one Byzantine node running a training attack; then the consensus phase runs on
their final models once per consensus attack of the adversary mode
(gossip/consensus_attacks.py), and once without. Measured:

* consensus_extra_rounds: the most steps the phase took (agreement + signature flooding);
  every honest node must end with the same hash (checked, a failure stops the bench);
* consensus_auc_change: the largest (in size, sign kept) mean AUC of the agreed model minus
  the mean AUC of the nodes' own models before consensus, over the honest hospitals' test
  splits; consensus_auc_change_vs_mean_model: the same against the plain mean of the honest
  nodes' final models (what consensus would ideally return);
* pooled_auc_error: the largest |pooled AUROC from the masked histograms - scikit-learn's on
  the pooled scores|, agreed model, honest hospitals' test splits (no DP noise);
* pooled_eval_fraction_of_round: the time of the whole pooled evaluation (every hospital's
  histogram, masks, encoding, then decoding and the sum, all serial in this process) over the
  mean training round's time in the same run.

Settings: Fed-Heart-Disease on a complete graph (4 + 1), the embedded data on a complete graph
(9 + 1) and on a random 4-regular graph (9 + 1): one Byzantine node per neighbourhood.
Run: python bench/release.py [--rounds N] [--quick]. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
for path in (REPO, REPO / "bench"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import byzantine  # noqa: E402
from murmur.gossip.consensus_attacks import CONSENSUS_ATTACKS  # noqa: E402
from murmur.models import pooled_eval as pe  # noqa: E402
from murmur.models.params import flatten, set_state, unflatten  # noqa: E402
from murmur.models.training import predict_proba  # noqa: E402
from murmur.node import consensus, pooled  # noqa: E402
from murmur.topologies.graphs import build_topology  # noqa: E402
from sklearn.metrics import roc_auc_score  # noqa: E402

import run_cluster  # noqa: E402

TARGET_ROUNDS = 10
TARGET_AUC_CHANGE = 0.005
TARGET_POOLED_ERROR = 0.002
TARGET_FRACTION = 0.05
SETTINGS = (
    ("heart-disease", "complete", 4),
    ("breast-cancer", "complete", 9),
    ("breast-cancer", "regular:4", 9),
)


def train(dataset: str, topology: str, honest: int, rounds: int, run_dir: Path):
    options: dict[str, Any] = {"dataset": dataset}
    if dataset != "heart-disease":
        options.update(nodes=honest, alpha=0.5)
    options.update(
        topology=topology,
        rounds=rounds,
        lr=0.1,
        no_dp=True,
        seed=0,
        aggregator="clipping:1",
        byzantine=1,
        attack="sign_flip",
        round_timeout=30.0,
    )
    args = run_cluster.parse_args(byzantine.to_argv(options))
    _, nodes = asyncio.run(byzantine.run_nodes_in_process(args, run_dir))
    graph = build_topology(args.topology, len(nodes), seed=args.seed)
    return nodes, graph


def auc_of(node: Any, state: dict[str, np.ndarray] | None = None) -> float:
    model = node.study.model
    if state is not None:
        set_state(model, state)
    d = node.study.data
    return float(roc_auc_score(d.y_test, predict_proba(model, d.x_test)))


def one_setting(dataset: str, topology: str, honest_n: int, rounds: int) -> list[dict[str, Any]]:
    base = Path("/dev/shm") if Path("/dev/shm").is_dir() else None
    with tempfile.TemporaryDirectory(prefix="murmur-release-", dir=base) as tmp:
        nodes, graph = train(dataset, topology, honest_n, rounds, Path(tmp))
    names = [n.config.node.name for n in nodes]
    neighbours = {names[i]: [names[j] for j in graph.neighbours(i)] for i in range(len(nodes))}
    honest = [n for n in nodes if not n.config.adversary.enabled]
    attackers = [n.config.node.name for n in nodes if n.config.adversary.enabled]
    finals = {n.config.node.name: n.study.state() for n in honest}
    before = float(np.mean([auc_of(n) for n in honest]))
    round_s = float(np.mean([r["seconds"] for n in honest for r in n.state.history]))
    rows = []
    for attack in (None, *CONSENSUS_ATTACKS):
        for n in honest:
            n.study.load(finals[n.config.node.name])
        run = consensus.run_phase(
            nodes,
            neighbours,
            graph.graph,
            t=1,
            f=1,
            attacks={a: attack for a in attackers if attack},
        )
        decisions = run.result.decisions
        hashes = {d.model_sha256 for d in decisions.values()}
        if len(hashes) != 1:
            raise SystemExit(f"{dataset} {topology} {attack}: honest nodes disagree: {hashes}")
        agreed = next(iter(decisions.values())).model
        after = float(np.mean([auc_of(n, agreed) for n in honest]))
        mean_model = honest_mean_model(honest, finals)
        mean_model_auc = float(np.mean([auc_of(n, mean_model) for n in honest]))
        signed = min(len(f.signatures) for f in run.result.signatures.values())
        rows.append(
            {
                "setting": f"{dataset} {topology} {len(honest)}+{len(attackers)}",
                "attack": attack or "none",
                "extra_rounds": run.result.steps,
                "auc_before": before,
                "auc_after": after,
                "auc_change": after - before,
                "auc_mean_model": mean_model_auc,
                "auc_change_vs_mean_model": after - mean_model_auc,
                "signed_by": signed,
                "included": len(next(iter(decisions.values())).included),
            }
        )
    rows[0].update(pooled_row(honest, agreed, round_s))
    for n in honest:
        n.study.load(finals[n.config.node.name])
    return rows


def honest_mean_model(honest: list[Any], finals: dict[str, dict]) -> dict[str, np.ndarray]:
    """The plain float64 mean of the honest nodes' final models (the reference the agreed
    model is also compared with)."""
    rows = np.stack([flatten(finals[n.config.node.name]).astype(np.float64) for n in honest])
    return unflatten(rows.mean(axis=0).astype(np.float32), finals[honest[0].config.node.name])


def pooled_row(honest: list[Any], agreed: dict[str, np.ndarray], round_s: float) -> dict:
    spec = pe.BinSpec()
    parts = []
    for n in honest:
        set_state(n.study.model, agreed)
        d = n.study.data
        parts.append(
            (n.config.node.name, n.identity, d.y_test, predict_proba(n.study.model, d.x_test))
        )
    keys = [p[1].public_key for p in parts]
    partners = {k: [o for o in keys if o != k] for k in keys}
    session = pooled.session_label("bench", "agreed")
    started = time.perf_counter()
    outcome = pooled.pooled_in_memory(parts, partners, session, spec)
    seconds = time.perf_counter() - started
    y = np.concatenate([p[2] for p in parts])
    s = np.concatenate([p[3] for p in parts])
    exact = float(roc_auc_score(y, s))
    got = outcome.report["pooled"]["auroc"]
    return {
        "pooled_auc": got["value"],
        "pooled_low": got["low"],
        "pooled_high": got["high"],
        "pooled_exact": exact,
        "pooled_error": abs(got["value"] - exact),
        "pooled_s": seconds,
        "round_s": round_s,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--quick", action="store_true", help="heart disease only, 3 rounds")
    args = parser.parse_args(argv)
    logging.disable(logging.ERROR)
    settings = SETTINGS[:1] if args.quick else SETTINGS
    rounds = 3 if args.quick else args.rounds
    rows = [r for s in settings for r in one_setting(*s, rounds)]
    print(
        f"{'setting':36} {'consensus attack':16} {'extra':>5} {'AUC before':>10} "
        f"{'agreed':>7} {'change':>8} {'vs mean model':>13} {'signed':>6}"
    )
    for r in rows:
        print(
            f"{r['setting']:36} {r['attack']:16} {r['extra_rounds']:5d} {r['auc_before']:10.4f} "
            f"{r['auc_after']:7.4f} {r['auc_change']:+8.4f} "
            f"{r['auc_change_vs_mean_model']:+13.4f} {r['signed_by']:6d}"
        )
    pooled_rows = [r for r in rows if "pooled_auc" in r]
    print()
    print(f"{'setting':36} {'pooled AUROC (95% CI)':26} {'exact':>7} {'error':>8} {'cost':>7}")
    for r in pooled_rows:
        ci = f"{r['pooled_auc']:.4f} ({r['pooled_low']:.3f}-{r['pooled_high']:.3f})"
        print(
            f"{r['setting']:36} {ci:26} {r['pooled_exact']:7.4f} {r['pooled_error']:8.5f} "
            f"{r['pooled_s'] / r['round_s']:7.2%}"
        )
    figures = {
        "consensus_extra_rounds": max(r["extra_rounds"] for r in rows),
        "consensus_auc_change": round(max((r["auc_change"] for r in rows), key=abs), 5),
        "consensus_auc_change_vs_mean_model": round(
            max((r["auc_change_vs_mean_model"] for r in rows), key=abs), 5
        ),
        "pooled_auc_error": round(max(r["pooled_error"] for r in pooled_rows), 6),
        "pooled_eval_fraction_of_round": round(
            max(r["pooled_s"] / r["round_s"] for r in pooled_rows), 4
        ),
    }
    targets = {
        "consensus_extra_rounds": TARGET_ROUNDS,
        "consensus_auc_change": TARGET_AUC_CHANGE,
        "pooled_auc_error": TARGET_POOLED_ERROR,
        "pooled_eval_fraction_of_round": TARGET_FRACTION,
    }
    print()
    for key, target in targets.items():
        value = abs(figures[key])
        verdict = "met" if value <= target else f"MISSED by {value - target:.4g}"
        print(f"{key}: {figures[key]} (target <= {target}): {verdict}")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
