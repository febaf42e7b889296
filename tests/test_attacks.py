"""The attack suite (gossip/attacks.py): each attack does what its paper says, the attacker
builds the messages the node sends, and every protocol-abuse message is refused by a receiver
with its reason code."""

from __future__ import annotations

import statistics

import numpy as np
import pytest
from murmur.crypto.allowlist import Allowlist, Peer
from murmur.crypto.identity import generate_identity
from murmur.gossip.abuse import (
    impersonated_envelope,
    malformed_messages,
    outsider_envelope,
    oversize_message,
)
from murmur.gossip.aggregation import mean as gossip_mean
from murmur.gossip.attacks import (
    ATTACKS,
    MODEL_ATTACKS,
    PROTOCOL_ATTACKS,
    Adversary,
    AttackView,
    alie,
    alie_z,
    attack_params,
    attack_rng,
    craft,
    dissensus,
    flip_labels,
    gaussian,
    ipm,
    scaled_boost,
    sign_flip,
)
from murmur.gossip.receipts import EquivocationProof
from murmur.gossip.wire import (
    EnvelopeOpener,
    ModelUpdate,
    RejectReason,
    WireError,
    build_envelope,
    peek_envelope,
)
from murmur.models.params import flatten
from murmur.node.config import ConfigError, parse_config

ATTACKER = generate_identity("byzantine_0")
ALICE = generate_identity("alice")
BOB = generate_identity("bob")
PEERS = [
    Peer(i.name, f"http://127.0.0.1:{9100 + n}", i.public_key)
    for n, i in enumerate([ALICE, BOB, ATTACKER])
]
STATE = {
    "w": np.array([0.5, -1.0, 2.0], dtype=np.float32),
    "b": np.array([0.25], dtype=np.float32),
}
SPEC = {name: (a.shape, "float32") for name, a in STATE.items()}


def shifted(delta: float) -> dict[str, np.ndarray]:
    return {k: (v + np.float32(delta)).astype(np.float32) for k, v in STATE.items()}


def opener_for(identity) -> EnvelopeOpener:
    return EnvelopeOpener(identity, Allowlist(PEERS), SPEC)


def view(**changes) -> AttackView:
    rng = np.random.default_rng(0)
    honest = {f"h{i}": rng.normal(1.0, 0.1, 6) for i in range(4)}
    base = {
        "own": rng.normal(1.0, 0.1, 6).astype(np.float32),
        "anchor": np.full(6, 0.9),
        "honest": honest,
        "stale": np.zeros(6, dtype=np.float32),
        "round": 3,
    }
    return AttackView(**{**base, **changes})


# --------------------------------------------------------------------------- parameters


def test_params_take_defaults_and_refuse_unknown_names_with_the_known_ones() -> None:
    assert attack_params("ipm", {}) == {"epsilon": 0.1}
    assert attack_params("ipm", {"epsilon": 100}) == {"epsilon": 100.0}
    with pytest.raises(ValueError, match="no parameter eps; its parameters: epsilon"):
        attack_params("ipm", {"eps": 1.0})
    with pytest.raises(ValueError, match="unknown attack 'nope'"):
        attack_params("nope", {})
    with pytest.raises(ValueError, match="finite"):
        attack_params("gaussian", {"std": float("nan")})


def test_every_attack_class_of_the_issue_is_present() -> None:
    kinds = {info.kind for info in ATTACKS.values()}
    assert kinds == {
        "model_poisoning",
        "data_poisoning",
        "free_riding",
        "equivocation",
        "protocol_abuse",
    }
    assert {"sign_flip", "scaled_boost", "gaussian", "alie", "ipm", "dissensus"} <= MODEL_ATTACKS
    assert {"replay", "outsider", "impersonate", "flood"} <= PROTOCOL_ATTACKS


def test_the_adversary_config_section_is_validated() -> None:
    base = {"node": {"name": "a", "key_file": "k", "state_dir": "s"}, "data": {"hospital": "0"}}
    assert not parse_config(base).adversary.enabled  # never on by default
    config = parse_config({**base, "adversary": {"attack": "ipm", "params": {"epsilon": 100}}})
    assert config.adversary.enabled and config.adversary.params == {"epsilon": 100.0}
    with pytest.raises(ConfigError, match=r"adversary\.attack unknown attack 'ipn'"):
        parse_config({**base, "adversary": {"attack": "ipn"}})
    with pytest.raises(ConfigError, match=r"adversary\.params: attack 'ipm' has no parameter z"):
        parse_config({**base, "adversary": {"attack": "ipm", "params": {"z": 1.0}}})


# --------------------------------------------------------------------------- model attacks


def test_sign_flip_and_scaled_boost_by_hand() -> None:
    mean = np.array([1.0, -2.0])
    anchor = np.array([0.5, 0.5])
    assert np.array_equal(sign_flip(mean), [-1.0, 2.0])
    # anchor + 5 * (-mean - anchor) = [0.5 + 5 * -1.5, 0.5 + 5 * 1.5]
    assert np.allclose(scaled_boost(anchor, mean, 5.0), [-7.0, 8.0])


def test_a_boost_of_n_makes_plain_averaging_land_on_the_negated_model() -> None:
    """Model replacement: n - 1 honest copies of the mean and one boosted model average to
    exactly the attacker's target, -mean (Bagdasaryan et al. 2020)."""
    n = 5
    mu = np.array([0.3, -1.2, 2.0])
    boosted = scaled_boost(mu, mu, scale=n)
    received = np.stack([mu] * (n - 2) + [boosted])
    result = gossip_mean(mu, received, np.full(n, 1.0 / n), 0)
    assert np.allclose(result, -mu)


def test_alie_z_is_the_papers_z_max() -> None:
    # Baruch et al. 2019: s = floor(n/2 + 1) - f, z = Phi^-1((n - s) / n).
    assert alie_z(50, 24) == pytest.approx(statistics.NormalDist().inv_cdf(48 / 50))
    assert alie_z(50, 24) == pytest.approx(1.7507, abs=1e-4)
    # With few attackers it barely moves: n = 5, f = 1 gives s = 2, z = Phi^-1(0.6).
    assert alie_z(5, 1) == pytest.approx(0.2533, abs=1e-4)
    with pytest.raises(ValueError, match="0 <= f < n"):
        alie_z(4, 4)


def test_alie_moves_every_coordinate_by_z_standard_deviations() -> None:
    rows = np.array([[1.0, 10.0], [3.0, 10.0], [2.0, 16.0]])
    out = alie(rows, z=1.5)
    assert np.allclose(out, rows.mean(axis=0) - 1.5 * rows.std(axis=0))
    assert out[0] == pytest.approx(2.0 - 1.5 * np.sqrt(2 / 3))


@pytest.mark.parametrize("epsilon", [0.1, 100.0])
def test_ipm_reverses_the_honest_update(epsilon: float) -> None:
    anchor = np.array([1.0, 1.0, 1.0])
    mean = np.array([1.5, 0.5, 1.2])
    sent = ipm(anchor, mean, epsilon)
    honest_update = mean - anchor
    assert np.dot(sent - anchor, honest_update) == pytest.approx(
        -epsilon * np.dot(honest_update, honest_update)
    )


def test_dissensus_with_epsilon_one_cancels_the_gossip_step() -> None:
    """He et al. 2022: b Byzantine neighbours with equal weights undo the target's averaging."""
    rng = np.random.default_rng(1)
    target = rng.normal(size=4)
    honest = rng.normal(size=(3, 4))
    b = 2
    sent = dissensus(target, honest, byzantine_neighbours=b, epsilon=1.0)
    received = np.vstack([honest, np.stack([sent] * b)])
    weights = np.full(1 + 3 + b, 1.0 / (1 + 3 + b))
    assert np.allclose(gossip_mean(target, received, weights, 0), target)
    # With epsilon > 1 the target is pushed away from its honest neighbours.
    pushed = dissensus(target, honest, byzantine_neighbours=b, epsilon=2.0)
    after = gossip_mean(target, np.vstack([honest, [pushed] * b]), weights, 0)
    assert np.linalg.norm(after - honest.mean(axis=0)) > np.linalg.norm(
        target - honest.mean(axis=0)
    )


def test_craft_sends_one_model_to_all_or_one_per_recipient() -> None:
    v = view()
    params = attack_params("sign_flip", {})
    out = craft("sign_flip", v, ["h0", "h1"], params, attack_rng(0, "x", 1))
    assert np.array_equal(out["h0"], out["h1"])
    assert out["h0"].dtype == v.own.dtype
    assert np.allclose(out["h0"], -v.honest_mean(), atol=1e-6)

    per = craft("dissensus", v, ["h0", "h1", "colluder"], attack_params("dissensus", {}), None)
    assert not np.array_equal(per["h0"], per["h1"])
    assert np.array_equal(per["colluder"], v.own)  # not a target: gets the honest model

    eq = craft("equivocation", v, ["h0", "h1", "h2", "h3"], attack_params("equivocation", {}), None)
    honest_half = [r for r in eq if np.array_equal(eq[r], v.own)]
    assert honest_half == ["h0", "h1"]
    assert np.array_equal(eq["h2"], eq["h3"]) and not np.array_equal(eq["h2"], v.own)


def test_gaussian_and_random_are_reproducible_per_round_and_the_right_shape() -> None:
    v = view()
    for name in ("gaussian", "random"):
        params = attack_params(name, {})
        a = craft(name, v, ["h0"], params, attack_rng(7, "byzantine_0", 3))["h0"]
        b = craft(name, v, ["h0"], params, attack_rng(7, "byzantine_0", 3))["h0"]
        c = craft(name, v, ["h0"], params, attack_rng(7, "byzantine_0", 4))["h0"]
        assert a.shape == v.own.shape and np.array_equal(a, b) and not np.array_equal(a, c)


def test_label_flip_flips_the_asked_fraction() -> None:
    y = np.array([0, 1] * 50, dtype=np.float32)
    assert np.array_equal(flip_labels(y, 1.0, np.random.default_rng(0)), 1 - y)
    half = flip_labels(y, 0.5, np.random.default_rng(0))
    assert int((half != y).sum()) == 50
    assert np.array_equal(flip_labels(y, 0.0, np.random.default_rng(0)), y)
    with pytest.raises(ValueError, match=r"fraction must be in \[0, 1\]"):
        flip_labels(y, 1.5, np.random.default_rng(0))


# --------------------------------------------------------------------------- the attacker


def adversary(name: str, colluders: tuple[str, ...] = (), **params: float) -> Adversary:
    return Adversary(
        name,
        params,
        identity=ATTACKER,
        peers=PEERS[:2],
        colluders=list(colluders),
        seed=0,
        initial=STATE,
        max_message_bytes=4096,
    )


def test_the_attackers_update_opens_at_an_honest_peer_and_is_the_poison() -> None:
    attacker = adversary("sign_flip")
    honest = {"alice": shifted(0.1), "bob": shifted(-0.1)}
    messages = attacker.messages(1, shifted(0.0), STATE, honest)
    assert len(messages) == 1 and messages[0].abuse is None
    assert {p.name for p in messages[0].recipients} == {"alice", "bob"}
    opened = opener_for(ALICE).open(messages[0].data)
    sent = flatten(opened.update.tensors)
    expected = -np.mean([flatten(s) for s in (shifted(0.0), *honest.values())], axis=0)
    assert np.allclose(sent, expected, atol=1e-6)


def test_colluders_get_the_honest_model_and_are_never_counted_as_honest() -> None:
    attacker = adversary("sign_flip", colluders=("bob",))
    assert [p.name for p in attacker.honest_peers] == ["alice"]
    own = shifted(0.0)
    messages = attacker.messages(1, own, STATE, {"alice": shifted(0.2)})
    to_bob = next(m for m in messages if {p.name for p in m.recipients} == {"bob"})
    assert np.allclose(flatten(opener_for(BOB).open(to_bob.data).update.tensors), flatten(own))


def test_stale_resends_the_model_it_had_age_rounds_ago() -> None:
    attacker = adversary("stale", age=2)
    sent = []
    for r in (1, 2, 3):
        anchor = shifted(float(r))
        message = attacker.messages(r, shifted(9.0), anchor, {})[0]
        sent.append(flatten(opener_for(ALICE).open(message.data).update.tensors))
    assert np.allclose(sent[0], flatten(STATE))  # before round 1: the shared starting model
    assert np.allclose(sent[1], flatten(shifted(1.0)))
    assert np.allclose(sent[2], flatten(shifted(2.0)))


def test_equivocation_sends_two_different_envelopes_in_one_round() -> None:
    attacker = adversary("equivocation")
    messages = attacker.messages(1, shifted(0.0), STATE, {"alice": shifted(0.1)})
    assert len(messages) == 2
    a = flatten(opener_for(ALICE).open(messages[0].data).update.tensors)
    b = flatten(opener_for(BOB).open(messages[1].data).update.tensors)
    assert not np.allclose(a, b)


def test_equivocation_and_dissensus_envelopes_make_a_verifying_proof() -> None:
    for name in ("equivocation", "dissensus"):
        attacker = adversary(name)
        honest = {"alice": shifted(0.1), "bob": shifted(-0.3)}
        messages = attacker.messages(1, shifted(0.0), STATE, honest)
        assert len(messages) == 2, name
        a = opener_for(ALICE).open(messages[0].data).receipt
        b = opener_for(BOB).open(messages[1].data).receipt
        proof = EquivocationProof.of(a, b)
        assert proof.verify() and proof.sender == ATTACKER.public_key and proof.round == 1


def test_attackers_frame_honest_peers_with_evidence_that_cannot_verify() -> None:
    attacker = adversary("sign_flip", colluders=("bob",))
    messages = attacker.messages(3, shifted(0.0), STATE, {"alice": shifted(0.2)})
    update = opener_for(ALICE).open(messages[0].data).update
    alice = ALICE.public_key
    assert [r.sender for r in update.receipts] == [alice]  # never about its colluder bob
    assert [p.sender for p in update.proofs] == [alice]
    assert all(r.round == 2 and not r.verify() for r in update.receipts)
    assert not update.proofs[0].verify()
    # The framing has a generator of its own: the crafted model is what it was without it.
    again = adversary("gaussian").messages(2, shifted(0.0), STATE, {})
    model = flatten(opener_for(ALICE).open(again[0].data).update.tensors)
    rng = attack_rng(0, ATTACKER.name, 2)
    expected = gaussian(flatten(shifted(0.0)).astype(np.float64), rng, 1.0)
    assert np.allclose(model, expected.astype(np.float32))


def test_the_adversary_reports_itself_loudly() -> None:
    status = adversary("alie").status()
    assert status["attack"] == "alie" and status["class"] == "model_poisoning"
    assert "ADVERSARY MODE" in status["warning"]


# --------------------------------------------------------------------------- protocol abuse


def reason_of(opener: EnvelopeOpener, data: bytes, sender: bytes | None = None) -> str:
    with pytest.raises(WireError) as caught:
        opener.open(data, sender=sender)
    return caught.value.reason.value


def test_each_protocol_abuse_builder_is_refused_with_its_reason() -> None:
    opener = opener_for(ALICE)
    keys = [ALICE.public_key, BOB.public_key]
    genuine = build_envelope(ModelUpdate(STATE), ATTACKER, keys, 1)
    opener.open(genuine)
    assert reason_of(opener, genuine) == RejectReason.REPLAY
    assert (
        reason_of(opener, outsider_envelope(ModelUpdate(STATE), keys, 1))
        == RejectReason.UNKNOWN_SENDER
    )
    fresh = build_envelope(ModelUpdate(STATE), ATTACKER, keys, 1)
    forged = impersonated_envelope(fresh, ATTACKER.public_key, BOB.public_key)
    assert reason_of(opener, forged) == RejectReason.BAD_SIGNATURE
    # Posted over HTTP, the request signature is the attacker's own: refused before that.
    assert reason_of(opener, forged, ATTACKER.public_key) == RejectReason.SENDER_MISMATCH
    assert reason_of(opener, oversize_message(100)[:50] + genuine) == RejectReason.MALFORMED
    garbage, truncated, flipped = malformed_messages(fresh, np.random.default_rng(0))
    assert reason_of(opener, garbage) == RejectReason.MALFORMED
    assert reason_of(opener, truncated) == RejectReason.MALFORMED
    assert reason_of(opener, flipped) == RejectReason.BAD_SIGNATURE
    assert len(oversize_message(4096)) == 4097
    with pytest.raises(ValueError, match="sender"):
        impersonated_envelope(fresh, ALICE.public_key, BOB.public_key)


def test_a_protocol_abuser_sends_its_honest_update_and_then_only_refused_messages() -> None:
    attacker = adversary("protocol_abuse", count=1)
    opener = opener_for(ALICE)
    first = attacker.messages(1, shifted(0.0), STATE, {})
    opener.open(first[0].data)  # round 1: its honest update is accepted
    assert first[0].abuse is None
    assert np.allclose(
        flatten(opener_for(BOB).open(first[0].data).update.tensors), flatten(shifted(0.0))
    )
    second = attacker.messages(2, shifted(0.1), STATE, {})
    opener.open(second[0].data)
    abuse = second[1:]
    assert {m.abuse for m in abuse} == {
        "replay",
        "outsider",
        "impersonate",
        "oversize",
        "malformed",
    }
    for message in abuse:
        if message.abuse == "outsider":  # sent as the outsider sends it: signed by its key
            assert message.signer is not None
            assert peek_envelope(message.data).sender == message.signer.public_key
            assert message.signer.public_key not in {p.public_key for p in attacker.peers}
        else:
            assert message.signer is None  # the attacker's own request signature
        if message.abuse == "oversize":
            assert len(message.data) > attacker.max_message_bytes  # refused before it is read
            continue
        assert reason_of(opener, message.data) in {
            RejectReason.REPLAY,
            RejectReason.UNKNOWN_SENDER,
            RejectReason.BAD_SIGNATURE,
            RejectReason.MALFORMED,
        }, message.abuse


# --------------------------------------------------------------------------- in a study network


STUDY = bytes(range(32))  # the attacked network's manifest hash


def test_in_a_study_network_the_attackers_updates_carry_its_study_and_open() -> None:
    """An attacker is a member: its envelopes carry the study, so a study node opens them
    (they reach robust aggregation) instead of refusing them as unknown_study."""
    study_opener = EnvelopeOpener(ALICE, Allowlist(PEERS), SPEC, study=STUDY)
    unbound = adversary("sign_flip").messages(1, shifted(0.0), STATE, {})[0]
    assert reason_of(study_opener, unbound.data) == RejectReason.UNKNOWN_STUDY  # the old bug
    for name, params in [
        ("sign_flip", {}),
        ("alie", {"n": 3, "f": 1}),
        ("equivocation", {}),
        ("stale", {}),
        ("gaussian", {}),
    ]:
        attacker = Adversary(
            name,
            params,
            identity=ATTACKER,
            peers=PEERS[:2],
            seed=0,
            initial=STATE,
            max_message_bytes=4096,
            study=STUDY,
        )
        messages = attacker.messages(1, shifted(0.0), STATE, {"alice": shifted(0.1)})
        to_alice = next(m for m in messages if "alice" in {p.name for p in m.recipients})
        opener = EnvelopeOpener(ALICE, Allowlist(PEERS), SPEC, study=STUDY)
        opened = opener.open(to_alice.data)
        assert opened.sender.name == "byzantine_0" and opened.round == 1, name


def test_in_a_study_network_protocol_abuse_is_refused_for_what_it_is_not_its_study() -> None:
    attacker = Adversary(
        "protocol_abuse",
        {"count": 1},
        identity=ATTACKER,
        peers=PEERS[:2],
        seed=0,
        initial=STATE,
        max_message_bytes=4096,
        study=STUDY,
    )
    opener = EnvelopeOpener(ALICE, Allowlist(PEERS), SPEC, study=STUDY)
    opener.open(attacker.messages(1, shifted(0.0), STATE, {})[0].data)
    second = attacker.messages(2, shifted(0.1), STATE, {})
    opener.open(second[0].data)
    reasons = {m.abuse: reason_of(opener, m.data) for m in second[1:] if m.abuse != "oversize"}
    assert reasons["replay"] == RejectReason.REPLAY
    assert reasons["outsider"] == RejectReason.UNKNOWN_SENDER
    assert reasons["impersonate"] == RejectReason.BAD_SIGNATURE
    assert RejectReason.UNKNOWN_STUDY not in reasons.values()


def test_the_radius_attack_sits_just_inside_the_screening_radius_reversing_the_update() -> None:
    from murmur.gossip.aggregation import coordinate_median, distances_to, screen_inputs
    from murmur.gossip.attacks import radius_attack

    rng = np.random.default_rng(3)
    anchor = rng.normal(size=50)
    honest = anchor + 0.2 + rng.normal(scale=0.05, size=(5, 50))  # the round moved them by +0.2
    poison = radius_attack(honest, anchor, 0.99)
    # What a victim (honest[0]) sees: four honest neighbours and three copies of the poison.
    received = np.vstack([honest[1:], np.tile(poison, (3, 1))])
    screened = screen_inputs(honest[0], received, 3, spread=1.5)
    assert not screened.pulled.any() and not screened.muted.any()
    # At 0.99 of the radius it estimates from the honest models alone: 1.5 times the farthest
    # honest model's distance from their median (the victim's, with the poison in, is wider).
    centre = coordinate_median(honest[0], honest[1:])
    estimate = 1.5 * distances_to(centre, honest).max()
    assert np.linalg.norm(poison - centre) == pytest.approx(0.99 * estimate)
    assert estimate <= screened.radius
    # It points against the honest update: away from where the honest models went.
    update = honest.mean(axis=0) - anchor
    assert float(np.dot(poison - screened.centre, update)) < 0
