"""Model lineage: which rounds and peers' signed updates built a model, read back from the
aggregation and message_received records (`murmur audit lineage`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from murmur.node.audit.reading import (
    records_of_kind,
)
from murmur.node.audit.records import (
    SHA256_PATTERN,
    AuditError,
    AuditRecord,
)


@dataclass(frozen=True)
class Contribution:
    """One model that went into an aggregate, and the log record of its signed envelope."""

    peer: str
    model_sha256: str
    received_seq: int | None
    body_sha256: str | None


@dataclass(frozen=True)
class LineageStep:
    """One aggregation on the path back from a model."""

    round: int | None
    aggregation_seq: int
    rule: str
    f: Any
    result_sha256: str
    own_model_sha256: str
    contributions: list[Contribution]
    excluded: list[dict[str, Any]]


@dataclass(frozen=True)
class Lineage:
    """Where a model came from. `origin` is "aggregate" when the model is the result of
    aggregation record `record_seq`, "local" when it is the model this node trained and fed
    into that aggregation. `steps` go newest first."""

    model_sha256: str
    origin: str
    round: int | None
    record_seq: int
    steps: list[LineageStep]


Finder = Callable[[Callable[[AuditRecord], bool], int | None], AuditRecord | None]


def lineage(
    state: Path | str, model_sha256: str, *, max_rounds: int | None = None
) -> Lineage | None:
    """Walk back from a model through the aggregations that built it; None if never seen.

    Each round's own model was trained from an earlier aggregate: the one named by the
    aggregation record's optional `base_model_sha256`, else this node's latest aggregate of
    an earlier round (after a crash and restart, the re-done round is the one that counts).
    """
    aggregations = records_of_kind(state, "aggregation")
    target = _resolve_model_hash(model_sha256, aggregations)
    if target is None:
        return None
    received: dict[tuple[str, str], list[AuditRecord]] = {}
    for rec in records_of_kind(state, "message_received"):
        if rec.fields.get("accepted") is True and rec.fields.get("model_sha256"):
            key = (rec.fields.get("sender"), rec.fields["model_sha256"])
            received.setdefault(key, []).append(rec)

    def latest(predicate: Callable[[AuditRecord], bool], before: int | None) -> AuditRecord | None:
        return next(
            (
                a
                for a in reversed(aggregations)
                if (before is None or a.seq < before) and predicate(a)
            ),
            None,
        )

    start = latest(lambda a: a.fields.get("result_sha256") == target, None)
    origin = "aggregate"
    current = start
    if start is None:
        start = latest(lambda a: a.fields.get("own_model_sha256") == target, None)
        if start is None:
            return None
        origin, current = "local", _base_of(start, latest)
    steps: list[LineageStep] = []
    seen: set[int] = set()
    while current is not None and current.seq not in seen:
        if max_rounds is not None and len(steps) >= max_rounds:
            break
        seen.add(current.seq)
        steps.append(_step(current, received))
        current = _base_of(current, latest)
    return Lineage(target, origin, start.round, start.seq, steps)


MIN_HASH_PREFIX = 6
"""Hex characters a model-hash prefix needs (the dashboard shows 12) before it is looked up."""


def _resolve_model_hash(text: str, aggregations: list[AuditRecord]) -> str | None:
    """The full SHA-256 that `text` names: itself, or the one model of this log whose hash
    starts with it; None when no model of the log does. An ambiguous prefix is an error that
    lists the candidates, never a guess."""
    target = text.strip().lower()
    if SHA256_PATTERN.match(target):
        return target
    if not (MIN_HASH_PREFIX <= len(target) < 64 and all(c in "0123456789abcdef" for c in target)):
        raise AuditError(
            f"{text!r} is not a SHA-256 (64 hex characters) nor a prefix of one: give at "
            f"least {MIN_HASH_PREFIX} hex characters (the dashboard shows 12) or all 64"
        )
    models = {
        value
        for a in aggregations
        for value in (a.fields.get("result_sha256"), a.fields.get("own_model_sha256"))
        if isinstance(value, str) and value.startswith(target)
    }
    if len(models) > 1:
        raise AuditError(
            f"prefix {target} matches {len(models)} models of this log "
            f"({', '.join(sorted(m[:16] for m in models))}); give more characters"
        )
    return next(iter(models), None)


def _base_of(agg: AuditRecord, latest: Finder) -> AuditRecord | None:
    base = agg.fields.get("base_model_sha256")
    if base:
        return latest(lambda a: a.fields.get("result_sha256") == base, agg.seq)
    if agg.round is None:
        return latest(lambda a: True, agg.seq)
    return latest(lambda a: a.round is not None and a.round < agg.round, agg.seq)


def _step(agg: AuditRecord, received: dict[tuple[str, str], list[AuditRecord]]) -> LineageStep:
    contributions = []
    for used in agg.fields.get("used", []):
        sent = received.get((used["peer"], used["model_sha256"]), [])
        candidates = [r for r in sent if r.seq < agg.seq]
        same_round = [r for r in candidates if r.round == agg.round]
        match = (same_round or candidates or [None])[-1]
        contributions.append(
            Contribution(
                peer=used["peer"],
                model_sha256=used["model_sha256"],
                received_seq=match.seq if match else None,
                body_sha256=match.fields.get("body_sha256") if match else None,
            )
        )
    return LineageStep(
        round=agg.round,
        aggregation_seq=agg.seq,
        rule=str(agg.fields.get("rule")),
        f=agg.fields.get("f"),
        result_sha256=agg.fields["result_sha256"],
        own_model_sha256=agg.fields["own_model_sha256"],
        contributions=contributions,
        excluded=list(agg.fields.get("excluded", [])),
    )


def lineage_command(
    state_dir: Path | str, model_sha256: str, out: TextIO, *, max_rounds: int | None = None
) -> int:
    """`murmur audit lineage`: the rounds and peers whose signed updates built a model.

    Returns 0 when found, 1 when no aggregation in this log involves the model, 2 on a bad
    log or argument.
    """
    try:
        found = lineage(state_dir, model_sha256, max_rounds=max_rounds)
    except AuditError as exc:
        print(f"audit lineage: {exc}", file=out)
        return 2
    if found is None:
        print(
            f"no aggregation in this node's audit log produced or used model "
            f"{model_sha256.strip().lower()}; check the hash (model_sha256 in /status) and --state",
            file=out,
        )
        return 1
    what = "the aggregate" if found.origin == "aggregate" else "this node's locally trained model"
    print(
        f"model {found.model_sha256} is {what} of round {found.round} "
        f"(audit record {found.record_seq})",
        file=out,
    )
    print(
        f"{len(found.steps)} aggregation(s) back, as far as this node's log sees "
        "(`murmur audit verify` checks the log itself):",
        file=out,
    )
    rows = [("round", "record", "contributor", "model_sha256", "evidence")]
    rounds_by_peer: dict[str, list[int | None]] = {}
    for step in found.steps:
        rnd, seq = "-" if step.round is None else str(step.round), str(step.aggregation_seq)
        rows.append(
            (rnd, seq, "(this node)", step.own_model_sha256, f"trained here; rule {step.rule}")
        )
        for c in step.contributions:
            evidence = (
                f"signed envelope accepted in record {c.received_seq}"
                if c.received_seq is not None
                else "no message_received record left in this log (pruned?)"
            )
            rows.append((rnd, seq, c.peer, c.model_sha256, evidence))
            rounds_by_peer.setdefault(c.peer, []).append(step.round)
        for e in step.excluded:
            reason = f"EXCLUDED: {e.get('reason')}"
            rows.append((rnd, seq, str(e.get("peer")), e.get("model_sha256") or "-", reason))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    for row in rows:
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=False)]
        print("  ".join([*cells, row[4]]), file=out)
    print("peers whose signed updates contributed:", file=out)
    for peer, rounds in sorted(rounds_by_peer.items()):
        print(f"  {peer}: {len(rounds)} round(s): {_ranges(rounds)}", file=out)
    if not rounds_by_peer:
        print("  none (every round kept this node's own model only)", file=out)
    return 0


def _ranges(rounds: list[int | None]) -> str:
    numbers = sorted({r for r in rounds if isinstance(r, int)})
    parts: list[tuple[int, int]] = []
    for n in numbers:
        if parts and parts[-1][1] == n - 1:
            parts[-1] = (parts[-1][0], n)
        else:
            parts.append((n, n))
    return ", ".join(f"{a}" if a == b else f"{a}-{b}" for a, b in parts) or "-"
