"""Combining this node's model with its neighbours' by the configured robust rule, and
scoring every neighbour for trust from the result.

Why its own part: the rules themselves are pure functions (gossip/aggregation.py); what this
adds is the node's policy around them, which is what the audit log must explain for every
round: who is left out (proven equivocators only) and whose model was pulled in or muted as
far (screening, which never lowers the rule's f: issue 19 item 4), the Metropolis-Hastings
mixing weights scaled by trust (0 in quarantine), and the fallback to our own model when too
few inputs arrived or the combination overflowed. It runs in a worker thread (node/rounds.py),
so it touches only the trust tracker, the audit log, the metrics and its corner of the node's
state.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from murmur.gossip import blocks
from murmur.gossip.aggregation import SCREENING_SPREAD, distances_to, min_inputs, mute
from murmur.gossip.blocks import ModelRows
from murmur.gossip.trust import (
    DP_CENTRE_NOISE_FLOOR,
    DP_TWIN_FRACTION,
    TrustTracker,
    own_distance_limits,
)
from murmur.models.params import flatten, state_sha256, unflatten
from murmur.node.audit import AuditLog
from murmur.node.config import NodeConfig
from murmur.node.metrics import NodeMetrics
from murmur.node.mixing import PATIENTS, patient_weights, uncounted
from murmur.node.noise_plan import NoisePlan
from murmur.node.receiver import ReceivedUpdate
from murmur.node.state import NodeState

log = logging.getLogger("murmur.node")

State = dict[str, np.ndarray]


@dataclass(frozen=True)
class Screened:
    """The heard neighbours, split into those aggregated and those left out (with why)."""

    names: list[str]  # aggregated, in order
    inputs: list[dict[str, Any]]  # {peer, model_sha256} of each aggregated one
    left_out: list[dict[str, Any]]  # {peer, model_sha256, reason}
    f: int  # the Byzantine inputs the rule must still tolerate among `names`


class RoundAggregator:
    """One round's aggregation and trust update (`aggregate`).

    `ignored` names peers whose models are never aggregated at all (not even scored): empty
    for an honest node; node/byzantine.py sets it to an attacker's colluders.
    """

    def __init__(
        self,
        config: NodeConfig,
        *,
        trust: TrustTracker,
        peer_degree: dict[str, int],
        own_degree: int | None = None,
        audit: AuditLog,
        metrics: NodeMetrics,
        state: NodeState,
        on_trust_change: Callable[[], None],
        outer_step: Callable[[State, np.ndarray, dict[str, Any]], np.ndarray] | None = None,
        noise_norm: Callable[[], float | None] | None = None,
        noise_plan: NoisePlan | None = None,
        noise_parameters: int | None = None,
    ) -> None:
        self._config = config
        self._trust = trust
        self._peer_degree = peer_degree
        # This node's degree in the mixing matrix: its peer count, or the sample size s when
        # it sends to s sampled peers a round (gossip/sampling.py).
        self._own_degree = own_degree if own_degree is not None else len(peer_degree)
        self._audit = audit
        self._metrics = metrics
        self._state = state
        self._on_trust_change = on_trust_change
        # the study's server-optimizer step on the robust aggregate (node/study.py)
        self._outer_step = outer_step
        # the expected length of this round's DP noise on our model (node/study.py), or None
        self._noise_norm = noise_norm
        # each sender's yardstick from its announced, checked DP noise (node/noise_plan.py)
        self._noise_plan = noise_plan
        self._noise_parameters = noise_parameters  # the d DP noise is added to
        self.ignored: frozenset[str] = frozenset()

    def set_degrees(self, degrees: dict[str, int]) -> None:
        """A membership change (node/governance.py): the peers' degrees now. A peer that
        left keeps its last degree, so a model it sent before leaving still weighs right."""
        self._peer_degree.update(degrees)
        self._own_degree = len(degrees)

    def aggregate(
        self,
        r: int,
        own_state: State,
        own_sha: str,
        received: dict[str, ReceivedUpdate],
        previous_state: State | None = None,
    ) -> tuple[State, str, float | None]:
        """Combine our model with the neighbours' by the configured rule, leaving out proven
        equivocators, screening far models and down-weighting distrusted ones (quarantined:
        weight 0); then update trust. Returns the
        new state, its SHA-256 and our mean distance to the neighbours (the disagreement)."""
        cfg = self._config.aggregation
        heard = [n for n in sorted(received) if n not in self.ignored]
        own = flatten(own_state)
        # The neighbours' models are read a column block at a time, never stacked: for a
        # large model they are spooled to disk (gossip/spool.py, gossip/blocks.py).
        heard_rows = ModelRows([received[n].envelope.update.tensors for n in heard], own.size)
        distance = _mean_distance(own, heard_rows)
        screened = self._screen(heard, received)
        names, inputs, left_out, f = screened.names, screened.inputs, screened.left_out, screened.f
        record: dict[str, Any] = {"rule": cfg.rule, "f": f, "own_model_sha256": own_sha}
        quarantined = sorted(set(names) & self._trust.quarantined())
        if quarantined:  # inputs still, with mixing weight 0 (trust)
            record["quarantined"] = quarantined
        if cfg.weighting == PATIENTS and uncounted(names, cfg.patients):
            # members admitted later whose count no signed manifest gives: weight 0
            record["uncounted"] = uncounted(names, cfg.patients)
        if len(names) + 1 < min_inputs(cfg.rule, f):
            # Too few inputs arrived for the rule to be robust: keep our own model this round.
            return self._keep_own(
                r,
                record,
                inputs,
                left_out,
                "too_few_inputs",
                own,
                (heard, heard_rows),
                own_state,
                distance,
            )
        rows = heard_rows.subset([heard.index(n) for n in names])
        muted = np.zeros(len(names), dtype=bool)
        if self._trust.settings.enabled and names:
            rows, muted, pulled = self._screen_far(own, names, rows, f, received)
            if pulled:
                record["pulled_in"] = pulled
        used, excluded = inputs, []
        if cfg.rule in ("krum", "multi_krum"):
            # Krum picks whole models: record exactly whose went into the result.
            m = int(cfg.params.get("m", len(names) + 1 - f)) if cfg.rule == "multi_krum" else 1
            chosen = {int(i) - 1 for i in blocks.krum_select(own, rows, f, m=m)}
            used = [u for i, u in enumerate(inputs) if i in chosen]
            excluded = [
                {**u, "reason": "not_selected"} for i, u in enumerate(inputs) if i not in chosen
            ]
        try:
            weights = mute(self.mixing_weights(names), muted)
            result = blocks.aggregate(cfg.rule, own, rows, weights, f, **cfg.params)
        except ValueError as exc:
            # Finite inputs whose combination overflows (only an undefended rule lets poison
            # grow that large): keep our own model this round rather than stop.
            log.warning("round %d: aggregation failed (%s); keeping our own model", r, exc)
            return self._keep_own(
                r,
                record,
                inputs,
                left_out,
                "aggregate_not_finite",
                own,
                (heard, heard_rows),
                own_state,
                distance,
            )
        result = result.astype(own.dtype, copy=False)
        if self._outer_step is not None and previous_state is not None:
            result = self._outer_step(previous_state, result, record)
        new_state = unflatten(result, own_state)
        new_sha = state_sha256(new_state)
        self._audit.append(
            "aggregation",
            r,
            **record,
            used=used,
            excluded=excluded + left_out,
            result_sha256=new_sha,
        )
        self._state.aggregation = {"rule": cfg.rule, "f": f, "inputs": len(names) + 1}
        self._observe_trust(r, own, result, heard, heard_rows)
        return new_state, new_sha, distance

    def _screen(self, heard: list[str], received: dict[str, ReceivedUpdate]) -> Screened:
        """Leave out proven equivocators, and only them (issue 19 item 4): a quarantined peer
        stays an input with mixing weight 0 and a far model is pulled in (``_screen_far``), so
        neither uses up any of the f Byzantine inputs the rule tolerates. A proof is evidence
        enough to presume a peer Byzantine, so each proven equivocator left out uses up one."""
        proven = self._trust.proven() if self._trust.settings.enabled else {}
        names = [n for n in heard if n not in proven]
        left_out = [
            {"peer": n, "model_sha256": received[n].model_sha256, "reason": "proven_equivocation"}
            for n in heard
            if n in proven
        ]
        f = max(0, self._config.aggregation.f - len(left_out))
        inputs = [{"peer": n, "model_sha256": received[n].model_sha256} for n in names]
        return Screened(names, inputs, left_out, f)

    def _screen_far(
        self,
        own: np.ndarray,
        names: list[str],
        rows: ModelRows,
        f: int,
        received: dict[str, ReceivedUpdate],
    ) -> tuple[ModelRows, np.ndarray, list[dict[str, Any]]]:
        """Pull models far from the robust centre in to the screening radius, and mute those
        also far from our own model (gossip/aggregation.py ``screen_inputs``); the rule keeps
        its f. Under DP the screening radius allows for the DP noise our own ledger says honest
        models carry, and the mute and twin checks for the noise each sender announced
        (node/noise_plan.py ``yardstick``). Returns the rows, the muted mask and an audit
        entry per model pulled in."""
        noise = self._noise_norm() if self._noise_norm is not None else None
        peer_noise = self._peer_noise(names, received, noise, self._noise_parameters or own.size)
        with np.errstate(over="ignore", invalid="ignore"):
            own_norm = float(np.linalg.norm(own))
            twin = (
                DP_TWIN_FRACTION * np.array([noise, *peer_noise], dtype=np.float64)
                if noise
                else 0.0
            )
            screening = blocks.screen_inputs(
                own,
                rows,
                f,
                spread=SCREENING_SPREAD,
                floor=DP_CENTRE_NOISE_FLOOR * noise if noise else 0.0,
                own_limit=own_distance_limits(self._trust.settings, own_norm, noise, peer_noise),
                twin_distance=twin,
            )
        pulled = []
        for i in np.flatnonzero(screening.pulled | screening.muted):
            peer = names[i]
            if screening.muted[i]:  # counted as before: its weight was taken this round
                self._state.too_far[peer] = self._state.too_far.get(peer, 0) + 1
                self._metrics.too_far.labels(peer=peer).inc()
            pulled.append(
                {
                    "peer": peer,
                    "model_sha256": received[peer].model_sha256,
                    "distance": _finite_float(screening.distances[i]),
                    "radius": _finite_float(screening.radius),
                    "muted": bool(screening.muted[i]),
                    "twin": bool(screening.twins[i]),
                }
            )
        return screening.rows, screening.muted, pulled

    def _peer_noise(
        self,
        names: list[str],
        received: dict[str, ReceivedUpdate],
        own_noise: float | None,
        parameters: int,
    ) -> list[float | None]:
        """The DP noise length to expect on each sender's honest model: from the noise it
        announced (checked against the plan on arrival, node/receiver.py), else our own."""
        plan = self._noise_plan
        if plan is None or own_noise is None:
            return [own_noise] * len(names)
        return [
            plan.yardstick(received[n].envelope.update.noise, own_noise, parameters) for n in names
        ]

    def _keep_own(
        self,
        r: int,
        record: dict[str, Any],
        inputs: list[dict[str, Any]],
        left_out: list[dict[str, Any]],
        reason: str,
        own: np.ndarray,
        heard: tuple[list[str], ModelRows],
        own_state: State,
        distance: float | None,
    ) -> tuple[State, str, float | None]:
        """Keep our own model this round, audited with why every input was not used."""
        own_sha = record["own_model_sha256"]
        excluded = [{**u, "reason": reason} for u in inputs] + left_out
        self._audit.append(
            "aggregation", r, **record, used=[], excluded=excluded, result_sha256=own_sha
        )
        self._observe_trust(r, own, own, *heard)
        return own_state, own_sha, distance

    def mixing_weights(self, received: list[str]) -> np.ndarray:
        """Metropolis-Hastings weights (or, with `weighting = "patients"`, shares of the
        configured patient counts capped per neighbour: node/mixing.py), each scaled by the
        peer's trust factor; a missing or distrusted neighbour's share stays with this node."""
        cfg = self._config.aggregation
        if cfg.weighting == PATIENTS:
            return patient_weights(
                self._config.node.name,
                received,
                cfg.patients,
                [self._trust.weight(n) for n in received],
                cfg.max_weight,
            )
        own_degree = self._own_degree
        w = np.array(
            [self._trust.weight(n) / (1 + max(own_degree, self._peer_degree[n])) for n in received]
        )
        return np.concatenate([[1.0 - w.sum()], w])

    def _observe_trust(
        self, r: int, own: np.ndarray, aggregate: np.ndarray, names: list[str], rows: ModelRows
    ) -> None:
        """Score every neighbour heard this round (quarantined ones too) by its distance from
        the robust aggregate; log and audit each quarantine and re-admission with its evidence."""
        with np.errstate(over="ignore", invalid="ignore"):  # poison may overflow float32
            distances = np.nan_to_num(blocks.distances(aggregate, rows), nan=np.inf)
            own_distance = float(
                np.nan_to_num(distances_to(aggregate, own[None, :]), nan=np.inf)[0]
            )
        events = self._trust.observe(
            r,
            own_distance,
            {n: float(d) for n, d in zip(names, distances, strict=True)},
            f=self._config.aggregation.f,
        )
        for event in events:
            if event.kind == "quarantine":
                log.warning(
                    "QUARANTINE peer %s at round %d: its updates stay far from the robust "
                    "aggregate (evidence: %s); it is left out of aggregation until it behaves",
                    event.peer,
                    r,
                    json.dumps(event.evidence),
                )
            else:
                log.warning(
                    "re-admitting peer %s at round %d (evidence: %s)",
                    event.peer,
                    r,
                    json.dumps(event.evidence),
                )
            self._audit.append(event.kind, r, peer=event.peer, evidence=event.evidence)
        self._on_trust_change()


def _mean_distance(own: np.ndarray, rows: ModelRows) -> float | None:
    """Our mean distance to the heard models (None when none, or poison overflowed float32)."""
    if rows.k == 0:
        return None
    with np.errstate(over="ignore", invalid="ignore"):
        distance = float(np.mean(blocks.distances(own, rows)))
    return distance if np.isfinite(distance) else None


def _finite_float(x: float) -> float:
    """A distance for the audit record's JSON: infinity as a large number."""
    return round(float(x), 6) if np.isfinite(x) else 1e30
