"""The consensus phase (gossip/consensus.py): every honest node ends with the same model hash,
whatever one Byzantine member per neighbourhood does (gossip/consensus_attacks.py), within
the steps `steps_needed` gives, and no unsigned or forged model gets in."""

from __future__ import annotations

import numpy as np
import pytest
from murmur.crypto.identity import generate_identity
from murmur.gossip import consensus as cs
from murmur.gossip.consensus_attacks import CONSENSUS_ATTACKS, ConsensusAttacker, poisoned
from murmur.models.params import flatten, state_sha256
from murmur.topologies.graphs import build_topology

STUDY = "study-heart"


def final_models(n: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """Honest final models after gossip training: close to one another, not equal."""
    rng = np.random.default_rng(seed)
    w, b = rng.normal(size=(4, 3)), rng.normal(size=4)
    return [
        {
            "w": (w + 0.01 * rng.normal(size=w.shape)).astype(np.float32),
            "b": (b + 0.01 * rng.normal(size=b.shape)).astype(np.float32),
        }
        for _ in range(n)
    ]


def network(topology: str, n: int, attack: str | None, attackers=(0,), seed: int = 0):
    topo = build_topology(topology, n, seed=seed)
    ids = [generate_identity(f"h{i}") for i in range(n)]
    keys = [i.public_key for i in ids]
    members = frozenset(keys)
    nbrs = {keys[i]: [keys[j] for j in topo.neighbours(i)] for i in range(n)}
    t = len(attackers) if attack else 0
    steps, sig_steps = cs.steps_needed(topo.graph, max(t, 1))
    models = final_models(n, seed)
    parties = {}
    for i, ident in enumerate(ids):
        if attack and i in attackers:
            parties[keys[i]] = ConsensusAttacker(
                ident, attack, STUDY, models[i], nbrs[keys[i]], steps
            )
        else:
            party = cs.ConsensusParty(ident, members, STUDY, models[i], steps, f=1)
            parties[keys[i]] = cs.Member(party)
    result = cs.run_in_memory(parties, nbrs, steps, sig_steps)
    honest = [keys[i] for i in range(n) if not (attack and i in attackers)]
    return result, honest, [keys[i] for i in attackers], models, keys


@pytest.mark.parametrize("attack", [None, *CONSENSUS_ATTACKS])
@pytest.mark.parametrize("topology,n", [("complete", 5), ("regular:4", 10)])
def test_every_honest_node_ends_with_the_same_hash_signed_by_every_honest_node(topology, n, attack):
    result, honest, _attackers, models, keys = network(topology, n, attack)
    hashes = {result.decisions[k].model_sha256 for k in honest}
    assert len(hashes) == 1
    assert result.steps <= 10
    agreed = hashes.pop()
    for k in honest:
        decision = result.decisions[k]
        assert set(honest) <= set(decision.included)  # no honest model is lost
        assert state_sha256(decision.model) == agreed
        assert set(result.signatures[k].signatures) == set(honest)
        for signer, sig in result.signatures[k].signatures.items():
            assert cs.check_agreed_signature(signer, STUDY, agreed, sig)
    # the agreed model stays with the honest ones (the robust rule bounds what got in)
    honest_rows = np.stack([flatten(models[keys.index(k)]) for k in honest])
    got = flatten(result.decisions[honest[0]].model)
    assert np.abs(got - np.median(honest_rows, axis=0)).max() < 0.05


def test_an_equivocator_is_excluded_everywhere_with_a_proof_anybody_can_check():
    result, honest, attackers, *_ = network("regular:4", 10, "equivocate")
    members = frozenset(result.decisions) | set(attackers)
    for k in honest:
        decision = result.decisions[k]
        assert attackers[0] not in decision.included
        assert "equivocation" in decision.excluded[attackers[0]]
        (proof,) = decision.evidence
        assert proof.first.signers(members) and proof.second.signers(members)
        assert proof.first.offer.model_sha256 != proof.second.offer.model_sha256


@pytest.mark.parametrize("attack", ["late", "silent", "forge"])
def test_no_late_absent_or_forged_model_gets_in(attack):
    result, honest, _attackers, *_ = network("complete", 5, attack)
    for k in honest:
        assert result.decisions[k].included == tuple(sorted(honest))


def test_a_selectively_sent_offer_reaches_every_honest_node_or_none():
    result, honest, attackers, *_ = network("regular:4", 10, "selective")
    included = {result.decisions[k].included for k in honest}
    assert included == {tuple(sorted([*honest, *attackers]))}


def test_offers_are_refused_with_reasons():
    a, b, c = (generate_identity(x) for x in "abc")
    members = frozenset({a.public_key, b.public_key})
    model = final_models(1)[0]
    party = cs.ConsensusParty(a, members, STUDY, model, steps=3)
    offer = cs.FinalOffer(STUDY, b.public_key, state_sha256(model))
    good = cs.Delivery(cs.SignedOffer(offer, ()).endorsed(b), model)
    assert party.receive(2, [good]) == ["consensus_too_few_signatures"]
    outsider = cs.FinalOffer(STUDY, c.public_key, state_sha256(model))
    assert party.receive(1, [cs.Delivery(cs.SignedOffer(outsider, ()).endorsed(c), model)]) == [
        "consensus_bad_signature"
    ]
    assert party.receive(1, [cs.Delivery(good.signed, poisoned(model))]) == [
        "consensus_model_mismatch"
    ]
    other = cs.FinalOffer("another-study", b.public_key, state_sha256(model))
    assert party.receive(1, [cs.Delivery(cs.SignedOffer(other, ()).endorsed(b), model)]) == [
        "consensus_wrong_study"
    ]
    assert party.receive(1, [good]) == []
    assert party.refused["consensus_model_mismatch"] == 1


def test_the_aggregate_is_the_same_bits_in_any_arrival_order():
    models = final_models(6, seed=3)
    owners = [generate_identity(f"o{i}").public_key for i in range(6)]
    forward = dict(zip(owners, models, strict=True))
    backward = dict(reversed(list(forward.items())))
    assert (
        cs.aggregate_final(forward, "trimmed_mean", 1)[1]
        == cs.aggregate_final(backward, "trimmed_mean", 1)[1]
    )


def test_steps_needed_refuses_a_graph_t_removals_can_cut():
    with pytest.raises(ValueError, match="disconnects"):
        cs.steps_needed(build_topology("ring", 6).graph, 2)
    assert cs.steps_needed(build_topology("complete", 5).graph, 1) == (2, 1)
