"""Announced DP noise parameters (issue 19): signed in the body, checked against the plan
(out-of-plan claims refused as ``dp_out_of_plan``, counted), and each sender measured with
the noise its own honest model carries, so a tiny honest DP site is not muted as too far.

gossip/noise_claims.py (the claim and its wire form), node/noise_plan.py (the plan's check
and the yardstick), gossip/trust.py ``own_distance_limits`` and gossip/aggregation.py
``twins`` (per sender), node/receiver.py (the refusal).
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from murmur.crypto.allowlist import Allowlist, Peer
from murmur.crypto.identity import generate_identity, load_identity
from murmur.gossip.aggregation import dp_noise_norm, screen_inputs, twins
from murmur.gossip.noise_claims import NOISE_FIELD, NoiseClaim, NoiseClaimError
from murmur.gossip.trust import (
    DP_OWN_NOISE_MARGIN,
    TrustSettings,
    own_distance_limit,
    own_distance_limits,
)
from murmur.gossip.wire import (
    EnvelopeOpener,
    ModelUpdate,
    RejectReason,
    WireError,
    WireLimits,
    build_envelope,
)
from murmur.models.privacy import PrivacyLedger
from murmur.models.training import poisson_sample_rate
from murmur.node.audit import records_of_kind
from murmur.node.noise_plan import REASON, NoisePlan

from tests.netutil import build_node

ALICE, BOB = generate_identity("alice"), generate_identity("bob")
ALLOWLIST = Allowlist(
    Peer(identity.name, f"http://127.0.0.1:{9000 + i}", identity.public_key)
    for i, identity in enumerate([ALICE, BOB])
)
STATE = {"w": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.ones(3, dtype=np.float32)}
SPEC = {name: (array.shape, "float32") for name, array in STATE.items()}
NOW = 1_800_000_000.0


def plan(**changes: Any) -> NoisePlan:
    """The bench's plan: epsilon 1, C 1, batch 32, one local epoch, 20 rounds, lr 0.1."""
    fields = dict(
        dp=True,
        epsilon=1.0,
        delta=None,
        max_grad_norm=1.0,
        accountant="pld",
        batch_size=32,
        local_epochs=1,
        local_steps=0,
        rounds=20,
        learning_rate=0.1,
        ledger_steps_per_step=1,
        min_site_patients=9,
    )
    return NoisePlan(**{**fields, **changes})


def open_update(claim: NoiseClaim | None) -> ModelUpdate:
    data = build_envelope(ModelUpdate(STATE, noise=claim), ALICE, [BOB.public_key], 3, now=NOW)
    return EnvelopeOpener(BOB, ALLOWLIST, SPEC, WireLimits()).open(data, now=NOW).update


# --------------------------------------------------------------------------- the wire


def test_a_claim_travels_in_the_signed_body_and_a_bad_one_is_malformed() -> None:
    claim = plan().claim_for(120)
    assert open_update(claim).noise == claim
    assert open_update(None).noise is None

    class Negative(NoiseClaim):  # builds, then encodes a noise multiplier no sender has
        def encode(self) -> dict[str, float | int]:
            return {**super().encode(), "noise_multiplier": -1.0}

    bad = Negative(**dataclasses.asdict(claim))
    with pytest.raises(WireError) as excinfo:
        open_update(bad)
    assert excinfo.value.reason is RejectReason.MALFORMED
    assert "noise_multiplier" in excinfo.value.detail
    with pytest.raises(NoiseClaimError, match="exactly"):
        NoiseClaim.decode({**claim.encode(), "extra": 1.0})
    with pytest.raises(NoiseClaimError, match="steps"):
        NoiseClaim.decode({**claim.encode(), "steps": 1.5})
    assert NOISE_FIELD == "dp_noise"


def test_a_claim_changed_on_the_way_does_not_verify() -> None:
    """The claim is inside the encrypted, signed body: a relay cannot raise it."""
    data = bytearray(
        build_envelope(
            ModelUpdate(STATE, noise=plan().claim_for(120)), ALICE, [BOB.public_key], 3, now=NOW
        )
    )
    data[-40] ^= 1  # inside the ciphertext
    with pytest.raises(WireError) as excinfo:
        EnvelopeOpener(BOB, ALLOWLIST, SPEC, WireLimits()).open(bytes(data), now=NOW)
    assert excinfo.value.reason in (RejectReason.BAD_SIGNATURE, RejectReason.DECRYPT_FAILED)


# --------------------------------------------------------------------------- the plan


@pytest.mark.parametrize("patients", [9, 31, 120, 303])
def test_what_an_honest_site_announces_is_in_plan(patients: int) -> None:
    """The claim a site's own ledger and trainer make (as node/study.py builds it)."""
    q = poisson_sample_rate(patients, 32)
    ledger = PrivacyLedger.plan(
        epsilon=1.0,
        delta=None,
        n_patients=patients,
        sample_rate=q,
        planned_steps=20 * round(1 / q),
        max_grad_norm=1.0,
    )
    claim = NoiseClaim(
        noise_multiplier=ledger.noise_multiplier,
        max_grad_norm=1.0,
        sample_rate=q,
        expected_batch_size=q * patients,
        steps=round(1 / q),
        learning_rate=0.1,
    )
    assert plan().check(claim) is None
    assert plan().claim_for(patients) == claim


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"noise_multiplier": 2.0}, "noise multiplier"),  # more noise than that size has
        ({"max_grad_norm": 4.0}, "clipping bound"),
        ({"learning_rate": 0.5}, "learning rate"),
        ({"steps": 50}, "steps a round"),
        ({"sample_rate": 0.3}, "not 1 / (steps per epoch)"),
        ({"expected_batch_size": 7.3}, "whole number"),
        ({"steps": 3}, "steps a round"),  # fewer steps than the plan gives that size
        ({"sample_rate": 1e-300}, "no site has more"),  # no accountant call for 1e300 rows
        ({"expected_batch_size": 1e9}, "no site has more"),
    ],
)
def test_claims_outside_the_plan_are_refused_with_the_reason(
    change: dict[str, float], words: str
) -> None:
    honest = plan().claim_for(120)
    if "noise_multiplier" in change:
        change = {"noise_multiplier": honest.noise_multiplier * change["noise_multiplier"]}
    why = plan().check(dataclasses.replace(honest, **change))
    assert why is not None and words in why


def test_a_site_smaller_than_the_plan_admits_is_refused_and_the_loudest_claim_is_its_floor() -> (
    None
):
    tiny = plan(min_site_patients=1).claim_for(3)  # honest for a plan that admits 3 rows
    why = plan(min_site_patients=9).check(tiny)
    assert why is not None and "at least 9" in why
    # the sample rate must follow from the claimed size at the plan's batch size
    forged = dataclasses.replace(plan().claim_for(120), sample_rate=1.0, expected_batch_size=120.0)
    assert "does not follow" in (plan().check(forged) or "")
    d = 31
    loudest = plan().loudest_claim(d)
    assert loudest == plan().claim_for(9)
    # no in-plan claim has more noise than the loudest
    for n in (9, 10, 20, 32, 33, 64, 120):
        assert plan().claim_for(n).noise_norm(d) <= loudest.noise_norm(d) * (1 + 1e-9)
    # not always the smallest site: 33 rows take two steps of B = 16.5 where 32 take one of 32
    at_32 = plan(min_site_patients=32)
    assert at_32.claim_for(33).noise_norm(d) > at_32.claim_for(32).noise_norm(d)
    assert at_32.loudest_claim(d).patients != 32
    assert plan(min_site_patients=None).loudest_claim() is None
    assert "without DP-SGD" in (plan(dp=False).check(loudest) or "")


def test_the_yardstick_is_the_senders_noise_capped_at_ours_without_a_smallest_site() -> None:
    d = 31
    tiny, large = plan().claim_for(9), plan().claim_for(300)
    own = large.noise_norm(d)
    assert tiny.noise_norm(d) > 3 * own  # a 9-row site is far noisier than a 300-row one
    assert plan().yardstick(tiny, own, d) == pytest.approx(tiny.noise_norm(d))
    assert plan(min_site_patients=None).yardstick(tiny, own, d) == own
    assert plan().yardstick(None, own, d) == own
    assert plan().yardstick(large, None, d) is None
    assert tiny.noise_norm(d) == dp_noise_norm(
        tiny.noise_multiplier, 1.0, tiny.expected_batch_size, 0.1, tiny.steps, d
    )


# --------------------------------------------------------------------------- per sender


def test_own_distance_limits_follow_each_senders_noise() -> None:
    settings = TrustSettings()
    own_noise = 0.3
    limits = own_distance_limits(settings, 0.1, own_noise, [0.3, 1.0, None, 0.05])
    assert limits[0] == own_distance_limit(settings, 0.1, own_noise) == DP_OWN_NOISE_MARGIN * 0.3
    assert limits[1] == pytest.approx(DP_OWN_NOISE_MARGIN * math.sqrt((0.09 + 1.0) / 2))
    assert limits[2] == limits[0]  # unknown: our own noise stands in
    assert limits[3] < limits[0]  # a quieter (larger) site is held closer
    assert own_distance_limits(TrustSettings(max_relative_distance=2.0), 1.0, 0.3, [5.0])[0] == 2


def test_twins_per_pair_spare_two_quiet_sites_that_a_noisy_node_would_take_for_twins() -> None:
    rng = np.random.default_rng(0)
    d = 400
    own = rng.standard_normal(d) * 1.0 / math.sqrt(d)  # a noisy site: noise length 1
    quiet = [rng.standard_normal(d) * 0.1 / math.sqrt(d) for _ in range(2)]  # length 0.1 each
    received = np.stack(quiet)
    assert np.linalg.norm(quiet[0] - quiet[1]) < 0.3  # closer than 0.3 x our noise
    assert twins(own, received, 0.3 * 1.0).all()  # one threshold: honest sites taken for twins
    per_input = 0.3 * np.array([1.0, 0.1, 0.1])
    assert not twins(own, received, per_input).any()
    # identical colluders are still twins whatever noise they claim
    same = np.stack([quiet[0], quiet[0]])
    assert twins(own, same, 0.3 * np.array([1.0, 5.0, 5.0])).all()
    with pytest.raises(ValueError, match="one per input"):
        twins(own, received, np.ones(2))


def test_a_tiny_honest_sites_model_is_muted_with_our_yardstick_and_kept_with_its_own() -> None:
    """Screening as node/aggregator.py runs it: a large site (noise 0.3) hears four large
    neighbours and a 9-row site whose honest model carries noise 1.3 (the bench's
    hospital_0 has 1.03 against 0.30-0.37), plus some drift. With our own noise as its
    yardstick the tiny site is muted as too far; with the noise it announced it is not. What
    a claim cannot widen is the screening radius around the robust centre: a sign flip that
    claims the same (loudest) noise is pulled in to it either way."""
    rng = np.random.default_rng(1)
    d = 62
    consensus = rng.standard_normal(d) * 0.1

    def model(noise: float) -> np.ndarray:
        return consensus + rng.standard_normal(d) * noise / math.sqrt(d)

    own = model(0.3)
    honest = [model(0.3) for _ in range(4)]
    tiny = model(1.3) + 0.3 * rng.standard_normal(d) / math.sqrt(d)  # its label skew
    flip = -3 * consensus - model(0.3)
    received = np.stack([*honest, tiny, flip])
    settings = TrustSettings()
    own_norm = float(np.linalg.norm(own))

    def screen(peer_noise: list[float]) -> Any:
        return screen_inputs(
            own,
            received,
            2,
            floor=3 * 0.3,
            own_limit=own_distance_limits(settings, own_norm, 0.3, peer_noise),
            twin_distance=0.3 * np.array([0.3, *peer_noise]),
        )

    blind = screen([0.3] * 6)
    assert blind.muted[4] and blind.muted[5] and not blind.muted[:4].any()
    announced = screen([0.3, 0.3, 0.3, 0.3, 1.3, 1.3])  # the attacker claims a 9-row site too
    assert not announced.muted[4] and not announced.muted[:4].any()
    assert announced.radius == blind.radius == pytest.approx(0.9)
    assert announced.pulled[5] and announced.distances[5] > 3 * announced.radius
    assert np.linalg.norm(announced.rows[5] - announced.centre) == pytest.approx(0.9, rel=1e-5)


# --------------------------------------------------------------------------- the node


def _envelope(tmp_path: Path, node: Any, claim: NoiseClaim | None, round_: int = 1) -> bytes:
    peer = load_identity(tmp_path / "keys" / "hospital_1.key")
    update = ModelUpdate(node.study.state(), noise=claim)
    return build_envelope(update, peer, [node.identity.public_key], round_)


async def test_the_node_refuses_an_out_of_plan_claim_counts_it_and_takes_an_honest_one(
    tmp_path: Path,
) -> None:
    node = build_node(
        tmp_path,
        nodes=3,
        privacy={"enabled": True, "epsilon": 1.0, "min_site_patients": 20},
        training={"learning_rate": 0.1},
    )
    try:
        own = node.study.noise_claim()
        assert own is not None and node.noise_plan.check(own) is None
        loud = dataclasses.replace(own, noise_multiplier=own.noise_multiplier * 3)
        status, reason, detail = await node.receiver.receive(_envelope(tmp_path, node, loud))
        assert (status, reason) == (422, REASON) and "noise multiplier" in detail
        small = node.noise_plan.claim_for(12)  # a site the plan does not admit
        status, reason, detail = await node.receiver.receive(_envelope(tmp_path, node, small, 2))
        assert (status, reason) == (422, REASON) and "at least 20" in detail
        assert node.state.rejected[REASON] == 2
        assert node.metrics.rejected.labels(reason=REASON)._value.get() == 2
        refused = [
            r
            for r in records_of_kind(node.state_dir, "message_received")
            if r.fields.get("reason") == REASON
        ]
        assert [r.fields["sender"] for r in refused] == ["hospital_1", "hospital_1"]
        honest = node.noise_plan.claim_for(20)
        assert (await node.receiver.receive(_envelope(tmp_path, node, honest, 3)))[0] == 202
        assert node.state.rejected[REASON] == 2
    finally:
        node.audit.close()


async def test_a_tiny_honest_dp_site_is_not_muted_by_a_node_that_reads_its_claim(
    tmp_path: Path,
) -> None:
    """The node's own path, receiver to aggregation: hospital_0 (about a hundred rows) hears
    two neighbours as noisy as itself and a 5-row site whose honest model carries its far
    larger DP noise. Sent with its claim, the tiny site's model is aggregated with its weight;
    the same model without a claim is measured with hospital_0's own noise and muted."""
    from murmur.models.params import flatten, state_sha256, unflatten

    node = build_node(
        tmp_path,
        nodes=4,
        privacy={"enabled": True, "epsilon": 1.0, "min_site_patients": 5},
        training={"learning_rate": 0.1},
        aggregation={"rule": "clipping", "f": 1},
    )
    try:
        own_state = node.study.state()
        own = flatten(own_state)
        own_noise = node.study.dp_noise_norm()
        d = node.study.trainable_parameters()
        tiny = node.noise_plan.claim_for(5)
        assert tiny.noise_norm(d) > 5 * own_noise  # the 5-row site is that much noisier
        rng = np.random.default_rng(0)

        def noisy(length: float) -> dict[str, np.ndarray]:
            step = rng.standard_normal(own.size)
            return unflatten(
                (own + step * length / np.linalg.norm(step)).astype(np.float32), own_state
            )

        def send(round_: int, name: str, state: Any, claim: NoiseClaim | None) -> bytes:
            key = load_identity(tmp_path / "keys" / f"{name}.key")
            update = ModelUpdate(state, noise=claim)
            return build_envelope(update, key, [node.identity.public_key], round_)

        tiny_model = noisy(tiny.noise_norm(d))
        large = node.study.noise_claim()
        muted = {}
        for round_, claim in ((1, tiny), (2, None)):
            for name, state, sent in (
                ("hospital_1", noisy(own_noise), large),
                ("hospital_2", noisy(own_noise), large),
                ("hospital_3", tiny_model, claim),
            ):
                assert (await node.receiver.receive(send(round_, name, state, sent)))[0] == 202
            got = await node.inbox.collect(
                round_, ["hospital_1", "hospital_2", "hospital_3"], 5.0, node.stop
            )
            node.aggregator.aggregate(round_, own_state, state_sha256(own_state), got.messages)
            record = records_of_kind(node.state_dir, "aggregation")[-1]
            muted[claim is not None] = {
                p["peer"] for p in record.fields.get("pulled_in", []) if p["muted"]
            }
        assert muted[True] == set()  # with its claim: kept
        assert muted[False] == {"hospital_3"}  # without: muted as too far
        assert node.state.too_far == {"hospital_3": 1}
    finally:
        node.audit.close()
