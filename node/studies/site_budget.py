"""The hospital's lifetime privacy budget per local data set, shared by all its studies.

Why: each study's ledger (models/privacy.py) bounds what *that* study spends, but the same
patients are in every study of the hospital. The site budget bounds what all of them spend
together: `[site_budget.datasets.NAME] max_epsilon, delta` in the node config. A study is
admitted only if the composition of every admitted study's DP-SGD run on that data set, and
its own planned run, stays within max_epsilon at the site's δ; the composition is done by the
accountant (`models.privacy.composed_epsilon`, PLD), never by adding epsilons.

The store is one sqlite3 file (`[site_budget] store`), which several node processes of the
hospital (one per study) share; every admission runs in a `BEGIN IMMEDIATE` transaction, so
two studies starting at once cannot both take the last of the budget. An admitted study
reserves its *planned* steps until it finishes; then only the steps it took count.

Rollback: the store has a random instance id and a generation that grows with every write.
Every write also appends a signed, hash-chained entry to the store's log (node/studies/
budget_log.py), checked in full at every open, so a row changed or an entry removed is
caught (``StoreTampered``). Each node records the store's position in its own audit log
(`site_budget` records), whose signed heads its neighbours hold (node/rollback.py), and
refuses to start when the store is older than what its log saw, or is another store (deleted
and recreated); and its neighbours keep the newest signed head of the log itself
(node/studies/witness.py), which catches a store deleted or put back while no study ran
(:meth:`SiteBudgetStore.check_reaches`). A node also never lets the store say less about
its own study than its rollback-checked ledger does.
"""

from __future__ import annotations

import secrets
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from murmur.crypto.identity import Identity
from murmur.models.privacy import composed_epsilon
from murmur.node.studies.budget_log import (
    ROW_FIELDS,
    BudgetHead,
    LogError,
    genesis_hash,
    make_entry,
    verify_log,
)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS studies (
    dataset TEXT NOT NULL,
    study TEXT NOT NULL,
    name TEXT NOT NULL,
    noise_multiplier REAL NOT NULL,
    sample_rate REAL NOT NULL,
    planned_steps INTEGER NOT NULL,
    steps_taken INTEGER NOT NULL,
    finished INTEGER NOT NULL DEFAULT 0,
    admitted_at REAL NOT NULL,
    public_key TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (dataset, study)
);
CREATE TABLE IF NOT EXISTS log (
    seq INTEGER PRIMARY KEY,
    entry TEXT NOT NULL,
    hash TEXT NOT NULL,
    signature TEXT NOT NULL
);
"""


class BudgetRefused(RuntimeError):
    """A study does not fit in what is left of a data set's lifetime budget."""


class StoreRolledBack(RuntimeError):
    """The store is older than, or another than, the one this node's audit log (or its
    neighbours' record of the hospital's budget log) saw."""


class StoreTampered(StoreRolledBack):
    """The store's rows or its log were changed outside murmur: the log does not verify."""


@dataclass(frozen=True)
class DatasetBudget:
    """One data set's lifetime budget, from the node config."""

    name: str
    max_epsilon: float
    delta: float


@dataclass(frozen=True)
class StudyRun:
    """One study's DP-SGD run on a data set, as the accountant is given it."""

    study: str
    name: str
    noise_multiplier: float
    sample_rate: float
    planned_steps: int
    steps_taken: int = 0
    finished: bool = False
    public_key: str = ""  # the node key that runs it (hex); one running row per (key, study)

    @property
    def counted_steps(self) -> int:
        """What the site budget counts: the plan while running, what was taken once done."""
        return self.steps_taken if self.finished else max(self.planned_steps, self.steps_taken)

    def event(self) -> tuple[float, float, int]:
        return (self.noise_multiplier, self.sample_rate, self.counted_steps)


@dataclass(frozen=True)
class Position:
    """Which store, at which write: what a node's audit log records after each write."""

    instance: str
    generation: int


class SiteBudgetStore:
    """The shared sqlite3 store of every study's run, per data set, and its signed log.

    ``signer``: the node key that signs the log entries of this process's writes (a store
    opened without one can be read, not written). Opening verifies the whole log against the
    rows (``StoreTampered``).
    """

    def __init__(self, path: Path, signer: Identity | None = None) -> None:
        self.path = Path(path)
        self.signer = signer
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._conn = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=FULL")
        self._conn.executescript(_SCHEMA)  # idempotent; executescript commits on its own
        with self._write() as conn:
            if conn.execute("SELECT value FROM meta WHERE key='instance'").fetchone() is None:
                conn.execute("INSERT INTO meta VALUES ('instance', ?)", (secrets.token_hex(16),))
                conn.execute("INSERT INTO meta VALUES ('generation', '0')")
        self.verify()

    def verify(self) -> tuple[int, str]:
        """StoreTampered unless the log verifies, is as long as the generation and replays
        to exactly the rows of ``studies``; returns (newest seq, head hash)."""
        instance = self.position().instance
        entries = self._conn.execute(
            "SELECT seq, entry, hash, signature FROM log ORDER BY seq"
        ).fetchall()
        try:
            seq, head, rows = verify_log(instance, entries)
        except LogError as exc:
            raise StoreTampered(self._tampered(str(exc))) from None
        generation = self.position().generation
        if seq != generation:
            raise StoreTampered(
                self._tampered(f"the log has {seq} entries, the store counts {generation} writes")
            )
        held = {
            (r[0], r[1]): dict(zip(ROW_FIELDS, r, strict=True))
            for r in self._conn.execute(f"SELECT {', '.join(ROW_FIELDS)} FROM studies")
        }
        if held != {key: dict(row) for key, row in rows.items()}:
            raise StoreTampered(
                self._tampered("its studies table differs from what its log wrote into it")
            )
        return seq, head

    def _tampered(self, why: str) -> str:
        return (
            f"the site budget store {self.path} was changed outside murmur: {why}. Its log "
            "of every write does not verify, so what the hospital's studies spent cannot be "
            "trusted. Fix: restore the newest intact copy of the store"
        )

    def head(self, hospital: str, now: float) -> BudgetHead:
        """This store's log head, signed by this process's node key as hospital ``hospital``'s."""
        assert self.signer is not None, "a head is signed by the node key"
        seq, digest = self._head(self._conn)
        instance = self.position().instance
        return BudgetHead.make(
            self.signer, hospital=hospital, instance=instance, seq=seq, hash_=digest, now=now
        )

    def _head(self, conn: sqlite3.Connection) -> tuple[int, str]:
        row = conn.execute("SELECT seq, hash FROM log ORDER BY seq DESC LIMIT 1").fetchone()
        if row is None:
            return 0, genesis_hash(self._instance(conn))
        return int(row[0]), str(row[1])

    def _instance(self, conn: sqlite3.Connection) -> str:
        return str(conn.execute("SELECT value FROM meta WHERE key='instance'").fetchone()[0])

    def check_reaches(self, head: BudgetHead, holder: str) -> None:
        """StoreRolledBack unless this store's log contains ``head``, the newest head of this
        hospital's log that neighbour ``holder`` recorded: the store was deleted, replaced or
        put back to an earlier copy otherwise."""
        instance = self.position().instance
        seq, _ = self._head(self._conn)
        said = (
            f"{holder} holds this hospital's signed budget log head: store {head.instance[:12]}, "
            f"write {head.seq} (hash {head.hash[:16]}..., signed by key {head.public_key[:16]}... "
            f"at {time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(head.issued_at))} UTC)"
        )
        fix = (
            "Fix: put back the newest copy of the site budget store (its log must reach that "
            "write; `murmur study budget STORE` shows a copy's), then start "
            "again. Starting a study on this store would spend privacy budget that the "
            "hospital's earlier studies already spent; there is no way to start the data set's "
            "budget over short of a new data protection decision and a new consortium"
        )
        if head.instance != instance:
            raise StoreRolledBack(
                f"the site budget store {self.path} (store {instance[:12]}, {seq} writes) is "
                f"not the one the hospital's peers recorded: {said}. The store was deleted or "
                f"replaced. {fix}"
            )
        if seq < head.seq:
            raise StoreRolledBack(
                f"the site budget store {self.path} ends at write {seq}: {said}. The store "
                f"was put back to an earlier copy. {fix}"
            )
        row = self._conn.execute("SELECT hash FROM log WHERE seq = ?", (head.seq,)).fetchone()
        have = row[0] if row is not None else genesis_hash(instance)
        if have != head.hash:
            raise StoreRolledBack(
                f"the site budget store {self.path} holds another write {head.seq} (hash "
                f"{have[:16]}...) than the one the hospital's peers recorded: {said}. The "
                f"store's history was rewritten. {fix}"
            )

    def close(self) -> None:
        self._conn.close()

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One transaction holding sqlite's write lock from its first statement."""
        conn = self._conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    def _bump(self, conn: sqlite3.Connection, op: str, dataset: str, study: str) -> None:
        """Count the write and append its signed log entry, in the caller's transaction."""
        if self.signer is None:
            raise ValueError("a write to the site budget store is signed: open it with a key")
        conn.execute(
            "UPDATE meta SET value = CAST(CAST(value AS INTEGER) + 1 AS TEXT) "
            "WHERE key = 'generation'"
        )
        seq, prev = self._head(conn)
        values = conn.execute(
            f"SELECT {', '.join(ROW_FIELDS)} FROM studies WHERE dataset = ? AND study = ?",
            (dataset, study),
        ).fetchone()
        row = dict(zip(ROW_FIELDS, values, strict=True))
        text, digest, signature = make_entry(
            self.signer, instance=self._instance(conn), seq=seq + 1, prev=prev, op=op, row=row
        )
        conn.execute("INSERT INTO log VALUES (?, ?, ?, ?)", (seq + 1, text, digest, signature))

    def position(self) -> Position:
        rows = dict(self._conn.execute("SELECT key, value FROM meta").fetchall())
        return Position(rows["instance"], int(rows["generation"]))

    def datasets(self) -> list[str]:
        rows = self._conn.execute("SELECT DISTINCT dataset FROM studies ORDER BY dataset")
        return [r[0] for r in rows]

    def runs(self, dataset: str, conn: sqlite3.Connection | None = None) -> list[StudyRun]:
        rows = (conn or self._conn).execute(
            "SELECT study, name, noise_multiplier, sample_rate, planned_steps, steps_taken, "
            "finished, public_key FROM studies WHERE dataset = ? ORDER BY admitted_at, study",
            (dataset,),
        )
        return [StudyRun(r[0], r[1], r[2], r[3], r[4], r[5], bool(r[6]), r[7]) for r in rows]

    def spent(self, budget: DatasetBudget, runs: list[StudyRun] | None = None) -> float:
        """The data set's ε at the site's δ: every run composed in one PLD accountant."""
        runs = self.runs(budget.name) if runs is None else runs
        return composed_epsilon([r.event() for r in runs], budget.delta)

    def admit(self, budget: DatasetBudget, run: StudyRun) -> tuple[float, Position]:
        """Reserve ``run`` on the data set, or BudgetRefused with the numbers; a study already
        admitted is admitted again (a restart), its steps kept. Returns the composed ε."""
        with self._write() as conn:
            runs = self.runs(budget.name, conn)
            held = {r.study: r for r in runs}
            if run.study in held:
                return self.spent(budget, runs), self._position(conn)
            # One running study per (key, study): a study already admitted is the early
            # return above. Another study under the same key is no conflict: its envelopes are
            # of another kind (update@<study>), so neighbours keep its receipts and heads apart.
            before = self.spent(budget, runs)
            after = self.spent(budget, [*runs, run])
            alone = composed_epsilon([run.event()], budget.delta)
            if after > budget.max_epsilon:
                others = ", ".join(
                    f"{r.name} ({r.study[:12]}, {r.counted_steps} steps)" for r in runs
                )
                raise BudgetRefused(
                    f"study {run.name} ({run.study[:16]}...) would take data set {budget.name} "
                    f"past its lifetime budget: it plans {run.planned_steps} DP-SGD steps "
                    f"(σ={run.noise_multiplier:.3f}, q={run.sample_rate:.4g}), ε={alone:.3f} "
                    f"alone at the site's δ={budget.delta:g}; the data set has spent "
                    f"ε={before:.3f} on {len(runs)} admitted stud{'y' if len(runs) == 1 else 'ies'}"
                    f"{' (' + others + ')' if others else ''}; composed (PLD) with them it "
                    f"would be ε={after:.3f} > max_epsilon={budget.max_epsilon:g}. Fix: plan a "
                    "smaller ε or fewer rounds, or raise the site's max_epsilon for this data set"
                )
            conn.execute(
                "INSERT INTO studies VALUES (?, ?, ?, ?, ?, ?, ?, 0, ?, ?)",
                (
                    budget.name,
                    run.study,
                    run.name,
                    run.noise_multiplier,
                    run.sample_rate,
                    run.planned_steps,
                    run.steps_taken,
                    time.time(),
                    run.public_key,
                ),
            )
            self._bump(conn, "admit", budget.name, run.study)
            return after, self._position(conn)

    def record_steps(
        self, dataset: str, study: str, steps_taken: int, *, finished: bool = False
    ) -> Position:
        """The study's steps taken so far (never lowered), and whether it is done."""
        with self._write() as conn:
            cur = conn.execute(
                "UPDATE studies SET steps_taken = MAX(steps_taken, ?), "
                "finished = MAX(finished, ?) WHERE dataset = ? AND study = ?",
                (int(steps_taken), int(finished), dataset, study),
            )
            if cur.rowcount != 1:
                raise KeyError(f"study {study[:16]}... is not admitted on data set {dataset}")
            self._bump(conn, "steps", dataset, study)
            return self._position(conn)

    def _position(self, conn: sqlite3.Connection) -> Position:
        rows = dict(conn.execute("SELECT key, value FROM meta").fetchall())
        return Position(rows["instance"], int(rows["generation"]))

    def check_not_behind(self, seen: Position | None) -> None:
        """StoreRolledBack when this store is not the one, or older than the one, a node's
        audit log last recorded (``seen``: None for a node that never used a store)."""
        if seen is None:
            return
        now = self.position()
        if now.instance != seen.instance:
            raise StoreRolledBack(
                f"the site budget store {self.path} is not the one this node used (instance "
                f"{now.instance[:12]}, the audit log recorded {seen.instance[:12]}): it was "
                "deleted or replaced, which would forget what the hospital's studies spent. "
                "Fix: put the store back from its last copy"
            )
        if now.generation < seen.generation:
            raise StoreRolledBack(
                f"the site budget store {self.path} is at write {now.generation}, older than "
                f"write {seen.generation} that this node's audit log recorded: it was put back "
                "to an earlier copy. Fix: restore the newest copy of the store"
            )
