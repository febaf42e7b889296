"""The Byzantine attack suite: what a malicious or broken hospital sends instead of its model.

For tests and demos only. A node runs an attack only when its config has an ``[adversary]``
section (``run_cluster.py --byzantine K --attack NAME``), and it says so loudly in its log,
``/status`` and the report (docs/robustness.md).

Model attacks are pure functions of an :class:`AttackView`, the attacker's knowledge in one
round, and return one flat model vector per recipient. The attackers are as strong as in the
papers they come from: they **collude** (they know each other, so they never count each other
as honest) and they **rush**: a Byzantine node waits until its honest neighbours' round-r
models have arrived before it sends its own round-r message, so ALIE, IPM and dissensus use the
honest statistics of the very round they attack. The view holds:

* ``own``: the attacker's own honestly trained model this round (it trains like an honest node,
  on a copy of an honest hospital's data, and aggregates only honest models, so it tracks the
  honest consensus);
* ``anchor``: its model at the start of the round, before training;
* ``honest``: the round-r models of its honest neighbours, by name (on a complete graph, every
  honest hospital; on a sparse graph, only its neighbours);
* ``stale``: the model it had ``age`` rounds ago, before training (for free riding; the
  shared starting model if that is before round 1).

Protocol-abuse attacks do not craft models: the builders in gossip/abuse.py produce the
abusive messages (replays, outsider-signed and impersonated envelopes, oversize and malformed
bytes) that a receiver must reject with a reason code. They are sent as the attacker would
send them: with a request signature (gossip/auth.py) of the attacker's own key, or, for an
outsider's envelope, of the outsider's key (which the receiver refuses as `unauthenticated`
before reading the body).

Every attacker also tries to **frame** its honest neighbours: instead of honest receipts
(gossip/receipts.py) its updates carry made-up receipts and proofs claiming that each honest
neighbour signed two different envelopes in the previous round. Their signatures cannot verify,
so receivers must ignore them (evidence against nobody); the attacker never reports the
receipts of its colluders' envelopes, which would convict them.
"""

from __future__ import annotations

import hashlib
import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from murmur.crypto.allowlist import Peer
from murmur.crypto.identity import Identity, generate_identity
from murmur.gossip.abuse import (
    forged_evidence,
    impersonated_envelope,
    malformed_messages,
    outsider_envelope,
    oversize_message,
)
from murmur.gossip.aggregation import SCREENING_SPREAD, coordinate_median, distances_to
from murmur.gossip.noise_claims import NoiseClaim
from murmur.gossip.receipts import AuditHead, no_audit_head
from murmur.gossip.wire import (
    ModelUpdate,
    build_envelope,
)
from murmur.models.params import ModelState, flatten, state_sha256, unflatten

# --------------------------------------------------------------------------- the attack table


@dataclass(frozen=True)
class AttackInfo:
    """One attack: its class (for docs and tests), default parameters and what it needs."""

    kind: str  # model_poisoning, data_poisoning, free_riding, equivocation, protocol_abuse
    defaults: dict[str, float]
    summary: str
    per_recipient: bool = False  # different models to different neighbours in one round


ATTACKS: dict[str, AttackInfo] = {
    "sign_flip": AttackInfo(
        "model_poisoning", {"scale": 1.0}, "the honest mean model negated: -scale * mean"
    ),
    "scaled_boost": AttackInfo(
        "model_poisoning",
        {"scale": 5.0},
        "model replacement (Bagdasaryan et al. 2020): anchor + scale * (-mean - anchor), "
        "boosted so that averaging lands on the negated model",
    ),
    "gaussian": AttackInfo(
        "model_poisoning", {"std": 1.0}, "the honest mean plus N(0, std^2) noise per coordinate"
    ),
    "alie": AttackInfo(
        "model_poisoning",
        {"z": -1.0},
        "a little is enough (Baruch et al. 2019): mean - z * std per coordinate; z < 0 means "
        "the paper's z_max from the network size n and the number of attackers f",
    ),
    "ipm": AttackInfo(
        "model_poisoning",
        {"epsilon": 0.1},
        "inner-product manipulation (Xie et al. 2020): anchor - epsilon * (mean - anchor)",
    ),
    "dissensus": AttackInfo(
        "model_poisoning",
        {"epsilon": 1.5},
        "dissensus (He et al. 2022): to each neighbour i, x_i - epsilon * "
        "sum_j (x_j - x_i) / b_i, undoing (epsilon = 1) or reversing i's gossip step",
        per_recipient=True,
    ),
    "radius": AttackInfo(
        "model_poisoning",
        {"fraction": 0.99},
        "adaptive (knows the screening): the robust centre plus fraction times the screening "
        "radius, in the direction that reverses the honest round's update",
    ),
    "label_flip": AttackInfo(
        "data_poisoning",
        {"fraction": 1.0},
        "trains honestly on its own data with a fraction of the labels flipped",
    ),
    "stale": AttackInfo(
        "free_riding",
        {"age": 1.0},
        "never trains: re-sends the model it had age rounds ago (1: the model it was sent, "
        "averaged, untouched)",
    ),
    "random": AttackInfo(
        "free_riding",
        {"scale": 1.0},
        "random weights of the right shape: N(0, (scale * std of the honest mean)^2)",
    ),
    "equivocation": AttackInfo(
        "equivocation",
        {"scale": 5.0},
        "two-faced: its honest model to half of its neighbours, the scaled_boost model to the "
        "other half, in the same round",
        per_recipient=True,
    ),
    "replay": AttackInfo(
        "protocol_abuse", {}, "re-sends old authentic envelopes (its own and its neighbours')"
    ),
    "outsider": AttackInfo(
        "protocol_abuse", {"count": 2.0}, "envelopes signed by keys that were never admitted"
    ),
    "impersonate": AttackInfo(
        "protocol_abuse",
        {"count": 2.0},
        "its own envelope with an admitted neighbour's key put in the sender field",
    ),
    "flood": AttackInfo(
        "protocol_abuse", {"count": 4.0}, "floods of oversize and malformed messages"
    ),
    "protocol_abuse": AttackInfo(
        "protocol_abuse", {"count": 2.0}, "replay, outsider, impersonate and flood together"
    ),
}

MODEL_ATTACKS = frozenset(
    name for name, info in ATTACKS.items() if info.kind not in ("data_poisoning", "protocol_abuse")
)
PROTOCOL_ATTACKS = frozenset(n for n, i in ATTACKS.items() if i.kind == "protocol_abuse")


def attack_params(name: str, given: Mapping[str, float]) -> dict[str, float]:
    """The attack's defaults overridden by ``given``; unknown names and keys are refused."""
    if name not in ATTACKS:
        raise ValueError(f"unknown attack {name!r}; choose one of {', '.join(ATTACKS)}")
    defaults = ATTACKS[name].defaults
    unknown = set(given) - set(defaults) - {"n", "f"}
    if unknown:
        known = ", ".join(defaults) or "none"
        raise ValueError(
            f"attack {name!r} has no parameter {', '.join(sorted(unknown))}; its parameters: "
            f"{known}"
        )
    params = {**defaults, **{k: float(v) for k, v in given.items()}}
    for key, value in params.items():
        if not math.isfinite(value):
            raise ValueError(f"attack parameter {key} must be a finite number, got {value!r}")
    return params


# --------------------------------------------------------------------------- what attackers know


@dataclass(frozen=True)
class AttackView:
    """Everything a (colluding, rushing) attacker knows when it crafts its round-r message."""

    own: np.ndarray
    anchor: np.ndarray
    honest: Mapping[str, np.ndarray]
    stale: np.ndarray
    round: int
    byzantine_neighbours: Mapping[str, int] = field(default_factory=dict)

    def honest_rows(self) -> np.ndarray:
        """The honest models it knows, its own honestly trained one included: ``(m, d)``."""
        return np.stack([self.own, *self.honest.values()]).astype(np.float64)

    def honest_mean(self) -> np.ndarray:
        return self.honest_rows().mean(axis=0)


# --------------------------------------------------------------------------- model attacks


def sign_flip(mean: np.ndarray, scale: float = 1.0) -> np.ndarray:
    """The honest mean model negated (a pipeline that flips the sign of every weight)."""
    return -scale * mean


def scaled_boost(anchor: np.ndarray, mean: np.ndarray, scale: float = 5.0) -> np.ndarray:
    """Model replacement with boosting: aim at the negated model and scale the step by
    ``scale`` around the anchor, so that a plain average of n inputs with weight 1/n each
    lands on the target when scale = n (Bagdasaryan et al. 2020, Bhagoji et al. 2019)."""
    target = -mean
    return anchor + scale * (target - anchor)


def gaussian(mean: np.ndarray, rng: np.random.Generator, std: float = 1.0) -> np.ndarray:
    """The honest mean with N(0, std^2) noise on every coordinate."""
    return mean + rng.normal(0.0, std, size=mean.shape)


def alie_z(n: int, f: int) -> float:
    """Baruch et al. 2019's z_max: the largest shift that still hides among the honest values.

    s = floor(n / 2 + 1) - f honest values must be "behind" the attacker for a majority-based
    rule to pick it, so z = Phi^-1((n - s) / n).
    """
    if n < 2 or not 0 <= f < n:
        raise ValueError(f"ALIE needs 0 <= f < n and n >= 2 (got n={n}, f={f})")
    s = math.floor(n / 2 + 1) - f
    p = (n - s) / n
    p = min(max(p, 1e-6), 1 - 1e-6)
    return statistics.NormalDist().inv_cdf(p)


def alie(rows: np.ndarray, z: float) -> np.ndarray:
    """A little is enough: mean - z * std, per coordinate, over the honest models."""
    return rows.mean(axis=0) - z * rows.std(axis=0)


def ipm(anchor: np.ndarray, mean: np.ndarray, epsilon: float) -> np.ndarray:
    """Inner-product manipulation: the honest round's update, reversed and scaled by epsilon.

    Xie et al. 2020 send -epsilon * (mean honest gradient); in model space that is the anchor
    moved by -epsilon times the honest update. Small epsilon (0.1) hides from robust rules and
    makes the aggregate's inner product with the true update negative; large epsilon (100)
    overwhelms averaging.
    """
    return anchor - epsilon * (mean - anchor)


def dissensus(
    target: np.ndarray, others: np.ndarray, byzantine_neighbours: int, epsilon: float
) -> np.ndarray:
    """Dissensus (He, Karimireddy & Jaggi 2022) against one neighbour i with model ``target``.

    Gossip moves i by sum_j w_ij (x_j - x_i). With equal weights (complete and regular graphs
    under Metropolis-Hastings), b Byzantine neighbours each sending
    ``x_i - epsilon * sum_j (x_j - x_i) / b`` cancel that step (epsilon = 1) or push i away from
    its honest neighbours (epsilon > 1). ``others`` are the honest models the attacker knows
    other than i's own.
    """
    b = max(1, int(byzantine_neighbours))
    if others.shape[0] == 0:
        return target.copy()
    pull = (others - target).sum(axis=0)
    return target - epsilon * pull / b


def radius_attack(
    rows: np.ndarray, anchor: np.ndarray, fraction: float, spread: float = SCREENING_SPREAD
) -> np.ndarray:
    """An attacker that knows the screening (gossip/aggregation.py ``screen_inputs``): it sits
    at ``fraction`` of the screening radius from the robust centre, so it is never pulled in
    nor muted, in the worst direction it can pick, the honest round's update reversed (the
    negated honest mean if that update is zero). It estimates the centre as the coordinate-wise
    median and the radius as ``spread`` times the farthest honest model's distance from it (the
    (n - f)-th smallest distance when the attackers sit farther out), from the honest models
    it knows; a DP floor, which it does not compute, only widens the real radius."""
    rows = np.asarray(rows, dtype=np.float64)
    centre = coordinate_median(rows[0], rows[1:])
    radius = spread * float(distances_to(centre, rows).max())
    direction = anchor - rows.mean(axis=0)
    length = float(np.linalg.norm(direction))
    if length == 0.0:
        direction, length = -rows.mean(axis=0), float(np.linalg.norm(rows.mean(axis=0)))
    if length == 0.0:
        return centre
    return centre + (fraction * radius / length) * direction


def random_weights(mean: np.ndarray, rng: np.random.Generator, scale: float = 1.0) -> np.ndarray:
    """Random weights of the right shape, spread like the honest model's own entries."""
    spread = float(np.std(mean)) or 1.0
    return rng.normal(0.0, scale * spread, size=mean.shape)


def craft(
    name: str,
    view: AttackView,
    recipients: Sequence[str],
    params: Mapping[str, float],
    rng: np.random.Generator,
) -> dict[str, np.ndarray]:
    """The model each recipient gets from this attacker in this round (same dtype as ``own``).

    ``params`` are complete (see :func:`attack_params`); ``n`` and ``f`` in them (network size
    and number of attackers) give ALIE its default z. Attacks that do not poison the model
    (label flipping trains on bad data and sends what it trained; protocol abuse sends its
    honest model besides its abusive messages) send ``own`` to everyone.
    """
    if name not in ATTACKS:
        raise ValueError(f"unknown attack {name!r}; choose one of {', '.join(ATTACKS)}")
    if name == "dissensus":
        return {r: _dissensus_for(r, view, params["epsilon"]) for r in recipients}
    if name == "equivocation":
        # Honest to the first half of its neighbours (by name), poison to the rest.
        mean, anchor = view.honest_mean(), view.anchor.astype(np.float64)
        poisoned = _as_model(scaled_boost(anchor, mean, params["scale"]), view.own)
        ordered = sorted(recipients)
        honest_half = set(ordered[: len(ordered) // 2])
        return {r: (view.own if r in honest_half else poisoned) for r in recipients}
    vector = _as_model(_one_model(name, view, params, rng), view.own)
    return {r: vector for r in recipients}


def _one_model(
    name: str, view: AttackView, params: Mapping[str, float], rng: np.random.Generator
) -> np.ndarray:
    """The model of an attack that sends the same thing to every neighbour."""
    mean, anchor = view.honest_mean(), view.anchor.astype(np.float64)
    match name:
        case "sign_flip":
            return sign_flip(mean, params["scale"])
        case "scaled_boost":
            return scaled_boost(anchor, mean, params["scale"])
        case "gaussian":
            return gaussian(mean, rng, params["std"])
        case "alie":
            z = params["z"]
            if z < 0:
                z = alie_z(int(params.get("n", 0)), int(params.get("f", 0)))
            return alie(view.honest_rows(), z)
        case "ipm":
            return ipm(anchor, mean, params["epsilon"])
        case "radius":
            return radius_attack(view.honest_rows(), anchor, params["fraction"])
        case "stale":
            return view.stale
        case "random":
            return random_weights(mean, rng, params["scale"])
        case _:  # label_flip and protocol abuse send what they trained
            return view.own


def _dissensus_for(recipient: str, view: AttackView, epsilon: float) -> np.ndarray:
    if recipient not in view.honest:  # a colluder, or a neighbour that has not spoken yet
        return view.own
    others = [v for k, v in view.honest.items() if k != recipient] or [view.own]
    vector = dissensus(
        view.honest[recipient].astype(np.float64),
        np.stack(others).astype(np.float64),
        view.byzantine_neighbours.get(recipient, 1),
        epsilon,
    )
    return _as_model(vector, view.own)


def flip_labels(y: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Data poisoning: a copy of the 0/1 labels with ``fraction`` of them flipped at random."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"label_flip fraction must be in [0, 1], got {fraction!r}")
    flipped = np.array(y, copy=True)
    count = round(fraction * len(flipped))
    chosen = rng.choice(len(flipped), size=count, replace=False)
    flipped[chosen] = 1 - flipped[chosen]
    return flipped


def attack_rng(seed: int, name: str, round_: int) -> np.random.Generator:
    """A generator that depends only on the attacker's seed, name and round (reproducible)."""
    digest = hashlib.sha256(f"{seed}/{name}/{round_}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def _as_model(vector: np.ndarray, own: np.ndarray) -> np.ndarray:
    out = np.asarray(vector, dtype=np.float64)
    # Keep the payload finite: a non-finite model would only test the wire's non_finite check.
    out = np.clip(np.nan_to_num(out, nan=0.0), -1e30, 1e30)
    return out.astype(own.dtype)


# --------------------------------------------------------------------------- the attacker


@dataclass(frozen=True)
class Outgoing:
    """One message an attacker sends this round: an update (``abuse`` is None) or abuse.
    ``signer`` signs the HTTP request (None: the attacker's own key)."""

    recipients: tuple[Peer, ...]
    data: bytes
    model_sha256: str | None = None
    abuse: str | None = None
    signer: Identity | None = None


class Adversary:
    """A Byzantine node's attack across rounds: what to send, built from what it knows.

    The node owns the network; this class only decides and builds messages. ``peers`` are the
    node's neighbours; ``colluders`` the other attackers (never treated as honest). ``study``
    is the manifest hash of the study the network runs (None: no study): an attacker is a
    member and knows it, so its envelopes carry it like honest ones; without it every
    envelope would be refused as ``unknown_study`` and never reach robust aggregation.
    ``noise`` is the DP noise claim its crafted models announce (gossip/noise_claims.py): the
    adversary mode announces the loudest one the plan accepts (node/byzantine.py), which
    widens the distance at which honest nodes mute its models as far as any claim can.
    """

    def __init__(
        self,
        name: str,
        params: Mapping[str, float],
        *,
        identity: Identity,
        peers: Sequence[Peer],
        colluders: Sequence[str] = (),
        seed: int = 0,
        byzantine_neighbours: Mapping[str, int] | None = None,
        initial: ModelState,
        max_message_bytes: int,
        study: bytes | None = None,
        noise: NoiseClaim | None = None,
    ) -> None:
        self.name = name
        self.study = study
        self.noise = noise
        self.params = attack_params(name, params)
        self.identity = identity
        self.peers = list(peers)
        self.colluders = frozenset(colluders)
        self.seed = seed
        self.byzantine_neighbours = dict(byzantine_neighbours or {})
        self.initial = flatten(initial)
        self._anchors: dict[int, np.ndarray] = {}
        self.max_message_bytes = max_message_bytes
        self._old_envelopes: dict[int, list[bytes]] = {}

    @property
    def kind(self) -> str:
        return ATTACKS[self.name].kind

    @property
    def rushes(self) -> bool:
        """Whether it waits for its honest neighbours' models before sending (model attacks)."""
        return self.name in MODEL_ATTACKS

    @property
    def honest_peers(self) -> list[Peer]:
        return [p for p in self.peers if p.name not in self.colluders]

    def describe(self) -> str:
        return describe(self.name, self.params)

    def status(self) -> dict[str, Any]:
        """The ``adversary`` entry of the node's /status."""
        return {
            "attack": self.name,
            "class": self.kind,
            "params": {k: v for k, v in self.params.items() if k not in ("n", "f")},
            "colluders": sorted(self.colluders),
            "warning": "ADVERSARY MODE: this node attacks its neighbours (tests and demos only)",
        }

    def _stale(self, round_: int, anchor: np.ndarray) -> np.ndarray:
        """Its model from ``age`` rounds ago (age 1: this round's, before training)."""
        self._anchors[round_] = anchor
        age = max(1, int(self.params.get("age", 1)))
        for old in [r for r in self._anchors if r <= round_ - age]:
            del self._anchors[old]
        return self._anchors.get(round_ - age + 1, self.initial)

    def remember(self, round_: int, envelope: bytes) -> None:
        """Keep authentic envelopes (received or sent) for replaying later; two rounds kept."""
        self._old_envelopes.setdefault(round_, []).append(envelope)
        for old in [r for r in self._old_envelopes if r < round_ - 2]:
            del self._old_envelopes[old]

    def messages(
        self,
        round_: int,
        own: ModelState,
        anchor: ModelState,
        honest: Mapping[str, ModelState],
        head: AuditHead | None = None,
    ) -> list[Outgoing]:
        """Everything this attacker sends in round ``round_``.

        ``own`` is its honestly trained model, ``anchor`` its model before training, ``honest``
        the round's models of its honest neighbours that have arrived, ``head`` the node's
        signed audit head (its updates carry it as honest ones do; default: all zero).
        """
        head = no_audit_head() if head is None else head
        view = AttackView(
            own=flatten(own),
            anchor=flatten(anchor),
            honest={k: flatten(v) for k, v in honest.items() if k not in self.colluders},
            stale=self._stale(round_, flatten(anchor)),
            round=round_,
            byzantine_neighbours=self.byzantine_neighbours,
        )
        rng = attack_rng(self.seed, self.identity.name, round_)
        names = [p.name for p in self.peers]
        models = craft(self.name, view, names, self.params, rng)
        # Colluders get the honest model: they ignore each other's updates anyway.
        for name in self.colluders & set(names):
            models[name] = view.own
        out = self._updates(round_, models, own, head)
        if self.kind == "protocol_abuse":
            out.extend(self._abuse(round_, own, head, out[0].data, rng))
        return out

    def _updates(
        self, round_: int, models: dict[str, np.ndarray], template: ModelState, head: AuditHead
    ) -> list[Outgoing]:
        """One envelope per distinct model, addressed to everyone who gets that model."""
        groups: dict[bytes, list[Peer]] = {}
        vectors: dict[bytes, np.ndarray] = {}
        for peer in self.peers:
            vector = models[peer.name]
            key = hashlib.sha256(vector.tobytes()).digest()
            groups.setdefault(key, []).append(peer)
            vectors[key] = vector
        # A generator of its own, so framing never changes the models the attack crafts.
        frame_rng = attack_rng(self.seed, f"{self.identity.name}/frame", round_)
        receipts, proofs = forged_evidence(
            [p.public_key for p in self.honest_peers], max(0, round_ - 1), frame_rng
        )
        out = []
        for key, peers in groups.items():
            state = unflatten(vectors[key], template)
            update = ModelUpdate(
                state, metrics={}, receipts=receipts, proofs=proofs, noise=self.noise
            )
            data = build_envelope(
                update,
                self.identity,
                [p.public_key for p in peers],
                round_,
                head=head,
                study=self.study,
            )
            self.remember(round_, data)
            out.append(Outgoing(tuple(peers), data, state_sha256(state)))
        return out

    def _abuse(
        self,
        round_: int,
        own: ModelState,
        head: AuditHead,
        sent: bytes,
        rng: np.random.Generator,
    ) -> list[Outgoing]:
        """The protocol-abuse messages of this round (each must be rejected by its receiver)."""
        targets = tuple(self.honest_peers)
        if not targets:
            return []
        kinds = (
            ("replay", "outsider", "impersonate", "flood")
            if self.name == "protocol_abuse"
            else (self.name,)
        )
        count = max(1, int(self.params.get("count", 1)))
        update = ModelUpdate(own, metrics={})
        keys = [p.public_key for p in targets]
        out: list[Outgoing] = []
        if "replay" in kinds:
            for data in self._old_envelopes.get(round_ - 1, []):
                out.append(Outgoing(targets, data, abuse="replay"))
        if "outsider" in kinds:
            for _ in range(count):
                outsider = generate_identity("outsider")
                data = outsider_envelope(update, keys, round_, outsider=outsider, study=self.study)
                out.append(Outgoing(targets, data, abuse="outsider", signer=outsider))
        if "impersonate" in kinds:
            for i in range(count):
                victim = targets[i % len(targets)]
                fresh = build_envelope(
                    update, self.identity, keys, round_, head=head, study=self.study
                )
                forged = impersonated_envelope(fresh, self.identity.public_key, victim.public_key)
                out.append(Outgoing(targets, forged, abuse="impersonate"))
        if "flood" in kinds:
            for _ in range(count):
                out.append(
                    Outgoing(targets, oversize_message(self.max_message_bytes), abuse="oversize")
                )
                for data in malformed_messages(sent, rng):
                    out.append(Outgoing(targets, data, abuse="malformed"))
        return out


def describe(name: str, params: Mapping[str, Any]) -> str:
    """One line for logs: the attack, its class and its parameters."""
    info = ATTACKS[name]
    shown = ", ".join(f"{k}={v:g}" for k, v in params.items() if k not in ("n", "f"))
    return f"{name} ({info.kind.replace('_', ' ')}{': ' + shown if shown else ''})"
