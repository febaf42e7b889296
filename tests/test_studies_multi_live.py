"""One process, one key, several studies (`[[studies]]`, node/multistudy.py), with real
`murmur node` processes: two hospitals each run three studies in one process under one key.
Both hospitals train the first two studies at once, their evidence kept per (sender,
study) (no study's receipts or heads taken for an equivocation or a rollback of the other),
both charged to each hospital's one site budget store, composed by the accountant; the third
study does not fit in what is left and is refused with the numbers, while the others run on."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from murmur.models.privacy import composed_epsilon
from murmur.node.studies.site_budget import SiteBudgetStore

from tests.netutil import make_network
from tests.studyutil import DELTA, approve_study, propose_study, run_studies

pytestmark = pytest.mark.slow

HOSPITALS = ("hospital_0", "hospital_1")
# alpha and beta fit in max_epsilon together (composed: about 2.05); gamma alone is 3.0,
# and composed with what alpha and beta reserved it is past 3.2.
STUDIES = (("alpha", 1.5), ("beta", 1.5), ("gamma", 3.0))
MAX_EPSILON = 3.2


def test_one_process_one_key_runs_two_studies_and_refuses_a_third_over_budget(
    tmp_path: Path,
) -> None:
    net = make_network(
        tmp_path / "net",
        *("--nodes", "2", "--rounds", "2", "--round-timeout", "5"),
        *("--aggregator", "mean", "--dp-epsilon", "1.5", "--dp-delta", str(DELTA)),
    )
    made = [propose_study(tmp_path, net, name, eps) for name, eps in STUDIES]
    manifests = [m for m, _ in made]
    ids = {name: study for (name, _), (_, study) in zip(STUDIES, made, strict=True)}
    stores = {name: tmp_path / f"{name}-site.sqlite" for name in HOSPITALS}
    for name in HOSPITALS:
        run_studies(net, name, manifests, stores[name], MAX_EPSILON)
        for manifest, study in made:
            approve_study(net, name, manifest, study)
    try:
        net.start_all()
        codes = net.wait_all(timeout_s=240)
        # 2: one study (gamma) could not start; the process ran the others to the end.
        assert codes == {"hospital_0": 2, "hospital_1": 2}, net.log("hospital_0")
        for name in HOSPITALS:
            log = net.node(name).log_path.read_text()  # all of it (net.log is its tail)
            assert "cannot start study gamma" in log
            assert "would take data set breast-cancer past its lifetime budget" in log
            assert f"> max_epsilon={MAX_EPSILON}" in log and "on 2 admitted studies" in log
            top = json.loads((net.node(name).state_dir / "status.json").read_text())
            assert sorted(top["studies"]) == sorted(ids.values())
            assert top["studies"][ids["gamma"]]["phase"] == "refused"
            assert "past its lifetime budget" in top["studies"][ids["gamma"]]["stop_detail"]
            keys = {s["public_key"] for s in top["studies"].values()}
            assert keys == {top["public_key"]}  # one key for every study
            other = next(h for h in HOSPITALS if h != name)
            for study in ("alpha", "beta"):
                status = top["studies"][ids[study]]
                assert status["phase"] == "done" and status["round"] == 2, status["phase"]
                assert status["study"]["study"] == ids[study]
                # Trained with the other hospital: its model was in every round's aggregate.
                for entry in status["history"]:
                    assert other in entry["received"], entry
                # The same key signed round r of both studies: neither an equivocation nor
                # a rollback of the other, and nothing refused as another study's.
                assert status["equivocation"]["proven"] == {}
                assert status["rollback"]["proven"] == {}
                assert status["rollback"]["startup_check"]["outcome"] in ("ok", "no_answer")
                for reason in ("unknown_study", "rollback", "equivocation", "replay"):
                    assert status["rejected"].get(reason, 0) == 0, status["rejected"]
            assert top["rejected"].get("unknown_study", 0) == 0
            # Both studies charged to the hospital's one store, composed by the accountant;
            # gamma reserved nothing.
            runs = SiteBudgetStore(stores[name]).runs("breast-cancer")
            assert sorted(r.name for r in runs) == ["alpha", "beta"]
            assert all(r.finished and r.steps_taken > 0 for r in runs)
            assert len({r.public_key for r in runs}) == 1  # one key, two studies
            composed = composed_epsilon([r.event() for r in runs], DELTA)
            alone = [composed_epsilon([r.event()], DELTA) for r in runs]
            assert max(alone) < composed < sum(alone) < MAX_EPSILON + 1
            assert f"the data set has spent ε={composed:.3f} on 2 admitted studies" in log
            # Each study's lines say which study they are about.
            for study in ("alpha", "beta"):
                assert f"study {study}: round 2 done" in log
    finally:
        net.kill_all()
