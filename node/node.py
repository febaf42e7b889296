"""One hospital's node: a small composition of parts, each with one concern.

    study.py       the model, local DP-SGD trainer, privacy ledger and data split
    receiver.py    POST bodies -> authentic envelopes in the round inbox, or counted refusals
    evidence.py    receipts and equivocation proofs (checked, kept, forwarded)
    neighbours.py  who is up and admits us; holding a round until enough can take it
    aggregator.py  the robust rule and the trust update, with every exclusion audited
    sharing.py     the outgoing path (honest: one envelope for every neighbour)
    persistence.py checkpoint, write-ahead privacy intent, signed-round record
    rounds.py      the round protocol, calling the parts above in order
    lifecycle.py   the process: start checks, listeners, signals, the orderly stop

`HospitalNode` builds them from a validated config, restores them from the checkpoint, and
serves them through node/api.py, which sees only the narrow `ServedNode` protocol
(node/served.py). A Byzantine test node is composed here too: `[adversary]` hands it to
node/byzantine.py, which replaces its outgoing path (and, for label flipping, its data).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from typing import Any

from murmur.crypto.allowlist import Allowlist, Peer
from murmur.crypto.identity import Identity, load_identity, load_public_key
from murmur.gossip.attacks import Adversary
from murmur.gossip.membership import MembershipError
from murmur.gossip.peer_records import RecordBook
from murmur.gossip.receipts import AuditHead, ReceiptBook
from murmur.gossip.rounds import CatchUp, RoundInbox
from murmur.gossip.sampling import PeerSample
from murmur.gossip.spool import node_spool
from murmur.gossip.transport import Transport
from murmur.gossip.trust import TrustTracker
from murmur.gossip.wire import EnvelopeOpener, ReplayGuard, WireLimits, default_max_message_bytes
from murmur.models.data import HospitalSplit
from murmur.models.params import state_sha256
from murmur.models.privacy import PrivacyLedger
from murmur.node import byzantine, consensus_net, lifecycle
from murmur.node.aggregator import RoundAggregator
from murmur.node.audit import AUDIT_FILE, AuditError, AuditLog, RetentionPolicy, records_of_kind
from murmur.node.binding import config_binding, data_fingerprint
from murmur.node.checkpoint import NodeCheckpoint
from murmur.node.clock import ClockReport
from murmur.node.config import NodeConfig
from murmur.node.consortium import Governance, behind_audit, governance_dir, open_governance
from murmur.node.evidence import EvidenceBook
from murmur.node.governance import peers_of
from murmur.node.metrics import NodeMetrics
from murmur.node.neighbours import NeighbourWatch
from murmur.node.noise_plan import NoisePlan
from murmur.node.persistence import SIGNED_ROUND_FILE, NodeStore
from murmur.node.receiver import ReceivedUpdate, Receiver
from murmur.node.records import load_saved_records
from murmur.node.rejections import RateLimitedLog
from murmur.node.rollback import RollbackGuard, RolledBackError
from murmur.node.rounds import RoundCoordinator
from murmur.node.sharing import HonestSharing, Sender
from murmur.node.state import NodeState, RoundRecord, StartupError
from murmur.node.studies.gate import StudyGate
from murmur.node.study import Study, load_own_data
from murmur.node.threads import limit_numeric_threads

__all__ = [
    "SIGNED_ROUND_FILE",
    "HospitalNode",
    "NodeState",
    "ReceivedUpdate",
    "RoundRecord",
    "StartupError",
]

log = logging.getLogger("murmur.node")


class HospitalNode:
    """A hospital's murmur node. Build it from a validated config, then `await run()`."""

    def __init__(self, config: NodeConfig, *, governance: Governance | None = None) -> None:
        """``governance``: the consortium membership this runtime shares with the other
        studies of its process (node/multistudy.py); None opens the config's own."""
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
        self.state_dir = config.node.state_dir
        self.governance_news = asyncio.Event()
        self.governance, revoked = self._open_governance(governance)
        # The runtimes a membership change applies to: this one, or every study of the
        # process sharing the governance (node/multistudy.py sets it).
        self.governed: list[HospitalNode] = [self]
        self.allowlist = Allowlist(self.peers, revoked=revoked)
        self.record_book = RecordBook(self.allowlist)  # where peers say they are now
        load_saved_records(self.record_book, self.state_dir)
        self.store = NodeStore(self.state_dir)
        data = load_own_data(config)
        if config.adversary.enabled:
            data = byzantine.poisoned_data(config, data)
        self.study = Study(config, data)
        max_bytes = config.gossip.max_message_bytes or default_max_message_bytes(self.study.spec)
        self.limits = WireLimits(
            max_message_bytes=max_bytes,
            timestamp_window_s=config.gossip.timestamp_window_s,
            accepted_codecs=config.compression.accepted(),
        )
        self.metrics = NodeMetrics(config.node.name)
        self.audit = AuditLog(
            self.state_dir / AUDIT_FILE,
            self.identity,
            retention=RetentionPolicy(max_age_days=config.audit.retention_days),
        )
        # The study's manifest, its approvals and its share of the site budget (node/studies/).
        self.gate = StudyGate(config, self.identity, self.peers, self.audit, self.record_rejection)
        # Each peer's newest signed audit head, POST /receipts, the startup check.
        self.rollback = RollbackGuard(
            identity=self.identity,
            allowlist=self.allowlist,
            audit=self.audit,
            metrics=self.metrics,
            state_dir=self.state_dir,
            gossip=config.gossip,
            on_change=self._refresh_rollback_status,
            budget_head_of=self.gate.witnessed_head_of,
            refused_key=self.gate.budget_refusal,
            study=self.gate.wire_id,
        )
        self.state = NodeState(
            name=config.node.name,
            public_key=self.identity.public_key.hex(),
            planned_rounds=config.training.rounds,
            peers={
                p.name: {"address": p.address, "last_round": 0, "last_seen": None}
                for p in self.peers
            },
            data=self.study.describe_data(),
        )
        # Neighbours' clock skew, read off their replies (node/clock.py).
        self.clock_report = ClockReport(
            self.state.peers,
            window_s=config.gossip.timestamp_window_s,
            gauge=self.metrics.peer_clock_skew,
            audit=self.audit.append,
            current_round=lambda: self.state.round,
        )
        self.stop = asyncio.Event()
        self.consensus_inbox = consensus_net.inbox_for(config)  # open from the start
        # called once the node is about to serve, after its node_start audit record
        self.on_start: list[Callable[[], None]] = []
        ckpt = self._open_checkpoint()
        self._compose(ckpt)
        self.adversary: Adversary | None = None
        if config.adversary.enabled:
            self.adversary = byzantine.arm(self)
        self._restore(ckpt)
        self.state.model_sha256 = state_sha256(self.study.state())
        self.state.privacy = self.study.privacy_status()

    def _open_governance(
        self, shared: Governance | None
    ) -> tuple[Governance | None, frozenset[bytes]]:
        """With `[consortium]` the peers are the current members (node/governance.py), not
        the [[peers]] entries; returns the governance and the revoked keys. Its log is
        checked against this runtime's own audit log (a study's, under [[studies]])."""
        config = self.config
        if not config.consortium.enabled:
            return None, frozenset()
        governance = shared
        if governance is None:
            try:
                governance = open_governance(config, governance_dir(config))
            except MembershipError as exc:
                raise StartupError(f"[consortium] {exc}") from None
        try:
            recorded = records_of_kind(self.state_dir, "membership")
        except AuditError:  # a first start: no audit log yet
            recorded = []
        if recorded:
            fields = recorded[-1].fields
            problem = behind_audit(governance, int(fields["epoch"]), str(fields["head"]))
            if problem is not None:
                if shared is None:
                    governance.store.close()
                raise StartupError(
                    f"[consortium] {problem}. Fix: put back the newest copy of "
                    f"{governance.store.path}: starting from an older membership, this node "
                    "would accept keys the consortium has revoked since"
                )
        membership = governance.membership
        self.peers = peers_of(membership, config.node.name, self.identity.public_key, config)
        return governance, membership.revoked

    def _compose(self, ckpt: NodeCheckpoint | None) -> None:
        """Build the parts, each from the checkpoint's share when there is one."""
        config = self.config
        self.trust, receipts, self.replay = _books(config, self.peers, ckpt)
        self.inbox: RoundInbox[ReceivedUpdate] = RoundInbox(
            max_round=config.training.rounds, asynchronous=config.gossip.asynchronous
        )
        self.evidence = EvidenceBook(
            receipts,
            allowlist=self.allowlist,
            trust=self.trust,
            audit=self.audit,
            metrics=self.metrics,
            current_round=lambda: self.inbox.current_round,
            on_change=self._refresh_trust_status,
        )
        parts = {"audit": self.audit, "metrics": self.metrics, "state": self.state}
        self.neighbours = NeighbourWatch(
            config,
            identity=self.identity,
            peers=self.peers,
            trust=self.trust,
            stop=self.stop,
            finished_peers=self._finished_peers if config.gossip.asynchronous else tuple,
            **parts,
        )
        self.opener = EnvelopeOpener(
            self.identity,
            self.allowlist,
            self.study.spec,
            limits=self.limits,
            replay=self.replay,
            study=self.gate.wire_id,
            spool=node_spool(self.study.spec, self.state_dir),
        )
        # what DP noise a neighbour may announce, and its yardstick (node/noise_plan.py)
        self.noise_plan = NoisePlan.from_config(config)
        self.receiver = Receiver(
            identity=self.identity,
            allowlist=self.allowlist,
            opener=self.opener,
            inbox=self.inbox,
            rollback=self.rollback,
            evidence=self.evidence,
            timestamp_window_s=config.gossip.timestamp_window_s,
            on_spoke=self.neighbours.spoke,
            noise_plan=self.noise_plan,
            **parts,
        )
        self.sample = _peer_sample(config)
        s = self.sample.s if self.sample is not None else None
        self.aggregator = RoundAggregator(
            config,
            trust=self.trust,
            # Sampled rounds: every node sends to and hears from exactly s peers, so each model
            # weighs 1 / (s + 1) (gossip/sampling.py); else Metropolis-Hastings on the degrees.
            peer_degree=(
                {p.name: len(self.peers) for p in self.peers}
                if self.governance is not None
                else {p.name: s or p.degree or len(config.peers) for p in config.peers}
            ),
            own_degree=s,
            on_trust_change=self._refresh_trust_status,
            outer_step=self.study.outer_step,
            noise_norm=self.study.dp_noise_norm,
            noise_plan=self.noise_plan,
            noise_parameters=self.study.trainable_parameters(),
            **parts,
        )
        self.sender = Sender(record_contact=self.neighbours.record_contact, **parts)
        sharing = HonestSharing(
            identity=self.identity,
            peers=self.peers,
            evidence=self.evidence,
            sender=self.sender,
            own_head=self.own_head,
            study=self.gate.wire_id,
            sample=self.sample,
            compression=config.compression.settings(),
            noise_claim=self.study.noise_claim,
        )
        self.rounds = RoundCoordinator(
            config,
            study=self.study,
            store=self.store,
            inbox=self.inbox,
            evidence=self.evidence,
            trust=self.trust,
            neighbours=self.neighbours,
            aggregator=self.aggregator,
            receiver=self.receiver,
            sharing=sharing,
            stop=self.stop,
            checkpoint=self._checkpoint,
            next_round=1,
            sample=self.sample,
            **parts,
        )
        self.rounds.halt = self.gate.approval_lost  # a withdrawn approval stops the rounds
        if self.governance is not None:
            self.rounds.set_peer_names([p.name for p in self.peers])
            founders = {m.public_key for m in self.governance.manifest.founders}
            # A hospital admitted after the founding joins the network where it is.
            self.rounds.join_on_catch_up = self.identity.public_key not in founders
            self.state.consortium = self.governance.status()
        self._refresh_trust_status()

    # ---------------------------------------------------------------- persistence

    def _open_checkpoint(self) -> NodeCheckpoint | None:
        """The checkpoint to continue from, never under changed privacy or model fields
        (node/binding.py); None for a fresh node."""
        ledger = self.study.ledger
        data = self.study.data
        self.binding = config_binding(
            self.config,
            public_key=self.identity.public_key,
            fingerprint=data_fingerprint(data.x_train, data.y_train),
            delta=ledger.delta if ledger is not None else None,
        )
        return self.store.load_checkpoint(
            config_sha256=self.config.sha256,
            binding=self.binding,
            config_file=str(self.config.source or "the config file"),
        )

    def _restore(self, ckpt: NodeCheckpoint | None) -> None:
        """Continue from the last checkpoint, never from scratch while claiming an old budget."""
        if ckpt is None:
            # A fresh node: checkpoint round 0 before any training, so a node killed in its
            # first round restarts from here with its write-ahead privacy spend intact.
            self._checkpoint(0)
            self._refresh_rollback_status()
            return
        self.study.restore(ckpt, self.store.read_privacy_intent())
        self.store.read_signed_round()
        self.rounds.next_round = ckpt.round + 1
        self.state.round = ckpt.round
        self.state.history = list(ckpt.extra.get("history", []))
        if self.state.history:
            self.state.last_metrics = dict(self.state.history[-1].get("metrics", {}))
        self.state.bytes_sent = int(ckpt.extra.get("bytes_sent", 0))
        self.rollback.restore(ckpt.extra.get("heads"))
        self.inbox.advance_to(self.next_round)
        self._refresh_rollback_status()
        log.info(
            "restored checkpoint of round %d; continuing at round %d", ckpt.round, self.next_round
        )
        if not ckpt.binding:
            # Written by an earlier murmur and resumed under its exact config file: bind it
            # now, so that from here on only the bound fields must stay (node/binding.py).
            self._checkpoint(ckpt.round)
            log.info("checkpoint of round %d now records the fields it is bound to", ckpt.round)

    def _checkpoint(self, r: int) -> None:
        """Save everything the node's parts hold, durably, and audit the file's hash."""
        ckpt = NodeCheckpoint(
            round=r,
            **self.study.checkpoint_parts(),
            replay=self.replay.to_state(),
            config_sha256=self.config.sha256,
            binding=self.binding,
            extra={
                "history": self.state.history,
                "bytes_sent": self.state.bytes_sent,
                "trust": self.trust.to_state(),
                "receipts": self.evidence.receipts.to_state(),
                "heads": self.rollback.to_state(),
                **self.study.checkpoint_extra(),
            },
        )
        digest = self.store.save_checkpoint(ckpt)
        self.audit.append("checkpoint", r, checkpoint_sha256=digest)
        self.gate.record(self.study.ledger, r)  # the site budget's count of this study's steps
        if self.study.ledger is not None:
            self.state.privacy = self.study.privacy_status()
            self.audit.append("privacy", r, **self.state.privacy)
        self.write_status()

    def write_status(self) -> None:
        """Replace status.json with the current status (node/persistence.py)."""
        self.store.write_status(self.status())

    # ---------------------------------------------------------------- what the parts hold

    @property
    def ledger(self) -> PrivacyLedger | None:
        return self.study.ledger

    @property
    def model(self) -> Any:
        return self.study.model

    @property
    def data(self) -> HospitalSplit:
        return self.study.data

    @property
    def spec(self) -> Any:
        return self.study.spec

    @property
    def receipts(self) -> ReceiptBook:
        return self.evidence.receipts

    @property
    def next_round(self) -> int:
        return self.rounds.next_round

    @property
    def last_signed_round(self) -> int:
        return self.store.last_signed_round

    @property
    def current_round(self) -> int:
        """The round the inbox is in (what the API's per-round allowances count by)."""
        return self.inbox.current_round

    def _finished_peers(self) -> list[str]:
        """Peers whose last planned step arrived (authenticated): they send nothing more."""
        planned = self.config.training.rounds
        return [p for p, r in self.inbox.highest_round_seen.items() if r >= planned]

    @property
    def rejected(self) -> dict[str, int]:
        return self.receiver.rejected

    @property
    def rejection_log(self) -> RateLimitedLog:
        return self.receiver.rejection_log

    def own_head(self) -> AuditHead:
        """What this node's envelopes claim (gossip/receipts.py, AuditHead): its newest durable
        signed audit head and its ledger's spend. Both only grow, which neighbours check."""
        seq, digest = self.audit.durable_head
        steps, epsilon = self.study.spend()
        return AuditHead(seq, digest, steps, epsilon)

    def catch_up_target(self) -> CatchUp | None:
        return self.rounds.catch_up_target()

    # ---------------------------------------------------------------- status

    def _refresh_trust_status(self) -> None:
        self.state.trust = self.trust.scores()
        self.state.trust_history = self.trust.history()
        quarantined = self.trust.quarantined()
        self.state.quarantined = sorted(quarantined)
        for peer, score in self.state.trust.items():
            self.metrics.trust.labels(peer=peer).set(score)
            self.metrics.quarantined.labels(peer=peer).set(1 if peer in quarantined else 0)
        self.state.equivocation = self.evidence.status()
        proven = self.state.equivocation["proven"]
        for name, info in self.state.peers.items():
            info["proven_equivocation"] = name in proven
            info["proven_equivocation_round"] = proven.get(name)

    def _refresh_rollback_status(self) -> None:
        self.state.rollback = self.rollback.status()
        for name, info in self.state.peers.items():
            info["rolled_back"] = name in self.state.rollback["proven"]

    def status(self) -> dict[str, Any]:
        self.state.study = self.gate.status()
        return {**asdict(self.state), "audit": self.audit.counts_by_kind()}

    # ---------------------------------------------------------------- what the API calls

    async def receive(
        self, body: bytes, source: str | None = None, sender: Peer | None = None
    ) -> tuple[int, str, str]:
        """POST /gossip (node/receiver.py): (HTTP status, reason code, detail)."""
        return await self.receiver.receive(body, source, sender)

    async def receive_stream(
        self,
        read: Callable[[int], Awaitable[bytes]],
        length: int,
        source: str | None = None,
        sender: Peer | None = None,
    ) -> tuple[int, str, str]:
        """POST /gossip of a large body, opened as it is read (node/receiver.py)."""
        return await self.receiver.receive_stream(read, length, source, sender)

    def answer_probe(self, body: bytes, sender: bytes | None = None) -> tuple[int, str]:
        """POST /probe (node/receiver.py): (HTTP status, reason code)."""
        return self.receiver.answer_probe(body, sender)

    def answer_receipts_request(
        self, body: bytes, sender: bytes | None = None
    ) -> tuple[int, str, bytes]:
        """Handle one POST /receipts body (node/rollback.py): (status, content type, payload).
        `sender`: the key the request was authenticated with, which must be the requester's."""
        return self.rollback.answer(body, self.inbox.current_round, sender)

    def record_rejection(self, reason: str, detail: str, **where: Any) -> None:
        """Count, log and (for admitted senders) audit a refusal; `where`: the keywords of
        node/receiver.py's `Receiver.record_rejection` (sender, round_, source, ...)."""
        self.receiver.record_rejection(reason, detail, **where)

    def answer_approvals(self, body: bytes, sender: Peer | None) -> tuple[int, str]:
        """POST /approvals (node/studies/gate.py): (HTTP status, reason code); ``sender``
        None: from the operator listener."""
        answer = self.gate.answer_approvals(body, sender, self.inbox.current_round)
        self.state.study = self.gate.status()
        return answer

    async def answer_consensus(self, body: bytes, sender: Peer) -> tuple[int, str]:
        """POST /consensus (node/consensus_net.py): (HTTP status, reason code)."""
        return await consensus_net.answer(self, body, sender)

    def summarise_rejections(self, round_: int | None) -> None:
        self.receiver.summarise_rejections(round_)

    # ---------------------------------------------------------------- lifecycle

    async def check_own_receipts(self, transport: Any = None) -> None:
        """Before signing anything, ask the neighbours for the newest receipt they hold of this
        node; refuse to start if its state is older than what it signed (docs/privacy.md)."""
        self.state.phase = "checking_rollback"
        try:
            await self.rollback.check_startup(
                transport,
                own_head=self.own_head(),
                signed_through=max(self.last_signed_round, self.next_round - 1),
                next_round=self.next_round,
                stop=self.stop,
            )
        except RolledBackError as exc:
            raise StartupError(str(exc)) from None

    async def run_rounds(self, transport: Transport) -> None:
        """Run every planned round that is left (node/rounds.py), then return."""
        await self.rounds.run_rounds(transport)

    async def run(self, *, serve_forever: bool = False) -> int:
        """Serve the peer and operator listeners and run the planned rounds (node/lifecycle.py);
        returns the process exit status."""
        return await lifecycle.run(self, serve_forever=serve_forever)


def _peer_sample(config: NodeConfig) -> PeerSample | None:
    """The sampled graph of every round when `[gossip] sample_peers` is set, else None."""
    s = config.gossip.sample_peers
    if not s:
        return None
    if s > len(config.peers):
        raise StartupError(
            f"gossip.sample_peers = {s} but node {config.node.name} lists {len(config.peers)} "
            f"peers: it cannot send to more peers than it has; set sample_peers <= "
            f"{len(config.peers)}"
        )
    return PeerSample.of(config.node.name, [p.name for p in config.peers], s, config.training.seed)


def _books(
    config: NodeConfig, peers: list[Peer], ckpt: NodeCheckpoint | None
) -> tuple[TrustTracker, ReceiptBook, ReplayGuard]:
    """The trust scores, the receipts and the replay guard: from the checkpoint when it has
    them, else fresh."""
    extra = ckpt.extra if ckpt is not None else {}
    names, keys = [p.name for p in peers], [p.public_key for p in peers]
    settings = config.trust.settings()
    trust = (
        TrustTracker.from_state(extra["trust"], names, settings)
        if "trust" in extra
        else TrustTracker(names, settings)
    )
    receipts = (
        ReceiptBook.from_state(extra["receipts"], keys)
        if "receipts" in extra
        else ReceiptBook(keys)
    )
    replay = ReplayGuard.from_state(ckpt.replay) if ckpt is not None else ReplayGuard()
    return trust, receipts, replay
