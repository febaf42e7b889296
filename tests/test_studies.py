"""Study manifests, signed approvals and the site privacy budget (node/studies/), without
node processes (tests/test_studies_live.py starts real nodes)."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
from murmur.crypto.identity import generate_identity
from murmur.models.privacy import composed_epsilon, epsilon_for
from murmur.node.config import ConfigError, parse_config
from murmur.node.studies.approvals import (
    ApprovalBook,
    ApprovalError,
    approve,
    check_approval,
    decode_approval,
    parse_approval,
)
from murmur.node.studies.manifest import (
    ManifestError,
    load_manifest,
    parse_manifest,
    sign_manifest,
    study_id,
    write_manifest,
)
from murmur.node.studies.site_budget import (
    BudgetRefused,
    DatasetBudget,
    SiteBudgetStore,
    StoreRolledBack,
    StudyRun,
)

CONTENT = {
    "study": {"name": "bc-logreg", "topology": "complete graph of the consortium"},
    "data": {"dataset": "breast_cancer", "num_hospitals": 3},
    "model": {"name": "logreg"},
    "training": {"rounds": 3, "batch_size": 32},
    "privacy": {"enabled": True, "epsilon": 2.0, "delta": 1e-5},
    "aggregation": {"rule": "trimmed_mean", "f": 0},
}


@pytest.fixture(scope="module")
def alice():
    return generate_identity("alice")


@pytest.fixture(scope="module")
def bob():
    return generate_identity("bob")


# ------------------------------------------------------------------ manifests


def test_manifest_hash_is_canonical_and_survives_the_file(tmp_path: Path, alice) -> None:
    manifest = sign_manifest(CONTENT, alice)
    reordered = json.loads(json.dumps(CONTENT, sort_keys=False))
    reordered = {k: reordered[k] for k in reversed(list(reordered))}
    assert study_id(reordered) == manifest.id
    path = tmp_path / "study.json"
    write_manifest(manifest, path)
    again = load_manifest(path, expected=manifest.id)
    assert again.id == manifest.id and again.proposer_key == alice.public_key
    assert again.summary()["epsilon"] == 2.0


def test_changed_manifest_fails_its_signature_and_its_pin(tmp_path: Path, alice) -> None:
    manifest = sign_manifest(CONTENT, alice)
    document = manifest.to_json()
    document["manifest"]["privacy"]["epsilon"] = 8.0  # a larger ε than was signed
    with pytest.raises(ManifestError) as forged:
        parse_manifest(document)
    assert forged.value.reason == "manifest_forged"
    other = sign_manifest({**CONTENT, "training": {"rounds": 4}}, alice)
    path = tmp_path / "other.json"
    write_manifest(other, path)
    with pytest.raises(ManifestError) as pinned:
        load_manifest(path, expected=manifest.id)
    assert pinned.value.reason == "study_hash_mismatch"


def test_manifest_refuses_site_settings_and_missing_budget(alice) -> None:
    with pytest.raises(ManifestError, match="site settings"):
        sign_manifest({**CONTENT, "data": {"dataset": "breast_cancer", "hospital": "0"}}, alice)
    with pytest.raises(ManifestError, match="epsilon must be a number"):
        sign_manifest({**CONTENT, "privacy": {"enabled": True, "delta": 1e-5}}, alice)


# ------------------------------------------------------------------ approvals


def test_approval_round_trip_and_membership(alice, bob) -> None:
    study = sign_manifest(CONTENT, alice).id
    record = decode_approval(approve(study, bob, now=1000.0).encode())
    members = {alice.public_key: "alice", bob.public_key: "bob"}
    assert check_approval(record, studies={study}, members=members, now=1001.0) == "bob"
    with pytest.raises(ApprovalError) as unknown:
        check_approval(record, studies={study}, members={alice.public_key: "alice"}, now=1001.0)
    assert unknown.value.reason == "approval_unknown_signer"
    with pytest.raises(ApprovalError) as other_study:
        check_approval(record, studies={"0" * 64}, members=members, now=1001.0)
    assert other_study.value.reason == "unknown_study"


def test_forged_expired_and_future_approvals_are_refused(alice, bob) -> None:
    study = sign_manifest(CONTENT, alice).id
    members = {bob.public_key: "bob"}
    document = approve(study, bob, now=1000.0, valid_days=1).to_json()
    document["study"] = "ab" * 32  # moved to another study: the signature no longer covers it
    with pytest.raises(ApprovalError) as forged:
        decode_approval(json.dumps(document).encode())
    assert forged.value.reason == "approval_forged"
    record = approve(study, bob, now=1000.0, valid_days=1)
    with pytest.raises(ApprovalError) as expired:
        check_approval(record, studies={study}, members=members, now=1000.0 + 86400 + 1)
    assert expired.value.reason == "approval_expired"
    with pytest.raises(ApprovalError) as future:
        check_approval(record, studies={study}, members=members, now=1000.0 - 3600)
    assert future.value.reason == "approval_future"
    with pytest.raises(ApprovalError) as malformed:
        decode_approval(b'{"format": "murmur-study-approval/1", "study": 1}')
    assert malformed.value.reason == "approval_malformed"


def test_book_keeps_newest_refuses_replay_and_survives_restart(tmp_path: Path, bob) -> None:
    study = "cd" * 32
    old = approve(study, bob, now=1000.0)
    new = approve(study, bob, now=2000.0)
    book = ApprovalBook(tmp_path)
    assert book.offer(old) is True
    assert book.offer(new) is True
    assert book.offer(new) is False  # the same record gossiped twice: a duplicate
    with pytest.raises(ApprovalError) as replayed:
        book.offer(old)
    assert replayed.value.reason == "approval_replayed"
    restarted = ApprovalBook(tmp_path)
    assert [a.signature for a in restarted.of_study(study)] == [new.signature]
    with pytest.raises(ApprovalError):
        restarted.offer(old)
    valid = restarted.valid_approvers(study, {bob.public_key: "bob"}, now=2001.0)
    assert list(valid) == ["bob"]


# ------------------------------------------------------------------ site budget

SIGMA, Q, STEPS, DELTA = 1.1, 0.05, 60, 1e-5


SIGNER = generate_identity("hospital_a")


def _run(study: str, steps: int = STEPS, taken: int = 0, finished: bool = False) -> StudyRun:
    return StudyRun(study * 8, study, SIGMA, Q, steps, taken, finished)


def test_composition_uses_the_accountant_not_a_sum() -> None:
    one = epsilon_for(SIGMA, Q, STEPS, DELTA)
    two = composed_epsilon([(SIGMA, Q, STEPS), (SIGMA, Q, STEPS)], DELTA)
    assert two == pytest.approx(epsilon_for(SIGMA, Q, 2 * STEPS, DELTA), rel=1e-6)
    assert one < two < 2 * one  # tighter than adding epsilons


def test_store_admits_within_budget_and_refuses_with_numbers(tmp_path: Path) -> None:
    one = epsilon_for(SIGMA, Q, STEPS, DELTA)
    two = epsilon_for(SIGMA, Q, 2 * STEPS, DELTA)
    three = epsilon_for(SIGMA, Q, 3 * STEPS, DELTA)
    budget = DatasetBudget(
        "breast_cancer", max_epsilon=(two + min(three, 2 * one)) / 2, delta=DELTA
    )
    assert two < budget.max_epsilon < 2 * one  # naive addition would refuse the second study
    store = SiteBudgetStore(tmp_path / "site.sqlite", signer=SIGNER)
    spent, _ = store.admit(budget, _run("a"))
    assert spent == pytest.approx(one, rel=1e-6)
    spent, _ = store.admit(budget, _run("b"))
    assert spent == pytest.approx(two, rel=1e-6)
    with pytest.raises(BudgetRefused) as refused:
        store.admit(budget, _run("c"))
    text = str(refused.value)
    assert f"ε={two:.3f} on 2 admitted studies" in text
    assert f"max_epsilon={budget.max_epsilon:g}" in text
    assert "ccccccc" in text and "would be ε=" in text
    assert store.admit(budget, _run("a"))[0] == pytest.approx(two, rel=1e-6)  # a restart


def test_finishing_releases_the_unspent_plan_and_restart_keeps_spend(tmp_path: Path) -> None:
    budget = DatasetBudget("d", max_epsilon=100.0, delta=DELTA)
    path = tmp_path / "site.sqlite"
    store = SiteBudgetStore(path, signer=SIGNER)
    store.admit(budget, _run("a"))
    store.record_steps("d", "a" * 8, 10)
    store.record_steps("d", "a" * 8, 5)  # never lowered
    assert store.runs("d")[0].steps_taken == 10
    assert store.spent(budget) == pytest.approx(epsilon_for(SIGMA, Q, STEPS, DELTA), rel=1e-6)
    store.record_steps("d", "a" * 8, 20, finished=True)
    store.close()
    reopened = SiteBudgetStore(path, signer=SIGNER)
    assert reopened.spent(budget) == pytest.approx(epsilon_for(SIGMA, Q, 20, DELTA), rel=1e-6)


def test_store_rollback_and_replacement_are_detected(tmp_path: Path) -> None:
    budget = DatasetBudget("d", max_epsilon=100.0, delta=DELTA)
    path = tmp_path / "site.sqlite"
    store = SiteBudgetStore(path, signer=SIGNER)
    _, seen = store.admit(budget, _run("a"))
    store.check_not_behind(seen)
    later = store.record_steps("d", "a" * 8, 7)
    store.close()
    reopened = SiteBudgetStore(path, signer=SIGNER)
    reopened.check_not_behind(later)
    with pytest.raises(StoreRolledBack, match="older than write"):
        reopened.check_not_behind(type(later)(later.instance, later.generation + 1))
    reopened.close()
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    with pytest.raises(StoreRolledBack, match="deleted or replaced"):
        SiteBudgetStore(path, signer=SIGNER).check_not_behind(later)


def test_two_processes_cannot_both_take_the_last_budget(tmp_path: Path) -> None:
    one = epsilon_for(SIGMA, Q, STEPS, DELTA)
    budget = DatasetBudget("d", max_epsilon=one * 1.01, delta=DELTA)  # room for one study
    path = tmp_path / "site.sqlite"
    SiteBudgetStore(path, signer=SIGNER).close()
    results: list[str] = []

    def start(name: str) -> None:
        store = SiteBudgetStore(path, signer=SIGNER)
        try:
            store.admit(budget, _run(name))
            results.append("admitted")
        except BudgetRefused:
            results.append("refused")
        finally:
            store.close()

    threads = [threading.Thread(target=start, args=(n,)) for n in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert sorted(results) == ["admitted", "refused"]


# ------------------------------------------------------------------ the node config

NODE = {
    "node": {"name": "hospital_a", "key_file": "a.key", "state_dir": "state"},
    "data": {"hospital": "hospital_0"},
}
BC = {**CONTENT, "data": {"dataset": "breast-cancer", "num_hospitals": 3}}


def _signed(tmp_path: Path, alice, content=BC) -> Path:
    path = tmp_path / "study.json"
    write_manifest(sign_manifest(content, alice), path)
    return path


def test_the_manifest_fills_the_sections_it_fixes(tmp_path: Path, alice) -> None:
    path = _signed(tmp_path, alice)
    config = parse_config({**NODE, "study": {"manifest": "study.json"}}, base_dir=tmp_path)
    assert config.privacy.epsilon == 2.0 and config.privacy.delta == 1e-5
    assert config.training.rounds == 3 and config.aggregation.rule == "trimmed_mean"
    assert config.data.num_hospitals == 3 and config.data.hospital == "hospital_0"
    pinned = {"manifest": str(path), "sha256": "0" * 64}
    with pytest.raises(ConfigError, match="study_hash_mismatch"):
        parse_config({**NODE, "study": pinned}, base_dir=tmp_path)


def test_a_node_config_cannot_widen_an_approved_study(tmp_path: Path, alice) -> None:
    _signed(tmp_path, alice)
    raw = {**NODE, "study": {"manifest": "study.json"}, "privacy": {"epsilon": 8.0}}
    with pytest.raises(ConfigError, match=r"privacy\.epsilon = 8\.0 in the node config"):
        parse_config(raw, base_dir=tmp_path)
    same = {**NODE, "study": {"manifest": "study.json"}, "privacy": {"epsilon": 2.0}}
    assert parse_config(same, base_dir=tmp_path).privacy.epsilon == 2.0


def test_site_budget_config_names_the_missing_field(tmp_path: Path) -> None:
    store = {"store": "site.sqlite"}
    with pytest.raises(ConfigError, match=r"site_budget\.datasets\.breast-cancer is missing"):
        parse_config({**NODE, "site_budget": store}, base_dir=tmp_path)
    lacking = {**store, "datasets": {"breast-cancer": {"max_epsilon": 4.0}}}
    with pytest.raises(ConfigError, match="lacks delta"):
        parse_config({**NODE, "site_budget": lacking}, base_dir=tmp_path)
    full = {**store, "datasets": {"breast-cancer": {"max_epsilon": 4.0, "delta": 1e-5}}}
    no_dp = {**NODE, "site_budget": full, "privacy": {"enabled": False}}
    with pytest.raises(ConfigError, match=r"privacy\.enabled = false, but data set"):
        parse_config(no_dp, base_dir=tmp_path)
    assert parse_config({**NODE, "site_budget": full}, base_dir=tmp_path).site_budget.store


def test_study_commands_propose_approve_import_and_list(tmp_path: Path, capsys) -> None:
    from murmur.crypto.identity import save_identity
    from murmur.node.audit import records_of_kind
    from murmur.node.cli import main

    keys = {}
    for name in ("h0", "h1"):
        identity = generate_identity(name)
        keys[name] = tmp_path / f"{name}.key"
        save_identity(identity, tmp_path)
    draft = tmp_path / "draft.toml"
    draft.write_text('[study]\nname = "s"\n[privacy]\nepsilon = 1.0\ndelta = 1e-5\n')
    study = tmp_path / "study.json"
    assert (
        main(["study", "propose", str(draft), "--key", str(keys["h0"]), "--out", str(study)]) == 0
    )
    sid = load_manifest(study).id
    shared = tmp_path / "h1-approval.json"
    h1_state, h0_state = tmp_path / "h1", tmp_path / "h0"
    args = ["--state", str(h1_state), "--key", str(keys["h1"]), "--out", str(shared)]
    assert main(["study", "approve", str(study), *args]) == 0
    assert (
        main(["study", "import", str(shared), "--state", str(h0_state), "--key", str(keys["h0"])])
        == 0
    )
    again = ["study", "import", str(shared), "--state", str(h0_state), "--key", str(keys["h0"])]
    assert main(again) == 0 and "already held" in capsys.readouterr().out
    assert main(["study", "list", "--state", str(h0_state)]) == 0
    assert f"{sid}  h1" in capsys.readouterr().out
    assert [r.fields["approver"] for r in records_of_kind(h0_state, "study_approval")] == ["h1"]
    forged = json.loads(shared.read_text())
    forged["expires_at"] += 1
    shared.write_text(json.dumps(forged))
    assert (
        main(["study", "import", str(shared), "--state", str(h0_state), "--key", str(keys["h0"])])
        == 2
    )
    assert "approval_forged" in capsys.readouterr().err


def test_a_withdrawal_cancels_earlier_approvals_and_a_later_one_approves_again(
    tmp_path: Path, alice
) -> None:
    from murmur.node.studies.approvals import Withdrawal, withdraw

    study = "ab" * 32
    members = {alice.public_key: "hospital_a"}
    book = ApprovalBook(tmp_path)
    now = time.time()
    first = approve(study, alice, now=now - 60)
    assert book.offer(first) and list(book.valid_approvers(study, members, now)) == ["hospital_a"]
    taken_back = withdraw(study, alice, now=now)
    parsed = parse_approval(json.loads(taken_back.encode()))
    assert isinstance(parsed, Withdrawal) and parsed == taken_back
    assert check_approval(parsed, studies={study}, members=members, now=now) == "hospital_a"
    assert book.offer(parsed) and book.valid_approvers(study, members, now) == {}
    assert book.offer(first) is False  # gossiped back by a peer: cancelled, not kept
    forged = {**taken_back.to_json(), "study": "cd" * 32}
    with pytest.raises(ApprovalError) as refused:
        parse_approval(forged)
    assert refused.value.reason == "approval_forged"
    with pytest.raises(ApprovalError) as refused:
        book.offer(withdraw(study, alice, now=now - 30))  # an older withdrawal
    assert refused.value.reason == "approval_replayed"
    reopened = ApprovalBook(tmp_path)  # the withdrawal survives a restart
    assert reopened.valid_approvers(study, members, now) == {}
    assert [w.issued_at for w in reopened.withdrawals_of(study)] == [taken_back.issued_at]
    again = approve(study, alice, now=now + 1)
    assert reopened.offer(again)
    assert list(reopened.valid_approvers(study, members, now + 2)) == ["hospital_a"]
