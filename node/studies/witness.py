"""What this hospital holds of its peers' site budget logs: the newest signed head of each.

Why here and not in a study's state: a hospital's studies come and go, each with its own
node process, key and state directory, but the patients stay. The witness table lives in the
hospital's own site budget store file (or, for a node without a site budget, in its state
directory), so a head that one study's node received is what every later study's node
answers with when that peer starts a new study (node/studies/budget_log.py).

Heads are filed under the name *this* node gives the sender in its allowlist (the
consortium's member name), never the name the head claims, and per signing key, because
several study processes of one hospital write one store concurrently and each one's own
reads only go forward. A head is refused as a rollback when it names another store instance
than the one held for that hospital (the store was deleted or replaced), when it is behind
a head the same key signed earlier, or when it names the same write with another hash.
"""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path

from murmur.node.studies.budget_log import BudgetHead

_SCHEMA = """
CREATE TABLE IF NOT EXISTS witnessed (
    hospital TEXT NOT NULL,
    public_key TEXT NOT NULL,
    instance TEXT NOT NULL,
    seq INTEGER NOT NULL,
    hash TEXT NOT NULL,
    head TEXT NOT NULL,
    received_at REAL NOT NULL,
    PRIMARY KEY (hospital, public_key)
);
"""


class WitnessBook:
    """The newest budget log head of each peer hospital, per key that signed it."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._conn = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=FULL")
        self._conn.executescript(_SCHEMA)

    def close(self) -> None:
        self._conn.close()

    def _held(self, conn: sqlite3.Connection, hospital: str) -> list[BudgetHead]:
        rows = conn.execute("SELECT head FROM witnessed WHERE hospital = ?", (hospital,))
        return [BudgetHead.from_json(json.loads(r[0])) for r in rows]

    def observe(self, hospital: str, head: BudgetHead) -> str | None:
        """Keep ``head`` (already verified, signed by the peer's own key) as ``hospital``'s,
        or return why it shows that hospital's store went back (nothing kept then)."""
        conn = self._conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            problem = _regression(self._held(conn, hospital), head)
            if problem is None:
                conn.execute(
                    "INSERT INTO witnessed VALUES (?, ?, ?, ?, ?, ?, ?) "
                    "ON CONFLICT (hospital, public_key) DO UPDATE SET instance = excluded.instance,"
                    " seq = excluded.seq, hash = excluded.hash, head = excluded.head, "
                    "received_at = excluded.received_at WHERE excluded.seq >= witnessed.seq",
                    (
                        hospital,
                        head.public_key,
                        head.instance,
                        head.seq,
                        head.hash,
                        head.encode().decode(),
                        time.time(),
                    ),
                )
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
        return problem

    def newest(self, hospital: str) -> BudgetHead | None:
        """The furthest head held of ``hospital``'s log (None: nothing held)."""
        held = self._held(self._conn, hospital)
        return max(held, key=lambda h: h.seq) if held else None

    def count(self) -> int:
        return int(self._conn.execute("SELECT COUNT(*) FROM witnessed").fetchone()[0])


def _regression(held: list[BudgetHead], head: BudgetHead) -> str | None:
    """Why ``head`` contradicts the heads held of its hospital, or None."""
    for earlier in held:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(earlier.issued_at))
        if earlier.instance != head.instance:
            return (
                f"its site budget store is {head.instance[:12]} (write {head.seq}), but it "
                f"signed store {earlier.instance[:12]} at write {earlier.seq} at {when} UTC: "
                "the store was deleted or replaced"
            )
        if earlier.seq == head.seq and earlier.hash != head.hash:
            return (
                f"its budget log holds another write {head.seq} than the one it signed at "
                f"{when} UTC: the store's history was rewritten"
            )
        if earlier.public_key == head.public_key and head.seq < earlier.seq:
            return (
                f"its budget log is at write {head.seq}, but the same key signed write "
                f"{earlier.seq} at {when} UTC: the store was put back to an earlier copy"
            )
    return None
