"""Krum's pairwise distances: direct differences (the rule) against the Gram trick it replaced.

Krum (gossip/aggregation.py) needs the squared distances between all n = 17 models (own and
16 neighbours) of 1M float32 parameters; issue #3 asks for Krum <= 5x a plain mean over the
same inputs. Two ways to get them, each timed best of 9, against the mean with BLAS on every
core (the fastest mean here, a stricter baseline than the one-thread mean a node runs):

- **differences** (the rule): ``torch.pdist`` over column blocks held in cache, differences
  taken before squaring, on the rule's worker threads and on one thread;
- **Gram** (what Krum did before): centre each block on own, numpy ``c @ c.T`` (OpenBLAS
  ``ssyrk``, which runs on one thread), d(a, b)^2 = |a|^2 + |b|^2 - 2ab; and the same split
  over two threads with BLAS held to one thread each;
- the kernels alone on one block in cache, per million columns: pdist and ssyrk.

Accuracy: two colluding models 1.0 from own and 1e-3 from each other; the relative error of
their squared distance by each way, against float64.

Run: python bench/distances.py. The last line printed is one JSON object.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from murmur.gossip import aggregation
from murmur.gossip.aggregation import _BLOCK_COLUMNS as GRAM_BLOCK  # the block the Gram pass used
from murmur.gossip.aggregation import AGGREGATORS, _column_blocks, pairwise_squared_distances
from murmur.node.threads import limit_numeric_threads
from threadpoolctl import threadpool_limits

NEIGHBOURS = 16
MODEL = 1_000_000
BEST_OF = 9


def best_ms(function: Callable[[], object]) -> float:
    function()  # warm caches, allocator and threads
    times = []
    for _ in range(BEST_OF):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return min(times) * 1e3


def gram_squared_distances(own: np.ndarray, received: np.ndarray, columns: range) -> np.ndarray:
    """Squared distances (n, n) over ``columns`` by the Gram trick, centred on own."""
    k = received.shape[0]
    gram = np.zeros((k + 1, k + 1))
    buffer = np.empty((k, GRAM_BLOCK), dtype=received.dtype)
    for cols in _column_blocks(columns.stop, GRAM_BLOCK, columns.start):
        centred = np.subtract(received[:, cols], own[cols], out=buffer[:, : cols.stop - cols.start])
        gram[1:, 1:] += centred @ centred.T
    norms = np.diag(gram)
    return np.maximum(norms[:, None] + norms[None, :] - 2.0 * gram, 0.0)


def gram_two_threads(own: np.ndarray, received: np.ndarray, pool: ThreadPoolExecutor) -> None:
    half = MODEL // 2 // GRAM_BLOCK * GRAM_BLOCK
    halves = [range(0, half), range(half, MODEL)]
    with threadpool_limits(1, user_api="blas"):
        list(pool.map(lambda columns: gram_squared_distances(own, received, columns), halves))


def collusion_errors() -> tuple[float, float]:
    """Relative error of two colluders' squared distance: (differences, Gram)."""
    rng = np.random.default_rng(1)
    d = 200_000
    own = rng.standard_normal(d)
    honest = own + 1e-3 * rng.standard_normal((4, d))
    colluders = own + rng.standard_normal(d) + 1e-3 * rng.standard_normal((2, d))
    values = np.vstack([own, honest, colluders]).astype(np.float32)
    exact = values[5].astype(np.float64) - values[6]
    exact = exact @ exact
    by_differences = pairwise_squared_distances(values[0], values[1:])[5, 6]
    by_gram = gram_squared_distances(values[0], values[1:], range(d))[5, 6]
    return abs(by_differences - exact) / exact, abs(by_gram - exact) / exact


def one_worker(function: Callable[[], object]) -> Callable[[], object]:
    def run() -> object:
        workers = aggregation._distance_workers
        aggregation._distance_workers = lambda d, torch_threads: 1
        try:
            return function()
        finally:
            aggregation._distance_workers = workers

    return run


def main() -> None:
    limit_numeric_threads()  # as in a node
    rng = np.random.default_rng(0)
    own = rng.standard_normal(MODEL, dtype=np.float32)
    received = own + 0.01 * rng.standard_normal((NEIGHBOURS, MODEL), dtype=np.float32)
    weights = np.full(NEIGHBOURS + 1, 1.0 / (NEIGHBOURS + 1))
    workers = aggregation._distance_workers(MODEL, torch.get_num_threads())

    # One block of each method's width, in cache, for the kernels alone.
    block = np.vstack([own, received])[:, : aggregation._DISTANCE_BLOCK_COLUMNS]
    tensor = torch.from_numpy(np.ascontiguousarray(block))
    centred = received[:, :GRAM_BLOCK] - own[:GRAM_BLOCK]

    def distances() -> object:
        return pairwise_squared_distances(own, received)

    with ThreadPoolExecutor(2) as pool:
        steps = {
            "krum": (
                "krum, 17 x 1M, f = 1",
                lambda: AGGREGATORS["krum"](own, received, weights, 1),
            ),
            "pass": (f"differences: the rule's pass, {workers} worker(s)", distances),
            "pass_1": ("differences: the pass on 1 thread", one_worker(distances)),
            "gram": (
                "gram: the pass as Krum ran it",
                lambda: gram_squared_distances(own, received, range(MODEL)),
            ),
            "gram_2": (
                "gram: the pass split over 2 threads",
                lambda: gram_two_threads(own, received, pool),
            ),
            "pdist": ("kernel: pdist, 1 block in cache, per 1M", lambda: torch.pdist(tensor)),
            "ssyrk": ("kernel: ssyrk, 1 block in cache, per 1M", lambda: centred @ centred.T),
        }
        ms = {key: best_ms(function) for key, (_, function) in steps.items()}
    # Last: after a threaded call OpenBLAS's idle workers busy-wait, taking a core from the next.
    with threadpool_limits(os.cpu_count(), user_api="blas"):
        ms["mean"] = best_ms(lambda: AGGREGATORS["mean"](own, received, weights, 0))
    ms["pdist"] *= MODEL / tensor.shape[1]
    ms["ssyrk"] *= MODEL / centred.shape[1]
    differences_error, gram_error = collusion_errors()

    print(f"{'step':46s} {'ms':>7s} {'x mean':>7s}")
    print("-" * 62)
    labels = {"mean": "mean, BLAS on every core (the baseline)"}
    labels |= {key: label for key, (label, _) in steps.items()}
    for key, label in labels.items():
        print(f"{label:46s} {ms[key]:7.2f} {ms[key] / ms['mean']:7.2f}")
    print(
        f"colluders' squared distance, relative error: differences {differences_error:.1e}, "
        f"gram {gram_error:.1e}"
    )
    print(
        json.dumps(
            {
                "krum_over_mean_16": round(ms["krum"] / ms["mean"], 3),
                "distance_pass_over_mean": round(ms["pass"] / ms["mean"], 3),
                "gram_pass_over_mean": round(ms["gram"] / ms["mean"], 3),
                "differences_worker_speedup": round(ms["pass_1"] / ms["pass"], 3),
                "gram_two_thread_speedup": round(ms["gram"] / ms["gram_2"], 3),
                "differences_collusion_error": float(f"{differences_error:.2e}"),
                "gram_collusion_error": float(f"{gram_error:.2e}"),
            }
        )
    )


if __name__ == "__main__":
    main()
