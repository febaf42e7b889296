"""Prometheus metrics for one node, in a registry of its own (served at GET /metrics)."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest


class NodeMetrics:
    """The counters and gauges an operator scrapes; every name starts with `murmur_`."""

    def __init__(self, node_name: str) -> None:
        self.registry = CollectorRegistry()
        self.node = node_name
        r = self.registry
        self.round = Gauge("murmur_round_completed", "Last completed round", registry=r)
        self.auc = Gauge("murmur_test_auc", "Held-out ROC AUC after the last round", registry=r)
        self.epsilon = Gauge(
            "murmur_epsilon_spent", "Differential-privacy epsilon spent", registry=r
        )
        self.round_seconds = Histogram(
            "murmur_round_seconds",
            "Wall time of a round",
            registry=r,
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60),
        )
        self.received = Counter("murmur_messages_accepted", "Peer messages accepted", registry=r)
        self.rejected = Counter(
            "murmur_messages_rejected", "Peer messages rejected, by reason", ["reason"], registry=r
        )
        self.unauthenticated = Counter(
            "murmur_unauthenticated_requests",
            "Peer requests refused as unauthenticated, by the precise reason (gossip/auth.py)",
            ["why"],
            registry=r,
        )
        self.bytes_sent = Counter("murmur_bytes_sent", "Envelope bytes sent to peers", registry=r)
        self._peer_metrics(r)

    def _peer_metrics(self, r: CollectorRegistry) -> None:
        """The per-peer trust, evidence and liveness metrics, and the neighbour count."""
        self.trust = Gauge(
            "murmur_peer_trust", "Trust score per peer (1 = trusted)", ["peer"], registry=r
        )
        self.quarantined = Gauge(
            "murmur_peer_quarantined",
            "1 while the peer is quarantined (mixing weight 0), else 0",
            ["peer"],
            registry=r,
        )
        self.too_far = Counter(
            "murmur_peer_too_far",
            "Rounds a peer's model was muted (weight 0, still an input) as far from the robust "
            "centre and from this node's own model",
            ["peer"],
            registry=r,
        )
        self.equivocation_proofs = Counter(
            "murmur_equivocation_proofs",
            "Verified equivocation proofs against a peer (it is then quarantined for good)",
            ["peer"],
            registry=r,
        )
        self.rollback_detected = Counter(
            "murmur_rollback_detected",
            "Envelopes refused because their sender's signed audit head went backwards",
            ["peer"],
            registry=r,
        )
        self.receipts_requests = Counter(
            "murmur_receipts_requests",
            "POST /receipts requests from peers, by outcome (answered or a reason code)",
            ["outcome"],
            registry=r,
        )
        self.peer_up = Gauge(
            "murmur_peer_up",
            "1 while rounds wait for the peer, 0 once it is marked down for staying silent",
            ["peer"],
            registry=r,
        )
        self.peer_clock_skew = Gauge(
            "murmur_peer_clock_skew_seconds",
            "The peer's clock minus this node's, from the Date of its last reply (node/clock.py)",
            ["peer"],
            registry=r,
        )
        self.neighbours_counted = Gauge(
            "murmur_neighbours_counted",
            "Neighbours up and admitting this node (compare with gossip.min_neighbours)",
            registry=r,
        )
        self.waiting_for_neighbours = Gauge(
            "murmur_waiting_for_neighbours",
            "1 while a round waits because too few neighbours can take it, else 0",
            registry=r,
        )
        self.invalid_evidence = Counter(
            "murmur_invalid_evidence",
            "Piggybacked receipts or proofs whose signatures do not verify (ignored)",
            ["what"],
            registry=r,
        )

    def observe_round(
        self, round_: int, metrics: dict[str, Any], epsilon: float, seconds: float
    ) -> None:
        self.round.set(round_)
        if metrics.get("auc") is not None:
            self.auc.set(metrics["auc"])
        self.epsilon.set(epsilon)
        self.round_seconds.observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
