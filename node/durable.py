"""Durable files in the state directory, and one process per state directory.

Why: the privacy guarantees rest on a few small files surviving any crash. `privacy_intent.json`
(steps a round may spend, written before training), `signed_round.json` (the round about to be
signed) and the checkpoint are each replaced the only way POSIX makes atomic and durable:
write a temporary file in the same directory, fsync it, rename it over the old one, and fsync
the directory so that the rename itself survives a power cut. Without the last fsync a power
cut can bring back the old file after the node already acted on the new one. `atomic_write`
is the one implementation all of them use.

Two `murmur node` processes on one state directory would interleave audit records, overwrite
each other's checkpoints and both spend the budget, so a node holds `StateLock` (an exclusive
`flock` on `node.lock`, with its PID inside) for its whole life; the kernel drops it when the
process dies, however it dies, so a stale lock file never blocks a restart.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
from pathlib import Path

LOCK_FILE = "node.lock"


def fsync_directory(directory: Path | str) -> None:
    """Make renames and creations in `directory` durable (POSIX); a no-op where a directory
    cannot be opened for reading (some platforms)."""
    try:
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(
    path: Path | str, data: bytes, *, temp_prefix: str | None = None, durable: bool = True
) -> None:
    """Replace `path` with `data` atomically and durably: temporary file in the same
    directory, write, fsync, rename over `path`, fsync the directory.

    A crash at any moment leaves either the old or the new file, never half of one; a
    temporary file left by a crash starts with `temp_prefix` (default `.NAME.`) and ends in
    `.tmp`, so the caller can clear it. `durable=False` skips both fsyncs: still atomic, but
    a power cut may bring back the old file (for views rebuilt from durable state anyway).
    """
    path = Path(path)
    prefix = temp_prefix if temp_prefix is not None else f".{path.name}."
    fd, tmp_name = tempfile.mkstemp(prefix=prefix, suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            if durable:
                os.fsync(fh.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp_name)
        raise
    if durable:
        fsync_directory(path.parent)


class StateLockError(RuntimeError):
    """Another live process holds this state directory; the message names its PID."""


class StateLock:
    """An exclusive lock on a state directory for as long as this object holds it open.

    `acquire()` takes a non-blocking `flock` on `STATE_DIR/node.lock` and writes this
    process's PID into it; a second acquisition (another process, or another open in this
    one) raises `StateLockError` naming the holder's PID. `release()` (or leaving the `with`
    block) unlocks; so does the process ending in any way.
    """

    def __init__(self, state_dir: Path | str) -> None:
        self.path = Path(state_dir) / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> StateLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_pid(fd)
            os.close(fd)
            raise StateLockError(
                f"state directory {self.path.parent} is in use by another murmur node "
                f"(PID {holder}, lock file {self.path}); two processes on one state directory "
                "would corrupt its audit log and spend its privacy budget twice. Stop that "
                "process first, or give this node its own node.state_dir"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        """Unlock (the file stays: removing it would race with a process about to lock it)."""
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> StateLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _read_pid(fd: int) -> str:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return "unknown"
    return text if text.isdigit() else "unknown"
