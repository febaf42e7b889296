"""Plain words for what the node records: reason codes, exclusions and audit records.

Why a module of its own: the dashboard (node/dashboard.py), its alerts (node/alerts.py) and
the compliance report (node/compliance/) are read by hospital staff and compliance officers,
not by engineers, and must say the same thing about the same event. Every function here is
pure text from plain data; callers escape or insert the text as text.
"""

from __future__ import annotations

import math
from typing import Any

from murmur.node.audit import AuditRecord

# Why a message was refused: the wire's reason codes (gossip/wire/format.py RejectReason), the
# inbox's verdicts (gossip/rounds.py), the HTTP layer's (node/api.py HttpReason), rollback.
REASON_MEANINGS: dict[str, str] = {
    "accepted": "accepted",
    "malformed": "not a well-formed murmur message",
    "unauthenticated": "no valid request signature from an admitted peer (refused unread)",
    "too_large": "larger than this node accepts",
    "unsupported_version": "an unsupported protocol version",
    "unsupported_kind": "an unknown kind of message",
    "unknown_sender": "the sender's key is not on this node's list of admitted hospitals",
    "wrong_recipient": "not addressed to this node",
    "stale": "its timestamp was outside the allowed clock window (or its round was too old)",
    "replay": "a copy of a message already received",
    "rate_limited": "too many messages from one sender in one round",
    "bad_signature": "its signature did not verify: not from the key it claims",
    "decrypt_failed": "it could not be decrypted",
    "unsupported_dtype": "its model used an unsupported number format",
    "shape_mismatch": "its model did not have this study's shape",
    "non_finite": "its model held invalid numbers (NaN or infinity)",
    "bad_receipt": "the receipt it carried was invalid",
    "unsupported_codec": "its model was compressed with a codec this node does not accept",
    "unknown_base": "a compressed update against a model this node no longer held (the next "
    "one is sent whole)",
    "old_round": "it was for a round this node had already finished",
    "duplicate": "a second, different model from the same sender for the same round",
    "too_far_ahead": "it was for a round too far ahead",
    "stale_model": "asynchronous gossip: the model was more than max_staleness of this "
    "node's steps old when it was taken",
    "rollback": "the sender's signed audit head went backwards (its log was rolled back)",
    "dp_out_of_plan": "it announced DP noise parameters no site of this study's plan could have",
    "unsupported_encoding": "compressed bodies are not accepted",
    "unsupported_expect": "an unsupported Expect header",
    "body_timeout": "its body did not arrive in time",
    "bad_body": "its body could not be read",
    "aborted_upload": "the sender disconnected mid-upload",
    "too_many_uploads": "too many uploads at once from one address",
    "too_many_connections": "too many connections at once",
    "bad_http": "not valid HTTP",
    "not_found": "a path this node does not serve",
    "method_not_allowed": "a method this node does not serve",
    # studies (node/studies/): the envelope's study, and signed approvals on POST /approvals
    "unknown_study": "it was for a study this node has not approved",
    "approval_malformed": "not a well-formed study approval",
    "approval_forged": "a study approval whose signature did not verify",
    "approval_unknown_signer": "a study approval signed by a key that is not a member's",
    "approval_expired": "a study approval past its expiry",
    "approval_future": "a study approval dated ahead of this node's clock",
    "approval_replayed": "an older study approval of an approver whose newer one is held",
    # a sender's own failures (gossip/transport.py SendResult.reason)
    "timeout": "the neighbour did not answer in time",
    "redirect": "the neighbour answered with a redirect, which is not followed",
    "oversize_reply": "the neighbour's answer was too long",
}

# Why a neighbour's model was left out of an aggregation (node/node.py `_aggregate`).
EXCLUSION_MEANINGS: dict[str, str] = {
    "quarantined": "quarantined: its recent models lay far from the robust combination",
    "proven_equivocation": "proven to have sent different models for the same round",
    "too_far_from_own": "its model lay far from the robust centre and this hospital's own model; "
    "it was pulled in and weighed nothing",
    "too_few_inputs": "too few models arrived for a safe combination; own model kept",
    "not_selected": "not selected by the Krum rule this round",
    "aggregate_not_finite": "the combination overflowed; own model kept",
}


def reason_meaning(code: Any) -> str:
    """A reason code in words; an unknown code is returned as it is."""
    text = str(code)
    if text.startswith("unreachable"):  # "unreachable: ClientConnectorError"
        return "the neighbour could not be reached" + text[len("unreachable") :]
    return REASON_MEANINGS.get(text, text)


def exclusion_meaning(code: Any) -> str:
    return EXCLUSION_MEANINGS.get(str(code), str(code))


def short_hash(value: Any) -> str:
    """The 12 characters the dashboard shows and `murmur audit lineage` accepts."""
    return str(value)[:12] if value else "-"


def number(value: Any, digits: int = 3) -> str:
    """Integers as integers, other numbers with `digits` decimals, missing as "undefined"."""
    if value is None or isinstance(value, bool) or not isinstance(value, int | float):
        return "undefined" if value is None else str(value)
    if isinstance(value, int):
        return str(value)
    if not math.isfinite(value):
        return "undefined"
    if value != 0 and abs(value) < 10.0**-digits:
        return f"{value:.2g}"
    return f"{value:.{digits}f}"


def size(n: Any) -> str:
    """Bytes as a person reads them: 868 bytes, 29.6 kB, 4.1 MB."""
    if not isinstance(n, int) or isinstance(n, bool):
        return "unknown size"
    if n < 1000:
        return f"{n} bytes"
    if n < 1_000_000:
        return f"{n / 1000:.1f} kB"
    return f"{n / 1_000_000:.1f} MB"


def names(items: Any) -> str:
    """A list of names as "a, b and c" ("nobody" when empty)."""
    values = [str(x) for x in items] if isinstance(items, list | tuple) else []
    if not values:
        return "nobody"
    return values[0] if len(values) == 1 else ", ".join(values[:-1]) + " and " + values[-1]


def describe_record(record: AuditRecord) -> str:
    """One line in plain words for an audit record (the dashboard's audit table, the
    compliance report's events). Unknown kinds list their first fields."""
    f = record.fields
    kind = record.kind
    if kind == "update_sent":
        failed = f.get("failed") or {}
        sent = (
            f"model {short_hash(f.get('model_sha256'))} ({size(f.get('bytes'))}) sent to "
            f"{names(f.get('recipients'))}; delivered to {len(f.get('delivered') or [])}"
        )
        if isinstance(failed, dict) and failed:
            sent += "; failed: " + ", ".join(f"{p} ({r})" for p, r in failed.items())
        return sent + f"; ε spent so far {number(f.get('epsilon_spent'))}"
    if kind == "message_received":
        sender = f.get("sender") or "an unidentified sender"
        if f.get("accepted"):
            return f"accepted model {short_hash(f.get('model_sha256'))} from {sender}"
        return f"refused a message from {sender}: {reason_meaning(f.get('reason'))}"
    if kind == "aggregation":
        used = [u.get("peer") for u in f.get("used") or [] if isinstance(u, dict)]
        text = f"combined own model with {names(used)} ({f.get('rule')})"
        excluded = [e for e in f.get("excluded") or [] if isinstance(e, dict)]
        if excluded:
            text += "; left out " + ", ".join(
                f"{e.get('peer')} ({exclusion_meaning(e.get('reason'))})" for e in excluded
            )
        return text
    if kind == "evaluation":
        m = f.get("metrics") or {}
        return f"evaluated: AUC {number(m.get('auc'))} on {number(m.get('n'))} test patients"
    if kind == "privacy":
        if f.get("event") == "budget_exhausted":
            return "privacy budget spent: training and sharing stopped"
        return (
            f"privacy: ε {number(f.get('epsilon_spent'))} of {number(f.get('epsilon_budget'))} "
            f"spent after {number(f.get('steps_taken'))} DP steps"
        )
    return _describe_event(kind, f)


def _describe_event(kind: str, f: dict[str, Any]) -> str:
    """`describe_record` for the kinds about trust, evidence and the node's own life."""
    if kind == "quarantine":
        evidence = f.get("evidence") or {}
        return f"QUARANTINED {f.get('peer')} (trust {number(evidence.get('score'), 2)})"
    if kind == "readmit":
        return f"re-admitted {f.get('peer')} after good rounds"
    if kind == "equivocation_proof":
        return (
            f"PROOF: {f.get('peer')} signed two different models for round "
            f"{f.get('equivocation_round')}"
            + ("; excluded for good" if f.get("excluded") else "; NOT excluded (trust off)")
        )
    if kind == "rollback_detected":
        return f"ROLLBACK: {f.get('peer')}'s signed audit head went backwards"
    if kind == "rollback_check":
        return f"startup rollback check: {f.get('outcome')}"
    if kind == "startup_refused":
        return f"refused to start: {f.get('holder')} holds a newer receipt of this node"
    if kind == "rejections":
        reasons = f.get("reasons") or {}
        pairs = reasons.items() if isinstance(reasons, dict) else []
        listed = ", ".join(f"{k} {v}" for k, v in pairs)
        return f"{f.get('total')} unauthenticated messages refused ({listed})"
    if kind == "checkpoint":
        return f"state saved (checkpoint {short_hash(f.get('checkpoint_sha256'))})"
    if kind == "node_start":
        config = short_hash(f.get("config_sha256"))
        return f"node started (murmur {f.get('version')}, config {config})"
    if kind == "node_stop":
        return f"node stopped ({f.get('reason')})"
    if kind == "adversary_mode":
        return "ADVERSARY MODE: this node ran as a test attacker"
    if kind == "round_resumed":
        return "round already signed before a restart: not trained or sent again"
    if kind == "catch_up":
        return f"behind its neighbours: jumped to round {f.get('to_round')}"
    if kind == "training_diverged":
        return "local training diverged; previous model kept"
    if kind == "retention_prune":
        return f"retention: {f.get('pruned')} old records deleted (anchored and signed)"
    if kind == "receipts_request":
        requester = f.get("requester") or "an unknown sender"
        return f"receipts request from {requester}: {f.get('outcome')}"
    if kind == "waiting_for_neighbours":
        reasons = f.get("reasons") if isinstance(f.get("reasons"), dict) else {}
        why = "; ".join(f"{p}: {r}" for p, r in reasons.items())
        return f"waiting for {f.get('min_neighbours')} neighbours before training" + (
            f" ({why})" if why else ""
        )
    if kind == "neighbours_ready":
        waited = f.get("waited_s")
        return f"ready to train with {names(f.get('counted'))}" + (
            f" after waiting {number(waited, 1)} s" if isinstance(waited, int | float) else ""
        )
    if kind == "study_approval":
        return f"study {short_hash(f.get('study'))} approved by {f.get('approver')}"
    if kind == "site_budget":
        state = "finished, unspent plan released" if f.get("finished") else "running, plan reserved"
        return (
            f"site budget of {f.get('dataset')}: ε {number(f.get('epsilon_composed'))} of "
            f"{number(f.get('max_epsilon'))} composed across studies ({state})"
        )
    if kind in ("peer_down", "peer_up"):
        state = "DOWN" if kind == "peer_down" else "up again"
        return f"neighbour {f.get('peer')} {state}" + (f": {f.get('why')}" if f.get("why") else "")
    shown = ", ".join(f"{k}={_brief(v)}" for k, v in list(f.items())[:4])
    return f"{kind.replace('_', ' ')}" + (f": {shown}" if shown else "")


def _brief(value: Any) -> str:
    text = number(value) if isinstance(value, int | float) else str(value)
    return text if len(text) <= 40 else text[:39] + "…"
