"""Writing a `ComplianceReport` as one self-contained HTML page in plain language.

No external assets and no script (its Content-Security-Policy allows none), and every string
from the log goes through `e` (HTML-escaped): node names and reasons come from config files
and from peers.
"""

from __future__ import annotations

import base64
import hashlib
import html
from collections import Counter
from typing import Any

from murmur.node.compliance.model import (
    ComplianceReport,
    Event,
    RoundSection,
    Verification,
)
from murmur.node.wording import (
    exclusion_meaning,
    names,
    number,
    reason_meaning,
    short_hash,
    size,
)


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
