"""The aggregation rules over models read a column block at a time (`ModelRows`).

Why: the rules of gossip/aggregation.py take the neighbours' models as one ``(k, d)``
matrix. Building it copies every model once more, and for a 25M-parameter model and 8
neighbours that matrix alone is 8 models of memory, on top of the k the round inbox already
holds (or has spooled to disk, gossip/spool.py). Here the matrix is never built: every pass
reads columns ``start:stop`` of the k models into one ``(k, block)`` buffer and gives it to
the same rule code, so a pass costs the buffer, not k models.

The results are those of the rules on the whole matrix: coordinate-wise rules (mean,
median, trimmed mean) are computed block by block; rules that look at whole models first
gather what they need over the blocks (distances to own for clipping, the pairwise
distances for Krum, the distances to the estimate in each Weiszfeld step), then combine the
models block by block with the coefficients that gives (tests/test_blocks.py compares every
rule with gossip/aggregation.py's).
"""

from __future__ import annotations

import bisect
import inspect
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from murmur.gossip import aggregation as agg

# Columns per block: 2^18 float32 entries (1 MiB) per model, 8 MiB for 8 neighbours; the
# rules split each block further into cache-sized pieces of their own.
BLOCK_COLUMNS = 1 << 18

_GEOMETRIC_MEDIAN_DEFAULTS = {
    p.name: p.default
    for p in inspect.signature(agg.geometric_median).parameters.values()
    if p.default is not inspect.Parameter.empty
}

# (start, stop, out): write flat entries start:stop of one model into out.
Reader = Callable[[int, int, np.ndarray], None]


def flat_reader(model: Mapping[str, np.ndarray] | np.ndarray) -> tuple[Reader, int]:
    """A reader of ``model``'s flat float32 vector (``models.params.flatten`` order) without
    flattening it, and its length. A spooled model reads from its file; a model in memory
    copies from its tensors."""
    if isinstance(model, np.ndarray):
        flat = model.reshape(-1)

        def read_vector(start: int, stop: int, out: np.ndarray) -> None:
            out[:] = flat[start:stop]

        return read_vector, flat.size
    read_flat = getattr(model, "read_flat", None)
    if read_flat is not None:
        return (lambda start, stop, out: read_flat(start, stop, out)), model.size
    arrays = [np.asarray(a).reshape(-1) for a in model.values()]
    ends = np.cumsum([a.size for a in arrays]).tolist()

    def read_tensors(start: int, stop: int, out: np.ndarray) -> None:
        i = bisect.bisect_right(ends, start)
        done = 0
        while done < stop - start:
            first = ends[i] - arrays[i].size
            lo, hi = start + done - first, min(arrays[i].size, stop - first)
            out[done : done + hi - lo] = arrays[i][lo:hi]
            done += hi - lo
            i += 1

    return read_tensors, (ends[-1] if ends else 0)


class ModelRows:
    """k models of d entries each, as the rows of a ``(k, d)`` matrix read block by block."""

    def __init__(
        self,
        models: Sequence[Mapping[str, np.ndarray] | np.ndarray],
        d: int,
        block: int = BLOCK_COLUMNS,
    ) -> None:
        readers = [flat_reader(m) for m in models]
        for i, (_, size) in enumerate(readers):
            if size != d:
                raise ValueError(f"model {i} has {size} entries, not the {d} of own")
        self._readers = [r for r, _ in readers]
        self.k, self.d, self.block = len(models), d, max(1, int(block))

    @classmethod
    def _of_readers(cls, readers: Sequence[Reader], d: int, block: int) -> ModelRows:
        rows = cls([], d, block)
        rows._readers, rows.k = list(readers), len(readers)
        return rows

    def subset(self, indices: Sequence[int]) -> ModelRows:
        return ModelRows._of_readers([self._readers[i] for i in indices], self.d, self.block)

    def pulled_in(self, centre: np.ndarray, scales: np.ndarray) -> ModelRows:
        """These rows with row i read as ``centre + (row - centre) * scales[i]`` wherever
        ``scales[i] != 1`` (0: the centre itself), without writing any model out."""
        readers = list(self._readers)
        for i in np.flatnonzero(np.asarray(scales) != 1.0):
            readers[i] = _pulled_reader(readers[i], centre, float(scales[i]))
        return ModelRows._of_readers(readers, self.d, self.block)

    def blocks(self) -> Iterator[tuple[slice, np.ndarray]]:
        """(columns, the k models' entries in them); the array is reused by the next block."""
        buffer = np.empty((self.k, min(self.block, self.d)), dtype=np.float32)
        for start in range(0, self.d, self.block):
            stop = min(start + self.block, self.d)
            rows = buffer[:, : stop - start]
            for reader, row in zip(self._readers, rows, strict=True):
                reader(start, stop, row)
            yield slice(start, stop), rows

    def row(self, i: int) -> np.ndarray:
        out = np.empty(self.d, dtype=np.float32)
        self._readers[i](0, self.d, out)
        return out

    def finite(self) -> np.ndarray:
        """``(k,)``: which models are entirely finite (``aggregation.finite_rows``)."""
        ok = np.ones(self.k, dtype=bool)
        for _, rows in self.blocks():
            ok &= agg.finite_rows(rows)
        return ok


def _pulled_reader(reader: Reader, centre: np.ndarray, scale: float) -> Reader:
    def read_pulled(start: int, stop: int, out: np.ndarray) -> None:
        c = centre[start:stop]
        if scale == 0.0:
            out[:] = c
            return
        reader(start, stop, out)
        out[:] = c + (out - c) * scale

    return read_pulled


def squared_distances(vector: np.ndarray, rows: ModelRows) -> np.ndarray:
    """``(k,)`` squared Euclidean distances from ``vector`` (d,) to each model, float64."""
    squared = np.zeros(rows.k, dtype=np.float64)
    if rows.k:
        for cols, block in rows.blocks():
            squared += agg.squared_distances_to(vector[cols], block)
    return squared


def distances(vector: np.ndarray, rows: ModelRows) -> np.ndarray:
    """``aggregation.distances_to(vector, rows)``, block by block."""
    return np.sqrt(squared_distances(vector, rows))


def pairwise_squared(own: np.ndarray, rows: ModelRows) -> np.ndarray:
    """``(n, n)`` squared distances between ``[own, *rows]``, summed over the blocks."""
    total = np.zeros((rows.k + 1, rows.k + 1), dtype=np.float64)
    for cols, block in rows.blocks():
        total += agg.pairwise_squared_distances(own[cols], block)
    return total


def krum_select(own: np.ndarray, rows: ModelRows, f: int, m: int = 1) -> np.ndarray:
    """``aggregation.krum_select`` on models read block by block."""
    return agg.select_lowest(agg.krum_scores_from(pairwise_squared(own, rows), f), m)


def weighted_sum(own: np.ndarray, rows: ModelRows, coefficients: np.ndarray) -> np.ndarray:
    """``coefficients[0] * own + coefficients[1:] @ rows`` in float32, block by block."""
    out = np.empty(own.shape[0], dtype=own.dtype)
    if rows.k == 0:
        np.multiply(own, np.asarray(coefficients, own.dtype)[0], out=out)
        return out
    for cols, block in rows.blocks():
        out[cols] = agg._weighted_sum(own[cols], block, coefficients)
    return out


def aggregate(
    rule: str, own: np.ndarray, rows: ModelRows, weights: np.ndarray, f: int, **params: object
) -> np.ndarray:
    """``AGGREGATORS[rule](own, received, weights, f, **params)`` with ``received`` the rows."""
    if rule not in agg.AGGREGATORS:
        agg.min_inputs(rule, f)  # names the known rules
    own = np.asarray(own, dtype=np.float32)
    if own.ndim != 1 or own.shape[0] != rows.d:
        raise ValueError(f"own must be a flat vector of {rows.d} entries, got {own.shape}")
    # The rules' own checks of shapes, the bound and the weights, on a stand-in matrix of
    # the right shape that takes no memory (every entry is one broadcast zero).
    stand_in = np.broadcast_to(np.float32(0), (rows.k, rows.d))
    _, _, weights = agg._validate(rule, own, stand_in, weights, f, rule in ("mean", "clipping"))
    if rule in ("median", "trimmed_mean"):
        result = np.empty_like(own)
        for cols, block in rows.blocks():
            result[cols] = agg.AGGREGATORS[rule](own[cols], block, weights, f, **params)
        return result
    if rule == "mean":
        result = weighted_sum(own, rows, weights)
    elif rule == "clipping":
        if rows.k == 0:
            return own.copy()
        result = weighted_sum(
            own, rows, agg.clipping_coefficients(distances(own, rows), weights, f, **params)
        )
    elif rule == "krum":
        chosen = int(krum_select(own, rows, f)[0])
        result = own.copy() if chosen == 0 else rows.row(chosen - 1)
    elif rule == "multi_krum":
        m = params.get("m")
        chosen = krum_select(own, rows, f, rows.k + 1 - f if m is None else m)  # type: ignore[arg-type]
        selection = np.zeros(rows.k + 1)
        selection[chosen] = 1.0 / len(chosen)
        result = weighted_sum(own, rows, selection)
    else:  # geometric_median
        result = agg.weiszfeld(
            rows.k + 1,
            lambda coefficients: weighted_sum(own, rows, coefficients),
            lambda estimate: np.concatenate(
                [agg.distances_to(estimate, own[None, :]), distances(estimate, rows)]
            ),
            **{**_GEOMETRIC_MEDIAN_DEFAULTS, **params},  # type: ignore[arg-type]
        )
    return checked(result, own, rows, rule)


def checked(result: np.ndarray, own: np.ndarray, rows: ModelRows, name: str) -> np.ndarray:
    """``aggregation._checked``: refuse a non-finite aggregate, naming the inputs behind it."""
    if np.isfinite(result).all():
        return result
    bad = [] if np.isfinite(own).all() else ["own"]
    bad += [f"received[{i}]" for i in np.flatnonzero(~rows.finite())]
    raise ValueError(
        f"rule {name!r} produced a non-finite aggregate; non-finite inputs: "
        f"{', '.join(bad) or 'none (values overflow float range)'}: "
        f"drop them before aggregating (gossip.aggregation.finite_rows)"
    )


# --------------------------------------------------------------------------- screening


@dataclass(frozen=True)
class Screening:
    """``aggregation.screen_inputs``'s result with the rows read block by block."""

    rows: ModelRows  # the received models, the far ones pulled in
    f: int
    centre: np.ndarray
    radius: float
    distances: np.ndarray
    pulled: np.ndarray
    muted: np.ndarray
    twins: np.ndarray


def screen_inputs(
    own: np.ndarray,
    rows: ModelRows,
    f: int,
    *,
    spread: float = 1.5,
    floor: float = 0.0,
    own_limit: float | np.ndarray = math.inf,
    twin_distance: float | np.ndarray = 0.0,
) -> Screening:
    """``aggregation.screen_inputs`` (which see: the rule keeps its f; far models pulled in
    to the screening radius around the coordinate-wise median, muted when also far from our
    own; DP twins muted) on models read block by block: the centre is computed a block at a
    time (a coordinate-wise median is), the distances are summed over the blocks, and the
    pulled-in rows are read through ``ModelRows.pulled_in``, never written out."""
    own = np.asarray(own, dtype=np.float32)
    k = rows.k
    if k == 0:
        none = np.zeros(0, dtype=bool)
        empty = np.zeros(0, dtype=np.float64)
        return Screening(rows, int(f), own.copy(), math.inf, empty, none, none, none)
    centre = np.empty_like(own)
    for cols, block in rows.blocks():
        centre[cols] = agg.coordinate_median(own[cols], block)
    with np.errstate(over="ignore", invalid="ignore"):
        far = np.nan_to_num(distances(centre, rows), nan=np.inf, posinf=np.inf)
        own_far = np.nan_to_num(agg.distances_to(centre, own[None, :]), nan=np.inf, posinf=np.inf)
        to_own = np.nan_to_num(distances(own, rows), nan=np.inf, posinf=np.inf)
    radius = agg.screening_radius(np.concatenate([own_far, far]), f, spread=spread, floor=floor)
    pulled = far > radius
    scales = np.ones(k, dtype=np.float64)
    for i in np.flatnonzero(pulled):
        scales[i] = radius / far[i] if np.isfinite(far[i]) else 0.0
    close = np.zeros(k, dtype=bool)
    if np.any(np.asarray(twin_distance) > 0):
        with np.errstate(over="ignore", invalid="ignore"):
            squared = np.nan_to_num(pairwise_squared(own, rows), nan=np.inf)
        close = agg.twins_from(squared, twin_distance)
    muted = (pulled & (to_own > own_limit)) | close
    return Screening(
        rows.pulled_in(centre, scales), int(f), centre, radius, far, pulled, muted, close
    )
