"""The site budget store's signed, hash-chained log, the heads peers keep of it, and the
check a store must pass against them: a store changed outside murmur, deleted, replaced or
put back to an earlier copy is refused with the fix."""

from __future__ import annotations

import shutil
import sqlite3
import time
from pathlib import Path

import pytest
from murmur.crypto.identity import generate_identity
from murmur.gossip.heads import (
    MAX_EXTRA_BYTES,
    ReceiptsRequest,
    open_receipts_answer,
    open_receipts_answer_with_budget,
    seal_receipts_answer,
)
from murmur.node.studies.budget_log import BudgetHead, LogError
from murmur.node.studies.site_budget import (
    DatasetBudget,
    SiteBudgetStore,
    StoreRolledBack,
    StoreTampered,
    StudyRun,
)
from murmur.node.studies.witness import WitnessBook

A = generate_identity("hospital_a")
A2 = generate_identity("hospital_a_second_study")
BUDGET = DatasetBudget("d", max_epsilon=100.0, delta=1e-5)


def _run(study: str, key: bytes = A.public_key) -> StudyRun:
    return StudyRun(study * 8, study, 1.1, 0.05, 60, public_key=key.hex())


def _store_with_writes(path: Path, writes: int = 3) -> SiteBudgetStore:
    store = SiteBudgetStore(path, signer=A)
    store.admit(BUDGET, _run("a"))
    for steps in range(1, writes):
        store.record_steps("d", "a" * 8, steps)
    return store


def _copy(path: Path, to: Path) -> None:
    for suffix in ("", "-wal", "-shm"):
        if Path(f"{path}{suffix}").exists():
            shutil.copyfile(f"{path}{suffix}", f"{to}{suffix}")


def _delete(path: Path) -> None:
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)


def test_every_write_is_a_signed_chained_entry_and_the_head_verifies(tmp_path: Path) -> None:
    store = _store_with_writes(tmp_path / "site.sqlite")
    assert store.verify()[0] == store.position().generation == 3
    head = store.head("hospital_a", time.time())
    assert head.verify() and head.seq == 3 and head.instance == store.position().instance
    assert BudgetHead.decode(head.encode()) == head
    forged = BudgetHead(**{**head.to_json(), "seq": 9})
    assert not forged.verify()  # the seq is signed
    with pytest.raises(LogError):
        BudgetHead.decode(b'{"format": "murmur-site-budget-head/1"}')
    with pytest.raises(ValueError, match="open it with a key"):
        SiteBudgetStore(tmp_path / "site.sqlite").record_steps("d", "a" * 8, 5)


@pytest.mark.parametrize(
    "edit, why",
    [
        ("UPDATE studies SET steps_taken = 0, finished = 1", "studies table differs"),
        ("DELETE FROM log WHERE seq = 2", "gap"),
        ("UPDATE log SET entry = replace(entry, '\"steps\"', '\"admit\"') WHERE seq = 2", "hash"),
        ("DELETE FROM studies", "studies table differs"),
    ],
)
def test_a_store_changed_outside_murmur_is_refused_at_open(
    tmp_path: Path, edit: str, why: str
) -> None:
    path = tmp_path / "site.sqlite"
    _store_with_writes(path).close()
    with sqlite3.connect(path) as conn:
        conn.execute(edit)
    with pytest.raises(StoreTampered, match=why) as refused:
        SiteBudgetStore(path, signer=A)
    assert "changed outside murmur" in str(refused.value) and "Fix:" in str(refused.value)


def test_a_store_deleted_replaced_or_put_back_does_not_reach_the_peers_head(
    tmp_path: Path,
) -> None:
    path = tmp_path / "site.sqlite"
    store = _store_with_writes(path, writes=1)
    store.close()
    _copy(path, tmp_path / "old.sqlite")  # an earlier copy: one write
    store = SiteBudgetStore(path, signer=A)
    store.record_steps("d", "a" * 8, 7)
    store.record_steps("d", "a" * 8, 9, finished=True)
    head = store.head("hospital_a", time.time())
    store.check_reaches(head, "hospital_b")  # the store itself reaches its head
    store.check_reaches(BudgetHead.make(A, hospital="hospital_a", instance=head.instance,
                        seq=1, hash_=_hash_at(path, 1), now=0.0), "hospital_b")  # fmt: skip
    store.close()

    _delete(path)
    _copy(tmp_path / "old.sqlite", path)
    with pytest.raises(StoreRolledBack, match="put back to an earlier copy") as refused:
        SiteBudgetStore(path, signer=A).check_reaches(head, "hospital_b")
    text = str(refused.value)
    assert "hospital_b holds this hospital's signed budget log head" in text
    assert "ends at write 1" in text and "write 3" in text and "Fix: put back" in text

    _delete(path)  # deleted: a new, empty store
    with pytest.raises(StoreRolledBack, match="deleted or replaced"):
        SiteBudgetStore(path, signer=A).check_reaches(head, "hospital_b")

    _delete(path)  # the earlier copy, then other writes: another history at write 3
    _copy(tmp_path / "old.sqlite", path)
    other = SiteBudgetStore(path, signer=A)
    other.record_steps("d", "a" * 8, 1)
    other.record_steps("d", "a" * 8, 2)
    with pytest.raises(StoreRolledBack, match="history was rewritten"):
        other.check_reaches(head, "hospital_b")


def _hash_at(path: Path, seq: int) -> str:
    with sqlite3.connect(path) as conn:
        return conn.execute("SELECT hash FROM log WHERE seq = ?", (seq,)).fetchone()[0]


def test_the_witness_keeps_the_newest_head_and_refuses_one_that_goes_back(
    tmp_path: Path,
) -> None:
    path = tmp_path / "site.sqlite"
    store = _store_with_writes(path)
    book = WitnessBook(tmp_path / "peer-site.sqlite")
    first = store.head("hospital_a", time.time())
    assert book.observe("hospital_a", first) is None
    store.record_steps("d", "a" * 8, 10)
    later = store.head("hospital_a", time.time())
    assert book.observe("hospital_a", later) is None
    assert book.newest("hospital_a") == later
    # A second study process of the same hospital, another key, read the store a moment
    # earlier: not a rollback, and the newest head is kept.
    second = SiteBudgetStore(path, signer=A2)
    earlier_by_other_key = BudgetHead.make(
        A2, hospital="hospital_a", instance=first.instance, seq=first.seq, hash_=first.hash,
        now=time.time(),
    )  # fmt: skip
    assert book.observe("hospital_a", earlier_by_other_key) is None
    assert book.newest("hospital_a").seq == later.seq
    # The same key going back, another hash at one write, another store: refused, not kept.
    assert "put back to an earlier copy" in book.observe("hospital_a", first)
    forked = BudgetHead.make(A, hospital="hospital_a", instance=later.instance, seq=later.seq,
                             hash_="00" * 32, now=time.time())  # fmt: skip
    assert "rewritten" in book.observe("hospital_a", forked)
    _delete(tmp_path / "fresh.sqlite")
    fresh = SiteBudgetStore(tmp_path / "fresh.sqlite", signer=A).head("hospital_a", time.time())
    assert "deleted or replaced" in book.observe("hospital_a", fresh)
    assert book.newest("hospital_a") == later
    book.close()
    assert WitnessBook(tmp_path / "peer-site.sqlite").newest("hospital_a") == later  # durable
    assert WitnessBook(tmp_path / "peer-site.sqlite").newest("hospital_c") is None
    second.close()


def test_the_receipts_answer_carries_the_budget_head_sealed_to_the_requester() -> None:
    b = generate_identity("hospital_b")
    request = ReceiptsRequest.make(A, b.public_key, time.time())
    answer = seal_receipts_answer(b, request, [], b"head bytes")
    assert open_receipts_answer_with_budget(A, request, answer) == ([], 0, b"head bytes")
    assert open_receipts_answer(A, request, answer) == ([], 0)
    plain = seal_receipts_answer(b, request, [])
    assert open_receipts_answer_with_budget(A, request, plain) == ([], 0, None)
    with pytest.raises(ValueError, match="at most"):
        seal_receipts_answer(b, request, [], b"x" * (MAX_EXTRA_BYTES + 1))


def test_murmur_study_budget_shows_how_far_a_copy_goes(tmp_path: Path) -> None:
    from tests.studyutil import murmur

    path = tmp_path / "site.sqlite"
    store = _store_with_writes(path)
    seq, head = store.verify()
    store.close()
    shown = murmur("study", "budget", str(path))
    assert shown.returncode == 0, shown.stderr
    assert f"writes:   {seq} (log verified)" in shown.stdout and head in shown.stdout
    assert "d  a (aaaaaaaa): 2 of 60 steps, running or stopped" in shown.stdout
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE studies SET planned_steps = 1")
    refused = murmur("study", "budget", str(path))
    assert refused.returncode == 2 and "changed outside murmur" in refused.stderr
