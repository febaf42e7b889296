"""What a node checks before it runs its study, and keeps up while it runs.

Why one part: "may this node train on these patients for this study" has three answers that
must all be yes, and each is a refusal with its own fix:

1. the manifest is signed by a consortium member (the allowlist's peers, or this node);
2. this node's operator approved its hash (`murmur study approve`), and, when
   `[study] required_approvals = m`, m other members did (their signed approvals imported
   with `murmur study import` or offered by peers on `POST /approvals`);
3. the study's planned DP-SGD run fits in what is left of the data set's lifetime site
   budget, composed with every other study of the hospital (node/studies/site_budget.py).

While the study runs, the gate reports its steps to the site budget after every checkpoint,
records the store's position in the audit log (so a store put back or replaced is caught at
the next start), and releases the unspent plan when the study finishes. It also offers the
signed head of the store's log to its neighbours with its approvals (`POST /approvals`),
keeps theirs (node/studies/witness.py), answers a starting neighbour with the head it holds
of that neighbour's hospital (in the `POST /receipts` answer, node/rollback.py), and before
admitting its own study checks its store against what the neighbours hold of it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable
from typing import Any

from murmur.crypto.allowlist import Peer
from murmur.crypto.identity import Identity
from murmur.gossip.transport import RecordsTransport
from murmur.models.privacy import PrivacyLedger
from murmur.node.audit import AuditLog, records_of_kind
from murmur.node.config import NodeConfig
from murmur.node.state import StartupError
from murmur.node.studies.approvals import (
    MAX_APPROVALS_PER_BODY,
    ApprovalBook,
    ApprovalError,
    Withdrawal,
    check_approval,
    parse_approval,
)
from murmur.node.studies.budget_log import HEAD_FORMAT, BudgetHead, LogError
from murmur.node.studies.manifest import StudyManifest, load_manifest
from murmur.node.studies.site_budget import (
    BudgetRefused,
    DatasetBudget,
    Position,
    SiteBudgetStore,
    StoreRolledBack,
    StudyRun,
)
from murmur.node.studies.witness import WitnessBook

log = logging.getLogger("murmur.studies")

APPROVALS_INTERVAL_S = 3.0  # while this node still waits for approvals
APPROVALS_IDLE_INTERVAL_S = 30.0  # after: peer listeners' request allowance is small
SITE_BUDGET_RECORD = "site_budget"
APPROVAL_RECORD = "study_approval"
WITHDRAWAL_RECORD = "study_withdrawal"
BUDGET_ROLLBACK_RECORD = "budget_rollback_detected"
WITNESS_FILE = "budget_witness.sqlite"  # a node without a site budget keeps peers' heads here

Refuse = Callable[..., None]  # node.record_rejection(reason, detail, sender=, round_=, source=)


class StudyGate:
    """The node's study: its manifest, the approvals it holds, its share of the site budget."""

    def __init__(
        self,
        config: NodeConfig,
        identity: Identity,
        peers: list[Peer],
        audit: AuditLog,
        refuse: Refuse,
    ) -> None:
        self.config = config
        self.identity = identity
        self.audit = audit
        self.refuse = refuse
        self.state_dir = config.node.state_dir
        self.members: dict[bytes, str] = {}
        self.set_members(peers)
        self.manifest: StudyManifest | None = None
        if config.study.manifest is not None:
            self.manifest = load_manifest(config.study.manifest, config.study.sha256)
        self.book = ApprovalBook(self.state_dir)
        # Set when a new approval was kept: its sender is up, and may be waiting for ours.
        self.changed = asyncio.Event()
        self.store: SiteBudgetStore | None = None
        self.budget: DatasetBudget | None = None
        self.site_epsilon: float | None = None
        # Peers whose site budget log went back: their envelopes are refused (node/rollback.py).
        self.budget_rolled_back: dict[bytes, str] = {}
        self.peer_heads_checked: dict[str, Any] = {"outcome": "not_run"}
        self.admitted = False  # the study's run is in the store (record() writes after that)
        site = config.site_budget
        if site.store is not None:
            entry = site.datasets[config.data.dataset]
            self.budget = DatasetBudget(
                config.data.dataset, float(entry["max_epsilon"]), float(entry["delta"])
            )
            try:
                self.store = SiteBudgetStore(site.store, signer=identity)
            except StoreRolledBack as exc:
                raise StartupError(str(exc)) from None
        # Peers' budget log heads, kept by nodes that take part in studies or site budgets.
        self.witness: WitnessBook | None = None
        if site.store is not None or self.manifest is not None:
            self.witness = WitnessBook(site.store or self.state_dir / WITNESS_FILE)

    def set_members(self, peers: list[Peer]) -> None:
        """A membership change (node/governance.py): the members are the peers and this node."""
        self.members = {p.public_key: p.name for p in peers}
        self.members[self.identity.public_key] = self.config.node.name

    # ------------------------------------------------------------------ identity

    @property
    def study_id(self) -> str | None:
        return self.manifest.id if self.manifest is not None else None

    @property
    def wire_id(self) -> bytes | None:
        """What this node's envelopes carry and its opener requires (None: no study)."""
        return bytes.fromhex(self.manifest.id) if self.manifest is not None else None

    @property
    def budget_key(self) -> str:
        """The study's name in the site budget: its manifest hash, or its config's."""
        return self.study_id or f"config-{self.config.sha256}"

    @property
    def study_name(self) -> str:
        return self.manifest.name if self.manifest is not None else self.config.node.name

    # ------------------------------------------------------------------ approvals

    def check_manifest(self) -> None:
        """StartupError unless the manifest's proposer is a consortium member."""
        manifest = self.manifest
        if manifest is None:
            return
        if manifest.proposer_key not in self.members:
            raise StartupError(
                f"study {manifest.name} ({manifest.id}) is proposed by key "
                f"{manifest.proposer_key.hex()[:16]}... ({manifest.proposer!r}), which is not a "
                "consortium member's (this node or its allowlisted peers); fix: have a member "
                "sign it with `murmur study propose`"
            )

    def check_own_approval(self, now: float | None = None) -> None:
        """StartupError naming the hash and the command when this operator has not approved."""
        manifest = self.manifest
        if manifest is None:
            return
        valid = self.book.valid_approvers(manifest.id, self.members, now)
        if self.config.node.name not in valid:
            raise StartupError(
                f"study {manifest.name} ({manifest.id}) is not approved by this node's operator "
                f"(or the approval expired); review it with `murmur study show "
                f"{self.config.study.manifest}` and approve it with `murmur study approve "
                f"{self.config.study.manifest} --state {self.state_dir} --key "
                f"{self.config.node.key_file}`"
            )

    def other_approvers(self, now: float | None = None) -> list[str]:
        if self.manifest is None:
            return []
        valid = self.book.valid_approvers(self.manifest.id, self.members, now)
        return sorted(name for name in valid if name != self.config.node.name)

    def approvals_missing(self, now: float | None = None) -> int:
        return max(0, self.config.study.required_approvals - len(self.other_approvers(now)))

    def check_quorum(self, now: float | None = None) -> None:
        """StartupError unless m other members' approvals are held."""
        missing = self.approvals_missing(now)
        if missing and self.manifest is not None:
            have = self.other_approvers(now)
            others = sorted(n for n in self.members.values() if n != self.config.node.name)
            raise StartupError(
                f"study {self.manifest.name} ({self.manifest.id}) needs approvals from "
                f"{self.config.study.required_approvals} other members ([study] "
                f"required_approvals) and has {len(have)} ({', '.join(have) or 'none'}) after "
                f"waiting {self.config.study.approval_wait_s:g} s; waiting on "
                f"{', '.join(n for n in others if n not in have) or 'no one'}. Fix: each of them "
                "runs `murmur study approve` on the same manifest and starts its node, or sends "
                "you the approval file for `murmur study import`"
            )

    def held_approvals(self) -> bytes:
        """This study's approvals and the signed head of the site budget store's log, as a
        `POST /approvals` body (a JSON array)."""
        records: list[dict[str, Any]] = []
        if self.manifest is not None:
            records = [a.to_json() for a in self.book.of_study(self.manifest.id)]
            records += [w.to_json() for w in self.book.withdrawals_of(self.manifest.id)]
        if self.store is not None:
            records.append(self.store.head(self.config.node.name, time.time()).to_json())
        return json.dumps(records).encode()

    def answer_approvals(self, body: bytes, sender: Peer | None, round_: int) -> tuple[int, str]:
        """`POST /approvals`: offer each record to the book; refusals counted and logged,
        nothing of a refused record kept. (HTTP status, reason code). ``sender`` None: the
        operator listener's `POST /approvals` (`murmur study withdraw --node`), which carries
        approvals and withdrawals only."""
        source = sender.name if sender is not None else "operator"
        try:
            documents = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError):
            documents = None
        if not isinstance(documents, list) or len(documents) > MAX_APPROVALS_PER_BODY:
            detail = f"a JSON array of at most {MAX_APPROVALS_PER_BODY} approval records"
            self.refuse("approval_malformed", detail, sender=None, round_=None, source=source)
            return 400, "approval_malformed"
        studies = {self.study_id} if self.study_id else set()
        for document in documents:
            if isinstance(document, dict) and document.get("format") == HEAD_FORMAT:
                if sender is not None and self.witness is not None:
                    self.take_head(document, sender, round_)
                continue
            try:
                record = parse_approval(document)
                member = check_approval(record, studies=studies, members=self.members)
                if self.book.offer(record):
                    self.changed.set()
                    withdrawal = isinstance(record, Withdrawal)
                    self.audit.append(
                        WITHDRAWAL_RECORD if withdrawal else APPROVAL_RECORD,
                        round_,
                        **record.to_json(),
                        member=member,
                        via=source,
                    )
                    what = "withdrawal of the approval" if withdrawal else "approval"
                    log.info("%s of study %s by %s", what, record.study[:16], member)
            except ApprovalError as exc:
                self.refuse(exc.reason, exc.detail, sender=None, round_=None, source=source)
        return 202, "accepted"

    def approval_lost(self, now: float | None = None) -> str | None:
        """Why this study may no longer run here (checked at every round boundary): this
        operator's approval was withdrawn or expired, or fewer than `required_approvals`
        other members' approvals are valid now. None: it may."""
        manifest = self.manifest
        if manifest is None:
            return None
        valid = self.book.valid_approvers(manifest.id, self.members, now)
        withdrawn = sorted(
            self.members.get(w.key, w.approver)
            for w in self.book.withdrawals_of(manifest.id)
            if w.key in self.members and self.members[w.key] not in valid
        )
        said = f" (withdrawn by {', '.join(withdrawn)})" if withdrawn else ""
        if self.config.node.name not in valid:
            return (
                f"this node's operator no longer approves study {manifest.name} "
                f"({manifest.id[:16]}...){said}"
            )
        missing = self.approvals_missing(now)
        if missing:
            others = self.other_approvers(now)
            return (
                f"study {manifest.name} ({manifest.id[:16]}...) has approvals from "
                f"{len(others)} other members ({', '.join(others) or 'none'}), fewer than the "
                f"{self.config.study.required_approvals} required{said}"
            )
        return None

    # ------------------------------------------------------------------ peers' budget logs

    def take_head(self, document: Any, sender: Peer, round_: int) -> None:
        """A neighbour's signed head of its hospital's budget log: kept in the witness book
        under the name this node gives it; refused (and the sender's envelopes refused from
        then on) when it shows that hospital's store went back."""
        try:
            head = BudgetHead.from_json(document)
        except LogError as exc:
            self.refuse("budget_head_malformed", str(exc), sender=None, round_=None,
                        source=sender.name)  # fmt: skip
            return
        if head.public_key != sender.public_key.hex() or not head.verify():
            detail = "a budget log head not signed by the peer that sent it"
            self.refuse("budget_head_forged", detail, sender=None, round_=None, source=sender.name)
            return
        assert self.witness is not None
        problem = self.witness.observe(sender.name, head)
        if problem is None:
            return
        detail = f"{sender.name}'s site budget store went back: {problem}"
        first = sender.public_key not in self.budget_rolled_back
        self.budget_rolled_back[sender.public_key] = (
            f"{detail}; its envelopes are refused: it would spend privacy budget its "
            "hospital already spent"
        )
        self.refuse("budget_rollback", detail, sender=None, round_=None, source=sender.name)
        if first:
            log.error("BUDGET ROLLBACK DETECTED: %s", detail)
            self.audit.append(
                BUDGET_ROLLBACK_RECORD, round_, peer=sender.name, head=head.to_json(),
                problem=problem,
            )  # fmt: skip

    def witnessed_head_of(self, key: bytes) -> bytes | None:
        """The newest budget log head held of the hospital of the member with ``key`` (for
        the `POST /receipts` answer to that member), None when nothing is held."""
        name = self.members.get(key)
        if name is None or self.witness is None:
            return None
        head = self.witness.newest(name)
        return head.encode() if head is not None else None

    def budget_refusal(self, key: bytes) -> str | None:
        return self.budget_rolled_back.get(key)

    def check_peer_heads(self, heads: dict[str, bytes]) -> None:
        """StoreRolledBack unless the store reaches every head of this hospital's budget log
        that a neighbour holds (``heads``: holder -> the bytes its startup answer carried).
        Heads that do not verify are ignored and named in /status."""
        assert self.store is not None
        ignored, checked = [], []
        for holder, data in sorted(heads.items()):
            try:
                head = BudgetHead.decode(data)
            except LogError:
                ignored.append(holder)
                continue
            if not head.verify():
                ignored.append(holder)
                continue
            checked.append({"holder": holder, "seq": head.seq, "instance": head.instance})
            self.store.check_reaches(head, holder)
        self.peer_heads_checked = {"outcome": "ok", "checked": checked, "ignored": ignored}
        if not checked:
            self.peer_heads_checked["outcome"] = "no_head"
            log.warning(
                "site budget: no neighbour holds a head of this hospital's budget log, so this "
                "node cannot confirm that its store %s was not deleted or put back; admitting "
                "against it (its neighbours check the head it sends them)",
                self.store.path,
            )

    # ------------------------------------------------------------------ the site budget

    def admit(
        self, ledger: PrivacyLedger | None, peer_heads: dict[str, bytes] | None = None
    ) -> None:
        """Reserve the study's planned run on the site budget, or StartupError with the
        numbers (node/studies/site_budget.py). ``peer_heads``: what the neighbours hold of
        this hospital's budget log (node/rollback.py's startup poll); the store must reach it."""
        if self.budget is None:
            return
        assert self.store is not None and ledger is not None
        try:
            self.store.check_not_behind(self._position_seen())
            self.check_peer_heads(peer_heads or {})
            run = StudyRun(
                study=self.budget_key,
                name=self.study_name,
                noise_multiplier=ledger.noise_multiplier,
                sample_rate=ledger.sample_rate,
                planned_steps=ledger.planned_steps,
                steps_taken=ledger.steps_taken,
                public_key=self.identity.public_key.hex(),
            )
            spent, position = self.store.admit(self.budget, run)
        except StoreRolledBack as exc:
            self.peer_heads_checked["outcome"] = "refused"
            self.audit.append("startup_refused", 0, site_budget=str(exc))
            raise StartupError(str(exc)) from None
        except BudgetRefused as exc:
            raise StartupError(str(exc)) from None
        self.site_epsilon = spent
        self.admitted = True
        self.changed.set()  # the new head goes to the neighbours at once
        self._audit_position(position, 0, admitted=True)
        log.info(
            "site budget: study %s admitted on data set %s; the data set's studies compose to "
            "ε=%.3f of max_epsilon=%g (δ=%g)",
            self.study_name,
            self.budget.name,
            spent,
            self.budget.max_epsilon,
            self.budget.delta,
        )

    def record(self, ledger: PrivacyLedger | None, round_: int, *, finished: bool = False) -> None:
        """After a checkpoint: the study's steps so far into the site budget, and the store's
        new position into the audit log."""
        if not self.admitted or self.store is None or self.budget is None or ledger is None:
            return
        position = self.store.record_steps(
            self.budget.name, self.budget_key, ledger.steps_taken, finished=finished
        )
        self.site_epsilon = self.store.spent(self.budget)
        self._audit_position(position, round_, finished=finished)
        # Heads after each round go out with the 30-s exchange (the peer listener's request
        # allowance is a few per round); only the end goes at once. An admission, the write a
        # put-back store would undo, is sent at once by admit().
        if finished:
            self.changed.set()

    def _audit_position(self, position: Position, round_: int, **extra: Any) -> None:
        assert self.budget is not None
        self.audit.append(
            SITE_BUDGET_RECORD,
            round_,
            dataset=self.budget.name,
            study=self.budget_key,
            instance=position.instance,
            generation=position.generation,
            epsilon_composed=self.site_epsilon,
            max_epsilon=self.budget.max_epsilon,
            delta=self.budget.delta,
            **extra,
        )

    def _position_seen(self) -> Position | None:
        """The store position this node's audit log last recorded (None: never used one)."""
        records = records_of_kind(self.state_dir, SITE_BUDGET_RECORD)
        if not records:
            return None
        fields = records[-1].fields
        return Position(str(fields["instance"]), int(fields["generation"]))

    def close(self) -> None:
        if self.store is not None:
            self.store.close()
            self.store = None
        if self.witness is not None:
            self.witness.close()
            self.witness = None

    # ------------------------------------------------------------------ status

    def status(self, now: float | None = None) -> dict[str, Any]:
        """/status `study`: which study, who approved it, the site budget's state."""
        now = time.time() if now is None else now
        out: dict[str, Any] = {"study": self.study_id}
        if self.manifest is not None:
            valid = self.book.valid_approvers(self.manifest.id, self.members, now)
            out.update(
                name=self.manifest.name,
                proposer=self.manifest.proposer,
                approved_by=sorted(valid),
                required_approvals=self.config.study.required_approvals,
                withdrawn_by=sorted(
                    self.members.get(w.key, w.approver)
                    for w in self.book.withdrawals_of(self.manifest.id)
                ),
            )
        if self.budget is not None:
            out["site_budget"] = {
                "dataset": self.budget.name,
                "max_epsilon": self.budget.max_epsilon,
                "delta": self.budget.delta,
                "epsilon_composed": self.site_epsilon,
                "peer_heads": self.peer_heads_checked,
            }
        if self.budget_rolled_back:
            out["budget_rolled_back"] = sorted(
                self.members.get(k, k.hex()) for k in self.budget_rolled_back
            )
        return out


async def exchange_approvals(
    gate: StudyGate, peers: list[Peer], transport: RecordsTransport, stop: asyncio.Event
) -> None:
    """Until ``stop``: offer this study's approvals and the site budget log's head to every
    neighbour; every few seconds while this node waits for approvals, every 30 s after, and
    at once when a new approval arrived (its sender is up and may be waiting for ours) or the
    store was written. Duplicates cost a receiver nothing."""
    if gate.manifest is None and gate.store is None:
        return
    while not stop.is_set():
        gate.changed.clear()
        await offer_records(gate, peers, transport)
        waiting = gate.approvals_missing() > 0
        interval = APPROVALS_INTERVAL_S if waiting else APPROVALS_IDLE_INTERVAL_S
        deadline = time.monotonic() + interval
        while not (stop.is_set() or gate.changed.is_set()) and time.monotonic() < deadline:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.5):
                    await stop.wait()


async def offer_records(gate: StudyGate, peers: list[Peer], transport: RecordsTransport) -> None:
    """One `POST /approvals` to every neighbour (each bounded by the transport's timeout)."""
    body = gate.held_approvals()
    async with asyncio.TaskGroup() as group:
        for peer in peers:
            group.create_task(transport.post_records(peer, body, "/approvals"))


async def await_quorum(gate: StudyGate, stop: asyncio.Event) -> None:
    """Hold the start until `[study] required_approvals` other members' approvals are held
    (they arrive on POST /approvals), at most `approval_wait_s`; StartupError after that."""
    if gate.approvals_missing() == 0:
        return
    wait_s = gate.config.study.approval_wait_s
    log.info(
        "waiting up to %g s for %d more approval(s) of study %s",
        wait_s,
        gate.approvals_missing(),
        gate.study_name,
    )
    deadline = time.monotonic() + wait_s
    while gate.approvals_missing() and not stop.is_set():
        left = deadline - time.monotonic()
        if left <= 0:
            break
        try:
            async with asyncio.timeout(min(0.5, left)):
                await stop.wait()
        except TimeoutError:
            pass
    gate.check_quorum()
