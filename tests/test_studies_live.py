"""Studies with real `murmur node` processes: a node refuses an unapproved study and a study
over its site budget; it refuses envelopes of another study; two studies run at once on the
same hospitals, sharing each hospital's site budget, composed by the accountant."""

from __future__ import annotations

import urllib.request
from pathlib import Path

import pytest
from murmur.models.privacy import composed_epsilon
from murmur.node.studies.site_budget import SiteBudgetStore

from tests.netutil import Network
from tests.studyutil import DELTA, approve, murmur, propose, site_budget, study_network

pytestmark = pytest.mark.slow


def manifest_id(manifest: Path) -> str:
    shown = murmur("study", "show", str(manifest))
    assert shown.returncode == 0, shown.stderr
    return next(line.split()[1] for line in shown.stdout.splitlines() if line.startswith("study:"))


def metrics(net: Network, name: str) -> str:
    url = f"{net.node(name).operator_address}/metrics"
    with urllib.request.urlopen(url, timeout=5) as reply:
        return reply.read().decode()


def test_unapproved_over_budget_and_foreign_studies_are_refused(tmp_path: Path) -> None:
    net, manifest = study_network(tmp_path, "alpha", epsilon=1.0, rounds=1)
    study = manifest_id(manifest)
    try:
        # 1. Not approved by this node's operator: refused before anything starts.
        proc = net.start("hospital_0")
        assert proc.wait(timeout=60) == 2
        log = net.log("hospital_0")
        assert f"study alpha ({study}) is not approved by this node's operator" in log
        assert "murmur study approve" in log and str(manifest) in log

        # 2. Approved, but the site budget left for the data set is below the study's plan.
        approve(net, "hospital_0", manifest)
        store = tmp_path / "h0-site.sqlite"
        site_budget(net, "hospital_0", store, max_epsilon=0.5)
        proc = net.start("hospital_0")
        assert proc.wait(timeout=60) == 2
        log = net.log("hospital_0")
        assert "would take data set breast-cancer past its lifetime budget" in log
        assert "> max_epsilon=0.5" in log and "ε=0.000 on 0 admitted studies" in log
        assert SiteBudgetStore(store).runs("breast-cancer") == []  # nothing reserved

        # 3. Envelopes of another study (hospital_1 runs a manifest with another hash) are
        # refused with unknown_study, counted in /status and /metrics; nothing is applied.
        site_budget(net, "hospital_0", store, max_epsilon=5.0)
        h1 = net.node("hospital_1")
        beta = propose(tmp_path, "beta", h1.config_path, net.run_dir / "keys" / "hospital_1.key")
        net.edit_config("hospital_1", "study", manifest=str(beta))
        approve(net, "hospital_1", beta)  # hospital_1 approves beta, not alpha
        net.start("hospital_0", "--serve")
        net.start("hospital_1")
        assert net.procs["hospital_1"].wait(timeout=120) == 0, net.log("hospital_1")
        net.wait_for_round("hospital_0", 1, timeout_s=60)
        status = net.status("hospital_0")
        assert status["study"]["study"] == study and status["study"]["approved_by"] == [
            "hospital_0"
        ]
        assert status["rejected"].get("unknown_study", 0) >= 1, status["rejected"]
        assert 'murmur_messages_rejected_total{reason="unknown_study"}' in metrics(
            net, "hospital_0"
        )
        assert status["history"][-1]["received"] == []  # nothing of beta's was applied
        assert "unknown_study" in net.log("hospital_0")
    finally:
        net.kill_all()


def test_two_studies_run_at_once_on_the_same_hospitals(tmp_path: Path) -> None:
    one, m1 = study_network(tmp_path, "one", epsilon=1.5)
    two, m2 = study_network(tmp_path, "two", epsilon=1.5)
    stores = {name: tmp_path / f"{name}-site.sqlite" for name in ("hospital_0", "hospital_1")}
    for net, manifest in ((one, m1), (two, m2)):
        for name in ("hospital_0", "hospital_1"):
            approve(net, name, manifest)
            site_budget(net, name, stores[name], max_epsilon=3.2)
    try:
        for net in (one, two):
            net.start_all()
        for net in (one, two):
            codes = net.wait_all(timeout_s=240)
            assert codes == {"hospital_0": 0, "hospital_1": 0}, net.log("hospital_0")
        for net, manifest in ((one, m1), (two, m2)):
            status = net.final_status("hospital_0")
            assert status["round"] == 2 and status["phase"] == "done"
            assert status["study"]["study"] == manifest_id(manifest)
            assert status["rejected"].get("unknown_study", 0) == 0
        # Each hospital's store holds both studies, finished, composed by the accountant.
        store = SiteBudgetStore(stores["hospital_0"])
        runs = store.runs("breast-cancer")
        assert sorted(r.name for r in runs) == ["one", "two"] and all(r.finished for r in runs)
        assert all(r.steps_taken > 0 for r in runs)
        composed = composed_epsilon([r.event() for r in runs], DELTA)
        alone = [composed_epsilon([r.event()], DELTA) for r in runs]
        assert max(alone) < composed < sum(alone)  # composed, not added
        final = next(
            rec for rec in reversed(status_audit(one, "hospital_0")) if rec.get("finished")
        )
        assert final["epsilon_composed"] == pytest.approx(composed, rel=1e-6)

        # A third study on hospital_0 that does not fit in what is left is refused.
        three, m3 = study_network(tmp_path, "three", epsilon=2.7)
        approve(three, "hospital_0", m3)
        site_budget(three, "hospital_0", stores["hospital_0"], max_epsilon=3.2)
        proc = three.start("hospital_0")
        assert proc.wait(timeout=60) == 2
        log = three.log("hospital_0")
        assert f"the data set has spent ε={composed:.3f} on 2 admitted studies" in log
        assert "> max_epsilon=3.2" in log
    finally:
        for net in (one, two):
            net.kill_all()


def status_audit(net: Network, name: str) -> list[dict]:
    """The node's site_budget audit records' fields, oldest first."""
    from murmur.node.audit import records_of_kind

    return [r.fields for r in records_of_kind(net.node(name).state_dir, "site_budget")]


def test_a_quorum_of_approvals_is_gossiped_before_the_study_starts(tmp_path: Path) -> None:
    net, manifest = study_network(tmp_path, "quorum", epsilon=1.0, rounds=1)
    for name in ("hospital_0", "hospital_1"):
        approve(net, name, manifest)
        net.edit_config(name, "study", required_approvals=1, approval_wait_s=3.0)
    try:
        alone = net.start("hospital_0")
        assert alone.wait(timeout=60) == 2
        log = net.log("hospital_0")
        assert "needs approvals from 1 other members" in log and "waiting on hospital_1" in log
        for name in ("hospital_0", "hospital_1"):
            net.edit_config(name, "study", approval_wait_s=60.0)
        net.start_all()
        assert net.wait_all(timeout_s=120) == {"hospital_0": 0, "hospital_1": 0}
        for name in ("hospital_0", "hospital_1"):
            status = net.final_status(name)
            assert status["phase"] == "done"
            assert status["study"]["approved_by"] == ["hospital_0", "hospital_1"]
            assert status["history"][-1]["received"] == [
                "hospital_1" if name == "hospital_0" else "hospital_0"
            ]
    finally:
        net.kill_all()


def _wait_serving(net: Network, name: str, timeout_s: float = 60.0) -> None:
    """Until the node is past its startup checks (its listeners answer POST /receipts)."""
    import time

    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        try:
            if net.status(name)["phase"] not in ("starting", "awaiting_approvals",
                                                 "checking_rollback"):  # fmt: skip
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{name} did not get past its startup checks: {net.log(name)}")


def test_a_site_budget_store_deleted_or_put_back_between_studies_is_refused(
    tmp_path: Path,
) -> None:
    """Study one runs on both hospitals; hospital_1 keeps hospital_0's budget log head in its
    own store. While nothing runs, hospital_0's store is deleted (then put back to a copy
    taken before study one): a new study of hospital_0, with new keys and a new state
    directory, is refused at start on hospital_1's record, with the fix."""
    from murmur.node.studies.witness import WitnessBook

    one, m1 = study_network(tmp_path, "one", epsilon=1.0)
    stores = {name: tmp_path / f"{name}-site.sqlite" for name in ("hospital_0", "hospital_1")}
    SiteBudgetStore(stores["hospital_0"]).close()  # the store as it was before study one
    old = tmp_path / "old-site.sqlite"
    old.write_bytes(stores["hospital_0"].read_bytes())
    two, m2 = study_network(tmp_path, "two", epsilon=1.0)
    for net, manifest in ((one, m1), (two, m2)):
        for name in ("hospital_0", "hospital_1"):
            approve(net, name, manifest)
            site_budget(net, name, stores[name], max_epsilon=5.0)
    try:
        one.start_all()
        assert one.wait_all(timeout_s=240) == {"hospital_0": 0, "hospital_1": 0}
        held = WitnessBook(stores["hospital_1"]).newest("hospital_0")
        written = SiteBudgetStore(stores["hospital_0"]).position().generation
        assert held is not None and held.seq == written >= 3  # up to the finished write

        for suffix in ("", "-wal", "-shm"):
            Path(f"{stores['hospital_0']}{suffix}").unlink(missing_ok=True)
        two.start("hospital_1", "--serve")
        _wait_serving(two, "hospital_1")
        proc = two.start("hospital_0")
        assert proc.wait(timeout=60) == 2
        log = two.log("hospital_0")
        assert "hospital_1 holds this hospital's signed budget log head" in log, log
        assert f"write {written}" in log and "deleted or replaced" in log
        assert "Fix: put back the newest copy of the site budget store" in log
        assert SiteBudgetStore(stores["hospital_0"]).runs("breast-cancer") == []

        for suffix in ("", "-wal", "-shm"):
            Path(f"{stores['hospital_0']}{suffix}").unlink(missing_ok=True)
        stores["hospital_0"].write_bytes(old.read_bytes())
        proc = two.start("hospital_0")
        assert proc.wait(timeout=60) == 2
        log = two.log("hospital_0")
        assert "ends at write 0" in log and "put back to an earlier copy" in log, log
        assert SiteBudgetStore(stores["hospital_0"]).runs("breast-cancer") == []
    finally:
        for net in (one, two):
            net.kill_all()


def test_a_withdrawn_approval_stops_a_running_study_at_the_next_round(tmp_path: Path) -> None:
    """Both hospitals need one other member's approval; mid-run hospital_1's operator
    withdraws its approval through its running node: hospital_1 stops before its next round
    (its own approval is gone) and hospital_0 as soon as the gossiped withdrawal reaches it
    (one other approval required, none left), each saying why in /status and the log."""
    # Far more rounds than the test needs: an idle machine runs a round in ~0.05 s, and the
    # withdrawal must land while the study still runs (it stops the nodes long before).
    rounds = 1000
    net, manifest = study_network(tmp_path, "withdrawn", epsilon=1.0, rounds=rounds)
    for name in ("hospital_0", "hospital_1"):
        approve(net, name, manifest)
        net.edit_config(name, "study", required_approvals=1, approval_wait_s=60.0)
    try:
        net.start_all()
        net.wait_for_round("hospital_0", 2, timeout_s=120)
        done = murmur(
            "study", "withdraw", str(manifest),
            "--key", str(net.run_dir / "keys" / "hospital_1.key"),
            "--node", net.node("hospital_1").operator_address,
        )  # fmt: skip
        assert done.returncode == 0 and "handed to the node (accepted)" in done.stdout, (
            done.stdout + done.stderr
        )
        assert net.wait_all(timeout_s=120) == {"hospital_0": 0, "hospital_1": 0}
        for name, why in (
            ("hospital_1", "this node's operator no longer approves study withdrawn"),
            ("hospital_0", "fewer than the 1 required (withdrawn by hospital_1)"),
        ):
            status = net.final_status(name)
            assert status["phase"] == "approval_withdrawn", (name, status["phase"])
            assert why in status["stop_detail"] and status["round"] < rounds
            assert status["study"]["withdrawn_by"] == ["hospital_1"]
            assert "the study's approvals no longer suffice" in net.log(name)
    finally:
        net.kill_all()
