"""What the audit log costs: appends per second, and its share of a round at 1M parameters.

A round of a node with 8 neighbours writes 1 update_sent (8 recipients), 8 message_received,
1 aggregation (8 models used), 1 evaluation, 1 privacy and 1 checkpoint record, then seals the
round with sign_head. Its communication work is building one envelope for 8 recipients and
opening 8 envelopes (gossip.wire: serialize, hash, encrypt, sign / verify, decrypt, parse).
Both are timed, interleaved, in the same run, and the headline is the median of their ratios
(target: the audit log under 2% of the round). Network transfer time is left out of the
round, which makes the fraction an upper bound. The fsync that makes a sealed round survive a
power cut runs in a background thread; its latency is reported separately.

Run: python bench/audit.py [--appends N] [--repeats N] [--params N]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sqlite3
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from murmur.crypto.allowlist import Allowlist, Peer
from murmur.crypto.identity import Identity, generate_identity
from murmur.gossip.wire import EnvelopeOpener, ModelUpdate, ReplayGuard, build_envelope
from murmur.models.params import model_spec, state_sha256
from murmur.node.audit import AUDIT_FILE, AuditLog, verify
from murmur.node.checkpoint import NodeCheckpoint, save_checkpoint

NEIGHBOURS = 8
TARGET_FRACTION = 0.02


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bare_insert_rate(directory: Path, n: int, synchronous: str) -> float:
    """Plain SQLite inserts of the same size in WAL mode, no hashing or signing."""
    conn = sqlite3.connect(directory / f"bare-{synchronous}.sqlite", isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute(f"PRAGMA synchronous={synchronous}")
    conn.execute("CREATE TABLE r (seq INTEGER PRIMARY KEY, fields TEXT, h BLOB, s BLOB)")
    row = ('{"accepted":false,"reason":"late","sender":"hospital_b"}', b"h" * 32, b"s" * 64)
    start = time.perf_counter()
    for _ in range(n):
        conn.execute("INSERT INTO r (fields, h, s) VALUES (?, ?, ?)", row)
    elapsed = time.perf_counter() - start
    conn.close()
    return n / elapsed


def append_rate(log: AuditLog, n: int) -> float:
    start = time.perf_counter()
    for i in range(n):
        log.append("message_received", i, sender="hospital_b", accepted=False, reason="late")
    return n / (time.perf_counter() - start)


def sign_head_seconds(log: AuditLog, repeats: int) -> tuple[float, float]:
    """(time sign_head keeps the caller, time until the sealed round is fsync'd)."""
    calls, durable = [], []
    for _ in range(repeats):
        log.append("node_stop", None, reason="bench")
        start = time.perf_counter()
        log.sign_head()
        calls.append(time.perf_counter() - start)
        log.wait_durable(timeout=60)
        durable.append(time.perf_counter() - start)
    return statistics.median(calls), statistics.median(durable)


def log_one_round(log: AuditLog, r: int, peers: list[str]) -> None:
    """Exactly the records node/node.py writes in one round with len(peers) neighbours."""
    own = sha(f"own{r}")
    log.append(
        "update_sent", r, recipients=peers, delivered=peers, failed={}, bytes=4_000_000,
        model_sha256=own, epsilon_spent=0.1 * r,
    )  # fmt: skip
    used = []
    for p in peers:
        model = sha(f"{p}{r}")
        log.append(
            "message_received", r, sender=p, accepted=True, reason="accepted",
            body_sha256=sha(f"body{p}{r}"), model_sha256=model,
        )  # fmt: skip
        used.append({"peer": p, "model_sha256": model})
    log.append(
        "aggregation", r, rule="trimmed_mean", f=1, used=used, excluded=[],
        own_model_sha256=own, result_sha256=sha(f"agg{r}"),
    )  # fmt: skip
    log.append(
        "evaluation", r,
        metrics={"auc": 0.81, "sensitivity": 0.7, "specificity": 0.9, "threshold": 0.4},
    )  # fmt: skip
    log.append(
        "privacy", r, enabled=True, epsilon_spent=0.1 * r, steps=40 * r, noise_multiplier=1.1,
        sample_rate=0.01, delta=1e-5,
    )  # fmt: skip
    log.append("checkpoint", r, checkpoint_sha256=sha(f"ckpt{r}"))
    log.sign_head()


class Gossip:
    """One node and its 8 neighbours, with the real envelope code."""

    def __init__(self, params: int) -> None:
        rng = np.random.default_rng(0)
        rows = params // 1000
        self.state = {
            "w": rng.standard_normal((rows, 1000)).astype(np.float32),
            "b": rng.standard_normal(params - rows * 1000).astype(np.float32),
        }
        self.me = generate_identity("hospital_a")
        self.peers: list[Identity] = [generate_identity(f"peer_{i}") for i in range(NEIGHBOURS)]
        self.allowlist = Allowlist(
            Peer(p.name, f"http://127.0.0.1:{9000 + i}", p.public_key)
            for i, p in enumerate(self.peers)
        )
        self.update = ModelUpdate(self.state, metrics={"loss": 0.5})
        self.incoming = [
            build_envelope(self.update, p, [self.me.public_key], round=1) for p in self.peers
        ]

    def send(self) -> bytes:
        return build_envelope(self.update, self.me, [p.public_key for p in self.peers], round=1)

    def receive(self) -> None:
        opener = EnvelopeOpener(
            self.me, self.allowlist, model_spec(self.state), replay=ReplayGuard()
        )
        for data in self.incoming:
            opener.open(data)

    def round_comm(self) -> None:
        self.send()
        self.receive()

    def model_hashes(self) -> None:
        """The state_sha256 calls node.py makes per round for its records (own, 8 peers, result)."""
        for _ in range(NEIGHBOURS + 2):
            state_sha256(self.state)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--appends", type=int, default=5000)
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--params", type=int, default=1_000_000)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="murmur-bench-audit-") as tmp:
        directory = Path(tmp)
        identity = generate_identity("hospital_a")
        peers = [f"peer_{i}" for i in range(NEIGHBOURS)]

        bare = bare_insert_rate(directory, args.appends, "NORMAL")
        bare_fsync = bare_insert_rate(directory, max(200, args.appends // 10), "FULL")
        log = AuditLog(directory / AUDIT_FILE, identity)
        appends = append_rate(log, args.appends)
        sign_head_s, durable_s = sign_head_seconds(log, args.repeats)

        gossip = Gossip(args.params)
        gossip.round_comm()  # warm up
        comm_times, audit_times, fractions = [], [], []
        rounds = iter(range(1, 10**6))
        for _ in range(args.repeats):  # interleaved, so machine noise hits both sides alike
            comm = median_seconds(gossip.round_comm, 1)
            audit = median_seconds(lambda: log_one_round(log, next(rounds), peers), 9)
            comm_times.append(comm)
            audit_times.append(audit)
            fractions.append(audit / comm)
        comm_s, audit_round_s = statistics.median(comm_times), statistics.median(audit_times)
        fraction = statistics.median(fractions)
        log.close()

        records = verify(directory).records
        start = time.perf_counter()
        verify(directory, identity.public_key)
        verify_rate = records / (time.perf_counter() - start)

        hashing_s = median_seconds(gossip.model_hashes, args.repeats)
        ckpt = NodeCheckpoint(1, gossip.state, b"\0" * 1024, {"steps": 40}, {}, sha("config"))
        ckpt_s = median_seconds(lambda: save_checkpoint(directory, ckpt), args.repeats)

    fraction_with_hashing = (audit_round_s + hashing_s) / comm_s
    rows = [
        ("bare SQLite insert, WAL NORMAL (baseline)", 1e6 / bare, 1.0),
        ("audit append: hash + Ed25519 sign + WAL NORMAL", 1e6 / appends, bare / appends),
        ("bare SQLite insert, WAL FULL (fsync per record)", 1e6 / bare_fsync, bare / bare_fsync),
        ("sign_head, per round (what the round loop waits)", sign_head_s * 1e6, sign_head_s * bare),
        ("... until the round is fsync'd (background thread)", durable_s * 1e6, durable_s * bare),
    ]
    print(f"audit log micro-benchmarks ({args.appends} appends, median of {args.repeats})")
    print(f"{'operation':<50} {'µs each':>10} {'x baseline':>11}")
    for name, micros, ratio in rows:
        print(f"{name:<50} {micros:>10.1f} {ratio:>11.2f}")
    print(f"verify: {verify_rate:,.0f} records/s (hash + signature check per record)")
    print()
    print(f"one round at {args.params:,} parameters and {NEIGHBOURS} neighbours")
    print(f"{'part of the round':<50} {'ms':>10} {'of comm':>11}")
    round_rows = [
        ("communication: build 1 envelope + open 8 (baseline)", comm_s, 1.0),
        ("audit log: 13 records + sign_head", audit_round_s, fraction),
        ("model SHA-256s node.py computes for its records", hashing_s, hashing_s / comm_s),
        ("checkpoint save (atomic, fsync), for reference", ckpt_s, ckpt_s / comm_s),
    ]
    for name, seconds, share in round_rows:
        print(f"{name:<50} {seconds * 1e3:>10.2f} {share:>10.2%}")
    verdict = "meets" if fraction < TARGET_FRACTION else "MISSES"
    print(f"audit log = {fraction:.3%} of the round's communication: {verdict} the 2% target")
    print(
        json.dumps(
            {
                "appends_per_s": round(appends),
                "audit_fraction_of_round": round(fraction, 5),
                "audit_round_ms": round(audit_round_s * 1e3, 3),
                "round_comm_ms": round(comm_s * 1e3, 2),
                "append_vs_bare_insert": round(bare / appends, 2),
                "fsync_per_record_inserts_per_s": round(bare_fsync),
                "round_durable_after_ms": round(durable_s * 1e3, 3),
                "fraction_with_model_hashing": round(fraction_with_hashing, 5),
                "checkpoint_fraction_of_round": round(ckpt_s / comm_s, 4),
                "verify_records_per_s": round(verify_rate),
                "target_fraction": TARGET_FRACTION,
                "meets_target": fraction < TARGET_FRACTION,
            }
        )
    )


if __name__ == "__main__":
    main()
