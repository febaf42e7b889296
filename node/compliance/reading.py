"""Reading a node's audit log into a `ComplianceReport`: every record of a round in its
section, the ledger's spend between rounds, and the study from the config it ran under."""

from __future__ import annotations

import hashlib
import io
import json
import tomllib
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from murmur.crypto.identity import fingerprint
from murmur.node.audit import (
    AuditRecord,
    PeerHead,
    counts_by_kind,
    records_of_kind,
    stored_meta,
    verify_and_report,
)
from murmur.node.compliance.model import (
    ComplianceReport,
    Event,
    Ledger,
    Received,
    RoundSection,
    Sent,
    Study,
    Verification,
)
from murmur.node.wording import (
    describe_record,
)

# Records that the per-round tables already show; every other kind is listed as an event.
_TABLED = {"update_sent", "message_received", "aggregation", "privacy", "evaluation", "checkpoint"}
# Events a reader must not miss.
_SERIOUS = {
    "quarantine",
    "equivocation_proof",
    "rollback_detected",
    "startup_refused",
    "adversary_mode",
    "attack_abuse_sent",
    "training_diverged",
    "peer_down",
    "waiting_for_neighbours",
}


def build_report(
    state_dir: Path,
    *,
    public_key: bytes | None = None,
    peer_heads: list[PeerHead] | None = None,
    peer_head_warnings: list[str] | None = None,
    config: Path | None = None,
) -> ComplianceReport:
    """Read the log of `state_dir` (AuditError without one) and verify it."""
    meta = stored_meta(state_dir)
    kinds = list(counts_by_kind(state_dir))
    records = records_of_kind(state_dir, *kinds) if kinds else []
    out = io.StringIO()
    for warning in peer_head_warnings or []:
        print(f"warning: {warning}", file=out)
    code, result = verify_and_report(state_dir, public_key, out, peer_heads=peer_heads)
    verification = Verification(
        code=code,
        output=out.getvalue(),
        records=result.records if result else 0,
        peer_heads_given=peer_heads is not None,
        first_bad_seq=result.first_bad_seq if result else None,
        problem=result.problem if result else None,
    )
    stored_key = meta.get("public_key", "")
    key_hex = public_key.hex() if public_key is not None else stored_key
    try:
        print_ = fingerprint(bytes.fromhex(key_hex))
    except ValueError:
        print_ = "unreadable"
    if public_key is None:
        key_source = "the key stored in the log itself (no published key was given to check it)"
    elif stored_key == public_key.hex():
        key_source = "the hospital's published key, which matches the key stored in the log"
    else:
        key_source = "the published key given, which does NOT match the key stored in the log"

    rounds: dict[int, RoundSection] = {}
    other: list[Event] = []
    previous: Ledger | None = None
    final: Ledger | None = None  # the node writes privacy records only under DP
    for rec in records:
        if rec.kind == "privacy" and rec.fields.get("event") is None:
            final = Ledger.of(rec.fields)
        section = rounds.get(rec.round) if isinstance(rec.round, int) and rec.round > 0 else None
        if section is None and isinstance(rec.round, int) and rec.round > 0:
            section = rounds[rec.round] = RoundSection(rec.round)
        if section is None:
            if rec.kind == "privacy" and rec.fields.get("event") is None:
                previous = Ledger.of(rec.fields)
            elif rec.kind not in _TABLED:
                other.append(_event(rec))
            continue
        section.first_utc = section.first_utc or rec.time_utc
        section.last_utc = rec.time_utc
        _add(section, rec)
        if section.ledger is not None and rec.kind == "privacy":
            section.epsilon_this_round, section.steps_this_round = _spent_since(
                previous, section.ledger
            )
            previous = section.ledger
    first = records[0].time_utc if records else ""
    last = records[-1].time_utc if records else ""
    return ComplianceReport(
        node_name=meta.get("node_name") or "unnamed node",
        public_key=key_hex,
        fingerprint=print_,
        key_source=key_source,
        study=_study(state_dir, records, config),
        verification=verification,
        rounds=[rounds[r] for r in sorted(rounds)],
        other_events=other,
        first_utc=first,
        last_utc=last,
        final=final,
        dp_enabled=final is not None,
        adversary=any(r.kind == "adversary_mode" for r in records),
        generated_utc=datetime.now(tz=UTC).isoformat(timespec="seconds"),
    )


def _add(section: RoundSection, rec: AuditRecord) -> None:
    f = rec.fields
    if rec.kind == "update_sent":
        failed = f.get("failed") if isinstance(f.get("failed"), dict) else {}
        section.sent.append(
            Sent(
                rec.seq,
                rec.time_utc,
                [str(x) for x in f.get("recipients") or []],
                [str(x) for x in f.get("delivered") or []],
                {str(k): str(v) for k, v in failed.items()},
                f.get("bytes") if isinstance(f.get("bytes"), int) else None,
                str(f.get("model_sha256") or ""),
            )
        )
    elif rec.kind == "message_received":
        section.received.append(
            Received(
                rec.seq,
                rec.time_utc,
                str(f.get("sender") or "unidentified sender"),
                bool(f.get("accepted")),
                str(f.get("reason") or ""),
                f.get("model_sha256"),
            )
        )
    elif rec.kind == "aggregation":
        section.rule = str(f.get("rule"))
        section.result_sha256 = f.get("result_sha256")
        section.used = [str(u.get("peer")) for u in f.get("used") or [] if isinstance(u, dict)]
        section.excluded = [
            (str(e.get("peer")), str(e.get("reason")))
            for e in f.get("excluded") or []
            if isinstance(e, dict)
        ]
    elif rec.kind == "privacy" and f.get("event") is None:
        section.ledger = Ledger.of(f)
    elif rec.kind == "evaluation":
        auc = (f.get("metrics") or {}).get("auc")
        section.auc = auc if isinstance(auc, int | float) else None
    elif rec.kind not in _TABLED or rec.kind == "privacy":
        section.events.append(_event(rec))


def _event(rec: AuditRecord) -> Event:
    return Event(rec.seq, rec.time_utc, rec.kind, describe_record(rec), rec.kind in _SERIOUS)


def _spent_since(before: Ledger | None, after: Ledger) -> tuple[float | None, int | None]:
    """ε and DP steps spent between two ledger readings (the first counts from zero)."""
    eps0 = before.epsilon_spent if before is not None else 0.0
    steps0 = before.steps_taken if before is not None else 0
    eps = (
        after.epsilon_spent - eps0
        if isinstance(after.epsilon_spent, int | float) and isinstance(eps0, int | float)
        else None
    )
    steps = (
        after.steps_taken - steps0
        if isinstance(after.steps_taken, int) and isinstance(steps0, int)
        else None
    )
    return eps, steps


def _study(state_dir: Path, records: list[AuditRecord], config: Path | None) -> Study:
    """The study from `--config` when its SHA-256 is one the log's node_start records name
    (so the signed log vouches for it), else from the node's status.json (unsigned)."""
    hashes = list(
        dict.fromkeys(str(r.fields.get("config_sha256")) for r in records if r.kind == "node_start")
    )
    if config is not None:
        raw = Path(config).read_bytes()
        digest = hashlib.sha256(raw).hexdigest()
        doc = tomllib.loads(raw.decode("utf-8"))
        matches = digest in hashes
        source = (
            f"the configuration file {config}, whose SHA-256 matches the one the node "
            "recorded in its signed log when it started"
            if matches
            else f"the configuration file {config}; its SHA-256 ({digest[:12]}) does NOT match "
            "any configuration the node recorded in its log, so it may not be the one it ran"
        )
        return Study(
            dataset=(doc.get("data") or {}).get("dataset"),
            hospital=(doc.get("data") or {}).get("hospital"),
            model=(doc.get("model") or {}).get("name"),
            planned_rounds=(doc.get("training") or {}).get("rounds"),
            source=source,
            config_sha256=hashes,
            config_matches=matches,
        )
    status_path = Path(state_dir) / "status.json"
    status: dict[str, Any] = {}
    if status_path.is_file():
        try:
            status = json.loads(status_path.read_text())
        except (OSError, ValueError):
            status = {}
    data = status.get("data") or {}
    return Study(
        dataset=data.get("dataset"),
        hospital=data.get("hospital"),
        model=None,
        planned_rounds=status.get("planned_rounds"),
        source=(
            "the node's status file (status.json), which is not signed; pass --config with "
            "the node's configuration file to have it checked against the log"
            if status
            else "nowhere: no status.json and no --config; pass --config to name the study"
        ),
        config_sha256=hashes,
        config_matches=None,
    )
