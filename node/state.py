"""The node's live picture of itself (what /status serves), and the error that stops it starting.

Every part of the node (node/node.py composes them) writes its corner of `NodeState`; nothing
here acts on it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


class StartupError(RuntimeError):
    """The node cannot start safely; the message says why and what to change."""


@dataclass
class RoundRecord:
    """What the node remembers of one finished round (shown in /status and the report)."""

    round: int
    auc: float | None
    epsilon: float
    metrics: dict[str, Any]
    received: list[str]
    missing: list[str]
    neighbour_distance: float | None
    seconds: float


@dataclass
class NodeState:
    """The live, JSON-able picture of the node that /status serves."""

    name: str
    public_key: str
    round: int = 0
    phase: str = "starting"
    # why the node stopped before its planned rounds, when a check said so (e.g. its study's
    # approval was withdrawn, node/studies/gate.py); None otherwise
    stop_detail: str | None = None
    planned_rounds: int = 0
    peers: dict[str, dict[str, Any]] = field(default_factory=dict)
    last_metrics: dict[str, Any] = field(default_factory=dict)
    privacy: dict[str, Any] = field(default_factory=dict)
    consortium: dict[str, Any] = field(default_factory=dict)  # node/governance.py
    # the consensus phase after the last round (node/consensus_net.py): step, agreed hash
    consensus: dict[str, Any] = field(default_factory=dict)
    model_sha256: str = ""
    rejected: dict[str, int] = field(default_factory=dict)
    # why requests were refused as `unauthenticated` (gossip/auth.py AuthFailure -> count):
    # the precise reasons a stranger is not told
    unauthenticated: dict[str, int] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    bytes_sent: int = 0
    aggregation: dict[str, Any] = field(default_factory=dict)
    trust: dict[str, float] = field(default_factory=dict)
    trust_history: dict[str, list[float]] = field(default_factory=dict)
    quarantined: list[str] = field(default_factory=list)
    # peer -> rounds its model was left out for lying too far from our own (gossip/trust.py)
    too_far: dict[str, int] = field(default_factory=dict)
    equivocation: dict[str, Any] = field(default_factory=dict)
    # rollback evidence against peers, this node's own startup check, /receipts requests
    rollback: dict[str, Any] = field(default_factory=dict)
    # the attack a test or demo node runs (node/byzantine.py); None on every real node
    adversary: dict[str, Any] | None = None
    # What this node trains and tests on (operator-only, like every field here): the data set,
    # where it was read from, and the split sizes the report's "n train" / "n test" show.
    data: dict[str, Any] = field(default_factory=dict)
    # min_neighbours, who counts toward it now, and (while the node waits) why the rest don't
    neighbours: dict[str, Any] = field(default_factory=dict)
    # the personalized model's metrics (models/personal.py); the model itself is never shown
    personal: dict[str, Any] = field(default_factory=dict)
    # the study (manifest hash, name, who approved it) and its site budget (node/studies/)
    study: dict[str, Any] = field(default_factory=dict)
