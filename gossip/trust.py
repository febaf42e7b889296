"""Per-peer trust scores: down-weight, then quarantine, a neighbour that keeps sending outliers.

A robust rule limits what one bad update can do in one round; trust remembers across rounds.
After each aggregation the node measures every neighbour's distance from the robust aggregate
and divides it by a robust **scale**: the larger of the median distance over all n inputs (its
own model included) and the (n - f)-th smallest distance, where f is the number of Byzantine
neighbours the node is configured to tolerate (at least 1). A ratio is scale-free: it says
"this peer is r times as far from the consensus as the honest inputs", whatever the model size
or how far training has come. Honest hospitals whose data differ (a non-IID site like
Switzerland in Fed-Heart-Disease) sit consistently somewhat farther out; an attacker that
matters sits far out. Each round turns the ratio into a goodness in [0, 1]:

    goodness = 1 at ratio <= tolerance, 0 at ratio >= cutoff, linear in between

and the score is a running (exponentially weighted) mean of goodness, starting at 1:

    score <- decay * score + (1 - decay) * goodness

A peer whose score falls below ``downweight_below`` has its mixing weight scaled by
``score / downweight_below`` (rules that use weights: mean, clipping). Below
``quarantine_below`` it is quarantined: left out of aggregation altogether, with the evidence
(its recent ratios and score) returned so the node can log and audit it. Its messages are still
verified, counted and measured; after ``readmit_after`` consecutive rounds within tolerance it
is re-admitted. One bad round cannot quarantine anyone: from a score of 1 it takes
``ceil(log(quarantine_below) / log(decay))`` fully bad rounds (5 with the defaults).

Trust acts across rounds, so it is slow by design; one check acts within the round
(gossip/aggregation.py ``screen_inputs``): a model far from the robust centre is pulled in,
and one also farther from the node's own model than :func:`own_distance_limit` is muted
(weight 0 this round, still one of the rule's inputs), as in BALANCE (Fang et al., CCS 2024)
but without lowering the rule's f. Without DP, honest hospitals train from nearly the same
consensus, so their models sit well inside 1.5 times the own model's length; a model pointing
the other way (a sign flip sits at about twice the length) does not. Under DP the limit is at
least a multiple of the DP noise the node's own ledger says every honest model carries. It is
a per-round decision, not a judgement: the peer's trust score still follows its distance from
the aggregate.

Distances are statistical evidence; an equivocation proof (gossip/receipts.py) is
cryptographic evidence. A peer with a verified proof against it is quarantined at once and for
good (:meth:`TrustTracker.prove_equivocation`): its score drops to 0 and it is never
re-admitted, because an honest node never signs two different envelopes for one round.

Pure: no I/O, no clock. The state is plain data for the node's checkpoint.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

STATE_VERSION = 1
EVIDENCE_ROUNDS = 8
# Without DP, honest models stay well inside this many times the own model's length (measured
# across the whole bench/byzantine.py matrix, docs/robustness.md); a sign flip sits at about 2.
DEFAULT_MAX_RELATIVE_DISTANCE = 1.5
# Under DP: the own-model limit is at least this many times one round's expected DP noise
# length (honest pairs measured at 1.2-2.3 times it, 2.4 from the centre), and the screening
# radius around the robust centre is at least DP_CENTRE_NOISE_FLOOR times it (an honest model
# carries one round's noise from the centre, which averages the others' away).
# docs/robustness.md has the measurements.
DP_OWN_NOISE_MARGIN = 4.0
DP_CENTRE_NOISE_FLOOR = 3.0
# Under DP, a received model closer than this many times one round's expected DP noise length
# to another input is muted (gossip/aggregation.py twins): two honest models differ by about
# sqrt(2) times it, so this is a fifth of their usual distance.
DP_TWIN_FRACTION = 0.3


@dataclass(frozen=True)
class TrustSettings:
    """How quickly trust moves and where it acts (the ``[trust]`` config section)."""

    enabled: bool = True
    decay: float = 0.7
    tolerance: float = 3.0
    cutoff: float = 6.0
    downweight_below: float = 0.5
    quarantine_below: float = 0.2
    readmit_after: int = 10
    # None: DEFAULT_MAX_RELATIVE_DISTANCE times ||own||, under DP at least DP_OWN_NOISE_MARGIN
    # times the DP noise length (:func:`own_distance_limit`).
    max_relative_distance: float | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.decay < 1.0:
            raise ValueError(f"trust decay must be in [0, 1), got {self.decay!r}")
        if not 0.0 < self.tolerance < self.cutoff:
            raise ValueError(
                f"trust needs 0 < tolerance < cutoff, got tolerance={self.tolerance!r}, "
                f"cutoff={self.cutoff!r}"
            )
        if not 0.0 <= self.quarantine_below <= self.downweight_below <= 1.0:
            raise ValueError(
                "trust needs 0 <= quarantine_below <= downweight_below <= 1, got "
                f"{self.quarantine_below!r} and {self.downweight_below!r}"
            )
        if self.readmit_after < 1:
            raise ValueError(f"trust readmit_after must be >= 1, got {self.readmit_after!r}")
        limit = self.max_relative_distance
        if limit is not None and (isinstance(limit, bool) or not limit > 0):
            raise ValueError(
                "trust max_relative_distance must be a number > 0 (inf turns the check off), "
                f"got {self.max_relative_distance!r}"
            )


@dataclass
class PeerTrust:
    """What the node remembers about one neighbour."""

    score: float = 1.0
    quarantined: bool = False
    good_streak: int = 0
    recent_ratios: list[float] = field(default_factory=list)
    history: list[float] = field(default_factory=list)
    proven_equivocation_round: int | None = None  # the round its proof is about
    equivocation_proof: str | None = None  # the proof's encoding, hex (gossip/receipts.py)


@dataclass(frozen=True)
class TrustEvent:
    """A change of standing: ``quarantine``, ``readmit`` or ``equivocation_proof``, with the
    evidence for the log."""

    kind: str
    peer: str
    round: int
    evidence: dict[str, Any]


def distance_ratios(
    own_distance: float, distances: dict[str, float], f: int = 1
) -> dict[str, float]:
    """Each peer's distance from the aggregate over a robust scale of all inputs' distances.

    The scale is the larger of the median of the n distances (own included) and the
    (n - f)-th smallest, f >= 1. With at most f attackers and an honest majority among the
    inputs (own counts, and is honest from the node's point of view) the scale lies between the
    smallest and the largest honest distance, however the attackers place themselves: far away
    they cannot inflate it, sitting on the aggregate they cannot shrink it below every honest
    distance. Taking the (n - f)-th rather than the median keeps a spread-out but honest
    neighbourhood (non-IID sites, a sparse graph) within tolerance.

    If the scale is zero (most inputs equal to the aggregate), a peer at zero has ratio 0 and
    any other is infinitely far; an infinite distance (a model so large its distance
    overflows) is infinitely far.
    """
    values = sorted([own_distance, *distances.values()])
    if any(math.isnan(v) or v < 0 for v in values):
        raise ValueError("distances must be numbers >= 0 (infinity allowed, NaN not)")
    if isinstance(f, bool) or not isinstance(f, int) or f < 0:
        raise ValueError(f"f must be a whole number >= 0, got {f!r}")
    n, f = len(values), max(f, 1)
    scale = float(np.median(values))
    if n - f >= 1:
        scale = max(scale, values[n - f - 1])
    if scale <= 0.0:
        return {p: (0.0 if d == 0.0 else math.inf) for p, d in distances.items()}
    if math.isinf(scale):  # most inputs overflowed: the finite ones are the sane ones
        return {p: (0.0 if math.isfinite(d) else math.inf) for p, d in distances.items()}
    return {p: d / scale for p, d in distances.items()}


def own_distance_limit(settings: TrustSettings, own_norm: float, noise_norm: float | None) -> float:
    """How far from the node's own model a neighbour's model may lie before it is muted
    (gossip/aggregation.py ``screen_inputs``): ``max_relative_distance`` times ``||own||`` if
    configured; else 1.5 times ``||own||`` without DP; with DP, the larger of that and
    DP_OWN_NOISE_MARGIN times the expected length of one round's DP noise (``noise_norm``,
    from the node's own ledger), since two honest DP models differ by about sqrt(2) times that
    whatever their data (measured: 1.2-2.3 times on Fed-Heart-Disease at epsilon 1, up to 2.4
    times from the centre on the label-skewed 8-regular network). With DP
    and no noise figure (an optimizer that rescales the noise), the check is off."""
    if not (math.isfinite(own_norm) and own_norm > 0):
        return math.inf
    if settings.max_relative_distance is not None:
        return settings.max_relative_distance * own_norm
    if noise_norm is None:
        return DEFAULT_MAX_RELATIVE_DISTANCE * own_norm
    if not (math.isfinite(noise_norm) and noise_norm > 0):
        return math.inf
    return max(DEFAULT_MAX_RELATIVE_DISTANCE * own_norm, DP_OWN_NOISE_MARGIN * noise_norm)


def own_distance_limits(
    settings: TrustSettings,
    own_norm: float,
    own_noise: float | None,
    peer_noise: Sequence[float | None],
) -> np.ndarray:
    """:func:`own_distance_limit` for each received model, from the noise that sender's
    honest model carries (``peer_noise``: its announced and checked noise length,
    node/noise_plan.py; None: unknown, our own noise stands in).

    Two honest models with independent DP noise of lengths a and b differ by about
    sqrt(a^2 + b^2) plus their data's drift; the margin was measured for a = b, where that is
    sqrt(2) a, so a pair is measured with the noise length sqrt((a^2 + b^2) / 2), which is a
    itself for a neighbour as noisy as we are. A tiny site's honest model (a few times our
    noise) is no longer muted as too far; a large site's (less noise) is held closer."""
    limits = []
    for noise in peer_noise:
        pair = own_noise
        if own_noise is not None and noise is not None and math.isfinite(noise) and noise > 0:
            pair = math.sqrt((own_noise**2 + noise**2) / 2)
        limits.append(own_distance_limit(settings, own_norm, pair))
    return np.array(limits, dtype=np.float64)


def goodness(ratio: float, settings: TrustSettings) -> float:
    """1 within tolerance, 0 at or past the cutoff, linear in between."""
    if ratio <= settings.tolerance:
        return 1.0
    if ratio >= settings.cutoff:
        return 0.0
    return (settings.cutoff - ratio) / (settings.cutoff - settings.tolerance)


class TrustTracker:
    """Trust in each neighbour, updated once per round from distances to the aggregate."""

    def __init__(self, peers: list[str], settings: TrustSettings | None = None) -> None:
        self.settings = settings or TrustSettings()
        self.peers: dict[str, PeerTrust] = {p: PeerTrust() for p in peers}

    def weight(self, peer: str) -> float:
        """The factor on this peer's mixing weight: 0 in quarantine, else score / threshold
        capped at 1 (1 while trust is off)."""
        if not self.settings.enabled:
            return 1.0
        state = self.peers[peer]
        if state.quarantined:
            return 0.0
        if self.settings.downweight_below <= 0.0:
            return 1.0
        return min(1.0, state.score / self.settings.downweight_below)

    def quarantined(self) -> set[str]:
        if not self.settings.enabled:
            return set()
        return {p for p, s in self.peers.items() if s.quarantined}

    def proven(self) -> dict[str, int]:
        """Peers proven to equivocate, with the round each proof is about (even with trust
        off: the proof is a fact; only acting on it follows ``enabled``)."""
        return {
            p: s.proven_equivocation_round
            for p, s in self.peers.items()
            if s.proven_equivocation_round is not None
        }

    def prove_equivocation(
        self, peer: str, round_: int, proof_round: int, proof_hex: str
    ) -> TrustEvent | None:
        """Quarantine ``peer`` at once and permanently on a verified equivocation proof.

        ``round_`` is the node's round now, ``proof_round`` the round of the two conflicting
        envelopes. Returns the event to log, or None if the peer was already proven.
        """
        if peer not in self.peers:
            raise ValueError(f"trust: unknown peer {peer!r}")
        state = self.peers[peer]
        if state.proven_equivocation_round is not None:
            return None
        state.score = 0.0
        state.quarantined = True
        state.good_streak = 0
        state.proven_equivocation_round = proof_round
        state.equivocation_proof = proof_hex
        evidence = {"equivocation_round": proof_round, "proof": proof_hex, "permanent": True}
        return TrustEvent("equivocation_proof", peer, round_, evidence)

    def scores(self) -> dict[str, float]:
        return {p: round(s.score, 6) for p, s in self.peers.items()}

    def history(self) -> dict[str, list[float]]:
        return {p: list(s.history) for p, s in self.peers.items()}

    def observe(
        self, round_: int, own_distance: float, distances: dict[str, float], f: int = 1
    ) -> list[TrustEvent]:
        """Record one round: ``distances`` from each peer heard this round to the aggregate;
        ``f`` is the number of Byzantine neighbours the node tolerates (its rule's f).

        Peers not heard from keep their score. Returns the quarantines and re-admissions this
        round caused.
        """
        unknown = set(distances) - set(self.peers)
        if unknown:
            raise ValueError(f"trust: unknown peers {sorted(unknown)}")
        ratios = distance_ratios(own_distance, distances, f) if distances else {}
        events = []
        for peer, state in self.peers.items():
            if peer in ratios and state.proven_equivocation_round is None:
                events.extend(self._update(peer, state, round_, ratios[peer]))
            state.history.append(round(state.score, 6))
        return events

    def _update(self, peer: str, state: PeerTrust, round_: int, ratio: float) -> list[TrustEvent]:
        s = self.settings
        state.score = s.decay * state.score + (1.0 - s.decay) * goodness(ratio, s)
        state.recent_ratios = [*state.recent_ratios, _finite(ratio)][-EVIDENCE_ROUNDS:]
        state.good_streak = state.good_streak + 1 if ratio <= s.tolerance else 0
        if not s.enabled:
            return []
        evidence = {
            "score": round(state.score, 6),
            "recent_distance_ratios": [round(r, 4) for r in state.recent_ratios],
            "tolerance": s.tolerance,
            "cutoff": s.cutoff,
            "quarantine_below": s.quarantine_below,
        }
        if not state.quarantined and state.score < s.quarantine_below:
            state.quarantined = True
            state.good_streak = 0
            return [TrustEvent("quarantine", peer, round_, evidence)]
        if state.quarantined and state.good_streak >= s.readmit_after:
            state.quarantined = False
            return [
                TrustEvent("readmit", peer, round_, {**evidence, "good_rounds": s.readmit_after})
            ]
        return []

    # ------------------------------------------------------------------ checkpoints

    def to_state(self) -> dict[str, Any]:
        return {"version": STATE_VERSION, "peers": {p: asdict(s) for p, s in self.peers.items()}}

    @classmethod
    def from_state(
        cls, state: dict[str, Any], peers: list[str], settings: TrustSettings | None = None
    ) -> TrustTracker:
        """Restore from :meth:`to_state`; peers added since start fresh, removed ones are
        dropped."""
        version = state.get("version") if isinstance(state, dict) else None
        if version != STATE_VERSION:
            raise ValueError(
                f"trust state has version {version!r}, expected {STATE_VERSION}: "
                "delete the checkpoint's trust entry to start afresh"
            )
        tracker = cls(peers, settings)
        for peer, saved in state.get("peers", {}).items():
            if peer in tracker.peers:
                tracker.peers[peer] = PeerTrust(
                    score=float(saved["score"]),
                    quarantined=bool(saved["quarantined"]),
                    good_streak=int(saved["good_streak"]),
                    recent_ratios=[float(r) for r in saved["recent_ratios"]],
                    history=[float(h) for h in saved["history"]],
                    proven_equivocation_round=_optional_int(saved.get("proven_equivocation_round")),
                    equivocation_proof=saved.get("equivocation_proof"),
                )
        return tracker


def _optional_int(value: Any) -> int | None:
    return None if value is None else int(value)


def _finite(ratio: float) -> float:
    """Ratios go into JSON evidence; an infinite ratio is recorded as a large number."""
    return ratio if math.isfinite(ratio) else 1e9
