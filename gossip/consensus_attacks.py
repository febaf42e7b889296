"""ADVERSARY MODE for the consensus phase (tests and bench only): what a Byzantine member can
try against gossip/consensus.py. Each attacker is driven by `consensus.run_in_memory` like an
honest `Member`, but may send each neighbour something different.

    silent       sends nothing (its model is simply not in the set)
    equivocate   signs two final models and sends one to half its neighbours, the other to
                 the rest (both accepted somewhere: excluded everywhere, with proof)
    poison       offers a model crafted by the training-round attack suite (gossip/attacks.py:
                 scaled_boost of its model, or sign_flip), properly signed: it is in the set
                 and the robust rule bounds it
    late         holds its offer back and sends it, with its signature alone, to one neighbour
                 at the last step (too few signatures for that step: refused)
    forge        relays honest offers with a tampered model and with a forged signature
    selective    sends its offer to one neighbour only (Dolev-Strong relaying brings it to all)
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from murmur.crypto.identity import Identity
from murmur.gossip import attacks
from murmur.gossip.consensus import (
    Delivery,
    FinalOffer,
    SignedOffer,
)
from murmur.models.params import flatten, state_sha256, unflatten

State = dict[str, np.ndarray]
CONSENSUS_ATTACKS = ("silent", "equivocate", "poison", "late", "forge", "selective")


def _offer(identity: Identity, study: str, model: State) -> Delivery:
    offer = FinalOffer(study, identity.public_key, state_sha256(model))
    return Delivery(SignedOffer(offer, ()).endorsed(identity), model)


def poisoned(model: State, how: str = "scaled_boost") -> State:
    """A final model built by the adversary mode's model attacks."""
    vector = flatten(model).astype(np.float64)
    if how == "sign_flip":
        bad = attacks.sign_flip(vector, scale=10.0)
    else:
        bad = attacks.scaled_boost(np.zeros_like(vector), vector, scale=10.0)
    return unflatten(bad.astype(np.float32), model)


class ConsensusAttacker:
    """A Byzantine member running one attack of `CONSENSUS_ATTACKS`."""

    def __init__(
        self,
        identity: Identity,
        attack: str,
        study: str,
        model: State,
        neighbours: Sequence[bytes],
        steps: int,
    ) -> None:
        if attack not in CONSENSUS_ATTACKS:
            raise ValueError(f"unknown consensus attack {attack!r}; one of {CONSENSUS_ATTACKS}")
        self.identity = identity
        self.attack = attack
        self.study = study
        self.model = model
        self.neighbours = sorted(neighbours)
        self.steps = steps
        self.seen: list[Delivery] = []
        self.step = 0

    def prepare(self, step: int) -> None:
        self.step = step

    def outgoing_to(self, step: int, recipient: bytes) -> list[Delivery]:
        a = self.attack
        if a == "silent":
            return []
        if a == "equivocate" and step == 1:
            first_half = self.neighbours.index(recipient) < max(1, len(self.neighbours) // 2)
            return [
                _offer(
                    self.identity, self.study, self.model if first_half else poisoned(self.model)
                )
            ]
        if a == "poison" and step == 1:
            return [_offer(self.identity, self.study, poisoned(self.model, "sign_flip"))]
        if a == "late" and step == self.steps and recipient == self.neighbours[0]:
            return [_offer(self.identity, self.study, poisoned(self.model))]
        if a == "selective" and step == 1 and recipient == self.neighbours[0]:
            return [_offer(self.identity, self.study, self.model)]
        if a == "forge" and step >= 2:
            return [self._forged(d, i) for i, d in enumerate(self.seen)]
        return []

    def _forged(self, d: Delivery, i: int) -> Delivery:
        if i % 2 == 0:  # a tampered model under the honest owner's signed hash
            return Delivery(d.signed, poisoned(d.model))
        fake = FinalOffer(
            d.signed.offer.study, d.signed.offer.owner, state_sha256(poisoned(d.model))
        )
        owner, sig = d.signed.signatures[0]
        return Delivery(
            SignedOffer(
                fake, ((owner, sig), (self.identity.public_key, self.identity.sign(fake.digest())))
            ),
            poisoned(d.model),
        )

    def receive(self, step: int, deliveries: Sequence[Delivery]) -> None:
        self.seen = list(deliveries)  # forge replays what it got last step, tampered
