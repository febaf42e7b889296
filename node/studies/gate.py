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
the next start), and releases the unspent plan when the study finishes.
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
    check_approval,
    parse_approval,
)
from murmur.node.studies.manifest import StudyManifest, load_manifest
from murmur.node.studies.site_budget import (
    BudgetRefused,
    DatasetBudget,
    Position,
    SiteBudgetStore,
    StoreRolledBack,
    StudyRun,
)

log = logging.getLogger("murmur.studies")

APPROVALS_INTERVAL_S = 3.0  # while this node still waits for approvals
APPROVALS_IDLE_INTERVAL_S = 30.0  # after: peer listeners' request allowance is small
SITE_BUDGET_RECORD = "site_budget"
APPROVAL_RECORD = "study_approval"

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
        self.members: dict[bytes, str] = {p.public_key: p.name for p in peers}
        self.members[identity.public_key] = config.node.name
        self.manifest: StudyManifest | None = None
        if config.study.manifest is not None:
            self.manifest = load_manifest(config.study.manifest, config.study.sha256)
        self.book = ApprovalBook(self.state_dir)
        # Set when a new approval was kept: its sender is up, and may be waiting for ours.
        self.changed = asyncio.Event()
        self.store: SiteBudgetStore | None = None
        self.budget: DatasetBudget | None = None
        self.site_epsilon: float | None = None
        site = config.site_budget
        if site.store is not None:
            entry = site.datasets[config.data.dataset]
            self.budget = DatasetBudget(
                config.data.dataset, float(entry["max_epsilon"]), float(entry["delta"])
            )

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
        """This study's approvals, as a `POST /approvals` body (a JSON array)."""
        if self.manifest is None:
            return b"[]"
        return json.dumps([a.to_json() for a in self.book.of_study(self.manifest.id)]).encode()

    def answer_approvals(self, body: bytes, sender: Peer, round_: int) -> tuple[int, str]:
        """`POST /approvals`: offer each record to the book; refusals counted and logged,
        nothing of a refused record kept. (HTTP status, reason code)."""
        try:
            documents = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError):
            documents = None
        if not isinstance(documents, list) or len(documents) > MAX_APPROVALS_PER_BODY:
            detail = f"a JSON array of at most {MAX_APPROVALS_PER_BODY} approval records"
            self.refuse("approval_malformed", detail, sender=None, round_=None, source=sender.name)
            return 400, "approval_malformed"
        studies = {self.study_id} if self.study_id else set()
        for document in documents:
            try:
                approval = parse_approval(document)
                member = check_approval(approval, studies=studies, members=self.members)
                if self.book.offer(approval):
                    self.changed.set()
                    self.audit.append(
                        APPROVAL_RECORD,
                        round_,
                        **approval.to_json(),
                        member=member,
                        via=sender.name,
                    )
                    log.info("approval of study %s by %s", approval.study[:16], member)
            except ApprovalError as exc:
                self.refuse(exc.reason, exc.detail, sender=None, round_=None, source=sender.name)
        return 202, "accepted"

    # ------------------------------------------------------------------ the site budget

    def admit(self, ledger: PrivacyLedger | None) -> None:
        """Reserve the study's planned run on the site budget, or StartupError with the
        numbers (node/studies/site_budget.py)."""
        if self.budget is None:
            return
        assert self.config.site_budget.store is not None and ledger is not None
        self.store = SiteBudgetStore(self.config.site_budget.store)
        try:
            self.store.check_not_behind(self._position_seen())
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
        except (BudgetRefused, StoreRolledBack) as exc:
            self.store.close()
            self.store = None
            raise StartupError(str(exc)) from None
        self.site_epsilon = spent
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
        if self.store is None or self.budget is None or ledger is None:
            return
        position = self.store.record_steps(
            self.budget.name, self.budget_key, ledger.steps_taken, finished=finished
        )
        self.site_epsilon = self.store.spent(self.budget)
        self._audit_position(position, round_, finished=finished)

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
            )
        if self.budget is not None:
            out["site_budget"] = {
                "dataset": self.budget.name,
                "max_epsilon": self.budget.max_epsilon,
                "delta": self.budget.delta,
                "epsilon_composed": self.site_epsilon,
            }
        return out


async def exchange_approvals(
    gate: StudyGate, peers: list[Peer], transport: RecordsTransport, stop: asyncio.Event
) -> None:
    """Until ``stop``: offer this study's approvals to every neighbour; every few seconds while
    this node waits for approvals, every 30 s after, and at once when a new one arrived (its
    sender is up and may be waiting for ours). Duplicates cost a receiver nothing."""
    if gate.manifest is None:
        return
    while not stop.is_set():
        gate.changed.clear()
        body = gate.held_approvals()
        async with asyncio.TaskGroup() as group:
            for peer in peers:
                group.create_task(transport.post_records(peer, body, "/approvals"))
        waiting = gate.approvals_missing() > 0
        interval = APPROVALS_INTERVAL_S if waiting else APPROVALS_IDLE_INTERVAL_S
        deadline = time.monotonic() + interval
        while not (stop.is_set() or gate.changed.is_set()) and time.monotonic() < deadline:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.5):
                    await stop.wait()


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
