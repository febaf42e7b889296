"""Neighbour models kept on disk while a round waits for them (`SpooledModel`).

Why: a node that aggregates k neighbours' models holds k models between their arrival and
the round's aggregation, and for an imaging-size model (resnet18_25m: 96 MiB in float32,
8 neighbours) that, not the wire, is what sets the node's memory. An opened model is
written once, in its flat float32 order, to an unlinked temporary file; the round inbox,
the compressed-delta bases and the aggregation then read it back a tensor or a column block
at a time (gossip/blocks.py), so a node's peak memory is its own model, the aggregate and a
few blocks, whatever k is.

The file is created with ``tempfile.TemporaryFile`` in the node's spool folder
(``<state_dir>/spool``, mode 0700): it has no name from the start (it is unlinked when
created), nothing else can open it, and the disk space is returned when the last handle to
the model is dropped, a crash included. What it holds is what the envelope carried,
decrypted: a neighbour's DP-protected model (docs/privacy.md, "Every value that leaves the
node"). Reads are positional (``os.preadv``), so worker threads may read one model at once.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import numpy as np

# A node spools neighbour models of this size or more (8M parameters in float32): below it,
# k models in memory cost less than the file reads of the aggregation's passes.
SPOOL_MIN_BYTES = 32 * 2**20

_DTYPE = np.dtype("<f4")
_ITEM = _DTYPE.itemsize


class SpooledModel(Mapping[str, np.ndarray]):
    """A read-only model (name -> float32 array, in order) whose values live in a file.

    ``model[name]`` reads one tensor (a fresh, read-only array); ``read_flat(start, stop)``
    reads entries ``start:stop`` of the flat vector ``models.params.flatten`` would give.
    """

    def __init__(self, tensors: Iterable[tuple[str, np.ndarray]], folder: Path) -> None:
        self._file = tempfile.TemporaryFile(dir=folder, buffering=0)  # noqa: SIM115 (kept open)
        self._layout: dict[str, tuple[tuple[int, ...], int]] = {}
        offset = 0
        try:
            for name, array in tensors:
                data = np.ascontiguousarray(array, dtype=_DTYPE)
                self._layout[name] = (data.shape, offset)
                _write_all(self._file.fileno(), memoryview(data).cast("B"), offset * _ITEM)
                offset += data.size
        except BaseException:
            self._file.close()
            raise
        self.size = offset  # entries in the flat vector

    @classmethod
    def of(cls, tensors: Mapping[str, np.ndarray], folder: Path) -> SpooledModel:
        """Spool a model held in memory."""
        return cls(tensors.items(), folder)

    @classmethod
    def reserve(cls, shapes: Iterable[tuple[str, tuple[int, ...]]], folder: Path) -> SpooledModel:
        """A model of these shapes (in this order) whose bytes are written afterwards with
        ``write_bytes``: a streamed envelope's tensors, spooled as they are decrypted
        (gossip/wire/stream.py), so the model is never whole in memory."""
        model = cls((), folder)
        offset = 0
        for name, shape in shapes:
            model._layout[name] = (tuple(shape), offset)
            offset += math.prod(shape)
        model.size = offset
        os.ftruncate(model._file.fileno(), offset * _ITEM)
        return model

    def shape(self, name: str) -> tuple[int, ...]:
        return self._layout[name][0]

    def byte_offset(self, name: str) -> int:
        """Where tensor ``name``'s float32 bytes start in the file."""
        return self._layout[name][1] * _ITEM

    def write_bytes(self, offset: int, data: memoryview) -> None:
        """Write raw little-endian float32 bytes at byte ``offset`` (``reserve``)."""
        if not 0 <= offset <= offset + len(data) <= self.size * _ITEM:
            raise IndexError(f"bytes {offset}:{offset + len(data)} of a model of {self.size}")
        _write_all(self._file.fileno(), data, offset)

    def __getitem__(self, name: str) -> np.ndarray:
        shape, offset = self._layout[name]
        out = self.read_flat(offset, offset + math.prod(shape)).reshape(shape)
        out.flags.writeable = False
        return out

    def __iter__(self) -> Iterator[str]:
        return iter(self._layout)

    def __len__(self) -> int:
        return len(self._layout)

    def read_flat(self, start: int, stop: int, out: np.ndarray | None = None) -> np.ndarray:
        """Flat entries ``start:stop`` (into ``out``, a float32 array of that length, if given)."""
        if not 0 <= start <= stop <= self.size:
            raise IndexError(f"entries {start}:{stop} of a model of {self.size}")
        if out is None:
            out = np.empty(stop - start, dtype=_DTYPE)
        view = memoryview(out).cast("B")
        done, fd = 0, self._file.fileno()
        while done < len(view):
            n = os.preadv(fd, [view[done:]], start * _ITEM + done)
            if n == 0:
                raise OSError(f"the spooled model ended at entry {start + done // _ITEM}")
            done += n
        return out

    def close(self) -> None:
        """Return the disk space now (it is returned anyway when the model is dropped)."""
        self._file.close()


def node_spool(spec: Mapping[str, tuple[tuple[int, ...], str]], state_dir: Path) -> Path | None:
    """Where a node whose model has ``spec``'s shapes keeps its neighbours' models: its
    spool folder for a model of ``SPOOL_MIN_BYTES`` or more in float32, else None (memory)."""
    size = sum(_ITEM * math.prod(shape) for shape, _ in spec.values())
    return spool_folder(state_dir) if size >= SPOOL_MIN_BYTES else None


def spool_folder(state_dir: Path) -> Path:
    """``<state_dir>/spool``, created 0700 (the node's own state is private to it)."""
    folder = state_dir / "spool"
    folder.mkdir(mode=0o700, exist_ok=True)
    os.chmod(folder, 0o700)
    return folder


def _write_all(fd: int, data: memoryview, offset: int) -> None:
    done = 0
    while done < len(data):
        done += os.pwrite(fd, data[done:], offset + done)
