"""Signed approvals of a study, their checks, and the node's store of them.

Why signed records: a study runs at a hospital only when that hospital's operator said so
(`murmur study approve`), and, where the consortium asks for it, when m other members said so
too. An approval is a small JSON record signed by the approver's Ed25519 key over a
domain-separated canonical encoding; it names the study by its manifest hash, so it approves
that content and nothing else, and it carries a validity window and a nonce.

Each refused record gets a reason code (``ApprovalError.reason``), which the node counts in
/status and /metrics, logs (rate-limited) and audits, applying nothing:

    approval_malformed       not an approval record
    approval_forged          the signature does not verify under the key it names
    approval_unknown_signer  the key is not a member's (the allowlist's peers or this node)
    approval_expired         past its expires_at
    approval_future          issued later than this node's clock allows (window)
    approval_replayed        an older record of an approver whose newer one is held
    unknown_study            an approval of a study this node does not run

An approver takes its approval back with a signed **withdrawal** (``murmur study withdraw``):
the same fields without an expiry, format ``murmur-study-withdrawal/1``. It is gossiped like
an approval and checked the same way (the same reason codes), never expires, and cancels
every approval of that study by that key issued up to its ``issued_at``: such an approval,
from a peer that has not heard of the withdrawal yet, is not kept (not a refusal: gossip
brings it back as a matter of course). A later approval approves again.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from murmur.crypto.identity import Identity, check_public_key, verify_signature
from murmur.node.durable import atomic_write
from murmur.node.studies.manifest import canonical_json

APPROVAL_FORMAT = "murmur-study-approval/1"
SIGNATURE_DOMAIN = b"murmur-study-approval/1\x00"
WITHDRAWAL_FORMAT = "murmur-study-withdrawal/1"
WITHDRAWAL_DOMAIN = b"murmur-study-withdrawal/1\x00"
WITHDRAWAL_SUFFIX = ".withdrawal.json"
DEFAULT_VALID_DAYS = 365.0
CLOCK_WINDOW_S = 300.0
MAX_APPROVAL_BYTES = 2048
MAX_APPROVALS_PER_BODY = 64
MAX_APPROVALS_BODY_BYTES = MAX_APPROVALS_PER_BODY * MAX_APPROVAL_BYTES  # POST /approvals
APPROVALS_DIR = "approvals"

REASONS = (
    "approval_malformed",
    "approval_forged",
    "approval_unknown_signer",
    "approval_expired",
    "approval_future",
    "approval_replayed",
    "unknown_study",
)


class ApprovalError(ValueError):
    """A refused approval record; ``reason`` is one of ``REASONS``."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class Approval:
    """One approver's signed approval of one study (a manifest hash)."""

    study: str
    approver: str
    public_key: str
    issued_at: float
    expires_at: float
    nonce: str
    signature: str = ""

    def signed_message(self) -> bytes:
        fields = asdict(self)
        del fields["signature"]
        return SIGNATURE_DOMAIN + canonical_json({"format": APPROVAL_FORMAT, **fields})

    def to_json(self) -> dict[str, Any]:
        return {"format": APPROVAL_FORMAT, **asdict(self)}

    def encode(self) -> bytes:
        return canonical_json(self.to_json())

    @property
    def key(self) -> bytes:
        return bytes.fromhex(self.public_key)


def approve(
    study: str,
    approver: Identity,
    *,
    now: float | None = None,
    valid_days: float = DEFAULT_VALID_DAYS,
) -> Approval:
    """The approver's signed approval of ``study``, valid for ``valid_days`` from ``now``."""
    now = time.time() if now is None else now
    unsigned = Approval(
        study=study,
        approver=approver.name,
        public_key=approver.public_key.hex(),
        issued_at=round(now, 3),
        expires_at=round(now + valid_days * 86400.0, 3),
        nonce=secrets.token_hex(16),
    )
    signature = approver.sign(unsigned.signed_message()).hex()
    return Approval(**{**asdict(unsigned), "signature": signature})


@dataclass(frozen=True)
class Withdrawal:
    """One approver's signed withdrawal of its approval of one study."""

    study: str
    approver: str
    public_key: str
    issued_at: float
    nonce: str
    signature: str = ""

    def signed_message(self) -> bytes:
        fields = asdict(self)
        del fields["signature"]
        return WITHDRAWAL_DOMAIN + canonical_json({"format": WITHDRAWAL_FORMAT, **fields})

    def to_json(self) -> dict[str, Any]:
        return {"format": WITHDRAWAL_FORMAT, **asdict(self)}

    def encode(self) -> bytes:
        return canonical_json(self.to_json())

    @property
    def key(self) -> bytes:
        return bytes.fromhex(self.public_key)

    def cancels(self, approval: Approval) -> bool:
        return approval.public_key == self.public_key and approval.issued_at <= self.issued_at


def withdraw(study: str, approver: Identity, *, now: float | None = None) -> Withdrawal:
    """The approver's signed withdrawal of its approval of ``study``, as of ``now``."""
    now = time.time() if now is None else now
    unsigned = Withdrawal(
        study=study,
        approver=approver.name,
        public_key=approver.public_key.hex(),
        issued_at=round(now, 3),
        nonce=secrets.token_hex(16),
    )
    signature = approver.sign(unsigned.signed_message()).hex()
    return Withdrawal(**{**asdict(unsigned), "signature": signature})


StudyRecord = Approval | Withdrawal


def _require(ok: bool, detail: str) -> None:
    if not ok:
        raise ApprovalError("approval_malformed", detail)


def parse_approval(document: Any) -> StudyRecord:
    """An approval or withdrawal record from its JSON document, shape checked, signature
    verified."""
    _require(isinstance(document, dict), "an approval is a JSON object")
    kinds = {APPROVAL_FORMAT: Approval, WITHDRAWAL_FORMAT: Withdrawal}
    kind = kinds.get(document.get("format"))  # type: ignore[union-attr]
    _require(kind is not None, f'format must be "{APPROVAL_FORMAT}" or "{WITHDRAWAL_FORMAT}"')
    fields = {k: v for k, v in document.items() if k != "format"}
    names = {f for f in kind.__dataclass_fields__}
    _require(set(fields) == names, f"a {document['format']} has exactly the fields {sorted(names)}")
    for name in ("study", "approver", "public_key", "nonce", "signature"):
        _require(isinstance(fields[name], str), f"{name} must be a string")
    for name in ("issued_at", "expires_at"):
        if name not in fields:
            continue
        value = fields[name]
        _require(
            isinstance(value, int | float) and not isinstance(value, bool), f"{name}: a number"
        )
    try:
        bytes.fromhex(fields["study"])
        check_public_key(bytes.fromhex(fields["public_key"]))
        signature = bytes.fromhex(fields["signature"])
    except ValueError as exc:
        raise ApprovalError("approval_malformed", str(exc)) from None
    _require(len(fields["study"]) == 64, "study must be a hex SHA-256")
    record = kind(**fields)
    if not verify_signature(record.key, record.signed_message(), signature):
        what = "approval" if kind is Approval else "withdrawal"
        raise ApprovalError(
            "approval_forged",
            f"the signature of {record.approver!r}'s {what} of study {record.study[:16]}... "
            "does not verify under the key it names",
        )
    return record


def decode_approval(raw: bytes) -> StudyRecord:
    _require(len(raw) <= MAX_APPROVAL_BYTES, f"an approval is at most {MAX_APPROVAL_BYTES} bytes")
    try:
        return parse_approval(json.loads(raw))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ApprovalError("approval_malformed", f"not JSON: {exc}") from None


def check_approval(
    approval: StudyRecord,
    *,
    studies: set[str] | frozenset[str],
    members: Mapping[bytes, str],
    now: float | None = None,
) -> str:
    """The member name behind a verified approval that is valid now, or ApprovalError."""
    now = time.time() if now is None else now
    if approval.study not in studies:
        raise ApprovalError(
            "unknown_study",
            f"approval by {approval.approver!r} of study {approval.study[:16]}..., which this "
            "node does not run",
        )
    member = members.get(approval.key)
    if member is None:
        raise ApprovalError(
            "approval_unknown_signer",
            f"key {approval.public_key[:16]}... (calling itself {approval.approver!r}) is not a "
            "consortium member's",
        )
    if isinstance(approval, Approval) and approval.expires_at <= now:
        raise ApprovalError(
            "approval_expired",
            f"{member}'s approval of study {approval.study[:16]}... expired "
            f"{now - approval.expires_at:.0f} s ago; the approver can issue a new one",
        )
    if approval.issued_at > now + CLOCK_WINDOW_S:
        raise ApprovalError(
            "approval_future",
            f"{member}'s approval is dated {approval.issued_at - now:.0f} s ahead of this clock",
        )
    return member


class ApprovalBook:
    """The approvals a node holds, one (the newest) per approver and study, in
    STATE_DIR/approvals/STUDY/KEY.json, each written atomically.

    A record older than, or as old as, the held one of its approver is a replay (a held
    record comes back unchanged as a duplicate, which gossip makes normal: not a refusal).
    The newest withdrawal of each approver and study is kept beside it
    (STATE_DIR/approvals/STUDY/KEY.withdrawal.json) and cancels the approvals it covers.
    """

    def __init__(self, state_dir: Path) -> None:
        self.root = Path(state_dir) / APPROVALS_DIR
        self._held: dict[tuple[str, str], Approval] = {}
        self._withdrawn: dict[tuple[str, str], Withdrawal] = {}
        if self.root.is_dir():
            for path in sorted(self.root.glob("*/*.json")):
                try:
                    record = decode_approval(path.read_bytes())
                except (OSError, ApprovalError):
                    continue  # a damaged file approves nothing; `murmur study list` says so
                book = self._withdrawn if isinstance(record, Withdrawal) else self._held
                book[(record.study, record.public_key)] = record  # type: ignore[index]

    def offer(self, approval: StudyRecord) -> bool:
        """Keep ``approval`` (True), or False for a duplicate of the held one or an approval
        that a held withdrawal cancels; ApprovalError ``approval_replayed`` for an older
        record."""
        if isinstance(approval, Withdrawal):
            return self._offer_withdrawal(approval)
        withdrawn = self._withdrawn.get((approval.study, approval.public_key))
        if withdrawn is not None and withdrawn.cancels(approval):
            return False
        held = self._held.get((approval.study, approval.public_key))
        if held is not None:
            if held.signature == approval.signature:
                return False
            if approval.issued_at <= held.issued_at:
                raise ApprovalError(
                    "approval_replayed",
                    f"{approval.approver!r}'s approval of study {approval.study[:16]}... issued "
                    f"at {approval.issued_at:.0f} is older than the held one "
                    f"({held.issued_at:.0f})",
                )
        path = self.root / approval.study / f"{approval.public_key}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, approval.encode())
        self._held[(approval.study, approval.public_key)] = approval
        return True

    def _offer_withdrawal(self, withdrawal: Withdrawal) -> bool:
        held = self._withdrawn.get((withdrawal.study, withdrawal.public_key))
        if held is not None:
            if held.signature == withdrawal.signature:
                return False
            if withdrawal.issued_at <= held.issued_at:
                raise ApprovalError(
                    "approval_replayed",
                    f"{withdrawal.approver!r}'s withdrawal of study {withdrawal.study[:16]}... "
                    f"is older than the held one",
                )
        path = self.root / withdrawal.study / f"{withdrawal.public_key}{WITHDRAWAL_SUFFIX}"
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, withdrawal.encode())
        self._withdrawn[(withdrawal.study, withdrawal.public_key)] = withdrawal
        return True

    def of_study(self, study: str) -> list[Approval]:
        return [a for (s, _), a in sorted(self._held.items()) if s == study]

    def withdrawals_of(self, study: str) -> list[Withdrawal]:
        return [w for (s, _), w in sorted(self._withdrawn.items()) if s == study]

    def withdrawn(self, approval: Approval) -> Withdrawal | None:
        """The held withdrawal that cancels ``approval``, if any."""
        w = self._withdrawn.get((approval.study, approval.public_key))
        return w if w is not None and w.cancels(approval) else None

    def studies(self) -> list[str]:
        return sorted({s for s, _ in self._held} | {s for s, _ in self._withdrawn})

    def valid_approvers(
        self, study: str, members: Mapping[bytes, str], now: float | None = None
    ) -> dict[str, Approval]:
        """Member name -> the held approval of ``study`` that is valid now."""
        valid = {}
        for approval in self.of_study(study):
            if self.withdrawn(approval) is not None:
                continue
            try:
                member = check_approval(approval, studies={study}, members=members, now=now)
            except ApprovalError:
                continue
            valid[member] = approval
        return valid
