"""Randomized peer sampling (Epidemic Learning, de Vos et al., NeurIPS 2023): each round every
node sends its model to s peers drawn at random from its allowlist, instead of to a fixed set
of neighbours.

Who sends to whom in round r is derived, on every node alike, from a shared seed, the round
number and the population (every node of the allowlist, sorted by name): a uniformly random
relabelling pi of the n nodes and s distinct offsets d_1..d_s drawn from 1..n-1, and the node
at position a sends to the nodes at positions a + d_k (mod n). So:

* every node sends to exactly s distinct peers, a uniformly random s-subset of the others
  (pi is uniform given pi(a), so the targets are); fresh every round;
* every node also *receives* from exactly s peers, and knows which (positions b - d_k), so a
  round waits for those s and no one else: the barrier costs no more than on an s-regular
  graph, and a peer that did not pick this node is never waited for;
* the round's mixing matrix W = (I + P_1 + ... + P_s) / (s + 1), each P_k a permutation, is
  doubly stochastic: with weight 1/(s+1) on each model (node/aggregator.py), the network's
  average model is exactly preserved by the mean, and unbiased in every round.

Byzantine bound. A node's s in-neighbours change every round; with b Byzantine nodes among
n, the number an honest node draws in one round is hypergeometric, X ~ H(n - 1 others, b of
them Byzantine, s draws), and at most min(s, b). A robust rule configured for f tolerates a
round in which X <= f; it needs s + 1 >= min_inputs(rule, f) inputs, so f is
bounded by the sample, never by the allowlist: f <= s // 2 for median and trimmed mean,
f <= (s - 2) // 2 for Krum's s + 1 > 2 f + 2 (gossip/feasibility.py checks this at start).
`exceed_probability(n, b, s, f)` is P(X > f) for one node in one round, the chance the
guarantee does not hold there; e.g. n = 64, b = 6, s = 4, f = 2: about 0.002. An attacker
that ignores the sampling and sends to every node gains nothing: a node aggregates only the
round's derived senders (node/rounds.py), whatever else arrives.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class PeerSample:
    """The sampled graph of every round, for a fixed population, sample size and seed."""

    population: tuple[str, ...]  # every node's name, sorted
    s: int
    seed: int
    own: str = ""  # the node this copy is for: the default name of targets() and sources()
    _cache: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = field(
        default_factory=dict, compare=False, repr=False
    )

    def __post_init__(self) -> None:
        if list(self.population) != sorted(set(self.population)):
            raise ValueError("the population must be distinct names, sorted")
        if self.own and self.own not in self.population:
            raise ValueError(f"{self.own!r} is not in the population")
        if not 1 <= self.s <= len(self.population) - 1:
            raise ValueError(
                f"sample size s = {self.s} must be between 1 and the number of peers "
                f"({len(self.population) - 1})"
            )

    @classmethod
    def of(cls, own: str, peers: Sequence[str], s: int, seed: int) -> PeerSample:
        return cls(tuple(sorted({own, *peers})), s, seed, own)

    def _round(self, r: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(node index at each position, position of each node, offsets) of round r: the same
        on every node, since it depends only on the seed and r."""
        if r not in self._cache:
            digest = hashlib.sha256(f"murmur-sample/{self.seed}/{r}".encode()).digest()
            rng = np.random.default_rng(int.from_bytes(digest[:16], "big"))
            n = len(self.population)
            order = rng.permutation(n)  # order[a] = index of the node at position a
            position = np.empty(n, dtype=np.int64)
            position[order] = np.arange(n)
            offsets = np.sort(rng.choice(np.arange(1, n), size=self.s, replace=False))
            if len(self._cache) > 8:
                self._cache.clear()
            self._cache[r] = (order, position, offsets)
        return self._cache[r]

    def targets(self, r: int, name: str | None = None) -> list[str]:
        """The s peers ``name`` (default: this node) sends its round-r model to."""
        order, position, offsets = self._round(r)
        n = len(self.population)
        a = position[self.population.index(name or self.own)]
        return sorted(self.population[order[(a + d) % n]] for d in offsets)

    def sources(self, r: int, name: str | None = None) -> list[str]:
        """The s peers whose round-r models ``name`` (default: this node) receives and waits
        for."""
        order, position, offsets = self._round(r)
        n = len(self.population)
        b = position[self.population.index(name or self.own)]
        return sorted(self.population[order[(b - d) % n]] for d in offsets)


def exceed_probability(n: int, byzantine: int, s: int, f: int) -> float:
    """P(an honest node draws more than f Byzantine senders among its s in one round): the
    hypergeometric tail of H(n - 1 others, ``byzantine`` of them Byzantine, s draws)."""
    others = n - 1
    if not 0 <= byzantine <= others or not 1 <= s <= others:
        raise ValueError(f"need 0 <= byzantine <= n - 1 and 1 <= s <= n - 1, n = {n}")
    total = math.comb(others, s)
    tail = sum(
        math.comb(byzantine, x) * math.comb(others - byzantine, s - x)
        for x in range(f + 1, min(s, byzantine) + 1)
    )
    return tail / total
