"""The node's side of consortium membership: the durable change log and the intake of
proposals and votes.

gossip/membership.py decides what a change does; this module decides what the node holds.
`ConsortiumStore` keeps the applied changes in a SQLite file in the state directory
(`consortium.sqlite`, synchronous=FULL, one row per epoch, written in one transaction before
anything acts on the change), bound to the consortium id: a store written for another
manifest refuses to open (`manifest_mismatch`). `Governance` holds the current membership
and the pending proposals and votes, checks each offered record against the time it is
given (expiry) and the membership (signature, member, revoked, epoch), applies a proposal
the moment its approvals reach the quorum, and says what changed. Pending records (proposals
and votes short of their quorum) are kept in the same file, rewritten in one transaction
whenever they change, and offered again (re-checked: expiry, epoch) when the node starts.

Rollback: each applied change is audited (`membership`: epoch and history head) after it is
written here, and the audit log is anchored at the peers (node/rollback.py). At start the
log is compared with the newest `membership` record (:func:`behind_audit`): a log that ends
before that epoch, or holds another history at it, was put back to an older copy (or
replaced) and the node refuses to start.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from murmur.gossip.membership import (
    Change,
    Manifest,
    Membership,
    MembershipError,
    Proposal,
    Reason,
    Vote,
    decode_record,
)

STORE_FILE = "consortium.sqlite"
MAX_PENDING_PROPOSALS = 64
# Changes sent in one answer to a peer behind us; it asks again for the rest.
MAX_CHANGES_PER_ANSWER = 64

# A membership a node could not run with: the problem (naming the node and the degree it
# would need), or None when every node is fine.
Feasibility = Callable[[Membership], str | None]


class ConsortiumStore:
    """The applied changes, durably, in order; bound to one consortium id."""

    def __init__(self, path: Path, consortium_id: bytes) -> None:
        self.path = path
        self._db = sqlite3.connect(path, isolation_level=None)
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA journal_mode=DELETE")
        self._db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value BLOB)")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS changes (epoch INTEGER PRIMARY KEY, data BLOB NOT NULL)"
        )
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS pending (seq INTEGER PRIMARY KEY, data BLOB NOT NULL)"
        )
        row = self._db.execute("SELECT value FROM meta WHERE key = 'consortium_id'").fetchone()
        if row is None:
            self._db.execute(
                "INSERT INTO meta VALUES ('consortium_id', ?)", (sqlite3.Binary(consortium_id),)
            )
        elif bytes(row[0]) != consortium_id:
            self._db.close()
            raise MembershipError(
                Reason.MANIFEST_MISMATCH,
                f"{path} holds the log of consortium {bytes(row[0]).hex()[:16]}..., not of "
                f"the configured manifest ({consortium_id.hex()[:16]}...): point "
                "[consortium] manifest at the manifest this node joined, or use a new state_dir",
            )

    def changes(self) -> list[Change]:
        rows = self._db.execute("SELECT data FROM changes ORDER BY epoch").fetchall()
        return [Change.decode(bytes(r[0])) for r in rows]

    def append(self, epoch: int, change: Change) -> None:
        """Durably record the change that made ``epoch`` (before anything acts on it)."""
        self._db.execute("INSERT INTO changes VALUES (?, ?)", (epoch, change.encode()))

    def pending(self) -> list[bytes]:
        """The pending proposals and votes last saved, proposals first."""
        return [bytes(r[0]) for r in self._db.execute("SELECT data FROM pending ORDER BY seq")]

    def save_pending(self, records: list[bytes]) -> None:
        """Replace the saved pending records with ``records``, in one transaction."""
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            db.execute("DELETE FROM pending")
            db.executemany(
                "INSERT INTO pending (data) VALUES (?)", [(sqlite3.Binary(r),) for r in records]
            )
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    def close(self) -> None:
        self._db.close()


@dataclass
class Offered:
    """What offering one record did: refused (``reason``), nothing new, or new (and maybe
    applied: the memberships it led to, oldest first)."""

    new: bool = False
    reason: Reason | None = None
    detail: str = ""
    applied: list[Membership] = field(default_factory=list)


class Governance:
    """The current membership, the pending proposals and votes, and the durable log."""

    def __init__(
        self,
        manifest: Manifest,
        store: ConsortiumStore,
        *,
        feasible: Feasibility | None = None,
        now: float | None = None,
    ) -> None:
        self.manifest = manifest
        self.store = store
        self.feasible = feasible
        self.changes = store.changes()
        self.membership = manifest.verify()
        self.heads = [self.membership.head]  # the history head after each epoch
        for change in self.changes:
            self.membership = self.membership.apply(change)
            self.heads.append(self.membership.head)
        self.proposals: dict[bytes, Proposal] = {}
        self.votes: dict[bytes, dict[bytes, Vote]] = {}
        self.applied_round: dict[int, int] = {}  # epoch -> the round this node applied it in
        # The pending records saved before a restart, checked again as if offered now: those
        # that expired or that a change made stale meanwhile are dropped, not counted.
        self._loading = True
        for data in store.pending():
            self.offer(data, time.time() if now is None else now)
        self._loading = False
        self.refused: dict[str, int] = {}
        self._save_pending()

    def _save_pending(self) -> None:
        if not self._loading:
            self.store.save_pending(self.pending_records())

    @property
    def epoch(self) -> int:
        return self.membership.epoch

    def pending_records(self) -> list[bytes]:
        """The encodings of every pending proposal and vote (what the exchange gossips)."""
        out = [p.encode() for p in self.proposals.values()]
        for votes in self.votes.values():
            out += [v.encode() for v in votes.values()]
        return out

    def changes_since(self, epoch: int) -> list[bytes]:
        if epoch < 0:
            return []
        return [c.encode() for c in self.changes[epoch : epoch + MAX_CHANGES_PER_ANSWER]]

    def offer(self, data: bytes, now: float) -> Offered:
        """One proposal or vote from a peer or the operator."""
        try:
            record = decode_record(data)
            if isinstance(record, Proposal):
                offered = self._offer_proposal(record, now)
            else:
                offered = self._offer_vote(record, now)
        except MembershipError as exc:
            return self._refuse(exc)
        if offered.new:
            self._save_pending()
        return offered

    def offer_change(self, data: bytes) -> Offered:
        """An applied change from a peer that is ahead of us (the log catch-up). Expiry is
        not checked here: the change carries its quorum's signatures, and the nodes that
        applied it first checked its expiry; its epoch must be exactly the next one."""
        try:
            change = Change.decode(data)
            if change.proposal.epoch < self.epoch:
                return Offered()  # already applied here
            after = self.membership.apply(change)
            offered = Offered(new=True, applied=[self._commit(change, after)])
        except MembershipError as exc:
            return self._refuse(exc)
        self._save_pending()
        return offered

    def _refuse(self, exc: MembershipError) -> Offered:
        if not self._loading:
            self.refused[exc.reason] = self.refused.get(exc.reason, 0) + 1
        return Offered(reason=exc.reason, detail=exc.detail)

    def _offer_proposal(self, proposal: Proposal, now: float) -> Offered:
        pid = proposal.proposal_id
        if pid in self.proposals or any(c.proposal.proposal_id == pid for c in self.changes):
            return Offered()  # gossip brings what this node holds or applied already
        if proposal.expires_at <= now:
            raise MembershipError(Reason.EXPIRED, f"proposal expired at {proposal.expires_at}")
        after = self.membership.check_proposal(proposal)
        self._check_feasible(after)
        if len(self.proposals) >= MAX_PENDING_PROPOSALS:
            self._forget_expired(now)
            if len(self.proposals) >= MAX_PENDING_PROPOSALS:
                raise MembershipError(Reason.INVALID_CHANGE, "too many pending proposals")
        self.proposals[pid] = proposal
        self.votes.setdefault(pid, {})
        return Offered(new=True, applied=self._try_apply(pid, now))

    def _offer_vote(self, vote: Vote, now: float) -> Offered:
        proposal = self.proposals.get(vote.proposal_id)
        if proposal is None:
            applied = next(
                (c for c in self.changes if c.proposal.proposal_id == vote.proposal_id), None
            )
            if applied is not None and vote in applied.votes:
                return Offered()  # the gossip echo of a vote that made the change
            if applied is not None:
                raise MembershipError(Reason.REPLAYED, "vote for a change already applied")
            raise MembershipError(Reason.UNKNOWN_PROPOSAL, "vote for no pending proposal")
        if vote.voter in self.votes[vote.proposal_id]:
            return Offered()
        if vote.expires_at <= now:
            raise MembershipError(Reason.EXPIRED, f"vote expired at {vote.expires_at}")
        self.membership.check_vote(vote, proposal)
        self.votes[vote.proposal_id][vote.voter] = vote
        return Offered(new=True, applied=self._try_apply(vote.proposal_id, now))

    def _try_apply(self, pid: bytes, now: float) -> list[Membership]:
        proposal = self.proposals[pid]
        votes = [v for v in self.votes[pid].values() if v.expires_at > now]
        approving = {proposal.proposer, *(v.voter for v in votes)}
        if len(approving) < self.membership.needed(proposal):
            return []
        change = Change(proposal, tuple(sorted(votes, key=lambda v: v.voter)))
        after = self.membership.apply(change)
        self._check_feasible(after)
        return [self._commit(change, after)]

    def _commit(self, change: Change, after: Membership) -> Membership:
        self.store.append(after.epoch, change)
        self.changes.append(change)
        self.membership = after
        self.heads.append(after.head)
        # Proposals for the old epoch can never apply now: drop them and their votes.
        for pid in [p for p, x in self.proposals.items() if x.epoch < after.epoch]:
            del self.proposals[pid]
            self.votes.pop(pid, None)
        return after

    def _check_feasible(self, after: Membership) -> None:
        problem = self.feasible(after) if self.feasible is not None else None
        if problem is not None:
            raise MembershipError(Reason.INFEASIBLE, problem)

    def _forget_expired(self, now: float) -> None:
        for pid in [p for p, x in self.proposals.items() if x.expires_at <= now]:
            del self.proposals[pid]
            self.votes.pop(pid, None)

    def status(self) -> dict[str, object]:
        return {
            **self.membership.describe(),
            "pending": [
                {
                    "proposal": pid.hex(),
                    "change": p.describe(),
                    "approvals": 1 + len(self.votes.get(pid, {})),
                    "needed": self.membership.needed(p),
                    "expires_at": p.expires_at,
                }
                for pid, p in self.proposals.items()
            ],
            "refused": dict(self.refused),
            "applied_round": dict(self.applied_round),
        }


def behind_audit(governance: Governance, epoch: int, head: str) -> str | None:
    """Why the log is older than (or another than) the one the audit log's newest
    `membership` record (``epoch``, ``head`` hex) saw, or None."""
    path = governance.store.path
    if governance.epoch < epoch:
        return (
            f"{path} ends at epoch {governance.epoch}, but this node's audit log recorded "
            f"membership epoch {epoch} (head {head[:16]}...): the file was put back to an "
            "older copy, which would forget admissions and revocations"
        )
    if governance.heads[epoch].hex() != head:
        return (
            f"{path} holds another membership history at epoch {epoch} (head "
            f"{governance.heads[epoch].hex()[:16]}...) than the one this node's audit log "
            f"recorded (head {head[:16]}...): the file was replaced"
        )
    return None


def complete_graph_feasibility(rule: str, f: int) -> Feasibility:
    """Feasibility on the complete graph of the members (the topology a consortium network
    runs: every member is every member's neighbour): each has ``len(members) - 1``
    neighbours, which the rule must be able to aggregate robustly (gossip/feasibility.py)."""
    from murmur.gossip.feasibility import check_node

    def check(membership: Membership) -> str | None:
        degree = len(membership.members) - 1
        for member in membership.members:
            problem = check_node(member.name, degree, rule, f)
            if problem is not None:
                return problem
        return None

    return check


def load_manifest(path: Path, expected_id: str = "") -> Manifest:
    """The manifest file, verified; ``manifest_mismatch`` when its hash is not the
    configured consortium id."""
    try:
        manifest = Manifest.decode(path.read_bytes())
    except OSError as exc:
        raise MembershipError(Reason.MALFORMED, f"cannot read {path}: {exc}") from None
    manifest.verify()
    if expected_id and manifest.consortium_id.hex() != expected_id.strip().lower():
        raise MembershipError(
            Reason.MANIFEST_MISMATCH,
            f"{path} hashes to {manifest.consortium_id.hex()}, not the configured "
            f"consortium_id {expected_id}: get the founders' manifest again",
        )
    return manifest


def decode_all(items: Iterable[object]) -> list[bytes]:
    return [x for x in items if isinstance(x, bytes)]


def governance_dir(config: object) -> Path:
    """Where the hospital's consortium log lives. Membership is the identity's, not a
    study's: in a process of `[[studies]]` it is the hospital's state root (one
    `consortium.sqlite` every study's runtime reads), else the node's state directory."""
    root = getattr(config, "studies_root", None)
    return Path(root) if root is not None else config.node.state_dir  # type: ignore[attr-defined]


def open_governance(config: object, state_dir: Path, studies: Iterable[object] = ()) -> Governance:
    """The node's governance from `[consortium]`: the verified manifest, its log in
    ``state_dir``, and the complete-graph feasibility of the configured rule (of every
    study's rule, with ``studies``: a change none of them can run with is refused)."""
    section = config.consortium  # type: ignore[attr-defined]
    manifest = load_manifest(section.manifest, section.consortium_id)
    store = ConsortiumStore(state_dir / STORE_FILE, manifest.consortium_id)
    checks = [
        complete_graph_feasibility(c.aggregation.rule, c.aggregation.f)  # type: ignore[attr-defined]
        for c in [config, *studies]
    ]

    def feasible(membership: Membership) -> str | None:
        return next((p for p in (check(membership) for check in checks) if p is not None), None)

    return Governance(manifest, store, feasible=feasible)
