"""Byzantine-robust aggregation rules for decentralized gossip.

Every rule is a plain function with one signature (docs/architecture.md)::

    rule(own, received, weights, f, **params) -> np.ndarray

``own`` is this node's flat model ``(d,)``, ``received`` the neighbours' models ``(k, d)``
(k may be 0), ``weights`` the mixing weights ``(k + 1,)`` for ``[own, *received]`` and ``f``
the number of Byzantine neighbours the rule must tolerate. No rule does I/O or keeps state,
so a rule can be tested against a hand-worked example and swapped from the config.

Which values a rule aggregates matters for its bound. In decentralized SGD the node's own
model is one of the values: median, trimmed mean, Krum, Multi-Krum and the geometric median
all work on the ``n = k + 1`` values ``[own, *received]``, and ``min_inputs`` counts ``own``.
``mean`` and ``clipping`` use the mixing weights, where ``own`` has a weight like any input.

The rules need finite inputs. Filter them first with ``finite_rows``; a rule whose result is
not finite raises ``ValueError`` naming the non-finite inputs rather than return poison.

The large-model paths work on column blocks small enough to stay in cache, because on a
1M-parameter model the rules are memory-bound: see bench/round.py for their cost relative
to a plain mean. Krum's distance pass also spreads its blocks over a process-wide pool of
worker threads, which holds no data between calls. docs/aggregation.md gives each rule's
bound and reference.
"""

from __future__ import annotations

import functools
import math
import numbers
import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

# Columns per block: 16 rows of 32768 float32 values (2 MiB) stay in cache between passes.
_BLOCK_COLUMNS = 32768
# Krum's pairwise distances: 17 rows of 16384 float32 values (1.1 MiB), about one core's L2;
# 16384 beat 8192 and 32768 by 2-10 % at 1M parameters. A distance worker thread gets at
# least 3 blocks: with fewer, handing work to a second thread cost more than it saved.
_DISTANCE_BLOCK_COLUMNS = 16384
_MIN_BLOCKS_PER_WORKER = 3
# Up to this many trimmed values per end, streaming selection (cost grows with the trim) beats
# sorting every column (fixed cost); beyond it, sort.
_STREAMING_MAX_TRIM = 8
_WEIGHT_SUM_TOLERANCE = 1e-6
# A model farther from the robust centre than this many times the (n - f)-th smallest distance
# is pulled in to that radius (screen_inputs).
SCREENING_SPREAD = 1.5


# rule(own, received, weights, f, **params) -> aggregate; see the module docstring.
Rule = Callable[..., np.ndarray]


# --------------------------------------------------------------------------- bounds


def min_inputs(rule_name: str, f: int) -> int:
    """The number of values (own model included) that rule ``rule_name`` needs to tolerate f.

    These are the bounds ``gossip/feasibility.py`` checks against every node's degree:
    Krum and Multi-Krum need n > 2f + 2 (Blanchard et al. 2017), median, trimmed mean and
    the geometric median need an honest majority n >= 2f + 1, and self-centred clipping needs
    at least one honest neighbour beyond the f it clips, n >= f + 2 (any n when f = 0).
    """
    if rule_name not in AGGREGATORS:
        raise ValueError(
            f"unknown aggregation rule {rule_name!r}: choose one of {', '.join(AGGREGATORS)}"
        )
    if isinstance(f, bool) or not isinstance(f, int | np.integer) or f < 0:
        raise ValueError(f"f must be a whole number >= 0 (Byzantine neighbours), got {f!r}")
    f = int(f)
    if rule_name == "mean":
        if f > 0:
            raise ValueError(
                f"rule 'mean' averages every input and tolerates no Byzantine neighbour, "
                f"but f={f}: set f = 0 or choose a robust rule "
                f"(clipping, trimmed_mean, median, krum, multi_krum, geometric_median)"
            )
        return 1
    if rule_name in ("krum", "multi_krum"):
        return 2 * f + 3
    if rule_name == "clipping":
        return 1 if f == 0 else f + 2
    return 2 * f + 1  # median, trimmed_mean, geometric_median


# --------------------------------------------------------------------------- helpers


def finite_rows(received: np.ndarray) -> np.ndarray:
    """Boolean mask ``(k,)``: which received vectors are entirely finite (no NaN, no inf).

    A row sum is non-finite whenever the row holds a NaN or inf, so one cheap product finds
    the suspects; only those (or rows whose float32 sum overflowed) get the exact check.
    """
    received = np.asarray(received)
    if received.ndim != 2:
        raise ValueError(f"received must be a 2-D array (k, d), got shape {received.shape}")
    if received.shape[0] == 0:
        return np.ones(0, dtype=bool)
    with np.errstate(over="ignore", invalid="ignore"):
        sums = received @ np.ones(received.shape[1], dtype=received.dtype)
    ok = np.isfinite(sums)
    for row in np.flatnonzero(~ok):
        ok[row] = bool(np.isfinite(received[row]).all())
    return ok


def distances_to(vector: np.ndarray, received: np.ndarray) -> np.ndarray:
    """Euclidean distance ``(k,)`` from ``vector`` to each row of ``received``.

    Differences are taken before squaring (never ||a||^2 + ||b||^2 - 2ab), so models that
    agree to many digits still get accurate distances; partial sums are kept in float64.
    """
    return np.sqrt(squared_distances_to(vector, received))


def squared_distances_to(vector: np.ndarray, received: np.ndarray) -> np.ndarray:
    """``distances_to`` squared, float64: partial sums that callers reading a model block by
    block (gossip/blocks.py) add up across blocks."""
    vector, received = _as_vector_and_rows(vector, received, "vector")
    squared = np.zeros(received.shape[0], dtype=np.float64)
    buffer = np.empty((received.shape[0], min(_BLOCK_COLUMNS, vector.shape[0])), received.dtype)
    for cols in _column_blocks(vector.shape[0]):
        diff = np.subtract(received[:, cols], vector[cols], out=buffer[:, : cols.stop - cols.start])
        squared += np.einsum("ij,ij->i", diff, diff)
    return squared


def krum_scores(own: np.ndarray, received: np.ndarray, f: int) -> np.ndarray:
    """Krum score of each value in ``[own, *received]`` (Blanchard et al. 2017).

    The score of value i is the sum of squared distances to its n - f - 2 nearest *other*
    values. (p2pfl and Nebula sum plain distances to all others and ignore f: that picks a
    medoid, without the n > 2f + 2 guarantee.)
    """
    own, received = _as_vector_and_rows(own, received, "own")
    _require_inputs("krum", received.shape[0] + 1, f)
    return krum_scores_from(pairwise_squared_distances(own, received), f)


def krum_scores_from(squared: np.ndarray, f: int) -> np.ndarray:
    """Krum scores from the squared distances ``(n, n)`` between ``[own, *received]``."""
    n = squared.shape[0]
    _require_inputs("krum", n, f)
    squared = squared.copy()
    np.fill_diagonal(squared, np.inf)
    return np.sort(squared, axis=1)[:, : n - f - 2].sum(axis=1)


def krum_select(own: np.ndarray, received: np.ndarray, f: int, m: int = 1) -> np.ndarray:
    """Indices into ``[own, *received]`` (0 is own) of the m values with the lowest Krum score.

    Best first; ties go to the lower index, so a node prefers its own model. The node can log
    which peers were used from this.
    """
    return select_lowest(krum_scores(own, received, f), m)


def select_lowest(scores: np.ndarray, m: int) -> np.ndarray:
    """The m indices of the lowest Krum scores, best first, ties to the lower index."""
    n = scores.shape[0]
    if isinstance(m, bool) or not isinstance(m, int | np.integer) or not 1 <= m <= n:
        raise ValueError(f"multi-krum m must be a whole number in 1..{n} (the inputs), got {m!r}")
    return np.argsort(scores, kind="stable")[: int(m)]


# --------------------------------------------------------------------------- screening


@dataclass(frozen=True)
class Bounded:
    """What :func:`bound_far_inputs` hands the rule: every received model, the far ones pulled
    in, and why (the centre, the radius and which rows were pulled)."""

    rows: np.ndarray  # (k, d): received, far rows moved onto the ball around the centre
    centre: np.ndarray  # (d,): coordinate-wise median of [own, *received]
    radius: float
    distances: np.ndarray  # (k,): each received model's distance from the centre, before
    pulled: np.ndarray  # (k,) bool: which rows were pulled in


def coordinate_median(own: np.ndarray, received: np.ndarray) -> np.ndarray:
    """Coordinate-wise median of ``[own, *received]``: with at most f < n / 2 Byzantine
    values, every coordinate lies between the smallest and the largest honest value of that
    coordinate, wherever the attackers put theirs."""
    own, received = _as_vector_and_rows(own, received, "own")
    return _trimmed(own, received, received.shape[0] // 2)


def screening_radius(distances: np.ndarray, f: int, *, spread: float, floor: float = 0.0) -> float:
    """The radius beyond which a model is pulled in: ``spread`` times the (n - f)-th smallest
    of the n distances from the centre (own included), and at least ``floor``.

    With at most f Byzantine values among n, the (n - f)-th smallest distance lies between the
    smallest and the largest honest distance: attackers far out cannot widen it, attackers
    sitting on the centre can shrink it only to an honest distance. ``floor`` is the spread the
    node knows honest models have anyway (under DP, :func:`dp_noise_norm`), so that honest
    noisy models are never pulled in however the attackers place themselves.
    """
    values = np.sort(np.asarray(distances, dtype=np.float64))
    if values.ndim != 1 or values.size == 0:
        raise ValueError(f"distances must be a non-empty vector, got shape {values.shape}")
    if np.isnan(values).any() or (values < 0).any():
        raise ValueError("distances must be numbers >= 0 (infinity allowed, NaN not)")
    if isinstance(f, bool) or not isinstance(f, int | np.integer) or f < 0:
        raise ValueError(f"f must be a whole number >= 0, got {f!r}")
    if not (np.isfinite(spread) and spread > 0):
        raise ValueError(f"screening spread must be a finite number > 0, got {spread!r}")
    if not (np.isfinite(floor) and floor >= 0):
        raise ValueError(f"screening floor must be a finite number >= 0, got {floor!r}")
    index = max(0, values.size - int(f) - 1)
    scale = float(values[index])
    if not np.isfinite(scale):
        return float(floor)
    return max(float(floor), float(spread) * scale)


def bound_far_inputs(
    own: np.ndarray,
    received: np.ndarray,
    f: int,
    *,
    spread: float,
    floor: float = 0.0,
) -> Bounded:
    """Pull every received model farther than the screening radius from the robust centre in
    to that radius, instead of leaving it out (issue 19 item 4).

    A model left out used to use up one of the f Byzantine inputs the rule tolerates, so an
    attacker that got honest models left out was clipped less. Pulled in, a model still counts
    as one of the n inputs and the rule keeps its f: a heuristic can no longer weaken it. What
    a far model can do is bounded instead, to ``radius`` from the coordinate-wise median
    (:func:`coordinate_median`), which the attackers cannot move out of the honest range.
    The centre is the median over own and every received row; the radius is
    :func:`screening_radius` over their distances. Pure: no I/O, no state.
    """
    own, received = _as_vector_and_rows(own, received, "own")
    k = received.shape[0]
    if k == 0:
        empty = np.zeros(0, dtype=np.float64)
        return Bounded(received.copy(), own.copy(), math.inf, empty, np.zeros(0, dtype=bool))
    centre = coordinate_median(own, received)
    with np.errstate(over="ignore", invalid="ignore"):
        own_distance = distances_to(centre, own[None, :])
        distances = np.nan_to_num(distances_to(centre, received), nan=np.inf, posinf=np.inf)
    own_distance = np.nan_to_num(own_distance, nan=np.inf, posinf=np.inf)
    every = np.concatenate([own_distance, distances])
    radius = screening_radius(every, f, spread=spread, floor=floor)
    pulled = distances > radius
    rows = received.copy()
    for i in np.flatnonzero(pulled):
        if np.isfinite(distances[i]):
            rows[i] = centre + (received[i] - centre) * (radius / distances[i])
        else:  # overflowed: no direction to keep, so it lands on the centre
            rows[i] = centre
    return Bounded(rows, centre, radius, distances, pulled)


@dataclass(frozen=True)
class Screening:
    """A round's inputs after :func:`screen_inputs`: what the rule gets, and why."""

    rows: np.ndarray  # (k, d): the received models, the far ones pulled in
    f: int  # the Byzantine inputs the rule tolerates: always the f it was given
    centre: np.ndarray
    radius: float
    distances: np.ndarray  # (k,): from the centre, before pulling in
    pulled: np.ndarray  # (k,) bool: pulled in to the radius
    muted: np.ndarray  # (k,) bool: weight 0 this round (far from centre and own, or a twin)
    twins: np.ndarray  # (k,) bool: closer to another input than DP noise allows


def screen_inputs(
    own: np.ndarray,
    received: np.ndarray,
    f: int,
    *,
    spread: float = 1.5,
    floor: float = 0.0,
    own_limit: float | np.ndarray = math.inf,
    twin_distance: float | np.ndarray = 0.0,
) -> Screening:
    """The node's heuristic screening before the rule, which never lowers the rule's f.

    Every received model stays one of the n inputs and the rule runs with the same f (issue 19
    item 4): a model far from the robust centre is pulled in to the screening radius
    (:func:`bound_far_inputs`), not dropped. A model that is both pulled in and farther than
    ``own_limit`` from the node's own model is also **muted**: :func:`mute` gives it mixing
    weight 0 this round (for the rules that use weights), but it still counts as an input, so
    an honest model muted by mistake cannot let an attacker's through unclipped.

    Under DP, ``twin_distance`` > 0 also mutes every received model closer than that to
    another input (:func:`twins`): each honest DP model carries its own round of independent
    noise, so two honest models are never that close, while colluders sending one crafted
    model (ALIE, IPM, sign flip, dissensus to one recipient) are identical. Pure.

    Per sender (issue 19, announced DP noise): ``own_limit`` may be one limit per received
    model ``(k,)`` and ``twin_distance`` one noise-scaled distance per input ``(k + 1,)``, own
    first (see :func:`twins`).
    """
    bound = bound_far_inputs(own, received, f, spread=spread, floor=floor)
    with np.errstate(over="ignore", invalid="ignore"):
        to_own = np.nan_to_num(distances_to(own, received), nan=np.inf, posinf=np.inf)
    close = twins(own, received, twin_distance)
    muted = (bound.pulled & (to_own > own_limit)) | close
    return Screening(
        bound.rows, int(f), bound.centre, bound.radius, bound.distances, bound.pulled, muted, close
    )


def twins(own: np.ndarray, received: np.ndarray, min_distance: float | np.ndarray) -> np.ndarray:
    """Boolean mask ``(k,)``: received models closer than ``min_distance`` to another input
    (own or received). Under DP two honest models differ by about sqrt(2) times one round's
    noise length (:func:`dp_noise_norm`) whatever their data, and the chi distribution keeps
    them from coming much closer once the model has a few hundred parameters; a fraction of
    that is a distance no two honest DP outputs come within. ``min_distance`` 0: none.

    Per input: ``min_distance`` of shape ``(k + 1,)`` (own first) is each input's own
    noise-scaled distance t_i, and inputs i and j are twins when closer than
    sqrt((t_i^2 + t_j^2) / 2): two honest models with noise lengths a and b differ by about
    sqrt(a^2 + b^2), so two large sites (little noise each) are not taken for twins by a
    small site that measures them with its own, larger noise."""
    own, received = _as_vector_and_rows(own, received, "own")
    if received.shape[0] == 0 or not np.any(np.asarray(min_distance) > 0):
        return twins_from(np.zeros((received.shape[0] + 1,) * 2), min_distance)
    with np.errstate(over="ignore", invalid="ignore"):
        squared = np.nan_to_num(pairwise_squared_distances(own, received), nan=np.inf)
    return twins_from(squared, min_distance)


def twins_from(squared: np.ndarray, min_distance: float | np.ndarray) -> np.ndarray:
    """:func:`twins` from the squared distances ``(k + 1, k + 1)`` between
    ``[own, *received]`` (gossip/blocks.py sums them block by block)."""
    n = squared.shape[0]
    thresholds = np.asarray(min_distance, dtype=np.float64)
    if thresholds.ndim == 0:
        if not float(thresholds) > 0:
            return np.zeros(n - 1, dtype=bool)
        limit: float | np.ndarray = float(thresholds) ** 2
    else:
        if thresholds.shape != (n,):
            raise ValueError(
                f"twin distances must be one number or one per input ({n},), "
                f"got shape {thresholds.shape}"
            )
        if not (thresholds > 0).any():
            return np.zeros(n - 1, dtype=bool)
        limit = (thresholds[:, None] ** 2 + thresholds[None, :] ** 2) / 2
    squared = np.array(squared, dtype=np.float64)
    np.fill_diagonal(squared, np.inf)
    return (squared < limit)[1:].any(axis=1)


def mute(weights: np.ndarray, muted: np.ndarray) -> np.ndarray:
    """Mixing weights with the muted inputs' weights moved to own (index 0); still summing
    to 1, so a muted input costs the node nothing but that input's pull."""
    weights = np.asarray(weights, dtype=np.float64)
    muted = np.asarray(muted, dtype=bool)
    if weights.shape != (muted.shape[0] + 1,):
        raise ValueError(
            f"weights must have shape ({muted.shape[0] + 1},) for [own, *received], "
            f"got {weights.shape}"
        )
    out = weights.copy()
    out[1:][muted] = 0.0
    out[0] = 1.0 - out[1:].sum()
    return out


def dp_noise_norm(
    noise_multiplier: float,
    max_grad_norm: float,
    expected_batch_size: float,
    learning_rate: float,
    steps: int,
    parameters: int,
) -> float:
    """The expected length of the DP noise one round of DP-SGD adds to a model.

    Each step adds N(0, (sigma C)^2) per coordinate to the summed clipped gradients, divided
    by the expected batch size B and scaled by the learning rate: per coordinate a standard
    deviation of lr sigma C / B, T independent steps sqrt(T) times that, and over d parameters
    a length of about lr sigma C sqrt(T d) / B (the chi distribution concentrates there for
    d in the hundreds and up). Two honest models that trained from one consensus differ by
    about sqrt(2) times it whatever their data: the node knows every factor from its own
    ledger and trainer, so this is a yardstick of the honest spread no attacker can move.
    (Plain SGD without momentum; Adam rescales the noise, and the node then uses no floor.)
    """
    for name, value in (
        ("noise_multiplier", noise_multiplier),
        ("max_grad_norm", max_grad_norm),
        ("expected_batch_size", expected_batch_size),
        ("learning_rate", learning_rate),
    ):
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"dp_noise_norm: {name} must be a finite number > 0, got {value!r}")
    if steps < 0 or parameters < 1:
        raise ValueError(
            f"dp_noise_norm: need steps >= 0 and parameters >= 1, got {steps}, {parameters}"
        )
    per_coordinate = learning_rate * noise_multiplier * max_grad_norm / expected_batch_size
    return per_coordinate * math.sqrt(steps * parameters)


# --------------------------------------------------------------------------- rules


def mean(own: np.ndarray, received: np.ndarray, weights: np.ndarray, f: int = 0) -> np.ndarray:
    """Weighted mean with the mixing weights: plain gossip averaging. Tolerates f = 0 only."""
    own, received, weights = _validate("mean", own, received, weights, f, check_weights=True)
    return _checked(_weighted_sum(own, received, weights), own, received, "mean")


def median(own: np.ndarray, received: np.ndarray, weights: np.ndarray, f: int) -> np.ndarray:
    """Coordinate-wise median of ``[own, *received]`` (mean of the two middle values if n even).

    The median is the trimmed mean that trims all but the middle one or two values.
    """
    own, received, weights = _validate("median", own, received, weights, f)
    n = received.shape[0] + 1
    return _checked(_trimmed(own, received, (n - 1) // 2), own, received, "median")


def trimmed_mean(own: np.ndarray, received: np.ndarray, weights: np.ndarray, f: int) -> np.ndarray:
    """Coordinate-wise trimmed mean: per coordinate drop the f largest and f smallest of the
    n = k + 1 values ``[own, *received]`` and average the remaining n - 2f (Yin et al. 2018)."""
    own, received, weights = _validate("trimmed_mean", own, received, weights, f)
    return _checked(_trimmed(own, received, f), own, received, "trimmed_mean")


def krum(own: np.ndarray, received: np.ndarray, weights: np.ndarray, f: int) -> np.ndarray:
    """Krum (Blanchard et al. 2017): the one value of ``[own, *received]`` with the lowest
    score; needs n > 2f + 2."""
    own, received, weights = _validate("krum", own, received, weights, f)
    chosen = int(krum_select(own, received, f, m=1)[0])
    result = own.copy() if chosen == 0 else received[chosen - 1].copy()
    return _checked(result, own, received, "krum")


def multi_krum(
    own: np.ndarray, received: np.ndarray, weights: np.ndarray, f: int, m: int | None = None
) -> np.ndarray:
    """Multi-Krum (Blanchard et al. 2017): the plain average of the m best-scored values.

    ``m`` defaults to n - f, the most values that can all be honest; m = 1 is Krum.
    """
    own, received, weights = _validate("multi_krum", own, received, weights, f)
    n = received.shape[0] + 1
    chosen = krum_select(own, received, f, m=n - f if m is None else m)
    selection = np.zeros(n, dtype=np.float64)
    selection[chosen] = 1.0 / len(chosen)
    return _checked(_weighted_sum(own, received, selection), own, received, "multi_krum")


def geometric_median(
    own: np.ndarray,
    received: np.ndarray,
    weights: np.ndarray,
    f: int,
    nu: float = 1e-6,
    max_iter: int = 100,
    tol: float = 1e-6,
) -> np.ndarray:
    """Geometric median of ``[own, *received]`` by smoothed Weiszfeld iterations (RFA,
    Pillutla, Kakade & Harchaoui 2022), uniform over the inputs.

    Each step re-weights every value by 1 / max(nu, distance to the current estimate); nu
    keeps the step defined when the estimate lands on an input. It stops when the objective
    (sum of distances) improves by less than ``tol`` relative, or after ``max_iter`` steps.
    """
    own, received, weights = _validate("geometric_median", own, received, weights, f)
    estimate = weiszfeld(
        received.shape[0] + 1,
        lambda coefficients: _weighted_sum(own, received, coefficients),
        lambda estimate: np.concatenate(
            [distances_to(estimate, own[None, :]), distances_to(estimate, received)]
        ),
        nu,
        max_iter,
        tol,
    )
    return _checked(estimate, own, received, "geometric_median")


def weiszfeld(
    n: int,
    combine: Callable[[np.ndarray], np.ndarray],
    distances: Callable[[np.ndarray], np.ndarray],
    nu: float,
    max_iter: int,
    tol: float,
) -> np.ndarray:
    """The smoothed Weiszfeld iterations of ``geometric_median`` over n values, given how to
    combine them with coefficients and how far each is from an estimate (so that
    gossip/blocks.py can run them on models read block by block)."""
    if not (np.isfinite(nu) and nu > 0):
        raise ValueError(f"geometric_median nu must be a finite number > 0, got {nu!r}")
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"geometric_median max_iter must be a whole number >= 1, got {max_iter!r}")
    if not (np.isfinite(tol) and tol >= 0):
        raise ValueError(f"geometric_median tol must be a finite number >= 0, got {tol!r}")
    estimate = combine(np.full(n, 1.0 / n))
    objective = np.inf
    for _ in range(max_iter):
        to_estimate = distances(estimate)
        new_objective = float(to_estimate.sum())
        if objective - new_objective <= tol * new_objective:
            break
        objective = new_objective
        betas = 1.0 / np.maximum(to_estimate, nu)
        estimate = combine(betas / betas.sum())
    return estimate


def clipping(
    own: np.ndarray,
    received: np.ndarray,
    weights: np.ndarray,
    f: int,
    tau: float | None = None,
) -> np.ndarray:
    """Self-centred clipping, ClippedGossip (He, Karimireddy & Jaggi 2022):
    ``own + sum_j w_j clip(x_j - own, tau)`` with ``clip(v, tau) = v * min(1, tau / ||v||)``.

    Each neighbour can move the node by at most ``w_j * tau``, whatever it sends. With
    ``tau=None`` the radius is chosen per round as the (k - f)-th smallest distance to a
    neighbour: the k - f nearest pass unchanged and only the f farthest are pulled in to that
    radius. This generalises the authors' code (which clips only the farthest one) to f, and
    with f = 0 the rule is plain gossip averaging.
    """
    own, received, weights = _validate("clipping", own, received, weights, f, check_weights=True)
    if received.shape[0] == 0:
        return own.copy()
    combined = clipping_coefficients(distances_to(own, received), weights, f, tau)
    return _checked(_weighted_sum(own, received, combined), own, received, "clipping")


def clipping_coefficients(
    distances: np.ndarray, weights: np.ndarray, f: int, tau: float | None = None
) -> np.ndarray:
    """The coefficients ``(k + 1,)`` of ``[own, *received]`` in ``clipping``'s result, from
    the neighbours' distances to own (k >= 1)."""
    k = distances.shape[0]
    if tau is None:
        radius = float(np.partition(distances, k - f - 1)[k - f - 1])
    else:
        if isinstance(tau, bool) or not isinstance(tau, numbers.Real) or not 0 < tau < np.inf:
            raise ValueError(
                f"clipping tau must be a finite number > 0 (or None: adaptive), got {tau!r}"
            )
        radius = float(tau)
    scale = np.ones(k, dtype=np.float64)
    far = distances > radius
    scale[far] = radius / distances[far]
    # own + sum_j c_j (x_j - own)  ==  (1 - sum_j c_j) own + sum_j c_j x_j
    coefficients = weights[1:] * scale
    return np.concatenate([[1.0 - coefficients.sum()], coefficients])


AGGREGATORS: dict[str, Rule] = {
    "mean": mean,
    "median": median,
    "trimmed_mean": trimmed_mean,
    "krum": krum,
    "multi_krum": multi_krum,
    "geometric_median": geometric_median,
    "clipping": clipping,
}


# --------------------------------------------------------------------------- internals


def _column_blocks(stop: int, size: int = _BLOCK_COLUMNS, start: int = 0) -> Iterator[slice]:
    """Slices of at most ``size`` columns covering columns ``start`` to ``stop``."""
    for first in range(start, stop, size):
        yield slice(first, min(first + size, stop))


def _as_vector_and_rows(
    vector: np.ndarray, rows: np.ndarray, vector_name: str
) -> tuple[np.ndarray, np.ndarray]:
    vector = np.asarray(vector)
    rows = np.asarray(rows)
    if vector.ndim != 1:
        raise ValueError(f"{vector_name} must be a flat vector (d,), got shape {vector.shape}")
    if rows.ndim != 2 or rows.shape[1] != vector.shape[0]:
        raise ValueError(
            f"received must have shape (k, {vector.shape[0]}) to match {vector_name}, "
            f"got {rows.shape}: flatten every model with models.params.flatten"
        )
    if not (np.issubdtype(vector.dtype, np.floating) and np.issubdtype(rows.dtype, np.floating)):
        raise ValueError(
            f"models must be floating-point arrays, got {vector.dtype} and {rows.dtype}"
        )
    dtype = np.result_type(vector.dtype, rows.dtype)
    return vector.astype(dtype, copy=False), rows.astype(dtype, copy=False)


def _require_inputs(rule_name: str, n: int, f: int) -> None:
    needed = min_inputs(rule_name, f)
    if n < needed:
        raise ValueError(
            f"rule {rule_name!r} with f={f} needs at least {needed} inputs "
            f"(own + {needed - 1} received), got {n}: lower f or use more neighbours"
        )


def _validate(
    rule_name: str,
    own: np.ndarray,
    received: np.ndarray,
    weights: np.ndarray,
    f: int,
    check_weights: bool = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Shapes, dtype, bound and (for rules that use them) the weights; returns clean arrays."""
    own, received = _as_vector_and_rows(own, received, "own")
    k = received.shape[0]
    _require_inputs(rule_name, k + 1, f)
    weights = np.asarray(weights, dtype=np.float64)
    if weights.shape != (k + 1,):
        raise ValueError(
            f"weights must have shape ({k + 1},) for [own, *received], got {weights.shape}"
        )
    if check_weights and (
        not np.isfinite(weights).all()
        or (weights < 0).any()
        or abs(weights.sum() - 1.0) > _WEIGHT_SUM_TOLERANCE
    ):
        raise ValueError(
            f"rule {rule_name!r} needs non-negative mixing weights summing to 1, got "
            f"{weights.tolist()}: take them from the topology's mixing matrix row"
        )
    return own, received, weights


def _weighted_sum(own: np.ndarray, received: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """weights[0] * own + weights[1:] @ received, in the models' dtype (one BLAS pass).

    The product's output is the result, and ``own`` is added into it block by block: a
    second whole-model temporary is a fresh multi-MB allocation per call whose page faults
    cost more than the product itself (measured at 1M parameters and 16 neighbours: 5.5 ms
    with it, 1.8 ms without).
    """
    w = np.asarray(weights, dtype=own.dtype)
    if received.shape[0] == 0:
        return own * w[0]
    result = w[1:] @ received
    for cols in _column_blocks(own.shape[0]):
        result[cols] += own[cols] * w[0]
    return result


def pairwise_squared_distances(own: np.ndarray, received: np.ndarray) -> np.ndarray:
    """Squared distances ``(n, n)`` between all of ``[own, *received]``, from differences.

    Never by the Gram trick ||a||^2 + ||b||^2 - 2ab: in float32 it cancels whenever two values
    are much closer to each other than to the point the products are centred on, which is
    what colluding Byzantine models look like (two models 1000x closer to each other than to
    own got 13 % error; bench/distances.py). ``torch.pdist`` takes each pair's differences
    before squaring in one compiled pass over a column block held in cache; block results
    are summed in float64. Column ranges go to worker threads (torch releases the GIL): the
    pass waits on add latency, not multiply throughput, so a second core nearly halves it,
    where the Gram trick's BLAS product gained nothing from one (docs/aggregation.md).
    """
    import torch  # here, not at the top: run_cluster's parent imports gossip/ without torch

    n, d = received.shape[0] + 1, own.shape[0]
    dtype = np.float32 if own.dtype == np.float32 else np.float64  # the two pdist computes in

    def squared_over(columns: range) -> np.ndarray:
        buffer = np.empty((n, min(_DISTANCE_BLOCK_COLUMNS, len(columns))), dtype=dtype)
        per_block = []
        for cols in _column_blocks(columns.stop, _DISTANCE_BLOCK_COLUMNS, columns.start):
            # pdist needs a contiguous block, so a short last block gets its own. Copying also
            # never hands torch the caller's arrays, which may be read-only message views.
            width = cols.stop - cols.start
            block = buffer if width == buffer.shape[1] else np.empty((n, width), dtype=dtype)
            block[0], block[1:] = own[cols], received[:, cols]
            per_block.append(torch.pdist(torch.from_numpy(block)))
        return torch.stack(per_block).double().square_().sum(dim=0).numpy()

    workers = _distance_workers(d, torch.get_num_threads())
    if workers == 1:
        condensed = squared_over(range(d))
    else:
        step = -(-d // workers // _DISTANCE_BLOCK_COLUMNS) * _DISTANCE_BLOCK_COLUMNS
        ranges = [range(start, min(start + step, d)) for start in range(0, d, step)]
        condensed = sum(_distance_pool(workers).map(squared_over, ranges))
    squared = np.zeros((n, n), dtype=np.float64)
    squared[np.triu_indices(n, 1)] = condensed
    return squared + squared.T


@functools.cache
def _distance_pool(workers: int) -> ThreadPoolExecutor:
    """Worker threads for the distance pass, kept for the life of the process: a thread's
    first call into torch sets up its thread-local state, and starting threads per call cost
    0.6 ms (8 % of the pass at 1M parameters). The pool holds no data between calls."""
    return ThreadPoolExecutor(workers, thread_name_prefix="murmur-distances")


def _distance_workers(d: int, torch_threads: int) -> int:
    """Threads for the pairwise-distance pass over ``d`` columns: one per core that torch's
    own intra-op threads leave free (a node runs torch on one thread), each with at least
    ``_MIN_BLOCKS_PER_WORKER`` column blocks, so a small model gets one."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    blocks = -(-d // _DISTANCE_BLOCK_COLUMNS)
    return max(1, min(cores // max(torch_threads, 1), blocks // _MIN_BLOCKS_PER_WORKER))


def _trimmed(own: np.ndarray, received: np.ndarray, trim: int) -> np.ndarray:
    """Per coordinate, the mean of ``[own, *received]`` without its ``trim`` largest and
    ``trim`` smallest values."""
    n, d = received.shape[0] + 1, own.shape[0]
    result = np.empty(d, dtype=own.dtype)
    for cols in _column_blocks(d):
        block = received[:, cols]
        if trim > _STREAMING_MAX_TRIM:
            ordered = np.sort(np.vstack([own[cols], block]), axis=0)
            result[cols] = ordered[trim : n - trim].sum(axis=0)
        else:
            result[cols] = _sum_of_middle([own[cols], *block], trim)
    result /= n - 2 * trim
    return result


def _sum_of_middle(rows: list[np.ndarray], trim: int) -> np.ndarray:
    """Sum of each column of ``rows`` without its ``trim`` largest and ``trim`` smallest values.

    Every row is pushed through a stack that keeps the largest values seen so far; what it
    evicts goes through a stack that keeps the smallest; what that one evicts is a middle
    value and is summed. This costs about 4 * trim + 1 elementwise operations per row instead
    of sorting every column. Summing the middle directly, rather than the total minus the
    extremes, matters: a Byzantine 1e30 would cancel every honest value out of a float32 sum.
    """
    largest = _SelectionStack(trim, rows[0], keep=np.maximum, evict=np.minimum)
    smallest = _SelectionStack(trim, rows[0], keep=np.minimum, evict=np.maximum)
    total = np.zeros_like(rows[0])
    for row in rows:
        not_largest = largest.push(row)
        if not_largest is None:
            continue
        middle = smallest.push(not_largest)
        if middle is not None:
            total += middle
    return total


class _SelectionStack:
    """Per column, the ``depth`` most extreme values pushed so far, best at level 0.

    ``keep`` (np.maximum or np.minimum) says which end is kept. Once full, each push evicts
    the least extreme of the stack and the new value; the evicted array is only valid until
    the next push.
    """

    def __init__(self, depth: int, like: np.ndarray, keep: np.ufunc, evict: np.ufunc):
        self.levels = np.empty((depth, like.shape[0]), dtype=like.dtype)
        self.spare = np.empty((2, like.shape[0]), dtype=like.dtype)
        self.filled = 0
        self.keep, self.evict = keep, evict

    def push(self, value: np.ndarray) -> np.ndarray | None:
        carried, free = value, 0
        for level in self.levels[: self.filled]:
            # the loser at this level moves down; the winner stays
            self.evict(level, carried, out=self.spare[free])
            self.keep(level, carried, out=level)
            carried, free = self.spare[free], 1 - free
        if self.filled < len(self.levels):
            self.levels[self.filled] = carried
            self.filled += 1
            return None
        return carried


def _checked(result: np.ndarray, own: np.ndarray, received: np.ndarray, name: str) -> np.ndarray:
    """Refuse a non-finite aggregate, naming the inputs that caused it."""
    if np.isfinite(result).all():
        return result
    bad = [] if np.isfinite(own).all() else ["own"]
    bad += [f"received[{i}]" for i in np.flatnonzero(~finite_rows(received))]
    raise ValueError(
        f"rule {name!r} produced a non-finite aggregate; non-finite inputs: "
        f"{', '.join(bad) or 'none (values overflow float range)'}: "
        f"drop them before aggregating (gossip.aggregation.finite_rows)"
    )
