"""The consensus phase after the last training round (issue #21): every honest hospital ends
with a bit-identical model, signed by each of them. Pure: no I/O, no clock.

Why not keep averaging until the hashes agree: float averaging over a graph converges, it never
becomes bit-identical in finitely many rounds, and a Byzantine neighbour can keep it moving.
Instead the honest nodes agree on a *set* of signed final models and apply one pure robust rule
(gossip/aggregation.py) to that set, in one fixed order, in float64: equal inputs give equal
bits on every node.

Agreement on the set is Dolev-Strong's authenticated broadcast (1983), run for every member at
once over the gossip graph. Each member signs an offer (study, its key, the SHA-256 of its final
model) and sends it with the model at step 1. At step s a node accepts an offer it has not
accepted before if it carries valid signatures of s distinct members, the owner's first, and
the model hashes to what the owner signed; it then adds its own signature and forwards offer
and model to its neighbours at step s + 1. After `steps` steps each node keeps the owners with
exactly one accepted offer; an owner with two accepted offers signed two different final models
(the two offers are a proof anybody can check) and is left out by every honest node.

Why it agrees: an honest node signs only what it has accepted. So the first honest node to
accept a Byzantine owner's offer got it with signatures of Byzantine members only: at a step
s <= t, with t the most Byzantine members tolerated. It forwards it with s + 1 signatures, and
every honest node within d honest hops accepts it by step s + d. With `steps` >= t + D, where D
is the largest diameter the graph can have with t members removed (`steps_needed`), every offer
one honest node accepts is accepted by all of them, and every honest owner's offer reaches all
of them. A Byzantine member can: stay silent (its model is simply not in the set), send two
models (it is excluded, with proof), release an offer late (too few signatures for the step:
refused), forge a model or a signature (refused), or offer a poisoned model, whose weight the
robust rule bounds exactly as in a training round. It cannot add a model that is not signed by
a member, nor stop honest nodes from agreeing.

The agreed hash is then signed by every honest member (`agreed_signature`) and those
signatures are flooded for D more steps; `murmur model show` prints them.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import networkx as nx
import numpy as np
from murmur.crypto.identity import Identity, verify_signature
from murmur.gossip.aggregation import AGGREGATORS, distances_to, min_inputs
from murmur.models.params import flatten, model_spec, state_sha256, unflatten

State = dict[str, np.ndarray]
OFFER_DOMAIN = b"murmur-final-offer-v1\x00"
AGREED_DOMAIN = b"murmur-agreed-model-v1\x00"
MAX_VALUES_PER_OWNER = 2  # two conflicting offers prove equivocation; more add nothing


def _framed(*parts: bytes) -> bytes:
    return b"".join(len(p).to_bytes(4, "big") + p for p in parts)


@dataclass(frozen=True)
class FinalOffer:
    """What an owner signs at the end of training: this is my final model."""

    study: str
    owner: bytes
    model_sha256: str
    facts: str = "{}"  # the owner's signed card entry (canonical JSON): name, sizes, ε, δ

    def digest(self) -> bytes:
        return hashlib.sha256(
            OFFER_DOMAIN
            + _framed(
                self.study.encode(),
                self.owner,
                self.model_sha256.encode("ascii"),
                self.facts.encode("utf-8"),
            )
        ).digest()


@dataclass(frozen=True)
class SignedOffer:
    """An offer with its chain of member signatures (signer, signature), owner first."""

    offer: FinalOffer
    signatures: tuple[tuple[bytes, bytes], ...]

    def signers(self, members: frozenset[bytes]) -> tuple[bytes, ...] | None:
        """The distinct members whose signatures verify, or None if any does not (or the
        owner's is not first, or a signer repeats or is not a member)."""
        if not self.signatures or self.signatures[0][0] != self.offer.owner:
            return None
        keys = tuple(k for k, _ in self.signatures)
        if len(set(keys)) != len(keys) or not set(keys) <= members:
            return None
        digest = self.offer.digest()
        if not all(verify_signature(k, digest, s) for k, s in self.signatures):
            return None
        return keys

    def endorsed(self, identity: Identity) -> SignedOffer:
        return SignedOffer(
            self.offer,
            (*self.signatures, (identity.public_key, identity.sign(self.offer.digest()))),
        )


@dataclass(frozen=True)
class Delivery:
    """One offer as it travels: the signed offer and the model it names."""

    signed: SignedOffer
    model: State


@dataclass(frozen=True)
class EquivocationEvidence:
    """Two offers of one owner, each signed by it, naming different final models."""

    owner: bytes
    first: SignedOffer
    second: SignedOffer


def agreed_digest(study: str, model_sha256: str) -> bytes:
    return hashlib.sha256(AGREED_DOMAIN + _framed(study.encode(), model_sha256.encode())).digest()


def agreed_signature(identity: Identity, study: str, model_sha256: str) -> bytes:
    """A member's signature that ``model_sha256`` is the study's agreed model."""
    return identity.sign(agreed_digest(study, model_sha256))


def check_agreed_signature(public_key: bytes, study: str, model_sha256: str, sig: bytes) -> bool:
    return verify_signature(public_key, agreed_digest(study, model_sha256), sig)


def steps_needed(graph: nx.Graph, t: int, *, max_subsets: int = 20_000) -> tuple[int, int]:
    """(agreement steps t + D, signature steps D): D is the largest diameter of the graph with
    any t nodes removed. Raises ValueError if removing t nodes can disconnect it (then no
    protocol over this graph can reach every honest node)."""
    nodes = list(graph.nodes)
    worst = 0
    subsets = itertools.chain.from_iterable(itertools.combinations(nodes, k) for k in range(t + 1))
    for count, removed in enumerate(subsets):
        if count >= max_subsets:
            raise ValueError(f"too many {t}-subsets of {len(nodes)} nodes to check")
        rest = graph.subgraph(set(nodes) - set(removed))
        if len(rest) > 1 and not nx.is_connected(rest):
            raise ValueError(f"removing {sorted(removed)} disconnects the graph")
        worst = max(worst, nx.diameter(rest) if len(rest) > 1 else 0)
    return t + worst, worst


OUTLIER_FACTOR = 3.0
CENTRED_MEAN = "centred_mean"


def centred_mean(rows: np.ndarray, f: int) -> np.ndarray:
    """The mean of the final models after leaving out the (at most f) farthest from their
    coordinate-wise median that lie more than OUTLIER_FACTOR times the median distance away.

    Why not a training rule as it is: at the end the honest models are close together, and
    trimming or Krum-selecting drops honest models too, which moves the agreed model away from
    the honest mean (by more than the AUC target on Fed-Heart-Disease). This keeps every
    model that is not an outlier; one it keeps moves the mean by at most
    OUTLIER_FACTOR * median distance / n, which is the bound a Byzantine member gets.
    """
    centre = AGGREGATORS["median"](rows[0], rows[1:], np.full(len(rows), 1.0 / len(rows)), f)
    distance = np.concatenate([distances_to(centre, rows[:1]), distances_to(centre, rows[1:])])
    limit = OUTLIER_FACTOR * float(np.median(distance))
    farthest = np.argsort(-distance, kind="stable")[:f]
    drop = {int(i) for i in farthest if distance[i] > limit}
    keep = [i for i in range(len(rows)) if i not in drop]
    return rows[keep].mean(axis=0)


def aggregate_final(models: Mapping[bytes, State], rule: str, f: int) -> tuple[State, str]:
    """The agreed model: ``rule`` over the models sorted by owner key, in float64, as float32.

    Deterministic: the same set gives the same bits on every node. f is lowered to what the
    set's size allows under the rule's bound (gossip/aggregation.py, min_inputs)."""
    if not models:
        raise ValueError("no final models to aggregate")
    owners = sorted(models)
    template = models[owners[0]]
    spec = model_spec(template)
    for owner in owners:
        if model_spec(models[owner]) != spec:
            raise ValueError("final models of different shapes cannot be aggregated")
    rows = np.stack([flatten(models[o]).astype(np.float64) for o in owners])
    if rule == CENTRED_MEAN:
        vector = centred_mean(rows, f)
        state = unflatten(vector.astype(np.float32), template)
        return state, state_sha256(state)
    n = len(owners)
    usable = f
    while usable > 0 and n < min_inputs(rule, usable):
        usable -= 1
    weights = np.full(n, 1.0 / n)
    vector = AGGREGATORS[rule](rows[0], rows[1:], weights, usable)
    state = unflatten(np.asarray(vector, dtype=np.float64).astype(np.float32), template)
    return state, state_sha256(state)


@dataclass(frozen=True)
class Decision:
    """What one honest node ends with."""

    model: State
    model_sha256: str
    included: tuple[bytes, ...]  # owners whose final model is in the aggregate, sorted
    excluded: Mapping[bytes, str]  # owner -> why (equivocation, or no offer reached us)
    evidence: tuple[EquivocationEvidence, ...]
    facts: Mapping[bytes, str]  # owner -> its signed card entry, for the included owners


@dataclass
class ConsensusParty:
    """One honest member's side of the phase. Drive it with `outgoing(step)` (the same for
    every neighbour) and `receive(step, deliveries)`, steps 1..`steps`, then `decide()`."""

    identity: Identity
    members: frozenset[bytes]
    study: str
    final_model: State
    steps: int
    rule: str = CENTRED_MEAN
    f: int = 1
    facts: str = "{}"
    accepted: dict[bytes, dict[str, Delivery]] = field(default_factory=dict)
    fresh: list[Delivery] = field(default_factory=list)
    refused: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.identity.public_key not in self.members:
            raise ValueError("a consensus party must be a member")
        self._spec = model_spec(self.final_model)
        offer = FinalOffer(
            self.study, self.identity.public_key, state_sha256(self.final_model), self.facts
        )
        own = Delivery(SignedOffer(offer, ()).endorsed(self.identity), self.final_model)
        self.accepted[self.identity.public_key] = {offer.model_sha256: own}
        self.fresh = [own]

    def outgoing(self, step: int) -> list[Delivery]:
        """What to send every neighbour at ``step``: what was accepted at step - 1 (at step
        1 the own offer), each with this node's signature added; nothing after the last."""
        if step > self.steps:
            return []
        out, self.fresh = self.fresh, []
        me = self.identity.public_key
        return [
            d
            if any(k == me for k, _ in d.signed.signatures)
            else Delivery(d.signed.endorsed(self.identity), d.model)
            for d in out
        ]

    def _refuse(self, reason: str) -> str:
        self.refused[reason] = self.refused.get(reason, 0) + 1
        return reason

    def receive(self, step: int, deliveries: Sequence[Delivery]) -> list[str]:
        """Take what a neighbour sent at ``step``; returns the reason of each refusal."""
        reasons = []
        for d in deliveries:
            reason = self._check(step, d)
            if reason is not None:
                reasons.append(self._refuse(reason))
                continue
            offer = d.signed.offer
            values = self.accepted.setdefault(offer.owner, {})
            if offer.model_sha256 in values:
                continue  # already accepted: not news
            if len(values) >= MAX_VALUES_PER_OWNER:
                continue  # its equivocation is already proven here
            values[offer.model_sha256] = d
            if step < self.steps:
                self.fresh.append(d)
        return reasons

    def _check(self, step: int, d: Delivery) -> str | None:
        offer = d.signed.offer
        if not 1 <= step <= self.steps:
            return "consensus_step_out_of_range"
        if offer.study != self.study:
            return "consensus_wrong_study"
        signers = d.signed.signers(self.members)
        if signers is None:
            return "consensus_bad_signature"
        if len(signers) < step:
            return "consensus_too_few_signatures"
        try:
            if model_spec(d.model) != self._spec or state_sha256(d.model) != offer.model_sha256:
                return "consensus_model_mismatch"
        except (TypeError, ValueError):
            return "consensus_model_mismatch"
        return None

    def decide(self) -> Decision:
        """The agreed model over the owners with exactly one accepted offer."""
        models: dict[bytes, State] = {}
        facts: dict[bytes, str] = {}
        excluded: dict[bytes, str] = {}
        evidence = []
        for owner, values in self.accepted.items():
            if len(values) == 1:
                only = next(iter(values.values()))
                models[owner] = only.model
                facts[owner] = only.signed.offer.facts
            else:
                first, second = sorted(values.values(), key=lambda d: d.signed.offer.model_sha256)[
                    :2
                ]
                excluded[owner] = "equivocation: signed two different final models"
                evidence.append(EquivocationEvidence(owner, first.signed, second.signed))
        for owner in self.members - set(self.accepted):
            excluded[owner] = "no final offer reached this node in time"
        state, digest = aggregate_final(models, self.rule, self.f)
        return Decision(
            state,
            digest,
            tuple(sorted(models)),
            dict(sorted(excluded.items())),
            tuple(evidence),
            dict(sorted(facts.items())),
        )


@dataclass
class SignatureFlood:
    """The agreed hash's signatures, flooded for D steps after the decision."""

    identity: Identity
    members: frozenset[bytes]
    study: str
    model_sha256: str
    signatures: dict[bytes, bytes] = field(default_factory=dict)
    dissent: dict[bytes, str] = field(default_factory=dict)  # member -> other hash it signed
    _fresh: dict[bytes, bytes] = field(default_factory=dict)

    def __post_init__(self) -> None:
        own = agreed_signature(self.identity, self.study, self.model_sha256)
        self.signatures[self.identity.public_key] = own
        self._fresh = dict(self.signatures)

    def outgoing(self) -> list[tuple[bytes, str, bytes]]:
        out, self._fresh = self._fresh, {}
        return [(k, self.model_sha256, s) for k, s in out.items()]

    def receive(self, items: Sequence[tuple[bytes, str, bytes]]) -> None:
        for key, digest, sig in items:
            if key not in self.members or not check_agreed_signature(key, self.study, digest, sig):
                continue
            if digest != self.model_sha256:
                self.dissent[key] = digest
                continue
            if key not in self.signatures:
                self.signatures[key] = sig
                self._fresh[key] = sig


class Member:
    """What `run_in_memory` drives: an honest `ConsensusParty` or an attacker
    (gossip/consensus_attacks.py) that may send each neighbour something else."""

    def __init__(self, party: ConsensusParty) -> None:
        self.party = party

    def outgoing_to(self, step: int, recipient: bytes) -> list[Delivery]:
        return self._out.get(step, [])

    def prepare(self, step: int) -> None:
        self._out = {step: self.party.outgoing(step)}

    def receive(self, step: int, deliveries: Sequence[Delivery]) -> None:
        self.party.receive(step, deliveries)


@dataclass(frozen=True)
class PhaseResult:
    decisions: dict[bytes, Decision]
    signatures: dict[bytes, SignatureFlood]
    steps: int  # extra rounds the phase took: agreement steps + signature steps


def run_in_memory(
    members: Mapping[bytes, object],
    neighbours: Mapping[bytes, Sequence[bytes]],
    steps: int,
    signature_steps: int,
) -> PhaseResult:
    """Run the phase synchronously over a graph, every message delivered within its step
    (how bench/release.py and the tests run it; a node runs the same parties over the wire).

    ``members``: key -> `Member` (honest) or an attacker with `prepare`, `outgoing_to`,
    `receive`. Attackers get no decision; honest members flood their agreed signatures.
    """
    for step in range(1, steps + 1):
        for m in members.values():
            m.prepare(step)  # type: ignore[attr-defined]
        inbox: dict[bytes, list[Delivery]] = {k: [] for k in members}
        for sender, m in members.items():
            for recipient in neighbours[sender]:
                inbox[recipient].extend(m.outgoing_to(step, recipient))  # type: ignore[attr-defined]
        for key, m in members.items():
            m.receive(step, inbox[key])  # type: ignore[attr-defined]
    honest = {k: m.party for k, m in members.items() if isinstance(m, Member)}
    decisions = {k: p.decide() for k, p in honest.items()}
    floods = {
        k: SignatureFlood(p.identity, p.members, p.study, decisions[k].model_sha256)
        for k, p in honest.items()
    }
    for _ in range(signature_steps):
        sent = {k: fl.outgoing() for k, fl in floods.items()}
        for sender, items in sent.items():
            for recipient in neighbours[sender]:
                if recipient in floods:
                    floods[recipient].receive(items)
    return PhaseResult(decisions, floods, steps + signature_steps)
