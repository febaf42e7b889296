"""Helpers shared by bench/peers.py and bench/scale.py: measuring whole process trees.

A federated run is many processes (murmur: run_cluster.py and one node per hospital; Flower:
SuperLink, SuperExec, the simulation process and Ray's workers), so its memory and CPU are
measured over every process it starts. `TreeSampler` walks /proc in a background thread and
tracks each descendant of the roots it is given, by (pid, start time) so that a reused pid is
never confused with a finished process, and keeps tracking a descendant after it is
re-parented (Ray's workers outlive their parent). At the end it reports, per run:

- peak memory: the sum over processes of each one's peak resident set (VmHWM). This is what
  "peak memory summed over its processes" means in the comparison; it over-counts pages that
  processes share, equally for both frameworks.
- CPU seconds: the sum over processes of user + system time at their last sample. A process's
  final fraction of a sampling interval is missed, so this is a lower bound, within
  interval x processes.

`stop_tree` ends exactly the processes a sampler saw (by pid, checking the start time), so a
benchmark never leaves anything running and never touches a process it did not start.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import re
import signal
import socket
import statistics
import threading
import time
from dataclasses import dataclass
from pathlib import Path

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024

ProcessKey = tuple[int, int]  # (pid, start time in clock ticks since boot)


@dataclass
class ProcessSample:
    ppid: int
    cpu_s: float
    peak_rss_kb: int
    command: str


@dataclass(frozen=True)
class TreeUsage:
    """What a process tree used, over the whole time it was sampled."""

    peak_rss_gb: float  # sum over processes of each one's peak resident set, GiB (2**30 bytes)
    # The largest sum, at one sample, of the processes' proportional set sizes: a page shared
    # by k processes (torch's libraries, copy-on-write pages) counts 1/k in each, so this is
    # what the tree really occupied. Summed RSS counts every shared page once per process.
    peak_pss_gb: float
    cpu_s: float  # sum over processes of user + system time
    processes: int  # processes seen
    largest: tuple[tuple[str, float], ...]  # (command, peak GB) of the biggest processes


def read_process(pid: int) -> tuple[ProcessKey, ProcessSample] | None:
    """One process's parent, CPU time and peak RSS from /proc; None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            stat = fh.read().decode(errors="replace")
        with open(f"/proc/{pid}/status", "rb") as fh:
            status = fh.read().decode(errors="replace")
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # The command name is in parentheses and may itself contain spaces or parentheses.
    command = stat[stat.index("(") + 1 : stat.rindex(")")]
    fields = stat[stat.rindex(")") + 2 :].split()
    ppid, utime, stime, start = int(fields[1]), int(fields[11]), int(fields[12]), int(fields[19])
    match = re.search(r"^VmHWM:\s+(\d+) kB", status, re.MULTILINE)
    peak_kb = int(match.group(1)) if match else 0
    return (pid, start), ProcessSample(ppid, (utime + stime) / CLOCK_TICKS, peak_kb, command)


def read_pss_kb(pid: int) -> int:
    """A process's proportional set size (kB) from /proc/PID/smaps_rollup; 0 if unreadable."""
    try:
        with open(f"/proc/{pid}/smaps_rollup", "rb") as fh:
            rollup = fh.read().decode(errors="replace")
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return 0
    match = re.search(r"^Pss:\s+(\d+) kB", rollup, re.MULTILINE)
    return int(match.group(1)) if match else 0


def _all_pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


class TreeSampler:
    """Samples every descendant of some root processes until `stop()`."""

    def __init__(self, interval_s: float = 0.1) -> None:
        self.interval_s = interval_s
        self.samples: dict[ProcessKey, ProcessSample] = {}
        self.peak_pss_kb = 0
        self._roots: set[int] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="tree-sampler", daemon=True)

    def add_root(self, pid: int) -> None:
        with self._lock:
            self._roots.add(pid)
        self.sample_once()

    def start(self) -> TreeSampler:
        self._thread.start()
        return self

    def sample_once(self) -> None:
        current: dict[int, tuple[ProcessKey, ProcessSample]] = {}
        for pid in _all_pids():
            read = read_process(pid)
            if read is not None:
                current[pid] = read
        with self._lock:
            # Roots, and processes already tracked (same pid AND start time: pids get reused).
            tracked = {pid for pid in self._roots if pid in current}
            tracked |= {
                pid for pid, start in self.samples if current.get(pid, (None,))[0] == (pid, start)
            }
            # A process belongs to the tree if its parent does: repeat until nothing is added.
            added = True
            while added:
                added = False
                for pid, (_, sample) in current.items():
                    if pid not in tracked and sample.ppid in tracked:
                        tracked.add(pid)
                        added = True
            for pid in tracked:
                key, sample = current[pid]
                previous = self.samples.get(key)
                if previous is not None:
                    sample.peak_rss_kb = max(sample.peak_rss_kb, previous.peak_rss_kb)
                    sample.cpu_s = max(sample.cpu_s, previous.cpu_s)
                self.samples[key] = sample
            pss_kb = sum(read_pss_kb(pid) for pid in tracked)
            self.peak_pss_kb = max(self.peak_pss_kb, pss_kb)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample_once()

    def stop(self) -> TreeUsage:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        self.sample_once()
        return self.usage()

    def usage(self) -> TreeUsage:
        with self._lock:
            samples = list(self.samples.values())
        by_size = sorted(samples, key=lambda s: s.peak_rss_kb, reverse=True)
        return TreeUsage(
            peak_rss_gb=sum(s.peak_rss_kb for s in samples) / 1024**2,
            peak_pss_gb=self.peak_pss_kb / 1024**2,
            cpu_s=sum(s.cpu_s for s in samples),
            processes=len(samples),
            largest=tuple((s.command, s.peak_rss_kb / 1024**2) for s in by_size[:3]),
        )

    def alive(self) -> list[int]:
        """Pids of tracked processes that still run (same pid and same start time)."""
        with self._lock:
            keys = list(self.samples)
        alive = []
        for pid, start in keys:
            read = read_process(pid)
            if read is not None and read[0] == (pid, start):
                alive.append(pid)
        return alive


def stop_tree(sampler: TreeSampler, grace_s: float = 5.0) -> list[int]:
    """SIGTERM every process the sampler saw that still runs, then SIGKILL what is left.

    Returns the pids that had to be killed. Zombies (exited, not yet reaped by their parent)
    count as gone."""
    sampler.sample_once()

    def running() -> list[int]:
        pids = []
        for pid in sampler.alive():
            with contextlib.suppress(OSError):
                with open(f"/proc/{pid}/stat", "rb") as fh:
                    state = fh.read().decode(errors="replace").rsplit(")", 1)[1].split()[0]
                if state != "Z":
                    pids.append(pid)
        return pids

    pids = running()
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGTERM)
    end = time.monotonic() + grace_s
    while running() and time.monotonic() < end:
        time.sleep(0.1)
    killed = running()
    for pid in killed:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    return killed


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout_s: float) -> bool:
    """Whether something accepts TCP connections on 127.0.0.1:port within the timeout."""
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return True
        time.sleep(0.1)
    return False


ROUND_DONE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) \S+ INFO round (\d+) done")


def murmur_round_ends(log_dir: Path) -> dict[int, float]:
    """Wall-clock time (epoch seconds) at which the LAST node finished each round.

    Read from the nodes' "round R done" log lines (logging's local-time asctime, ms)."""
    ends: dict[int, float] = {}
    for log_file in sorted(log_dir.glob("*.log")):
        for line in log_file.read_text(errors="replace").splitlines():
            match = ROUND_DONE.match(line)
            if match:
                when = dt.datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
                r = int(match.group(2))
                ends[r] = max(ends.get(r, 0.0), when)
    return ends


def steady_round_s(round_ends: dict[int, float]) -> float | None:
    """Median of the intervals between consecutive round ends, rounds 2..R."""
    rounds = sorted(round_ends)
    gaps = [round_ends[r] - round_ends[r - 1] for r in rounds if r - 1 in round_ends]
    return statistics.median(gaps) if gaps else None


def fmt(value: float | None, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


@dataclass
class ClusterRun:
    """One measured `run_cluster.py` run: its report, round ends and resource use."""

    started: float  # epoch seconds just before run_cluster.py was launched
    wall_s: float
    returncode: int | None  # None: killed at the timeout
    usage: TreeUsage
    report: dict | None  # report.json, if run_cluster wrote one
    round_ends: dict[int, float]
    statuses: list[dict]  # every node's final status.json
    output_tail: str

    @property
    def first_round_s(self) -> float | None:
        return self.round_ends[1] - self.started if 1 in self.round_ends else None

    @property
    def steady_s(self) -> float | None:
        return steady_round_s(self.round_ends)

    def message_bytes(self) -> float | None:
        """Mean bytes of one envelope: each node's bytes sent / (rounds x neighbours)."""
        sizes = []
        for status in self.statuses:
            messages = len(status.get("history", [])) * len(status.get("peers", {}))
            if messages:
                sizes.append(status["bytes_sent"] / messages)
        return statistics.mean(sizes) if sizes else None

    def missed_messages(self) -> int:
        """Neighbour models that missed a round's deadline, summed over nodes and rounds."""
        return sum(len(h.get("missing", [])) for s in self.statuses for h in s.get("history", []))


def run_cluster_measured(
    repo: Path, cluster_args: list[str], out: Path, timeout_s: float
) -> ClusterRun:
    """Run `run_cluster.py ARGS --quiet --out OUT`, sampling every process it starts."""
    import subprocess
    import sys

    command = [sys.executable, str(repo / "run_cluster.py"), *cluster_args, "--quiet"]
    command += ["--out", str(out)]
    sampler = TreeSampler().start()
    started = time.time()
    process = subprocess.Popen(
        command, cwd=repo, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    sampler.add_root(process.pid)
    returncode: int | None = None
    output = ""
    try:
        output, _ = process.communicate(timeout=timeout_s)
        returncode = process.returncode
    except subprocess.TimeoutExpired:
        pass
    finally:
        stop_tree(sampler)
        process.wait()
    wall_s = time.time() - started
    usage = sampler.stop()
    report_file = out / "report.json"
    report = json.loads(report_file.read_text()) if report_file.exists() else None
    statuses = [
        json.loads(path.read_text()) for path in sorted((out / "nodes").glob("*/status.json"))
    ]
    return ClusterRun(
        started=started,
        wall_s=wall_s,
        returncode=returncode,
        usage=usage,
        report=report,
        round_ends=murmur_round_ends(out / "logs") if (out / "logs").is_dir() else {},
        statuses=statuses,
        output_tail=output[-1500:],
    )
