"""What a compliance report says, as data: the sent and received models, the ledger, the
events, each round's section, the study and the verification."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Sent:
    """One `update_sent` record: one model, encrypted once for its recipients."""

    seq: int
    time_utc: str
    recipients: list[str]
    delivered: list[str]
    failed: dict[str, str]
    bytes: int | None
    model_sha256: str


@dataclass(frozen=True)
class Received:
    """One `message_received` record: a signed envelope from an admitted peer."""

    seq: int
    time_utc: str
    sender: str
    accepted: bool
    reason: str
    model_sha256: str | None


@dataclass(frozen=True)
class Ledger:
    """The accountant's inputs and answer after a round (a `privacy` record)."""

    epsilon_spent: float | None
    epsilon_budget: float | None
    delta: float | None
    noise_multiplier: float | None
    sample_rate: float | None
    steps_taken: int | None
    planned_steps: int | None
    accountant: str | None
    max_grad_norm: float | None

    @classmethod
    def of(cls, fields: dict[str, Any]) -> Ledger:
        return cls(
            *(
                fields.get(k)
                for k in (
                    "epsilon_spent",
                    "epsilon_budget",
                    "delta",
                    "noise_multiplier",
                    "sample_rate",
                    "steps_taken",
                    "planned_steps",
                    "accountant",
                    "max_grad_norm",
                )
            )
        )


@dataclass(frozen=True)
class Event:
    seq: int
    time_utc: str
    kind: str
    text: str
    serious: bool


@dataclass
class RoundSection:
    """Everything the log says about one training round."""

    round: int
    first_utc: str = ""
    last_utc: str = ""
    sent: list[Sent] = field(default_factory=list)
    received: list[Received] = field(default_factory=list)
    used: list[str] = field(default_factory=list)
    excluded: list[tuple[str, str]] = field(default_factory=list)  # (peer, reason code)
    rule: str | None = None
    result_sha256: str | None = None
    ledger: Ledger | None = None
    epsilon_this_round: float | None = None
    steps_this_round: int | None = None
    auc: float | None = None
    events: list[Event] = field(default_factory=list)


@dataclass(frozen=True)
class Study:
    """What the node was configured to do, and where the report learnt it from."""

    dataset: str | None
    hospital: str | None
    model: str | None
    planned_rounds: int | None
    source: str  # a sentence: which file, and whether the log vouches for it
    config_sha256: list[str]
    config_matches: bool | None  # --config given: does its hash match a node_start record?


@dataclass(frozen=True)
class Verification:
    """`murmur audit verify`'s outcome, in its own words and in a reader's."""

    code: int  # 0 verifies, 1 fails, 2 no readable log
    output: str
    records: int
    peer_heads_given: bool
    first_bad_seq: int | None
    problem: str | None

    @property
    def ok(self) -> bool:
        return self.code == 0


@dataclass
class ComplianceReport:
    node_name: str
    public_key: str
    fingerprint: str
    key_source: str
    study: Study
    verification: Verification
    rounds: list[RoundSection]
    other_events: list[Event]
    first_utc: str
    last_utc: str
    final: Ledger | None
    dp_enabled: bool
    adversary: bool
    generated_utc: str

    # -- totals the summary states

    def recipients(self) -> list[str]:
        seen: dict[str, None] = {}
        for r in self.rounds:
            for s in r.sent:
                seen.update(dict.fromkeys(s.recipients))
        return list(seen)

    def deliveries(self) -> tuple[int, int, int]:
        """(models sent, copies delivered, copies that failed)."""
        sent = [s for r in self.rounds for s in r.sent]
        return len(sent), sum(len(s.delivered) for s in sent), sum(len(s.failed) for s in sent)

    def received_counts(self) -> tuple[Counter[str], Counter[str]]:
        accepted: Counter[str] = Counter()
        refused: Counter[str] = Counter()
        for r in self.rounds:
            for m in r.received:
                (accepted if m.accepted else refused)[m.sender] += 1
        return accepted, refused

    def exclusions(self) -> Counter[tuple[str, str]]:
        return Counter(e for r in self.rounds for e in r.excluded)

    def serious_events(self) -> list[Event]:
        return [ev for ev in self.other_events if ev.serious] + [
            ev for r in self.rounds for ev in r.events if ev.serious
        ]

    def completed_rounds(self) -> int:
        return sum(1 for r in self.rounds if r.auc is not None or r.rule is not None)
