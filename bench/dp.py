"""How much slower is a DP-SGD epoch than a plain epoch? (models/training.py, models/privacy.py)

For murmur's MLP (13 -> 64 -> 32 -> 1, ~3k parameters, heart-disease shaped rows) and CNN
(1x28x28 images, ~20k parameters, PneumoniaMNIST shaped), one epoch of `LocalTrainer` is timed
without DP and with DP-SGD (per-patient clipping + Gaussian noise), in the same process and
interleaved, so machine noise hits both alike. Both paths use the same Poisson sampler, batch
size and optimizer; the DP path is timed with each per-sample gradient engine:

- hooks: what murmur uses for Linear/Conv2d models (per-layer outer products, ghost norms);
- vmap:  torch.func (vmap over grad), murmur's fallback for any other layer.

Rows are random numbers of the datasets' shapes: an epoch's cost depends on shapes, not on
values. One thread, as the node runs (node/node.py). Accounting is not timed (the trainer asks
the accountant once per round, not per step).

Run: python bench/dp.py [--repeats 7] [--rows 2048] [--batch-size 32]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from murmur.models.nets import build_model, count_parameters
from murmur.models.privacy import PrivacyLedger
from murmur.models.training import LocalTrainer, TrainingSettings

MODELS = {"mlp": (13,), "cnn": (1, 28, 28)}


def epoch_seconds(trainer: LocalTrainer) -> float:
    started = time.perf_counter()
    trainer.train_steps(trainer.steps_per_round())
    return time.perf_counter() - started


def measure(name: str, rows: int, batch_size: int, repeats: int) -> dict[str, float]:
    shape = MODELS[name]
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(rows, *shape, generator=generator)
    y = (torch.rand(rows, generator=generator) < 0.3).float()
    settings = TrainingSettings(batch_size=batch_size, learning_rate=0.05, seed=0)

    plain = LocalTrainer(build_model(name, shape, seed=0), x, y, settings)
    ledger = PrivacyLedger.plan(  # a real budget, with room for every timed epoch
        epsilon=8.0,
        delta=None,
        n_patients=rows,
        sample_rate=plain.sample_rate(),
        planned_steps=(repeats + 1) * 2 * plain.steps_per_round(),
    )
    private = {
        engine: LocalTrainer(
            build_model(name, shape, seed=0), x, y, settings, ledger, dp_engine=engine
        )
        for engine in ("hooks", "vmap")
    }
    times: dict[str, list[float]] = {"plain": [], "hooks": [], "vmap": []}
    for repeat in range(repeats + 1):  # the first pass warms up and is not counted
        measured = {"plain": epoch_seconds(plain)}
        measured.update({engine: epoch_seconds(t) for engine, t in private.items()})
        if repeat > 0:
            for key, seconds in measured.items():
                times[key].append(seconds)
    medians = {key: statistics.median(values) for key, values in times.items()}
    return {
        "parameters": count_parameters(plain.model),
        "steps": plain.steps_per_round(),
        **{f"{key}_s": value for key, value in medians.items()},
        "hooks_ratio": medians["hooks"] / medians["plain"],
        "vmap_ratio": medians["vmap"] / medians["plain"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--rows", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    torch.set_num_threads(1)

    results = {name: measure(name, args.rows, args.batch_size, args.repeats) for name in MODELS}

    print(
        f"DP-SGD epoch vs plain epoch: {args.rows} rows, expected batch {args.batch_size}, "
        f"median of {args.repeats} interleaved epochs, 1 thread\n"
    )
    header = (
        f"{'model':<6}{'params':>8}{'steps':>7}{'plain s':>10}{'DP hooks s':>12}"
        f"{'DP vmap s':>11}{'hooks/plain':>13}{'vmap/plain':>12}"
    )
    print(header)
    print("-" * len(header))
    for name, r in results.items():
        print(
            f"{name:<6}{r['parameters']:>8}{r['steps']:>7}{r['plain_s']:>10.4f}"
            f"{r['hooks_s']:>12.4f}{r['vmap_s']:>11.4f}{r['hooks_ratio']:>12.2f}x"
            f"{r['vmap_ratio']:>11.2f}x"
        )
    print("\ntargets: mlp <= 2.5x, cnn <= 1.5x (murmur trains with the hooks engine)")
    print(
        json.dumps(
            {
                "mlp_dp_over_plain": round(results["mlp"]["hooks_ratio"], 3),
                "cnn_dp_over_plain": round(results["cnn"]["hooks_ratio"], 3),
                "mlp_vmap_over_plain": round(results["mlp"]["vmap_ratio"], 3),
                "cnn_vmap_over_plain": round(results["cnn"]["vmap_ratio"], 3),
            }
        )
    )


if __name__ == "__main__":
    main()
