"""The evidence book: receipts of the envelopes this node saw, and equivocation proofs.

Why its own part: evidence comes from two directions (envelopes this node opens, and the
receipts and proofs its neighbours piggyback on theirs) and goes out one way (on this node's
next envelope), and none of it needs HTTP or the round loop. A receipt is the accused's own
signature over its envelope, so whoever relays it cannot frame anyone; two receipts of one
sender for one round with different digests are a proof (gossip/receipts.py). A proof against
a neighbour quarantines it for good (gossip/trust.py) and is audited with its evidence.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from typing import Any

from murmur.crypto.allowlist import Allowlist
from murmur.gossip.receipts import EquivocationProof, Receipt, ReceiptBook
from murmur.gossip.trust import TrustTracker
from murmur.gossip.wire import DEFAULT_MAX_PROOFS, ModelUpdate
from murmur.node.audit import AuditLog
from murmur.node.metrics import NodeMetrics

log = logging.getLogger("murmur.node")

MAX_PENDING_PROOFS = 64
MAX_REMEMBERED_PROOFS = 1024


class EvidenceBook:
    """Checks, keeps and forwards the evidence about this node's neighbours.

    `current_round` says the round the node is in (for the audit record of a proof);
    `on_change` is called whenever what `status()` returns may have changed.
    """

    def __init__(
        self,
        receipts: ReceiptBook,
        *,
        allowlist: Allowlist,
        trust: TrustTracker,
        audit: AuditLog,
        metrics: NodeMetrics,
        current_round: Callable[[], int],
        on_change: Callable[[], None],
    ) -> None:
        self.receipts = receipts
        self._allowlist = allowlist
        self._trust = trust
        self._audit = audit
        self._metrics = metrics
        self._current_round = current_round
        self._on_change = on_change
        # Proofs learned since the last envelope (forwarded once each), and the ids of every
        # proof seen recently (so none is verified or forwarded twice); both bounded.
        self._pending: list[EquivocationProof] = []
        self._seen: dict[str, None] = {}
        self.counts: Counter[str] = Counter()
        # Told of every new proof: the process's other studies (node/multistudy.py) learn it
        # too, since a key that equivocates in one study is not to be trusted in any.
        self.on_proof: list[Callable[[EquivocationProof], None]] = []

    def check_envelope(self, receipt: Receipt, *, accepted: bool) -> None:
        """File the receipt of an authentic envelope this node opened; a second, different
        envelope of the same sender and round is a proof at once."""
        proof = self.receipts.check(receipt, accepted=accepted)
        if proof is not None:
            self.learn(proof, reported_by=None)

    def take(self, reporter: str, update: ModelUpdate) -> None:
        """Check the receipts and proofs a peer piggybacked on its envelope.

        One whose signature does not verify is evidence against nobody: it is ignored,
        counted and logged. Receipts about senders this node does not know, or rounds outside
        its window, are not kept (bounded memory).
        """
        for receipt in update.receipts:
            if not self.receipts.tracks(receipt) or self.receipts.holds(receipt):
                continue
            if not receipt.verify():
                self._invalid("receipt", reporter, receipt.round)
                continue
            proof = self.receipts.check(receipt)
            if proof is not None:
                self.learn(proof, reported_by=reporter)
        for proof in update.proofs:
            if proof.id in self._seen:
                continue
            if not proof.verify():
                self._invalid("proof", reporter, proof.round)
                continue
            self.learn(proof, reported_by=reporter)

    def learn(self, proof: EquivocationProof, *, reported_by: str | None) -> None:
        """Remember a verified proof, queue it for forwarding once, and act on it if it is
        against a neighbour."""
        if proof.id in self._seen:
            return
        self._seen[proof.id] = None
        while len(self._seen) > MAX_REMEMBERED_PROOFS:
            del self._seen[next(iter(self._seen))]
        self.counts["proofs_learned"] += 1
        accused = self._allowlist.by_key(proof.sender)
        # Proofs against our own neighbours go first: those are the ones we could check are
        # about an admitted peer.
        if accused is not None:
            self._pending.insert(0, proof)
        else:
            self._pending.append(proof)
        del self._pending[MAX_PENDING_PROOFS:]
        if accused is not None:
            self._act_on(accused.name, proof, reported_by)
        self._on_change()
        for tell in self.on_proof:
            tell(proof)

    def outgoing(self, r: int) -> tuple[list[Receipt], list[EquivocationProof]]:
        """What an honest round-r envelope carries: the receipts of the envelopes accepted in
        round r - 1, and the proofs learned since the last envelope (each sent once)."""
        proofs = self._pending[:DEFAULT_MAX_PROOFS]
        del self._pending[:DEFAULT_MAX_PROOFS]
        return self.receipts.accepted(r - 1), proofs

    def status(self) -> dict[str, Any]:
        """/status `equivocation`: who is proven, and what evidence was learned or ignored."""
        return {
            "proven": self._trust.proven(),
            "proofs_learned": self.counts["proofs_learned"],
            "invalid_receipts": self.counts["invalid_receipts"],
            "invalid_proofs": self.counts["invalid_proofs"],
            "pending_proofs": len(self._pending),
        }

    def _invalid(self, what: str, reporter: str, round_: int) -> None:
        self.counts[f"invalid_{what}s"] += 1
        self._metrics.invalid_evidence.labels(what=what).inc()
        log.warning(
            "ignored a %s relayed by %s (round %d): its signature does not verify",
            what,
            reporter,
            round_,
        )
        self._on_change()

    def _act_on(self, peer: str, proof: EquivocationProof, reported_by: str | None) -> None:
        r = self._current_round()
        event = self._trust.prove_equivocation(peer, r, proof.round, proof.encode().hex())
        if event is None:
            return
        acting = self._trust.settings.enabled
        log.error(
            "\n%s\nPROVEN EQUIVOCATION by peer %s: it signed two different envelopes for round "
            "%d (proof %s, %s). %s\n%s",
            "#" * 78,
            peer,
            proof.round,
            proof.id[:16],
            f"relayed by {reported_by}" if reported_by else "detected here",
            "It is quarantined for good and left out of aggregation from now on."
            if acting
            else "Trust is disabled ([trust] enabled = false): it is NOT excluded.",
            "#" * 78,
        )
        self._audit.append(
            "equivocation_proof",
            r,
            peer=peer,
            excluded=acting,
            reported_by=reported_by,
            **proof.evidence(),
        )
        self._metrics.equivocation_proofs.labels(peer=peer).inc()
