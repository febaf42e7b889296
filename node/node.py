"""One hospital's node: train locally, share, collect, aggregate robustly, evaluate, persist.

The round loop is synchronous with a deadline (docs/protocol.md, "Rounds"): a dead or slow
neighbour costs at most `gossip.round_timeout_s`, never the run. Everything CPU-heavy that
could block the event loop (training, aggregation) runs in a worker thread, so the HTTP API
keeps answering peers and operators while the node trains.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import signal
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from crypto.allowlist import Allowlist, Peer
from crypto.identity import Identity, load_identity, load_public_key
from gossip.aggregation import AGGREGATORS, distances_to, krum_select, min_inputs
from gossip.attacks import Adversary, attack_rng, flip_labels
from gossip.feasibility import check_min_neighbours, check_node, default_min_neighbours
from gossip.liveness import LivenessChange, PeerLiveness
from gossip.peer_records import RecordBook
from gossip.probe import Contact, Reach, build_probe, check_probe
from gossip.receipts import AuditHead, EquivocationProof, Receipt, ReceiptBook
from gossip.rounds import CatchUp, InboxVerdict, RoundInbox, catch_up_quorum
from gossip.transport import Transport
from gossip.trust import TrustTracker, relative_distance_limit, too_far_from_own
from gossip.wire import (
    DEFAULT_MAX_PROOFS,
    HTTP_STATUS,
    EnvelopeOpener,
    ModelUpdate,
    OpenedEnvelope,
    RejectReason,
    ReplayGuard,
    WireError,
    WireLimits,
    build_envelope,
    default_max_message_bytes,
)
from models.data import HospitalSplit, load_dataset, resolved_data_path
from models.nets import build_model
from models.optimizers import ServerOptimizer
from models.params import flatten, get_state, model_spec, set_state, state_sha256, unflatten
from models.personal import PersonalModel
from models.privacy import BudgetExhausted, PrivacyLedger
from models.training import LocalTrainer, TrainingSettings, evaluate
from node import __version__
from node.audit import AUDIT_FILE, AuditLog, RetentionPolicy
from node.binding import config_binding, data_fingerprint
from node.checkpoint import NodeCheckpoint, load_checkpoint, save_checkpoint
from node.clock import ClockReport
from node.config import NodeConfig
from node.durable import atomic_write
from node.metrics import NodeMetrics
from node.rejections import RateLimitedLog, RejectionTally, printable
from node.rollback import RollbackGuard, RolledBackError
from node.threads import limit_numeric_threads

log = logging.getLogger("murmur.node")

VERSION = __version__
SIGNED_ROUND_FILE = "signed_round.json"
MAX_PENDING_PROOFS = 64
MAX_REMEMBERED_PROOFS = 1024
# Waiting for neighbours before a round: probes back off from the first delay to the
# longest, and the wait is logged whenever its reasons change and at least every reminder.
PROBE_FIRST_DELAY_S = 0.25
PROBE_MAX_DELAY_S = 5.0
PROBE_TIMEOUT_S = 2.0
WAIT_REMINDER_S = 60.0


@dataclass(frozen=True)
class ReceivedUpdate:
    """An authenticated neighbour update, with its model hash computed once on arrival."""

    envelope: OpenedEnvelope
    model_sha256: str


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
    planned_rounds: int = 0
    peers: dict[str, dict[str, Any]] = field(default_factory=dict)
    last_metrics: dict[str, Any] = field(default_factory=dict)
    privacy: dict[str, Any] = field(default_factory=dict)
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
    adversary: dict[str, Any] | None = None
    # What this node trains and tests on (operator-only, like every field here): the data set,
    # where it was read from, and the split sizes the report's "n train" / "n test" show.
    data: dict[str, Any] = field(default_factory=dict)
    # min_neighbours, who counts toward it now, and (while the node waits) why the rest don't
    neighbours: dict[str, Any] = field(default_factory=dict)
    # the personalized model's metrics (models/personal.py); the model itself is never shown
    personal: dict[str, Any] = field(default_factory=dict)


class HospitalNode:
    """A hospital's murmur node. Build it from a validated config, then `await run()`."""

    def __init__(self, config: NodeConfig) -> None:
        self.config = config
        limit_numeric_threads()
        self.identity: Identity = load_identity(config.node.key_file)
        if self.identity.name and self.identity.name != config.node.name:
            log.warning(
                "key file names %r but config names %r", self.identity.name, config.node.name
            )
        self.peers = [
            Peer(
                p.name,
                p.address,
                load_public_key(p.public_key or str(p.public_key_file)),
                tuple(p.relays),
            )
            for p in config.peers
        ]
        self.peer_degree = {p.name: (p.degree or len(config.peers)) for p in config.peers}
        self.allowlist = Allowlist(self.peers)
        self.record_book = RecordBook(self.allowlist)  # where peers say they are now
        self.state_dir = config.node.state_dir
        self.state_dir.mkdir(parents=True, exist_ok=True)

        self.data: HospitalSplit = self._load_own_data()
        adversary = config.adversary
        if adversary.enabled and adversary.attack == "label_flip":
            fraction = float(adversary.params.get("fraction", 1.0))
            rng = attack_rng(adversary.seed, config.node.name, 0)
            flipped = flip_labels(self.data.y_train, fraction, rng)
            self.data = dataclasses.replace(self.data, y_train=flipped)
        input_shape = tuple(self.data.x_train.shape[1:])
        model_params = {"hidden": tuple(config.model.hidden)} if config.model.name == "mlp" else {}
        # Every node builds the same initial model from the shared seed, so round 1 averages
        # models that started from the same point (as FedAvg does).
        self.model = build_model(
            config.model.name, input_shape, config.training.seed, **model_params
        )
        initial_state = get_state(self.model)
        self.spec = model_spec(initial_state)

        settings = TrainingSettings(
            batch_size=config.training.batch_size,
            learning_rate=config.training.learning_rate,
            local_epochs=config.training.local_epochs,
            optimizer=config.training.optimizer,
            momentum=config.training.momentum,
            loss=config.training.loss,
            focal_gamma=config.training.focal_gamma,
            class_weighting=str(config.training.class_weighting),
            class_weights=_pair(config.training.class_weights),
            fedprox_mu=config.training.fedprox_mu,
            survival_loss=config.training.survival_loss,
            seed=config.training.seed + _stable_int(config.node.name),
            augment=config.training.augment,
            lr_schedule=config.training.lr_schedule,
            schedule_rounds=config.training.rounds,
        )
        self.trainer = LocalTrainer(self.model, self.data.x_train, self.data.y_train, settings)
        # FedAdam/FedYogi/FedAdagrad on (aggregate - previous model), state kept here only.
        opt = config.server_optimizer
        self.server_optimizer = ServerOptimizer(opt.settings()) if opt.name != "none" else None
        # Ditto's personal model (models/personal.py): trained here, evaluated here, never sent.
        pers = config.personalization
        self.personal: PersonalModel | None = None
        if pers.method == "ditto":
            self.personal = PersonalModel(
                self.model,
                self.data.x_train,
                self.data.y_train,
                settings,
                mu=pers.mu,
                learning_rate=pers.learning_rate,
            )
        self.ledger: PrivacyLedger | None = None
        if config.privacy.enabled:
            self.ledger = PrivacyLedger.plan(
                epsilon=config.privacy.epsilon,
                delta=config.privacy.delta,
                n_patients=len(self.data.y_train),
                sample_rate=self.trainer.sample_rate(),
                planned_steps=self._dp_steps_per_round() * config.training.rounds,
                max_grad_norm=config.privacy.max_grad_norm,
                accountant=config.privacy.accountant,
            )
            self._use_ledger(self.ledger)

        max_bytes = config.gossip.max_message_bytes or default_max_message_bytes(self.spec)
        self.replay = ReplayGuard()
        self.limits = WireLimits(
            max_message_bytes=max_bytes, timestamp_window_s=config.gossip.timestamp_window_s
        )
        self.inbox: RoundInbox[ReceivedUpdate] = RoundInbox(max_round=config.training.rounds)
        self.trust = TrustTracker([p.name for p in self.peers], config.trust.settings())
        self.receipts = ReceiptBook([p.public_key for p in self.peers])
        # Proofs learned since the last envelope (forwarded once each), and the ids of every
        # proof seen recently (so none is verified or forwarded twice); both bounded.
        self._pending_proofs: list[EquivocationProof] = []
        self._seen_proofs: dict[str, None] = {}
        self.evidence_counts: Counter[str] = Counter()
        self.last_signed_round = 0
        self.adversary: Adversary | None = None
        if adversary.enabled:
            self.adversary = Adversary(
                adversary.attack,
                adversary.params,
                identity=self.identity,
                peers=self.peers,
                colluders=adversary.colluders,
                seed=adversary.seed,
                byzantine_neighbours=adversary.byzantine_neighbours,
                initial=initial_state,
                max_message_bytes=max_bytes,
            )
        self.rejected: Counter[str] = Counter()
        # Unauthenticated rejections: counted here and summarised in one audit record per
        # round, never one record or log line each (node/rejections.py).
        self.unauthenticated_rejections = RejectionTally()
        self.rejection_log = RateLimitedLog(log)
        self.metrics = NodeMetrics(config.node.name)
        self.audit = AuditLog(
            self.state_dir / AUDIT_FILE,
            self.identity,
            retention=RetentionPolicy(max_age_days=config.audit.retention_days),
        )
        # Each peer's newest signed audit head, POST /receipts, the startup check.
        self.rollback = RollbackGuard(
            identity=self.identity,
            allowlist=self.allowlist,
            audit=self.audit,
            metrics=self.metrics,
            state_dir=self.state_dir,
            gossip=config.gossip,
            on_change=self._refresh_rollback_status,
        )
        self.state = NodeState(
            name=config.node.name,
            public_key=self.identity.public_key.hex(),
            planned_rounds=config.training.rounds,
            peers={
                p.name: {"address": p.address, "last_round": 0, "last_seen": None}
                for p in self.peers
            },
            adversary=self.adversary.status() if self.adversary else None,
            data=self._data_description(),
        )
        self.clock_report = ClockReport(
            self.state.peers,
            window_s=config.gossip.timestamp_window_s,
            gauge=self.metrics.peer_clock_skew,
            audit=self.audit.append,
            current_round=lambda: self.state.round,
        )
        self.next_round = 1
        self.stop = asyncio.Event()
        gossip = config.gossip
        self.min_neighbours = (
            gossip.min_neighbours
            if gossip.min_neighbours is not None
            else default_min_neighbours(config.aggregation.rule, config.aggregation.f)
        )
        self.catch_up_quorum = catch_up_quorum(config.aggregation.f, len(self.peers))
        self.liveness = PeerLiveness(
            [p.name for p in self.peers], down_after=gossip.down_after_rounds
        )
        # Set whenever a neighbour's envelope is accepted, so a node waiting for neighbours
        # looks again at once instead of at its next probe.
        self._neighbour_news = asyncio.Event()
        self._refresh_liveness_status()
        self._refresh_privacy_status()
        self._refresh_trust_status()
        self._restore()
        self._refresh_rollback_status()
        self.opener = EnvelopeOpener(
            self.identity, self.allowlist, self.spec, limits=self.limits, replay=self.replay
        )
        self.state.model_sha256 = state_sha256(get_state(self.model))
        self._refresh_privacy_status()

    # ---------------------------------------------------------------- setup

    def _dp_steps_per_round(self) -> int:
        """DP-SGD steps a round takes: the shared model's, plus the personal model's if any
        (both are charged to the one ledger, so one ε covers both)."""
        personal = self.personal.steps_per_round() if self.personal is not None else 0
        return self.trainer.steps_per_round() + personal

    def _use_ledger(self, ledger: PrivacyLedger) -> None:
        self.trainer.ledger = ledger
        if self.personal is not None:
            self.personal.ledger = ledger

    def _load_own_data(self) -> HospitalSplit:
        d = self.config.data
        splits = load_dataset(
            d.dataset,
            path=str(d.path) if d.path else None,
            num_hospitals=d.num_hospitals,
            seed=d.seed,
            alpha=d.alpha,
            label=d.label,
            site=d.site,
            test_fraction=d.test_fraction,
            preprocessing=d.resolved_preprocessing(self.config.privacy.enabled),
            reference=d.reference,
            positive=d.positive,
            not_identifying=tuple(d.not_identifying),
        )
        names = [s.name for s in splits]
        if d.hospital in names:
            return splits[names.index(d.hospital)]
        if d.hospital.isdigit() and int(d.hospital) < len(splits):
            return splits[int(d.hospital)]
        raise StartupError(
            f"data.hospital {d.hospital!r} is not in dataset {d.dataset!r}; "
            f"fix: use one of {', '.join(names)} or an index 0..{len(splits) - 1}"
        )

    def _data_description(self) -> dict[str, Any]:
        """The data set, the path it was really read from, and this hospital's split sizes."""
        d = self.config.data
        return {
            "dataset": d.dataset,
            "path": str(resolved_data_path(d.dataset, d.path)),
            "hospital": self.data.name,
            "n_train": len(self.data.y_train),
            "n_test": len(self.data.y_test),
        }

    def _restore(self) -> None:
        """Continue from the last checkpoint, never from scratch while claiming an old budget,
        and never under changed privacy or model fields (node/binding.py)."""
        self.binding = config_binding(
            self.config,
            public_key=self.identity.public_key,
            fingerprint=data_fingerprint(self.data.x_train, self.data.y_train),
            delta=self.ledger.delta if self.ledger is not None else None,
        )
        ckpt = load_checkpoint(
            self.state_dir,
            expected_config_sha256=self.config.sha256,
            binding=self.binding,
            config_file=str(self.config.source or "the config file"),
        )
        if ckpt is None:
            # A fresh node: checkpoint round 0 before any training, so a node killed in its
            # first round restarts from here with its write-ahead privacy spend intact.
            self._checkpoint(0)
            return
        set_state(self.model, ckpt.model_state)
        self.trainer.load_state_dict_bytes(ckpt.trainer_state)
        if self.ledger is not None and ckpt.privacy:
            self.ledger = PrivacyLedger.from_state(ckpt.privacy)
            self._use_ledger(self.ledger)
        intent = self._read_privacy_intent()
        if self.ledger is not None and intent > self.ledger.steps_taken:
            # Killed mid-training: the steps of that round may have touched the data, so
            # they count as spent even though their model was never saved.
            self.ledger.record_steps(intent - self.ledger.steps_taken)
        self.replay = ReplayGuard.from_state(ckpt.replay)
        self.last_signed_round = self._read_signed_round()
        self.next_round = ckpt.round + 1
        self.state.round = ckpt.round
        self.state.history = list(ckpt.extra.get("history", []))
        if self.state.history:
            self.state.last_metrics = dict(self.state.history[-1].get("metrics", {}))
        self.state.bytes_sent = int(ckpt.extra.get("bytes_sent", 0))
        if "trust" in ckpt.extra:
            self.trust = TrustTracker.from_state(
                ckpt.extra["trust"], [p.name for p in self.peers], self.config.trust.settings()
            )
        if "receipts" in ckpt.extra:
            self.receipts = ReceiptBook.from_state(
                ckpt.extra["receipts"], [p.public_key for p in self.peers]
            )
        self.rollback.restore(ckpt.extra.get("heads"))
        if self.server_optimizer is not None and "server_optimizer" in ckpt.extra:
            self.server_optimizer.load_state(ckpt.extra["server_optimizer"])
        if self.personal is not None and "personal" in ckpt.extra:
            self.personal.load_state(ckpt.extra["personal"])
        self._refresh_trust_status()
        self.inbox.advance_to(self.next_round)
        log.info(
            "restored checkpoint of round %d; continuing at round %d", ckpt.round, self.next_round
        )
        if not ckpt.binding:
            # Written by an earlier murmur and resumed under its exact config file: bind it
            # now, so that from here on only the bound fields must stay (node/binding.py).
            self._checkpoint(ckpt.round)
            log.info("checkpoint of round %d now records the fields it is bound to", ckpt.round)

    def check_feasibility(self) -> None:
        problem = check_node(
            self.config.node.name,
            len(self.peers),
            self.config.aggregation.rule,
            self.config.aggregation.f,
        ) or check_min_neighbours(
            self.config.node.name,
            len(self.peers),
            self.min_neighbours,
            explicit=self.config.gossip.min_neighbours is not None,
        )
        if problem:
            raise StartupError(problem)

    # ---------------------------------------------------------------- receiving

    async def receive(
        self, body: bytes, source: str | None = None, sender: Peer | None = None
    ) -> tuple[int, str, str]:
        """Handle one POST /gossip body from address `source`: (HTTP status, reason code,
        detail). Never raises. The detail is for this node's log; peers get only the code.

        `sender` is the peer whose request signature the listener verified (node/api.py): the
        envelope must be its own, and its refusals are audited under its name. None for
        callers that hand envelopes over themselves (in-process benchmarks and tests).
        Opening (hashing, signature, decryption, parsing) runs in a worker thread; everything
        that changes this node's state runs here, on the event loop.
        """
        key = sender.public_key if sender is not None else None
        try:
            verified = await asyncio.to_thread(self.opener.verify, body, None, key)
            opened = self.opener.accept(verified)
        except WireError as err:
            self.opener.note_failure(err)
            self.record_rejection(
                err.reason.value,
                err.detail,
                sender=sender.name if sender is not None else None,
                round_=None,
                source=source,
            )
            return HTTP_STATUS[err.reason], err.reason.value, err.detail
        sender = opened.sender.name
        refused = self.rollback.check(opened, self.inbox.current_round)
        if refused is not None:
            self.record_rejection(
                "rollback", refused, sender=sender, round_=opened.round, receipt=opened.receipt
            )
            return 409, "rollback", refused
        received = ReceivedUpdate(opened, state_sha256(opened.update.tensors))
        verdict = self.inbox.offer(sender, opened.round, received)
        if verdict is not InboxVerdict.OLD_ROUND or opened.round >= self.inbox.current_round - 1:
            self._spoke(sender, opened.round)  # up again if it was down (gossip/liveness.py)
        peer = self.state.peers[sender]
        peer["last_round"] = max(peer["last_round"], opened.round)
        peer["last_seen"] = time.time()
        # The envelope is authentic, so its signature is evidence whatever the inbox made of
        # it: a second, different envelope for one round (a "duplicate") is a proof at once.
        proof = self.receipts.check(opened.receipt, accepted=verdict is InboxVerdict.ACCEPTED)
        if proof is not None:
            self._learn_proof(proof, reported_by=None)
        self._take_evidence(sender, opened.update)
        if verdict is not InboxVerdict.ACCEPTED:
            detail = f"round {opened.round} from {sender} while at round {self.inbox.current_round}"
            self.record_rejection(
                verdict.value, detail, sender=sender, round_=opened.round, receipt=opened.receipt
            )
            return 409, verdict.value, detail
        if self.adversary is not None:
            self.adversary.remember(opened.round, body)
        self.audit.append(
            "message_received",
            opened.round,
            sender=sender,
            accepted=True,
            reason="accepted",
            body_sha256=opened.body_sha256,
            model_sha256=received.model_sha256,
            audit_head=opened.head.to_json(),
            receipt=opened.receipt.to_hex(),  # the sender's own signed claim (gossip/heads.py)
        )
        self.metrics.received.inc()
        return 202, "accepted", ""

    # ---------------------------------------------------------------- equivocation evidence

    def _take_evidence(self, reporter: str, update: ModelUpdate) -> None:
        """Check the receipts and proofs a peer piggybacked on its envelope.

        A receipt is self-verifying (the accused's own signature), so whoever relays it cannot
        frame anyone; one whose signature does not verify is evidence against nobody: it is
        ignored, counted and logged. Receipts about senders this node does not know, or rounds
        outside its window, are not kept (bounded memory).
        """
        for receipt in update.receipts:
            if not self.receipts.tracks(receipt) or self.receipts.holds(receipt):
                continue
            if not receipt.verify():
                self._invalid_evidence("receipt", reporter, receipt.round)
                continue
            proof = self.receipts.check(receipt)
            if proof is not None:
                self._learn_proof(proof, reported_by=reporter)
        for proof in update.proofs:
            if proof.id in self._seen_proofs:
                continue
            if not proof.verify():
                self._invalid_evidence("proof", reporter, proof.round)
                continue
            self._learn_proof(proof, reported_by=reporter)

    def _invalid_evidence(self, what: str, reporter: str, round_: int) -> None:
        self.evidence_counts[f"invalid_{what}s"] += 1
        self.metrics.invalid_evidence.labels(what=what).inc()
        log.warning(
            "ignored a %s relayed by %s (round %d): its signature does not verify",
            what,
            reporter,
            round_,
        )
        self._refresh_equivocation_status()

    def _learn_proof(self, proof: EquivocationProof, *, reported_by: str | None) -> None:
        """Remember a verified proof, queue it for forwarding once, and act on it if it is
        against a neighbour."""
        if proof.id in self._seen_proofs:
            return
        self._seen_proofs[proof.id] = None
        while len(self._seen_proofs) > MAX_REMEMBERED_PROOFS:
            del self._seen_proofs[next(iter(self._seen_proofs))]
        self.evidence_counts["proofs_learned"] += 1
        accused = self.allowlist.by_key(proof.sender)
        # Proofs against our own neighbours go first: those are the ones we could check are
        # about an admitted peer.
        if accused is not None:
            self._pending_proofs.insert(0, proof)
        else:
            self._pending_proofs.append(proof)
        del self._pending_proofs[MAX_PENDING_PROOFS:]
        if accused is not None:
            self._act_on_proof(accused.name, proof, reported_by)
        self._refresh_equivocation_status()

    def _act_on_proof(self, peer: str, proof: EquivocationProof, reported_by: str | None) -> None:
        r = self.inbox.current_round
        event = self.trust.prove_equivocation(peer, r, proof.round, proof.encode().hex())
        if event is None:
            return
        acting = self.trust.settings.enabled
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
        self.audit.append(
            "equivocation_proof",
            r,
            peer=peer,
            excluded=acting,
            reported_by=reported_by,
            **proof.evidence(),
        )
        self.metrics.equivocation_proofs.labels(peer=peer).inc()
        self._refresh_trust_status()

    def _outgoing_evidence(self, r: int) -> tuple[list[Receipt], list[EquivocationProof]]:
        """What an honest round-r envelope carries: the receipts of the envelopes accepted in
        round r - 1, and the proofs learned since the last envelope (each sent once)."""
        proofs = self._pending_proofs[:DEFAULT_MAX_PROOFS]
        del self._pending_proofs[:DEFAULT_MAX_PROOFS]
        return self.receipts.accepted(r - 1), proofs

    def _refresh_equivocation_status(self) -> None:
        proven = self.trust.proven()
        self.state.equivocation = {
            "proven": proven,
            "proofs_learned": self.evidence_counts["proofs_learned"],
            "invalid_receipts": self.evidence_counts["invalid_receipts"],
            "invalid_proofs": self.evidence_counts["invalid_proofs"],
            "pending_proofs": len(self._pending_proofs),
        }
        for name, info in self.state.peers.items():
            info["proven_equivocation"] = name in proven
            info["proven_equivocation_round"] = proven.get(name)

    def record_rejection(
        self,
        reason: str,
        detail: str,
        *,
        sender: str | None,
        round_: int | None,
        source: str | None = None,
        receipt: Receipt | None = None,
        why: str | None = None,
    ) -> None:
        """Count a refused request in /status and /metrics, and log it (rate-limited).

        `why` is the precise reason behind an `unauthenticated` refusal (gossip/auth.py),
        counted in /status `unauthenticated` and `murmur_unauthenticated_requests_total`.

        `sender` is the admitted peer whose signature verified, or None. Only those are
        audited one record each (their number is bounded by the replay guard), with the
        envelope's `receipt` when there is one, so the sender's signed head survives a crash
        (node/rollback.py); anyone can cause an unauthenticated rejection, so those are
        tallied and summarised in one `rejections` audit record per round
        (`summarise_rejections`).
        """
        reason = str(reason)  # a plain code, whichever enum it came from
        self.rejected[reason] += 1
        self.state.rejected = dict(self.rejected)
        self.metrics.rejected.labels(reason=reason).inc()
        if why is not None:
            self.state.unauthenticated[why] = self.state.unauthenticated.get(why, 0) + 1
            self.metrics.unauthenticated.labels(why=why).inc()
        self.rejection_log.warning(
            reason if why is None else f"{reason}:{why}",  # one line per interval per cause
            "rejected message (%s) from %s: %s",
            reason,
            sender or source or "an unknown address",
            printable(detail),
        )
        if sender is None:
            self.unauthenticated_rejections.add(reason, source)
            return
        extra = {} if receipt is None else {"receipt": receipt.to_hex()}
        self.audit.append(
            "message_received",
            round_,
            sender=sender,
            accepted=False,
            reason=reason,
            detail=detail[:200],
            **extra,
        )

    def summarise_rejections(self, round_: int | None) -> None:
        """Write the unauthenticated rejections since the last call as ONE audit record
        (reason -> count, the top source addresses); nothing when there were none."""
        if self.unauthenticated_rejections:
            self.audit.append("rejections", round_, **self.unauthenticated_rejections.summary())

    # ---------------------------------------------------------------- rollback evidence

    def _own_head(self) -> AuditHead:
        """What this node's envelopes claim (gossip/receipts.py, AuditHead): its newest durable
        signed audit head and its ledger's spend. Both only grow, which neighbours check."""
        seq, digest = self.audit.durable_head
        if self.ledger is None:
            return AuditHead(seq, digest, 0, 0.0)
        epsilon = max(0.0, float(self.ledger.epsilon_spent())) + 0.0  # never -0.0
        return AuditHead(seq, digest, int(self.ledger.steps_taken), epsilon)

    async def _settle_head(self) -> None:
        """Let the audit head signed at the end of the last round reach the disk before this
        round's envelope claims it (the syncer has usually done so long before). Bounded: a
        slow disk makes the claim lag a round, it never holds the round up."""
        timeout = self.config.gossip.send_timeout_s
        if not await asyncio.to_thread(self.audit.wait_durable, timeout):
            log.warning("the audit log's last head is not on disk after %.0f s", timeout)

    def answer_receipts_request(
        self, body: bytes, sender: bytes | None = None
    ) -> tuple[int, str, bytes]:
        """Handle one POST /receipts body (node/rollback.py): (status, content type, payload).
        `sender`: the key the request was authenticated with, which must be the requester's."""
        return self.rollback.answer(body, self.inbox.current_round, sender)

    async def check_own_receipts(self, transport: Any = None) -> None:
        """Before signing anything, ask the neighbours for the newest receipt they hold of this
        node; refuse to start if its state is older than what it signed (docs/privacy.md)."""
        self.state.phase = "checking_rollback"
        try:
            await self.rollback.check_startup(
                transport,
                own_head=self._own_head(),
                signed_through=max(self.last_signed_round, self.next_round - 1),
                next_round=self.next_round,
                stop=self.stop,
            )
        except RolledBackError as exc:
            raise StartupError(str(exc)) from None

    def _refresh_rollback_status(self) -> None:
        self.state.rollback = self.rollback.status()
        for name, info in self.state.peers.items():
            info["rolled_back"] = name in self.state.rollback["proven"]

    # ---------------------------------------------------------------- the round loop

    async def run_rounds(self, transport: Transport) -> None:
        """Run every planned round that is left, then return.

        Before each round: jump ahead if a quorum of trusted peers is there, then hold the
        round until enough neighbours can take it (`_wait_for_peers`), so no privacy budget
        is spent on a round nobody receives.
        """
        planned = self.config.training.rounds
        r = self.next_round
        starting = True
        while r <= planned and not self.stop.is_set():
            jump = self._catch_up_target()
            if jump is not None and jump.round > r:
                self._jump(r, jump)
                r = jump.round
            self.inbox.advance_to(r)
            if not await self._wait_for_peers(transport, r, starting=starting):
                break
            starting = False
            if self._catch_up_target() is not None:
                continue  # the network moved on while this node waited: jump first
            try:
                await self._one_round(r, transport)
            except BudgetExhausted as exc:
                log.warning("privacy budget spent: %s; this node stops training and sharing", exc)
                self.state.phase = "budget_exhausted"
                self.audit.append("privacy", r, event="budget_exhausted", detail=str(exc))
                return
            r += 1
        self.state.phase = "stopped" if self.stop.is_set() else "done"

    def _catch_up_target(self) -> CatchUp | None:
        """The round a quorum of trusted peers has reached, if ahead of ours.

        Claims of quarantined peers and of proven equivocators never count (a proof is a fact
        even with trust off, and a liar's round claims are worth nothing); the quorum is
        `catch_up_quorum`, so one far-ahead peer alone cannot make this node skip rounds.
        """
        distrusted = self.trust.quarantined() | set(self.trust.proven())
        return self.inbox.catch_up_round(self.catch_up_quorum, exclude=distrusted)

    def _jump(self, r: int, jump: CatchUp) -> None:
        """Log and audit a catch-up; a jump over more than one round loudly, with who vouched."""
        skipped = jump.round - r
        if skipped > 1:
            log.warning(
                "\n%s\nCATCH-UP: jumping from round %d to round %d, skipping %d rounds (no "
                "privacy budget is spent on them); vouched for by %s (quorum %d of %d "
                "neighbours)\n%s",
                "=" * 78,
                r,
                jump.round,
                skipped,
                ", ".join(jump.vouchers),
                self.catch_up_quorum,
                len(self.peers),
                "=" * 78,
            )
        else:
            log.info(
                "behind: %s are at round %d; moving on from round %d", jump.vouchers, jump.round, r
            )
        self.audit.append(
            "catch_up",
            r,
            to_round=jump.round,
            skipped=skipped,
            quorum=self.catch_up_quorum,
            vouched_by=list(jump.vouchers),
        )

    async def _one_round(self, r: int, transport: Transport) -> None:
        started = time.monotonic()
        self.state.round = r
        self.receipts.advance(r)
        if r <= self.last_signed_round:
            # Restarted after signing this round: a second, different round-r envelope would
            # be equivocation. Share nothing; collect and aggregate from the checkpoint.
            log.warning(
                "round %d was already signed before a restart; not training or sending it "
                "again (collecting and aggregating from the checkpointed model)",
                r,
            )
            self.audit.append("round_resumed", r, last_signed_round=self.last_signed_round)
            own_state = get_state(self.model)
            own_sha = state_sha256(own_state)
        previous_state = get_state(self.model)  # the model round r starts from
        if r > self.last_signed_round:
            own_state, own_sha = await self._train_and_share(r, transport)

        self.state.phase = "collecting"
        collected = await self.inbox.collect(
            r,
            [p.name for p in self.peers],
            self.config.gossip.round_timeout_s,
            self.stop,
            wait_for=self.liveness.live(),  # not the neighbours marked down
        )
        for change in self.liveness.round_finished(r, collected.messages):
            self._liveness_changed(change)
        self.state.phase = "aggregating"
        new_state, new_sha, distance = await asyncio.to_thread(
            self._aggregate, r, own_state, own_sha, collected.messages, previous_state
        )
        set_state(self.model, new_state)

        self.state.phase = "evaluating"
        metrics = self._evaluate()
        self.audit.append("evaluation", r, metrics=metrics)
        epsilon = self.state.privacy.get("epsilon_spent", 0.0)
        record = RoundRecord(
            round=r,
            auc=metrics.get("auc"),
            epsilon=epsilon,
            metrics=metrics,
            received=sorted(collected.messages),
            missing=collected.missing,
            neighbour_distance=distance,
            seconds=time.monotonic() - started,
        )
        self.state.history.append(asdict(record))
        self.state.last_metrics = metrics
        self.state.model_sha256 = new_sha
        self.metrics.observe_round(r, metrics, epsilon, record.seconds)
        self.summarise_rejections(r)
        self._checkpoint(r)
        self.audit.sign_head()
        log.info(
            "round %d done in %.2fs: auc=%s eps=%.3f received=%d/%d",
            r,
            record.seconds,
            _fmt(metrics.get("auc")),
            epsilon,
            len(collected.messages),
            len(self.peers),
        )

    async def _train_and_share(
        self, r: int, transport: Transport
    ) -> tuple[dict[str, np.ndarray], str]:
        """Train round r, durably record that round r is being signed, then share it."""
        self.state.phase = "training"
        reference = get_state(self.model)
        self._write_privacy_intent()
        await asyncio.to_thread(self.trainer.train_round, reference)
        if self.personal is not None:  # Ditto: pulled towards the shared model of round start
            await asyncio.to_thread(self.personal.train_round, reference)
        own_state = get_state(self.model)
        if not all(np.isfinite(a).all() for a in own_state.values()):
            # Training diverged (e.g. from a model that poisoned neighbours blew up): share and
            # keep the model the round started from rather than NaN, which peers would refuse.
            log.warning(
                "round %d: local training diverged to NaN/inf; keeping the previous model", r
            )
            self.audit.append("training_diverged", r)
            set_state(self.model, reference)
            own_state = reference
        own_sha = state_sha256(own_state)
        self._refresh_privacy_status()

        await self._settle_head()
        self.state.phase = "sharing"
        self._write_signed_round(r)
        if self.adversary is None:
            # Only DP-SGD output leaves the hospital: the training loss is computed from raw
            # patient rows without noise, so it is not shared (docs/privacy.md).
            receipts, proofs = self._outgoing_evidence(r)
            update = ModelUpdate(own_state, metrics={}, receipts=receipts, proofs=proofs)
            keys = [p.public_key for p in self.peers]
            envelope = build_envelope(update, self.identity, keys, r, head=self._own_head())
            await self._send(r, transport, self.peers, envelope, own_sha)
        else:
            await self._attack(r, transport, own_state, reference)
        return own_state, own_sha

    async def _send(
        self,
        r: int,
        transport: Transport,
        peers: list[Peer],
        envelope: bytes,
        model_sha256: str,
    ) -> None:
        results = await transport.send_all(peers, envelope)
        for result in results:
            self._record_contact(
                result.peer,
                Contact.from_answer(result.status, result.reason, "", source="send"),
            )
        self.state.bytes_sent += len(envelope) * len(peers)
        self.metrics.bytes_sent.inc(len(envelope) * len(peers))
        self.audit.append(
            "update_sent",
            r,
            recipients=[p.name for p in peers],
            delivered=[x.peer for x in results if x.ok],
            failed={x.peer: x.reason for x in results if not x.ok},
            bytes=len(envelope),
            model_sha256=model_sha256,
            epsilon_spent=self.state.privacy.get("epsilon_spent"),
        )

    async def _attack(
        self,
        r: int,
        transport: Transport,
        own_state: dict[str, np.ndarray],
        anchor: dict[str, np.ndarray],
    ) -> None:
        """ADVERSARY MODE: send this round's malicious messages instead of the honest update.

        Model attacks rush: they wait (up to the round deadline) for the honest neighbours'
        round-r models, so they craft from this round's honest statistics, as in the papers.
        """
        assert self.adversary is not None
        adversary = self.adversary
        log.warning("ADVERSARY MODE round %d: attacking with %s", r, adversary.describe())
        honest: dict[str, dict[str, np.ndarray]] = {}
        if adversary.rushes:
            self.state.phase = "attacker_waiting_for_honest_models"
            seen = await self.inbox.collect(
                r,
                [p.name for p in adversary.honest_peers],
                self.config.gossip.round_timeout_s,
                self.stop,
            )
            honest = {n: m.envelope.update.tensors for n, m in seen.messages.items()}
        messages = adversary.messages(r, own_state, anchor, honest, self._own_head())
        for message in messages:
            if message.abuse is None:
                assert message.model_sha256 is not None
                await self._send(
                    r, transport, list(message.recipients), message.data, message.model_sha256
                )
        abuse = [m for m in messages if m.abuse is not None]
        for message in abuse:
            await transport.send_all(list(message.recipients), message.data, message.signer)
        if abuse:
            self.audit.append(
                "attack_abuse_sent",
                r,
                counts=dict(Counter(m.abuse for m in abuse)),
                recipients=[p.name for p in adversary.honest_peers],
            )

    def _aggregate(
        self,
        r: int,
        own_state: dict[str, np.ndarray],
        own_sha: str,
        received: dict[str, ReceivedUpdate],
        previous_state: dict[str, np.ndarray] | None = None,
    ) -> tuple[dict[str, np.ndarray], str, float | None]:
        """Combine our model with the neighbours' by the configured rule, leaving out
        quarantined peers and down-weighting distrusted ones; then update trust. Returns the
        new state, its SHA-256 and our mean distance to the neighbours (the disagreement)."""
        cfg = self.config.aggregation
        heard = sorted(received)
        if self.adversary is not None:  # an attacker never averages in its colluders' poison
            heard = [n for n in heard if n not in self.adversary.colluders]
        own = flatten(own_state)
        vectors = {n: flatten(received[n].envelope.update.tensors) for n in heard}
        distance = None
        to_own: dict[str, float] = {}
        if heard:
            with np.errstate(over="ignore", invalid="ignore"):
                row_distances = distances_to(own, np.stack(list(vectors.values())))
            to_own = dict(
                zip(heard, np.nan_to_num(row_distances, nan=np.inf).tolist(), strict=True)
            )
            distance = float(np.mean(row_distances))
            distance = distance if np.isfinite(distance) else None  # poison overflowed float32
        quarantined = self.trust.quarantined()
        proven = self.trust.proven()
        too_far: set[str] = set()
        if self.trust.settings.enabled:
            with np.errstate(over="ignore"):
                own_norm = float(np.linalg.norm(own))
            too_far = set(
                too_far_from_own(
                    own_norm,
                    {n: d for n, d in to_own.items() if n not in quarantined},
                    relative_distance_limit(self.trust.settings, self.config.privacy.enabled),
                )
            )
        for peer in too_far:
            self.state.too_far[peer] = self.state.too_far.get(peer, 0) + 1
            self.metrics.too_far.labels(peer=peer).inc()
        names = [n for n in heard if n not in quarantined and n not in too_far]
        # Each peer left out is presumed Byzantine, so it uses up one of the f the rule must
        # still tolerate among the remaining inputs.
        f = max(0, cfg.f - (len(heard) - len(names)))
        stack = (
            np.stack([vectors[n] for n in names])
            if names
            else np.zeros((0, own.size), dtype=own.dtype)
        )
        inputs = [{"peer": n, "model_sha256": received[n].model_sha256} for n in names]
        left_out = [
            {
                "peer": n,
                "model_sha256": received[n].model_sha256,
                "reason": _exclusion_reason(n, proven, quarantined),
            }
            for n in heard
            if n in quarantined or n in too_far
        ]
        record = {"rule": cfg.rule, "f": f, "own_model_sha256": own_sha}
        if len(names) + 1 < min_inputs(cfg.rule, f):
            # Too few inputs arrived for the rule to be robust: keep our own model this round.
            excluded = [{**u, "reason": "too_few_inputs"} for u in inputs] + left_out
            self.audit.append(
                "aggregation", r, **record, used=[], excluded=excluded, result_sha256=own_sha
            )
            self._observe_trust(r, own, own, vectors)
            return own_state, own_sha, distance
        used, excluded = inputs, []
        if cfg.rule in ("krum", "multi_krum"):
            # Krum picks whole models: record exactly whose went into the result.
            m = int(cfg.params.get("m", len(names) + 1 - f)) if cfg.rule == "multi_krum" else 1
            chosen = {int(i) - 1 for i in krum_select(own, stack, f, m=m)}
            used = [u for i, u in enumerate(inputs) if i in chosen]
            excluded = [
                {**u, "reason": "not_selected"} for i, u in enumerate(inputs) if i not in chosen
            ]
        weights = self._mixing_weights(names)
        try:
            result = AGGREGATORS[cfg.rule](own, stack, weights, f, **cfg.params)
        except ValueError as exc:
            # Finite inputs whose combination overflows (only an undefended rule lets poison
            # grow that large): keep our own model this round rather than stop.
            log.warning("round %d: aggregation failed (%s); keeping our own model", r, exc)
            excluded = [{**u, "reason": "aggregate_not_finite"} for u in inputs] + left_out
            self.audit.append(
                "aggregation", r, **record, used=[], excluded=excluded, result_sha256=own_sha
            )
            self._observe_trust(r, own, own, vectors)
            return own_state, own_sha, distance
        result = result.astype(own.dtype, copy=False)
        if self.server_optimizer is not None and previous_state is not None:
            result = self._server_step(previous_state, result, record)
        new_state = unflatten(result, own_state)
        new_sha = state_sha256(new_state)
        self.audit.append(
            "aggregation",
            r,
            **record,
            used=used,
            excluded=excluded + left_out,
            result_sha256=new_sha,
        )
        self.state.aggregation = {"rule": cfg.rule, "f": f, "inputs": len(names) + 1}
        self._observe_trust(r, own, result, vectors)
        return new_state, new_sha, distance

    def _server_step(
        self, previous: dict[str, np.ndarray], aggregate: np.ndarray, record: dict[str, Any]
    ) -> np.ndarray:
        """The server optimizer's step on (aggregate - previous model): post-processing of DP
        outputs only (models/optimizers.py). The aggregation record names the optimizer and
        the robust aggregate's hash; its result_sha256 is then the stepped model's."""
        assert self.server_optimizer is not None
        stepped = self.server_optimizer.step(flatten(previous), aggregate)
        if not np.isfinite(stepped).all():
            log.warning("server optimizer step not finite; keeping the robust aggregate")
            return aggregate
        record["server_optimizer"] = self.server_optimizer.settings.name
        record["aggregate_sha256"] = state_sha256(unflatten(aggregate, previous))
        return stepped

    def _observe_trust(
        self, r: int, own: np.ndarray, aggregate: np.ndarray, vectors: dict[str, np.ndarray]
    ) -> None:
        """Score every neighbour heard this round (quarantined ones too) by its distance from
        the robust aggregate; log and audit each quarantine and re-admission with its evidence."""
        names = list(vectors)
        rows = (
            np.stack([vectors[n] for n in names]) if names else np.zeros((0, own.size), own.dtype)
        )
        with np.errstate(over="ignore", invalid="ignore"):  # poison may overflow float32
            distances = np.nan_to_num(distances_to(aggregate, rows), nan=np.inf)
            own_distance = float(
                np.nan_to_num(distances_to(aggregate, own[None, :]), nan=np.inf)[0]
            )
        events = self.trust.observe(
            r,
            own_distance,
            {n: float(d) for n, d in zip(names, distances, strict=True)},
            f=self.config.aggregation.f,
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
            self.audit.append(event.kind, r, peer=event.peer, evidence=event.evidence)
        self._refresh_trust_status()

    def _refresh_trust_status(self) -> None:
        self.state.trust = self.trust.scores()
        self.state.trust_history = self.trust.history()
        quarantined = self.trust.quarantined()
        self.state.quarantined = sorted(quarantined)
        for peer, score in self.state.trust.items():
            self.metrics.trust.labels(peer=peer).set(score)
            self.metrics.quarantined.labels(peer=peer).set(1 if peer in quarantined else 0)
        self._refresh_equivocation_status()

    def _mixing_weights(self, received: list[str]) -> np.ndarray:
        """Metropolis-Hastings weights, each scaled by the peer's trust factor; a missing or
        distrusted neighbour's share stays with this node."""
        own_degree = len(self.peers)
        w = np.array(
            [self.trust.weight(n) / (1 + max(own_degree, self.peer_degree[n])) for n in received]
        )
        return np.concatenate([[1.0 - w.sum()], w])

    def _evaluate(self) -> dict[str, Any]:
        """Clinical metrics on the held-out split, at a threshold that never looks at the test
        rows. Under DP nothing published here is computed from training rows (docs/privacy.md):
        the threshold is fixed (Youden's J would be one training patient's score) and the
        majority baseline is the test split's own majority, not the training labels'."""
        d = self.data
        threshold = self.config.evaluation.resolved_threshold(self.config.privacy.enabled)
        if self.personal is not None:  # the personal model's metrics, beside the shared one's
            self.state.personal = self.personal.evaluate(
                d.x_train, d.y_train, d.x_test, d.y_test, threshold
            )
        return evaluate(self.model, d.x_train, d.y_train, d.x_test, d.y_test, threshold)

    # ---------------------------------------------------------------- persistence

    def _checkpoint(self, r: int) -> None:
        ckpt = NodeCheckpoint(
            round=r,
            model_state=get_state(self.model),
            trainer_state=self.trainer.state_dict_bytes(),
            privacy=self.ledger.to_state() if self.ledger else {},
            replay=self.replay.to_state(),
            config_sha256=self.config.sha256,
            binding=self.binding,
            extra={
                "history": self.state.history,
                "bytes_sent": self.state.bytes_sent,
                "trust": self.trust.to_state(),
                "receipts": self.receipts.to_state(),
                "heads": self.rollback.to_state(),
                **(
                    {"server_optimizer": self.server_optimizer.to_state()}
                    if self.server_optimizer is not None
                    else {}
                ),
                **({"personal": self.personal.state()} if self.personal is not None else {}),
            },
        )
        digest = save_checkpoint(self.state_dir, ckpt)
        self.audit.append("checkpoint", r, checkpoint_sha256=digest)
        if self.ledger is not None:
            self.audit.append("privacy", r, **self.state.privacy)
        self._write_status()

    def _write_privacy_intent(self) -> None:
        """Before training, durably record the steps this round may spend (write-ahead)."""
        if self.ledger is None:
            return
        planned = self.ledger.steps_taken + self._dp_steps_per_round()
        atomic_write(
            self.state_dir / "privacy_intent.json", json.dumps({"steps": planned}).encode()
        )

    def _write_signed_round(self, r: int) -> None:
        """Before signing round r, durably record it (fsync): a node restarted in this round
        must not sign a second, different round-r envelope, which would be equivocation."""
        atomic_write(self.state_dir / SIGNED_ROUND_FILE, json.dumps({"round": r}).encode())
        self.last_signed_round = r

    def _read_signed_round(self) -> int:
        path = self.state_dir / SIGNED_ROUND_FILE
        if not path.exists():
            return 0
        try:
            return int(json.loads(path.read_text())["round"])
        except (ValueError, KeyError, TypeError) as exc:
            raise StartupError(
                f"{path} is corrupt ({exc!r}); it records the last round this node signed. "
                "Fix: restore it, or delete it only if you know no envelope of a later round "
                "than the checkpoint's was sent"
            ) from None

    def _read_privacy_intent(self) -> int:
        path = self.state_dir / "privacy_intent.json"
        if not path.exists():
            return 0
        return int(json.loads(path.read_text())["steps"])

    def _refresh_privacy_status(self) -> None:
        if self.ledger is None:
            self.state.privacy = {"enabled": False, "epsilon_spent": 0.0}
            return
        self.state.privacy = {"enabled": True, **self.ledger.report()}

    def _write_status(self) -> None:
        # A view for run_cluster and operators, rebuilt from the checkpoint after a crash:
        # replaced atomically, but not worth an fsync every round.
        path = self.state_dir / "status.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.status(), default=str))
        os.replace(tmp, path)

    def status(self) -> dict[str, Any]:
        return {**asdict(self.state), "audit": self.audit.counts_by_kind()}

    # ---------------------------------------------------------------- lifecycle

    async def _wait_for_peers(self, transport: Transport, r: int, *, starting: bool) -> bool:
        """Hold round r until at least `min_neighbours` neighbours can take its update; False
        when the node was stopped first.

        Why: a round trained but received by nobody spends privacy budget for nothing. A
        neighbour counts when it is up (gossip/liveness.py) and its last probe answer or send
        result says it admits us. While too few count, the node probes them with backoff,
        says whom it waits for and why (unreachable, or the peer's refusal reason), and spends
        nothing; it looks again at once when a neighbour's envelope is accepted. When this
        process starts, it also gives every neighbour up to `startup_timeout_s` to come up,
        so that the first round includes everyone who is starting at the same time.
        """
        grace_end = time.monotonic() + (self.config.gossip.startup_timeout_s if starting else 0)
        delay, next_probe = PROBE_FIRST_DELAY_S, 0.0
        waiting_since: float | None = None
        said, said_at = "", 0.0
        while not self.stop.is_set():
            self._neighbour_news.clear()  # before looking, so news after the look wakes us
            excluded = self._excluded_from_count()
            need = self._needed_neighbours(len(excluded))
            counted = self.liveness.counted(excluded)
            candidates = [p for p in self.peers if p.name not in excluded]
            everyone = len(counted) == len(candidates)
            in_grace = time.monotonic() < grace_end
            if (len(counted) < need or (in_grace and not everyone)) and (
                time.monotonic() >= next_probe
            ):
                up = set(self.liveness.live())
                await self._probe([p for p in candidates if p.name in up], transport)
                next_probe = time.monotonic() + delay
                delay = min(delay * 2, PROBE_MAX_DELAY_S)
                counted = self.liveness.counted(excluded)
                everyone = len(counted) == len(candidates)
            ready = len(counted) >= need
            if ready and (everyone or time.monotonic() >= grace_end):
                self._ready_to_train(
                    r, counted, excluded, waited_since=waiting_since, starting=starting
                )
                return True
            reasons = self.liveness.not_counted(excluded)
            self.state.phase = "waiting_for_neighbours" if not ready else "waiting_for_peers"
            self._refresh_liveness_status(waiting_for=reasons)
            if not ready:
                if waiting_since is None:
                    waiting_since = time.monotonic()
                    self.audit.append(
                        "waiting_for_neighbours",
                        r,
                        min_neighbours=need,
                        counted=counted,
                        reasons=reasons,
                    )
                message = "; ".join(f"{n}: {why}" for n, why in sorted(reasons.items()))
                if message != said or time.monotonic() - said_at >= WAIT_REMINDER_S:
                    log.warning(
                        "round %d waits for neighbours: it is shared only when at least %d can "
                        "take it (gossip.min_neighbours), and %d can (%s). Waiting for %s. No "
                        "privacy budget is spent meanwhile.",
                        r,
                        need,
                        len(counted),
                        ", ".join(counted) or "none",
                        message,
                    )
                    said, said_at = message, time.monotonic()
            wake = max(0.0, next_probe - time.monotonic())
            if in_grace:
                wake = min(wake, max(0.0, grace_end - time.monotonic()))
            await _first_of(self.stop, self._neighbour_news, timeout_s=max(wake, 0.01))
        return False

    def _ready_to_train(
        self,
        r: int,
        counted: list[str],
        excluded: dict[str, str],
        *,
        waited_since: float | None,
        starting: bool,
    ) -> None:
        """Say (once) that round r goes ahead, and with whom if not with everyone."""
        missing = self.liveness.not_counted(excluded)
        self.state.phase = "starting_round"
        self._refresh_liveness_status()
        if waited_since is not None:
            waited = time.monotonic() - waited_since
            log.warning(
                "round %d goes ahead after waiting %.1fs for neighbours: %s can take it%s",
                r,
                waited,
                ", ".join(counted) or "none needed",
                f" (still without {', '.join(sorted(missing))})" if missing else "",
            )
            self.audit.append(
                "neighbours_ready", r, waited_s=round(waited, 3), counted=counted, missing=missing
            )
        elif missing and starting:
            log.warning(
                "starting round %d without %s",
                r,
                "; ".join(f"{n} ({why})" for n, why in sorted(missing.items())),
            )

    def _needed_neighbours(self, excluded: int) -> int:
        """min_neighbours now. When the config leaves it to the rule, each neighbour left out
        for good uses up one of the f Byzantine neighbours the rule must tolerate (as in
        aggregation), so proven equivocators do not leave the honest ones waiting forever."""
        if self.config.gossip.min_neighbours is not None:
            return self.min_neighbours
        cfg = self.config.aggregation
        return default_min_neighbours(cfg.rule, max(0, cfg.f - excluded))

    def _excluded_from_count(self) -> dict[str, str]:
        """Neighbours that never count toward min_neighbours, with why: proven equivocators
        (left out of aggregation for good while trust is on)."""
        if not self.trust.settings.enabled:
            return {}
        return {
            name: f"proven equivocator (round {round_}): left out for good"
            for name, round_ in self.trust.proven().items()
        }

    async def _probe(self, peers: list[Peer], transport: Transport) -> None:
        """Ask each of `peers` at once whether it takes our envelopes (gossip/probe.py)."""
        if not peers:
            return
        timeout = min(PROBE_TIMEOUT_S, self.config.gossip.send_timeout_s)
        async with asyncio.TaskGroup() as group:
            asks = {
                p.name: group.create_task(
                    transport.probe(p, build_probe(self.identity, p.public_key), timeout)
                )
                for p in peers
            }
        for name, task in asks.items():
            self._record_contact(name, task.result())

    def _record_contact(self, peer: str, contact: Contact) -> None:
        """Keep the latest evidence about a neighbour; log when it starts or stops taking our
        envelopes (once per change, not every round). Unknown names are not neighbours."""
        if peer not in self.liveness.peers:
            return
        before = self.liveness.peers[peer].contact.reach
        self.liveness.record_contact(peer, contact)
        if contact.reach is not before and before is not Reach.UNKNOWN:
            if contact.reach is Reach.ADMITTED:
                log.info("neighbour %s takes our envelopes again", peer)
            else:
                log.warning("neighbour %s is %s", peer, contact.describe())
        elif before is Reach.UNKNOWN and contact.reach is Reach.REFUSED:
            log.warning("neighbour %s is %s", peer, contact.describe())
        self.state.peers[peer].update(self.liveness.status(peer))

    def answer_probe(self, body: bytes, sender: bytes | None = None) -> tuple[int, str]:
        """Answer a neighbour's POST /probe: (HTTP status, reason code). Never raises.
        `sender`: the key the request was authenticated with, which must be the prober's.

        The verdict is the one the envelope opener would reach on that sender, and like the
        answer to an envelope it is only the reason code: the detail stays in this node's log.
        A refused probe is logged at most once per reason per interval (node/rejections.py), so
        an operator sees who is knocking without a line every few seconds; it is not audited,
        as it changes nothing here.
        """
        try:
            prober = check_probe(
                body,
                self.identity.public_key,
                self.allowlist,
                timestamp_window_s=self.config.gossip.timestamp_window_s,
            )
            if sender is not None and prober.public_key != sender:
                raise WireError(RejectReason.SENDER_MISMATCH, "a probe posted by another peer")
        except WireError as err:
            self.rejection_log.warning(
                f"probe:{err.reason.value}", "refused a probe (%s): %s", err.reason, err.detail
            )
            return HTTP_STATUS[err.reason], err.reason.value
        return 200, "admitted"

    def _spoke(self, peer: str, round_: int) -> None:
        """`peer` sent a recent authentic envelope: it is up, and a waiting round may go ahead."""
        change = self.liveness.spoke(peer, round_)
        if change is not None:
            self._liveness_changed(change)
        self._neighbour_news.set()

    def _liveness_changed(self, change: LivenessChange) -> None:
        if change.up:
            log.warning(
                "neighbour %s is UP again at round %d: %s", change.peer, change.round, change.why
            )
        else:
            log.warning(
                "neighbour %s is DOWN at round %d: %s; rounds no longer wait for it, and it "
                "still gets our envelopes so it can come back",
                change.peer,
                change.round,
                change.why,
            )
        self.audit.append(
            "peer_up" if change.up else "peer_down", change.round, peer=change.peer, why=change.why
        )
        self._refresh_liveness_status()

    def _refresh_liveness_status(self, waiting_for: dict[str, str] | None = None) -> None:
        """/status: each neighbour's state, and who counts toward min_neighbours now."""
        for name in self.state.peers:
            self.state.peers[name].update(self.liveness.status(name))
        excluded = self._excluded_from_count()
        self.state.neighbours = {
            "min_neighbours": self._needed_neighbours(len(excluded)),
            "counted": self.liveness.counted(excluded),
            "live": self.liveness.live(),
            "down_after_rounds": self.liveness.down_after,
            "waiting_for": waiting_for or {},
        }
        for name, health in self.liveness.peers.items():
            self.metrics.peer_up.labels(peer=name).set(1 if health.up else 0)
        self.metrics.neighbours_counted.set(len(self.state.neighbours["counted"]))
        self.metrics.waiting_for_neighbours.set(
            1 if self.state.phase == "waiting_for_neighbours" else 0
        )

    async def _watch_parent(self, finished: asyncio.Event) -> None:
        """Stop when the launching process (run_cluster) disappears, so no node is orphaned."""
        parent = os.environ.get("MURMUR_PARENT_PID")
        if not parent:
            return
        while not finished.is_set():
            if os.getppid() != int(parent):
                log.warning("parent process %s is gone; stopping", parent)
                self.stop.set()
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(finished.wait(), timeout=0.5)

    def start_line(self) -> str:
        """Who this node is, where it listens, whom it waits for, what it trains, its budget."""
        cfg = self.config
        peers = ", ".join(f"{p.name} ({p.address})" for p in self.peers) or "none"
        if self.ledger is not None:
            privacy = (
                f"DP-SGD ε={self.ledger.epsilon_budget:g} δ={self.ledger.delta:.3g} "
                f"(σ={self.ledger.noise_multiplier:.3f}, spent {self.ledger.epsilon_spent():.3f})"
            )
        else:
            privacy = "NO differential privacy"
        planned = cfg.training.rounds
        where = (
            f"continuing at round {self.next_round}"
            if self.next_round > 1
            else "starting at round 1"
        )
        return (
            f"murmur {VERSION} node {cfg.node.name} (key {self.identity.fingerprint}) "
            f"listening on {cfg.node.listen} for peers and {cfg.operator.listen} for operators; "
            f"peers: {peers}; study: {cfg.data.dataset} "
            f"({self.data.name}, {len(self.data.y_train)} training patients), model "
            f"{cfg.model.name}, {planned} rounds, rule {cfg.aggregation.rule} "
            f"f={cfg.aggregation.f}; privacy: {privacy}; {where} of {planned}"
        )

    def stop_reason(self) -> str:
        """Why the node is stopping, from its last phase, in words for the log."""
        phase = self.state.phase
        if phase == "done":
            return f"all {self.config.training.rounds} planned rounds done"
        if phase == "budget_exhausted":
            return "the privacy budget is spent (no further round could be trained within it)"
        if phase == "stopped":
            return "asked to stop (SIGTERM or SIGINT)"
        return f"stopped while {phase}"

    def finished_already(self) -> str | None:
        """The phase a previous run of this state directory ended in, if it left nothing to
        do: every planned round trained ("done"), or no DP step left in the budget."""
        if self.next_round > self.config.training.rounds:
            return "done"
        if self.ledger is not None and self.ledger.remaining_steps() == 0:
            return "budget_exhausted"
        return None

    async def run(self, *, serve_forever: bool = False) -> int:
        """Serve the peer and operator listeners and run the planned rounds; returns the
        process exit status."""
        from node.api import operator_token, start_api
        from node.paths import open_transport

        self.check_feasibility()
        token = operator_token(self.config)  # a readable token file stops the node here
        log.info("%s", self.start_line())
        ended = self.finished_already()
        if ended is not None and not serve_forever:
            self.state.phase = ended
            log.info(
                "node %s has already finished: %s (round %d, model %s, ε spent %.3f); "
                "nothing to do, exiting. Start it with --serve (or [node] after_training = "
                '"serve") to keep its API up.',
                self.config.node.name,
                self.stop_reason(),
                self.state.round,
                self.state.model_sha256[:12],
                self.state.privacy.get("epsilon_spent", 0.0),
            )
            self._write_status()
            self.audit.close()
            return 0
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop.set)
        self.audit.append(
            "node_start",
            self.next_round,
            config_sha256=self.config.sha256,
            public_key=self.identity.public_key.hex(),
            version=VERSION,
            pid=os.getpid(),
        )
        if self.adversary is not None:
            log.warning(
                "\n%s\nADVERSARY MODE: node %s is a Byzantine attacker (%s), for tests and demos "
                "only. Never run this config in a real consortium.\n%s",
                "!" * 78,
                self.config.node.name,
                self.adversary.describe(),
                "!" * 78,
            )
            self.audit.append("adversary_mode", self.next_round, **self.adversary.status())
        api = await start_api(self, token)
        finished = asyncio.Event()
        try:
            # Open for the whole run, serving included: through a relay, this node is
            # reached only while its relay connections are up.
            async with open_transport(self) as transport:
                await self.check_own_receipts(transport)
                async with asyncio.TaskGroup() as group:
                    group.create_task(self._watch_parent(finished))
                    try:
                        await self.run_rounds(transport)
                        self._write_status()
                        if serve_forever and not self.stop.is_set():
                            log.info("planned rounds done; serving until SIGTERM")
                            await self.stop.wait()
                    finally:
                        finished.set()
        finally:
            self.summarise_rejections(self.state.round)
            self.audit.append("node_stop", self.state.round, reason=self.state.phase)
            self.audit.sign_head()
            self._write_status()
            await api.close()
            self.audit.close()
            log.info(
                "node %s stopping at round %d: %s; ε spent %.3f",
                self.config.node.name,
                self.state.round,
                self.stop_reason(),
                self.state.privacy.get("epsilon_spent", 0.0),
            )
        return 0


async def _first_of(*events: asyncio.Event, timeout_s: float) -> None:
    """Return when any of `events` is set or `timeout_s` has passed, whichever comes first."""
    waits = [asyncio.ensure_future(e.wait()) for e in events]
    try:
        await asyncio.wait(waits, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waits:
            w.cancel()


def _exclusion_reason(peer: str, proven: dict[str, int], quarantined: set[str]) -> str:
    """Why a heard peer's model is not aggregated this round (the audit record's reason)."""
    if peer in proven:
        return "proven_equivocation"
    return "quarantined" if peer in quarantined else "too_far_from_own"


def _pair(values: list[float] | None) -> tuple[float, float] | None:
    """A validated two-number config list as the (negative, positive) tuple training takes."""
    return None if values is None else (float(values[0]), float(values[1]))


def _stable_int(text: str) -> int:
    """A small per-node integer from its name, stable across runs (Python's hash() is not)."""
    return int.from_bytes(text.encode()[:4].ljust(4, b"\0"), "little") % 10_000


def _fmt(x: float | None) -> str:
    return "undefined" if x is None else f"{x:.3f}"
