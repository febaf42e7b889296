"""Why Krum costs what it does here: the pairwise-distance product, its variants, and threads.

Krum (gossip/aggregation.py) needs the 16 x 16 inner products of the neighbours' models,
centred on the node's own, block by block. Issue #3 asks for Krum <= 5x a plain mean at 1M
parameters and 16 neighbours; this benchmark measures the parts that decide whether that is
reachable on the machine it runs on, each per million columns of a (16, 32768) float32 block
that stays in cache, best of 9:

- the symmetric product numpy runs for ``c @ c.T`` (OpenBLAS ``ssyrk``: half the products;
  OpenBLAS runs it on one thread), the same as a general product (``sgemm``, via a copy of
  ``c``) with OpenBLAS on one and on two threads, torch's (MKL) general product on one
  thread, and two products that cover only the lower triangle;
- the centring pass that keeps float32 distances accurate, on the full (16, 1M) models;
- how much a second thread adds to the symmetric product when the columns are split over
  two Python threads, against SHA-256 split the same way;
- three ways of doing Krum's whole pass (centre each block, then multiply): as Krum does, with
  the lower-triangle products, and with the centring split over two threads;
- the plain mean (the rule Krum is compared with) over the same 17 models.

Run: python bench/gram.py. The last line printed is one JSON object.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from threadpoolctl import threadpool_limits

from gossip.aggregation import _BLOCK_COLUMNS as BLOCK  # the rule's own column block
from gossip.aggregation import AGGREGATORS, _column_blocks

NEIGHBOURS = 16
MODEL = 1_000_000
REPEATS = 32  # block products per timing: 1M columns
BEST_OF = 9
SYMMETRIC = "symmetric (numpy c @ c.T: ssyrk)"


def best_seconds(function: Callable[[], object], best_of: int = BEST_OF) -> float:
    function()  # warm caches, allocator and thread pools
    times = []
    for _ in range(best_of):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return min(times)


def product_variants(block: np.ndarray) -> dict[str, Callable[[], object]]:
    """Each computes the block's Gram matrix (or its lower triangle) REPEATS times."""
    copy = block.copy()  # same values, different memory: numpy then calls sgemm, not ssyrk
    tensor = torch.from_numpy(block)
    half = block.shape[0] // 2

    def symmetric() -> None:
        for _ in range(REPEATS):
            block @ block.T

    def general() -> None:
        for _ in range(REPEATS):
            block @ copy.T

    def torch_general() -> None:
        for _ in range(REPEATS):
            tensor @ tensor.T

    def lower_triangle() -> None:
        for _ in range(REPEATS):
            block @ block[:half].T
            block[half:] @ block[half:].T

    def general_one_thread() -> None:
        with threadpool_limits(1, user_api="blas"):
            general()

    return {
        SYMMETRIC: symmetric,
        "general (sgemm), OpenBLAS 1 thread": general_one_thread,
        "general (sgemm), OpenBLAS 2 threads": general,
        "general, torch (MKL), 1 thread": torch_general,
        "lower triangle as 2 products": lower_triangle,
    }


def whole_pass_variants(own: np.ndarray, received: np.ndarray) -> dict[str, Callable[[], object]]:
    """The centred Gram matrix of all 16 x 1M, block by block, as Krum needs it, three ways."""
    k, half = received.shape[0], received.shape[0] // 2

    def make(lower_triangle: bool, threaded_centring: bool) -> Callable[[], object]:
        def run() -> np.ndarray:
            gram = np.zeros((k, k))
            buffer = np.empty((k, BLOCK), dtype=np.float32)
            with ThreadPoolExecutor(1) as helper:
                for cols in _column_blocks(MODEL):
                    c = buffer[:, : cols.stop - cols.start]
                    if threaded_centring:  # half the rows in a helper thread
                        rows = (received[half:, cols], own[cols])
                        done = helper.submit(np.subtract, *rows, out=c[half:])
                        np.subtract(received[:half, cols], own[cols], out=c[:half])
                        done.result()
                    else:
                        np.subtract(received[:, cols], own[cols], out=c)
                    if lower_triangle:
                        gram[:, :half] += c @ c[:half].T
                        gram[half:, half:] += c[half:] @ c[half:].T
                    else:
                        gram += c @ c.T
            return gram

        return run

    return {
        "centre + symmetric product (Krum today)": make(False, False),
        "centre + lower triangle as 2 products": make(True, False),
        "centre in 2 threads + symmetric product": make(False, True),
    }


def two_thread_speedup(work: Callable[[], object]) -> float:
    """Throughput of `work` run twice at once in two threads over twice in a row."""
    with ThreadPoolExecutor(2) as pool:

        def in_parallel() -> None:
            futures = [pool.submit(work) for _ in range(2)]
            for future in futures:
                future.result()

        serial = best_seconds(lambda: (work(), work()), best_of=5)
        parallel = best_seconds(in_parallel, best_of=5)
    return serial / parallel


def main() -> None:
    torch.set_num_threads(1)  # as in a node
    rng = np.random.default_rng(0)
    block = rng.standard_normal((NEIGHBOURS, BLOCK), dtype=np.float32)
    own = rng.standard_normal(MODEL, dtype=np.float32)
    received = own + 0.01 * rng.standard_normal((NEIGHBOURS, MODEL), dtype=np.float32)
    weights = np.full(NEIGHBOURS + 1, 1.0 / (NEIGHBOURS + 1))
    per_million = MODEL / (REPEATS * BLOCK)

    variants = product_variants(block)
    products = [(name, best_seconds(f) * per_million * 1e3) for name, f in variants.items()]
    buffer = np.empty_like(block)

    def centre() -> None:
        for cols in _column_blocks(MODEL):
            np.subtract(received[:, cols], own[cols], out=buffer[:, : cols.stop - cols.start])

    centring_ms = best_seconds(centre) * 1e3
    mean_ms = best_seconds(lambda: AGGREGATORS["mean"](own, received, weights, 0)) * 1e3
    krum_ms = best_seconds(lambda: AGGREGATORS["krum"](own, received, weights, 1)) * 1e3
    whole = [
        (name, best_seconds(f) * 1e3) for name, f in whole_pass_variants(own, received).items()
    ]
    rows = [
        *products,
        ("centring on own (16 x 1M, from memory)", centring_ms),
        *whole,
        ("mean, 17 x 1M (the baseline)", mean_ms),
        ("krum, 17 x 1M, f = 1", krum_ms),
    ]

    data = os.urandom(1 << 20)
    product_speedup = two_thread_speedup(variants[SYMMETRIC])
    sha_speedup = two_thread_speedup(lambda: [hashlib.sha256(data).digest() for _ in range(64)])

    print(f"{'step':44s} {'ms':>7s} {'x mean':>7s}")
    print("-" * 60)
    for name, ms in rows:
        print(f"{name:44s} {ms:7.2f} {ms / mean_ms:7.2f}")
    print(f"{'2 Python threads: symmetric product':44s} {product_speedup:7.2f}x")
    print(f"{'2 Python threads: SHA-256':44s} {sha_speedup:7.2f}x")
    print("(products: ms per million columns of 16 rows in cache; the rest: 16 x 1M from memory)")
    fastest_product_ms = min(ms for _, ms in products)
    print(
        json.dumps(
            {
                "krum_over_mean_16": round(krum_ms / mean_ms, 3),
                "fastest_product_over_mean": round(fastest_product_ms / mean_ms, 3),
                "fastest_whole_pass_over_mean": round(min(ms for _, ms in whole) / mean_ms, 3),
                "centring_over_mean": round(centring_ms / mean_ms, 3),
                "product_two_thread_speedup": round(product_speedup, 3),
                "sha256_two_thread_speedup": round(sha_speedup, 3),
            }
        )
    )


if __name__ == "__main__":
    main()
