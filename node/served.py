"""What the HTTP layer may ask of a node: the narrow interface node/api.py serves.

Why: node/api.py (and the dashboard and POST /receipts routes it mounts) must not import the
node, which starts the API; with this `Protocol` the dependency runs one way only
(node/node.py -> node/api.py -> this file), and a test can serve any object that has these
members. `HospitalNode` (node/node.py) provides them; nothing here is implemented.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Protocol

from murmur.crypto.allowlist import Allowlist, Peer
from murmur.crypto.identity import Identity
from murmur.gossip.wire import WireLimits
from murmur.node.config import NodeConfig
from murmur.node.metrics import NodeMetrics
from murmur.node.rejections import RateLimitedLog


class AuditFile(Protocol):
    """Where the node's audit log lies (the dashboard reads it read-only)."""

    @property
    def path(self) -> Path: ...


class ServedNode(Protocol):
    """The members of a node its peer and operator listeners use."""

    config: NodeConfig
    identity: Identity
    allowlist: Allowlist
    limits: WireLimits
    metrics: NodeMetrics

    @property
    def audit(self) -> AuditFile: ...

    @property
    def rejection_log(self) -> RateLimitedLog: ...

    @property
    def current_round(self) -> int:
        """The round the node is in (per-round request allowances count by it)."""
        ...

    async def receive(
        self, body: bytes, source: str | None = None, sender: Peer | None = None
    ) -> tuple[int, str, str]:
        """POST /gossip: (HTTP status, reason code, detail for this node's log)."""
        ...

    async def receive_stream(
        self,
        read: Callable[[int], Awaitable[bytes]],
        length: int,
        source: str | None = None,
        sender: Peer | None = None,
    ) -> tuple[int, str, str]:
        """POST /gossip of a large body, opened as `read(n)` returns it (node/receiver.py)."""
        ...

    def answer_probe(self, body: bytes, sender: bytes | None = None) -> tuple[int, str]:
        """POST /probe: (HTTP status, reason code)."""
        ...

    def answer_receipts_request(
        self, body: bytes, sender: bytes | None = None
    ) -> tuple[int, str, bytes]:
        """POST /receipts: (HTTP status, content type, payload)."""
        ...

    def answer_approvals(self, body: bytes, sender: Peer | None) -> tuple[int, str]:
        """POST /approvals: (HTTP status, reason code); ``sender`` None: the operator's."""
        ...

    async def answer_consensus(self, body: bytes, sender: Peer) -> tuple[int, str]:
        """POST /consensus (node/consensus_net.py): (HTTP status, reason code)."""
        ...

    def record_rejection(
        self,
        reason: str,
        detail: str,
        *,
        round_: int | None,
        sender: str | None,
        why: str | None = None,
        source: str | None = None,
    ) -> None:
        """Count, log (rate-limited) and, for admitted senders, audit a refused request."""
        ...

    def status(self) -> dict[str, Any]:
        """GET /status: the node's live picture (node/state.py)."""
        ...
