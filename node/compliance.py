"""`murmur audit report`: one document for a compliance officer, from a node's audit log.

Why: a compliance officer has to answer, for one hospital, what left it, to whom, when, under
which study and at what privacy cost, and whether the record of it can be trusted. The answer
is already in the node's signed audit log (node/audit/), but as hundreds of JSON records;
this module reads them through node/audit/'s public readers and writes one self-contained
HTML page (and a PDF where headless Chromium is installed) in plain language:

1. a one-paragraph summary: who the node is (name, key fingerprint), the study, the rounds,
   ε spent of the budget, to whom models were sent, and whether the log verifies;
2. per round: what was sent to whom (model hashes, sizes, delivered or failed), what was
   received and from whom, what was left out of the combination and why, ε spent against the
   budget with the accountant's inputs (σ, q, steps, δ), and any quarantine, equivocation
   proof or rollback;
3. the verification, exactly as `murmur audit verify` prints it (`verify_and_report`, with the
   peers' heads of `--peer-heads` read by node/peer_heads.py's `load_peer_heads`).

The page has no external assets and no script (its Content-Security-Policy allows none), and
every string from the log is HTML-escaped: node names and reasons come from config files and
from peers.
"""

from __future__ import annotations

import base64
import hashlib
import html
import io
import json
import os
import shutil
import subprocess
import tempfile
import tomllib
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from crypto.identity import fingerprint
from node.audit import (
    AuditError,
    AuditRecord,
    PeerHead,
    counts_by_kind,
    records_of_kind,
    stored_meta,
    verify_and_report,
)
from node.wording import (
    describe_record,
    exclusion_meaning,
    names,
    number,
    reason_meaning,
    short_hash,
    size,
)

PDF_TIMEOUT_S = 120.0
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")

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


# ---------------------------------------------------------------------------- the model


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


# ---------------------------------------------------------------------------- reading


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


# ---------------------------------------------------------------------------- writing


def e(value: Any) -> str:
    """Every string that reaches the page goes through here."""
    return html.escape(str(value), quote=True)


_STYLE = """
body{font-family:Georgia,"Times New Roman",serif;color:#1d1d1d;line-height:1.45}
body{margin:2em auto;max-width:60em;padding:0 1em}
h1{font-size:1.6em;margin-bottom:.1em}
h2{font-size:1.25em;margin-top:1.8em;border-bottom:1px solid #ccc}
h3{font-size:1.05em;margin:1.2em 0 .3em}
.summary{font-size:1.08em;background:#f6f6f2;border-left:5px solid #556;padding:.8em 1.1em}
.verdict{font-weight:bold;padding:.15em .45em;border-radius:3px}
.verdict.ok{background:#e3f4e8;color:#11612c}
.verdict.bad{background:#fbe3e6;color:#9b0018}
table{border-collapse:collapse;margin:.3em 0 .8em;font-family:system-ui,sans-serif;font-size:.86em}
td,th{border:1px solid #ccc;padding:2px 8px;text-align:left;vertical-align:top}
th{background:#f1f1f1}
td.n{text-align:right}
code,pre{font-family:"DejaVu Sans Mono",Menlo,monospace;font-size:.85em}
pre{background:#f6f6f6;padding:.6em;white-space:pre-wrap;word-break:break-all}
.serious{color:#9b0018;font-weight:bold}
.muted{color:#666}
section.round{page-break-inside:avoid;border-top:1px dotted #bbb;margin-top:1em}
dl.facts{display:grid;grid-template-columns:max-content 1fr;gap:.2em 1.2em}
dl.facts{font-family:system-ui,sans-serif;font-size:.9em}
dl.facts dt{font-weight:600}
dl.facts dd{margin:0}
@media print{body{margin:0;max-width:none}a{color:inherit}}
"""


def _csp() -> str:
    digest = base64.b64encode(hashlib.sha256(_STYLE.encode()).digest()).decode()
    return f"default-src 'none'; style-src 'sha256-{digest}'; base-uri 'none'; form-action 'none'"


def _when(iso: str) -> str:
    """'2026-05-01T10:00:00.123456+00:00' -> '2026-05-01 10:00:00 UTC'."""
    return iso[:19].replace("T", " ") + " UTC" if iso else "unknown time"


def summary_paragraph(report: ComplianceReport) -> str:
    """The report's first paragraph, as HTML (every value escaped)."""
    r = report
    parts = [
        f"This report describes what the murmur node <b>{e(r.node_name)}</b> (key fingerprint "
        f"<code>{e(r.fingerprint)}</code>) recorded in its signed audit log."
    ]
    s = r.study
    if s.dataset:
        where = f" as hospital <b>{e(s.hospital)}</b>" if s.hospital else ""
        parts.append(f"It took part in the study <b>{e(s.dataset)}</b>{where}.")
    else:
        parts.append("The log does not name the study (see “Study” below).")
    done = r.completed_rounds()
    planned = f" of {e(s.planned_rounds)} planned" if s.planned_rounds else ""
    period = f"between {e(_when(r.first_utc))} and {e(_when(r.last_utc))}" if r.first_utc else ""
    parts.append(f"It completed <b>{done} round{'s' if done != 1 else ''}</b>{planned} {period}.")
    if r.dp_enabled and r.final is not None:
        spent, budget = r.final.epsilon_spent, r.final.epsilon_budget
        share = (
            f", {spent / budget:.0%} of its budget of ε = {e(number(budget, 2))}"
            if isinstance(spent, int | float) and isinstance(budget, int | float) and budget
            else ""
        )
        parts.append(
            f"Its models were trained with differential privacy: it spent "
            f"<b>ε = {e(number(spent, 2))}</b>{share} (δ = {e(number(r.final.delta))})."
        )
    else:
        parts.append(
            "<b>Its models were trained WITHOUT differential privacy</b>: the models it sent "
            "are not protected by a privacy guarantee."
        )
    models, delivered, failed = r.deliveries()
    to = names(r.recipients())
    parts.append(
        f"It sent {models} model{'s' if models != 1 else ''} to <b>{e(to)}</b> "
        f"({delivered} copies delivered, {failed} failed); according to the log, model "
        "parameters are all it sent, never patient records."
    )
    accepted, refused = r.received_counts()
    exclusions = r.exclusions()
    why = "; ".join(
        f"{peer} {n}× ({exclusion_meaning(reason)})" for (peer, reason), n in exclusions.items()
    )
    parts.append(
        f"It accepted {sum(accepted.values())} models from {len(accepted)} hospital(s), refused "
        f"{sum(refused.values())} signed message(s), and left {sum(exclusions.values())} "
        f"received model(s) out of its combined model{e(': ' + why) if why else ''}."
    )
    serious = Counter(ev.kind for ev in r.serious_events())
    if serious:
        listed = ", ".join(f"{n} {kind.replace('_', ' ')}" for kind, n in serious.items())
        parts.append(
            f"<span class='serious'>Events to review: {e(listed)}</span> (listed in their rounds "
            "below)."
        )
    if r.adversary:
        parts.append(
            "<b class='serious'>This node ran in ADVERSARY MODE (a test attacker); its log "
            "must not be read as a hospital's.</b>"
        )
    v = r.verification
    if v.ok:
        heads = " and contains every audit head its neighbours hold" if v.peer_heads_given else ""
        parts.append(
            f"The audit log <span class='verdict ok'>verifies</span>: all {v.records} records "
            f"are intact, in order and signed by this node's key{heads}."
        )
    elif v.code == 1:
        parts.append(
            "The audit log <span class='verdict bad'>does NOT verify</span>: "
            f"{e(_first_failure(v))}. The figures in this report come from a log that was "
            "altered, damaged or cut back, and cannot be relied on."
        )
    else:
        parts.append("<span class='verdict bad'>The audit log could not be read.</span>")
    return " ".join(parts)


def _first_failure(v: Verification) -> str:
    for line in v.output.splitlines():
        if "FAILED" in line:
            return line
    return v.problem or "see Verification below"


def render_html(report: ComplianceReport) -> str:
    """The whole report as one self-contained HTML page."""
    r = report
    out: list[str] = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f'<meta http-equiv="Content-Security-Policy" content="{e(_csp())}">',
        f"<title>Compliance report: {e(r.node_name)}</title>",
        f"<style>{_STYLE}</style></head><body>",
        f"<h1>Compliance report: {e(r.node_name)}</h1>",
        f"<p class='muted'>Generated {e(_when(r.generated_utc))} by <code>murmur audit "
        "report</code> from the node's audit log.</p>",
        f"<p class='summary'>{summary_paragraph(r)}</p>",
        "<h2>Key facts</h2>",
        _facts(r),
        "<h2>Round by round</h2>",
        "<p>For each round: the models this hospital sent and received, which received models "
        "were left out of its combined model and why, and the privacy it spent. A model is "
        "named by the first 12 characters of its SHA-256 hash: anyone holding a model can "
        "compute its hash and check it is the one listed here (<code>murmur audit lineage</code> "
        "traces it further).</p>",
    ]
    out.extend(_round_html(section, r) for section in r.rounds)
    if not r.rounds:
        out.append("<p>No training round is recorded in this log.</p>")
    if r.other_events:
        out.append("<h2>Other events</h2>")
        out.append(_events_table(r.other_events))
    out.append(_verification_html(r.verification))
    out.append(_glossary_html())
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def _facts(r: ComplianceReport) -> str:
    s, f = r.study, r.final
    rows = [
        ("Node", r.node_name),
        ("Key fingerprint", r.fingerprint),
        ("Public key", r.public_key),
        ("Key checked against", r.key_source),
        ("Study (data set)", s.dataset or "not recorded"),
        ("Hospital's data", s.hospital or "not recorded"),
        ("Model", s.model or "not recorded"),
        ("Study details from", s.source),
        (
            "Configuration SHA-256 (signed)",
            ", ".join(s.config_sha256) or "no node_start record in this log",
        ),
        ("Rounds completed", f"{r.completed_rounds()}"),
        ("Period", f"{_when(r.first_utc)} to {_when(r.last_utc)}" if r.first_utc else "-"),
        ("Sent models to", names(r.recipients())),
    ]
    if r.dp_enabled and f is not None:
        rows += [
            ("Privacy spent", f"ε = {number(f.epsilon_spent)} of {number(f.epsilon_budget)}"),
            ("δ", number(f.delta)),
            (
                "Accountant",
                f"{f.accountant}: σ = {number(f.noise_multiplier)}, q = "
                f"{number(f.sample_rate)}, {number(f.steps_taken)} of {number(f.planned_steps)} "
                f"planned steps, clipping C = {number(f.max_grad_norm)}",
            ),
        ]
    else:
        rows.append(("Privacy", "differential privacy OFF"))
    rows.append(
        ("Verification", "verifies" if r.verification.ok else "DOES NOT VERIFY (see below)")
    )
    cells = "".join(f"<dt>{e(k)}</dt><dd>{e(v)}</dd>" for k, v in rows)
    return f"<dl class='facts'>{cells}</dl>"


def _round_html(section: RoundSection, r: ComplianceReport) -> str:
    out = [
        f"<section class='round' id='round-{section.round}'>",
        f"<h3>Round {section.round} <span class='muted'>({e(_when(section.first_utc))} – "
        f"{e(_when(section.last_utc)[11:])})</span></h3>",
    ]
    if section.sent:
        rows = []
        for s in section.sent:
            for peer in s.recipients:
                if peer in s.delivered:
                    outcome = "delivered"
                elif peer in s.failed:
                    outcome = f"FAILED: {reason_meaning(s.failed[peer])} ({s.failed[peer]})"
                else:
                    outcome = "not confirmed"
                rows.append((peer, short_hash(s.model_sha256), size(s.bytes), outcome, s.seq))
        out.append("<p><b>Sent</b> (encrypted for each recipient, signed by this node):</p>")
        out.append(
            _table(("to", "model", "size", "outcome", "record"), rows, numeric=frozenset({4}))
        )
    else:
        out.append("<p><b>Sent:</b> nothing this round.</p>")
    if section.received:
        rows = [
            (
                m.sender,
                short_hash(m.model_sha256),
                "accepted" if m.accepted else f"refused: {reason_meaning(m.reason)}",
                m.seq,
            )
            for m in section.received
        ]
        out.append("<p><b>Received</b> (signed by the sender):</p>")
        out.append(_table(("from", "model", "outcome", "record"), rows, numeric=frozenset({3})))
    else:
        out.append("<p><b>Received:</b> no signed message.</p>")
    if section.rule is not None:
        used = names(section.used) if section.used else "none of the received models"
        out.append(
            f"<p><b>Combined</b> its own model with {e(used)} (rule {e(section.rule)}), giving "
            f"model <code>{e(short_hash(section.result_sha256))}</code>.</p>"
        )
        if section.excluded:
            rows = [(peer, exclusion_meaning(reason), reason) for peer, reason in section.excluded]
            out.append("<p><b>Left out of the combination:</b></p>")
            out.append(_table(("hospital", "why", "code"), rows))
    if section.ledger is not None:
        g = section.ledger
        this = (
            f"ε {number(section.epsilon_this_round)} this round over "
            f"{number(section.steps_this_round)} steps; "
            if section.epsilon_this_round is not None
            else ""
        )
        share = (
            f" ({g.epsilon_spent / g.epsilon_budget:.0%})"
            if isinstance(g.epsilon_spent, int | float)
            and isinstance(g.epsilon_budget, int | float)
            and g.epsilon_budget
            else ""
        )
        out.append(
            f"<p><b>Privacy:</b> {e(this)}ε <b>{e(number(g.epsilon_spent))}</b> spent in all, of "
            f"a budget of {e(number(g.epsilon_budget))}{e(share)}. Accountant "
            f"{e(g.accountant)} with σ = {e(number(g.noise_multiplier))}, q = "
            f"{e(number(g.sample_rate))}, {e(number(g.steps_taken))} steps, "
            f"δ = {e(number(g.delta))}.</p>"
        )
    elif not r.dp_enabled:
        out.append("<p><b>Privacy:</b> no differential privacy.</p>")
    if section.events:
        out.append("<p><b>Events:</b></p>")
        out.append(_events_table(section.events))
    out.append("</section>")
    return "\n".join(out)


def _table(
    head: tuple[str, ...], rows: list[tuple[Any, ...]], numeric: frozenset[int] = frozenset()
) -> str:
    th = "".join(f"<th>{e(h)}</th>" for h in head)
    body = "".join(
        "<tr>"
        + "".join(
            f"<td class='n'>{e(c)}</td>" if i in numeric else f"<td>{e(c)}</td>"
            for i, c in enumerate(row)
        )
        + "</tr>"
        for row in rows
    )
    return f"<table><tr>{th}</tr>{body}</table>"


def _events_table(events: list[Event]) -> str:
    rows = "".join(
        f"<tr{' class=serious' if ev.serious else ''}><td class='n'>{ev.seq}</td>"
        f"<td>{e(_when(ev.time_utc))}</td><td>{e(ev.kind)}</td><td>{e(ev.text)}</td></tr>"
        for ev in events
    )
    head = "<tr><th>record</th><th>time</th><th>kind</th><th>what happened</th></tr>"
    return f"<table>{head}{rows}</table>"


def _verification_html(v: Verification) -> str:
    if v.ok:
        verdict = "<span class='verdict ok'>The audit log verifies.</span>"
        meaning = (
            "Every record's hash links to the one before it and every record carries this "
            "node's signature, so no record was changed, removed or inserted afterwards "
            "without the node's private key."
        )
        if v.peer_heads_given:
            meaning += (
                " It also contains every audit head this node signed in the envelopes its "
                "neighbours hold, so it was not cut back or replaced by an older copy."
            )
        else:
            meaning += (
                " It was not compared with the heads its neighbours hold; pass --peer-heads "
                "(from <code>murmur audit heads</code> on a neighbour) to rule out that the "
                "whole log was replaced by an older copy."
            )
    elif v.code == 1:
        verdict = "<span class='verdict bad'>The audit log does NOT verify.</span>"
        meaning = (
            "The first problem is named below. Records from that point on cannot be trusted; "
            "ask the hospital's operators for a backup and compare."
        )
    else:
        verdict = "<span class='verdict bad'>The audit log could not be read.</span>"
        meaning = "See the message below."
    return (
        "<h2>Verification</h2>"
        f"<p>{verdict} {meaning}</p>"
        "<p>What <code>murmur audit verify</code> printed:</p>"
        f"<pre>{e(v.output.strip())}</pre>"
    )


_GLOSSARY: tuple[tuple[str, str], ...] = (
    (
        "ε (epsilon)",
        (
            "How much a model can reveal about any single patient, under differential privacy. "
            "Smaller is more private. The budget is the most the study allows for the whole "
            "training; the node refuses to spend past it."
        ),
    ),
    (
        "δ (delta)",
        ("The small probability with which the ε guarantee may fail."),
    ),
    (
        "σ, q, steps",
        (
            "What the privacy accountant was given: the noise added to each training step (σ, "
            "relative to the clipping bound C), the fraction of patients sampled per step (q), "
            "and the number of training steps taken."
        ),
    ),
    (
        "Model hash",
        (
            "A SHA-256 fingerprint of the exact model parameters; two different models never "
            "share one."
        ),
    ),
    (
        "Left out (excluded)",
        (
            "A neighbour's model this node received but did not combine with its own, for the "
            "reason given."
        ),
    ),
    (
        "Quarantine",
        (
            "A neighbour whose models kept lying far from the others is left out until it behaves"
            " again."
        ),
    ),
    (
        "Equivocation",
        (
            "A neighbour that signed two different models for the same round; the two signatures "
            "prove it, and it is left out for good."
        ),
    ),
    (
        "Rollback",
        (
            "A neighbour whose signed audit log went backwards, i.e. was restored from an older "
            "copy."
        ),
    ),
    (
        "Audit head",
        (
            "The position and hash of the newest record in the log, signed by the node; every "
            "model it sends carries one, and its neighbours keep them."
        ),
    ),
)


def _glossary_html() -> str:
    cells = "".join(f"<dt>{e(term)}</dt><dd>{e(meaning)}</dd>" for term, meaning in _GLOSSARY)
    return f"<h2>Terms used</h2><dl class='facts'>{cells}</dl>"


# ---------------------------------------------------------------------------- PDF


def find_chromium() -> str | None:
    """Headless Chromium to print PDFs with: $MURMUR_CHROMIUM, else the first on PATH."""
    configured = os.environ.get("MURMUR_CHROMIUM")
    if configured:
        return shutil.which(configured)
    return next((path for name in CHROMIUM_NAMES if (path := shutil.which(name))), None)


def write_pdf(html_path: Path, pdf_path: Path) -> str | None:
    """Print `html_path` to `pdf_path` with headless Chromium; None when done, else why not."""
    chromium = find_chromium()
    if chromium is None:
        return "no PDF renderer: install Chromium (apt-get install chromium) for a PDF"
    with tempfile.TemporaryDirectory(prefix="murmur-pdf-") as profile:
        command = [
            chromium,
            "--headless=new",
            "--disable-gpu",
            "--no-first-run",
            "--no-pdf-header-footer",
            f"--user-data-dir={profile}",
            f"--print-to-pdf={pdf_path}",
            *(["--no-sandbox"] if os.geteuid() == 0 else []),  # Chromium refuses root otherwise
            html_path.resolve().as_uri(),
        ]
        try:
            done = subprocess.run(command, capture_output=True, timeout=PDF_TIMEOUT_S)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return f"PDF not written: {chromium} failed ({type(exc).__name__})"
    if done.returncode != 0 or not pdf_path.is_file() or pdf_path.read_bytes()[:5] != b"%PDF-":
        return f"PDF not written: {chromium} exited with status {done.returncode}"
    return None


# ---------------------------------------------------------------------------- the command


def report_command(
    state_dir: Path,
    out: Path,
    *,
    public_key: bytes | None = None,
    peer_heads: list[PeerHead] | None = None,
    peer_head_warnings: list[str] | None = None,
    config: Path | None = None,
    pdf: bool = True,
) -> int:
    """`murmur audit report`: 0 when the report is written and the log verifies, 1 when it is
    written but the log fails verification, 2 without a readable log."""
    try:
        report = build_report(
            state_dir,
            public_key=public_key,
            peer_heads=peer_heads,
            peer_head_warnings=peer_head_warnings,
            config=config,
        )
    except AuditError as exc:
        print(f"audit report: {exc}")
        return 2
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render_html(report), encoding="utf-8")
    print(f"audit report: {out}")
    if pdf:
        pdf_path = out.with_suffix(".pdf")
        problem = write_pdf(out, pdf_path)
        print(
            f"audit report: {problem}; skipped the PDF" if problem else f"audit report: {pdf_path}"
        )
    v = report.verification
    print(
        "audit report: the log verifies"
        if v.ok
        else f"audit report: the log does NOT verify ({_first_failure(v)})"
    )
    return 0 if v.ok else (1 if v.code == 1 else 2)
