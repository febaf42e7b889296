"""How many threads a node's numeric libraries run on.

In one place so that the benchmarks that measure "as in a node" (bench/round.py,
bench/distances.py) set exactly what the node sets.
"""

from __future__ import annotations

import torch
from threadpoolctl import threadpool_limits


def limit_numeric_threads() -> None:
    """Hold torch and BLAS to one thread each, for the whole process.

    Many nodes may share a small machine, and one core each is plenty for training. BLAS too:
    after a threaded call OpenBLAS's idle workers busy-wait ~0.1-0.2 s, taking a core from
    whatever runs next (Krum after a threaded mean: 7.1 -> 13.7 ms). Krum's distance pass
    spreads over the cores itself (gossip.aggregation._distance_workers).
    """
    torch.set_num_threads(1)
    threadpool_limits(1, user_api="blas")
