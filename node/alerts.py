"""What needs a person's attention now, from the node's /status and its last audit records.

Why a module of its own: the dashboard (GET /alerts on the operator listener) and run_cluster's
live table raise the same alarms, and each check is a pure function of plain data, so it is
tested without a network. Every check reports a state (`ok`, `alert` or `unavailable`, the
last when the node does not yet know), so the page can say "not yet available" rather than
stay silent, which would read as "all is well".

The checks (docs/console.md):

* **budget**: at least 80% of the privacy budget spent (coordinators plan the next study
  with what is left), or differential privacy off altogether;
* **trust**: a neighbour quarantined, proven to equivocate, rolled back, or trusted less
  than `[trust] downweight_below`;
* **silence**: a neighbour missing from the last `SILENT_ROUNDS` rounds or marked down by the
  node's liveness (gossip/liveness.py), one that refuses this node's envelopes, or the node
  waiting for enough neighbours before it trains;
* **deadline**: the last round lasted at least `gossip.round_timeout_s` with someone missing,
  i.e. it waited the full deadline (a neighbour marked down is not waited for);
* **clock**: a neighbour refuses this node's requests because their clocks are further apart
  than the timestamp window (critical), or a neighbour's clock is past half the window from
  this node's (warning). Measured from the `Date` of the neighbours' replies (node/clock.py,
  /status `peers.<name>.clock` and `clock_skew_s`); before any reply, from v3 neighbours'
  `stale` answers to the last envelope.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from murmur.node.audit import AuditRecord
from murmur.node.wording import EXCLUSION_MEANINGS, names, number

BUDGET_WARN_FRACTION = 0.8
SILENT_ROUNDS = 3
DEADLINE_WINDOW = 5  # rounds over which the deadline check counts waits

Level = Literal["critical", "warning"]
CheckState = Literal["ok", "alert", "unavailable"]


@dataclass(frozen=True)
class AlertSettings:
    """The node's own thresholds the checks compare against (from its config)."""

    round_timeout_s: float | None = None
    timestamp_window_s: float | None = None
    low_trust: float = 0.5
    silent_rounds: int = SILENT_ROUNDS
    budget_warn_fraction: float = BUDGET_WARN_FRACTION

    @classmethod
    def from_config(cls, config: Any) -> AlertSettings:
        """From a `node.config.NodeConfig`."""
        return cls(
            round_timeout_s=config.gossip.round_timeout_s,
            timestamp_window_s=config.gossip.timestamp_window_s,
            low_trust=config.trust.downweight_below,
        )


@dataclass(frozen=True)
class Alert:
    """One alarm: `title` is what the page shows in bold, `detail` the sentence after it."""

    level: Level
    code: str
    title: str
    detail: str
    peer: str | None = None


@dataclass(frozen=True)
class Check:
    """One check's outcome, alarm or not, so a quiet check is visibly a passed one."""

    code: str
    label: str
    state: CheckState
    detail: str


@dataclass
class PeerStanding:
    """What the dashboard's neighbour table shows beside /status's own per-peer fields."""

    standing: str = "trusted"
    silent_rounds: int = 0
    left_out: list[str] = field(default_factory=list)


@dataclass
class AlertReport:
    """The answer of GET /alerts."""

    alerts: list[Alert]
    checks: list[Check]
    peers: dict[str, PeerStanding]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def evaluate(
    status: dict[str, Any],
    settings: AlertSettings,
    *,
    last_sent: AuditRecord | None = None,
    last_aggregation: AuditRecord | None = None,
) -> AlertReport:
    """Every check on one /status snapshot; `last_sent` and `last_aggregation` are the newest
    `update_sent` and `aggregation` audit records (None when there are none, or unread)."""
    peers = {name: PeerStanding() for name in status.get("peers") or {}}
    alerts: list[Alert] = []
    checks = [
        _budget(status, settings, alerts),
        _trust(status, settings, alerts, peers, last_aggregation),
        _silence(status, settings, alerts, peers),
        _deadline(status, settings, alerts),
        _clock(status, settings, alerts, last_sent),
    ]
    alerts.sort(key=lambda a: a.level != "critical")  # stable: critical first
    return AlertReport(alerts, checks, peers)


# ---------------------------------------------------------------------------- checks


def _budget(status: dict[str, Any], s: AlertSettings, alerts: list[Alert]) -> Check:
    privacy = status.get("privacy") or {}
    label = "privacy budget"
    if not privacy.get("enabled"):
        alerts.append(
            Alert(
                "warning",
                "no_dp",
                "Differential privacy is off",
                "the models this node shares are not protected by differential privacy "
                "([privacy] enabled = false)",
            )
        )
        return Check("budget", label, "alert", "differential privacy is off")
    spent, budget = privacy.get("epsilon_spent"), privacy.get("epsilon_budget")
    if not _positive(budget) or not isinstance(spent, int | float):
        return Check("budget", label, "unavailable", "the ledger reports no budget yet")
    fraction = max(0.0, spent) / budget
    left = max(0.0, 1.0 - fraction)
    amount = f"ε {number(spent)} of {number(budget)} spent ({fraction:.0%}), {left:.0%} left"
    steps = privacy.get("remaining_steps")
    if status.get("phase") == "budget_exhausted" or steps == 0:
        planned = status.get("planned_rounds")
        unfinished = isinstance(planned, int) and int(status.get("round") or 0) < planned
        alerts.append(
            Alert(
                "critical" if unfinished else "warning",
                "budget_spent",
                "Privacy budget spent",
                f"{amount}: no further round can be trained within this budget"
                + (f" (stopped before round {planned})" if unfinished else ""),
            )
        )
        return Check("budget", label, "alert", amount)
    if fraction >= s.budget_warn_fraction:
        alerts.append(
            Alert(
                "warning",
                "budget_low",
                f"Privacy budget {fraction:.0%} spent",
                f"{amount}; {number(steps)} DP steps remain",
            )
        )
        return Check("budget", label, "alert", amount)
    return Check("budget", label, "ok", amount)


def _trust(
    status: dict[str, Any],
    s: AlertSettings,
    alerts: list[Alert],
    peers: dict[str, PeerStanding],
    last_aggregation: AuditRecord | None,
) -> Check:
    trust: dict[str, float] = status.get("trust") or {}
    quarantined = set(status.get("quarantined") or [])
    proven: dict[str, Any] = (status.get("equivocation") or {}).get("proven") or {}
    rolled_back: dict[str, Any] = (status.get("rollback") or {}).get("proven") or {}
    too_far: dict[str, int] = status.get("too_far") or {}
    flagged = 0
    for peer in peers:
        standing = peers[peer]
        score = trust.get(peer)
        if peer in rolled_back:
            standing.standing = "rolled back"
            flagged += 1
            alerts.append(_rolled_back(peer))
        if peer in proven:
            standing.standing = "proven equivocation"
            standing.left_out.append(EXCLUSION_MEANINGS["proven_equivocation"])
            flagged += 1
            alerts.append(
                Alert(
                    "critical",
                    "equivocation",
                    f"{peer} proven to equivocate",
                    f"{peer} signed two different models for round {proven[peer]}; it is "
                    "left out of aggregation for good",
                    peer,
                )
            )
        elif peer in quarantined:
            standing.standing = "quarantined"
            standing.left_out.append(EXCLUSION_MEANINGS["quarantined"])
            flagged += 1
            alerts.append(
                Alert(
                    "critical",
                    "quarantined",
                    f"{peer} quarantined",
                    f"trust in {peer} fell to {number(score, 2)}: its models weigh nothing in "
                    "the combination until it behaves again",
                    peer,
                )
            )
        elif isinstance(score, int | float) and score < s.low_trust:
            if standing.standing == "trusted":
                standing.standing = "low trust"
            flagged += 1
            alerts.append(
                Alert(
                    "warning",
                    "low_trust",
                    f"Low trust in {peer}",
                    f"trust {number(score, 2)} (below {number(s.low_trust, 2)}): its weight "
                    "in the combination is reduced",
                    peer,
                )
            )
        if too_far.get(peer):
            standing.left_out.append(
                f"{EXCLUSION_MEANINGS['too_far_from_own']} ({too_far[peer]} rounds)"
            )
    if last_aggregation is not None:
        _note_left_out(peers, last_aggregation)
    if flagged:
        return Check("trust", "neighbours' trust", "alert", f"{flagged} neighbour(s) flagged")
    if not trust:
        return Check("trust", "neighbours' trust", "unavailable", "no round aggregated yet")
    lowest = min(trust.values())
    return Check("trust", "neighbours' trust", "ok", f"lowest trust {number(lowest, 2)}")


def _rolled_back(peer: str) -> Alert:
    return Alert(
        "critical",
        "rollback",
        f"{peer} rolled back its audit log",
        f"{peer} signed an audit head behind one it had signed before: its state "
        "was restored from an older copy (docs/protocol.md, 'Rollback detection')",
        peer,
    )


def _note_left_out(peers: dict[str, PeerStanding], last_aggregation: AuditRecord) -> None:
    """Say which neighbours the last aggregation did not use for lack of inputs or choice."""
    for entry in last_aggregation.fields.get("excluded") or []:
        peer = entry.get("peer") if isinstance(entry, dict) else None
        reason = entry.get("reason") if isinstance(entry, dict) else None
        if peer in peers and reason in ("too_few_inputs", "not_selected"):
            peers[peer].left_out.append(
                f"round {last_aggregation.round}: {EXCLUSION_MEANINGS[reason]}"
            )


def _silence(
    status: dict[str, Any], s: AlertSettings, alerts: list[Alert], peers: dict[str, PeerStanding]
) -> Check:
    """Silent and unreachable neighbours. Uses /status's per-peer liveness (`state`, `why`,
    `silent_rounds`, `contact`, `contact_detail`) and `neighbours`, and counts the trailing
    rounds each peer is missing from `history` itself."""
    history: list[dict[str, Any]] = status.get("history") or []
    info: dict[str, dict[str, Any]] = status.get("peers") or {}
    flagged: list[str] = []
    if status.get("phase") == "waiting_for_neighbours":
        neighbours = status.get("neighbours") or {}
        waiting = neighbours.get("waiting_for") or {}
        flagged.extend(waiting)
        alerts.append(
            Alert(
                "warning",
                "waiting_for_neighbours",
                "Waiting for neighbours",
                f"the node needs {number(neighbours.get('min_neighbours'))} neighbours that take "
                "its envelopes before it trains; "
                + ("; ".join(f"{p}: {why}" for p, why in waiting.items()) or "none counts yet"),
            )
        )
    for peer in peers:
        v = info.get(peer, {})
        run = 0
        for record in reversed(history):
            if peer not in (record.get("missing") or []):
                break
            run += 1
        reported = v.get("silent_rounds")
        if isinstance(reported, int) and not isinstance(reported, bool):
            run = max(run, reported)
        peers[peer].silent_rounds = run
        down = v.get("state") == "down"
        if run >= s.silent_rounds or down:
            flagged.append(peer)
            last = v.get("last_round")
            heard = f"last heard in round {last}" if last else "never heard from"
            why = f"; the node marks it down: {v['why']}" if down and v.get("why") else ""
            alerts.append(
                Alert(
                    "warning",
                    "silent",
                    f"{peer} silent for {run} rounds" if run else f"{peer} is down",
                    f"no model from {peer} in the last {run} rounds ({heard}){why}",
                    peer,
                )
            )
        if v.get("contact") == "refused":
            flagged.append(peer)
            detail = v.get("contact_detail") or "it refuses this node's envelopes"
            alerts.append(
                Alert(
                    "warning",
                    "refused",
                    f"{peer} refuses this node's envelopes",
                    f"{detail}: check that each lists the other's current key and address",
                    peer,
                )
            )
    label = "neighbours' reachability"
    if flagged:
        return Check("silence", label, "alert", names(list(dict.fromkeys(flagged))))
    if not history:
        return Check("silence", label, "unavailable", "no round finished yet")
    missing = history[-1].get("missing") or []
    if missing:
        return Check("silence", label, "ok", f"missing from the last round: {names(missing)}")
    return Check("silence", label, "ok", "every neighbour sent a model in the last round")


def _waited_for(round_: dict[str, Any], s: AlertSettings) -> list[str]:
    """Who a finished round waited for until its deadline: the neighbours missing from it, in
    a round that lasted at least the deadline. A round that ended early (everyone it waited
    for came, and a neighbour marked down is not waited for) lasted less."""
    seconds = round_.get("seconds")
    if s.round_timeout_s and isinstance(seconds, int | float) and seconds < s.round_timeout_s:
        return []
    return list(round_.get("missing") or [])


def _deadline(status: dict[str, Any], s: AlertSettings, alerts: list[Alert]) -> Check:
    history: list[dict[str, Any]] = status.get("history") or []
    label = "round deadline"
    if not history:
        return Check("deadline", label, "unavailable", "no round finished yet")
    recent = history[-DEADLINE_WINDOW:]
    waited = [h for h in recent if _waited_for(h, s)]
    last = history[-1]
    limit = f"{_seconds(s.round_timeout_s)} s" if s.round_timeout_s else "the deadline"
    tally = f"{len(waited)} of the last {len(recent)} rounds waited the full {limit}"
    if _waited_for(last, s):
        alerts.append(
            Alert(
                "warning",
                "deadline",
                f"Round {last.get('round')} finished at the deadline",
                f"it waited {number(last.get('seconds'), 1)} s ({limit}) for "
                f"{names(_waited_for(last, s))}; {tally}",
            )
        )
        return Check("deadline", label, "alert", tally)
    return Check("deadline", label, "ok", tally)


def _clock(
    status: dict[str, Any], s: AlertSettings, alerts: list[Alert], last_sent: AuditRecord | None
) -> Check:
    """From each neighbour's measured clock (/status `peers.<name>.clock`, node/clock.py);
    without a reading yet, from the neighbours' answers to the last envelope."""
    label = "clock"
    window = f"±{_seconds(s.timestamp_window_s)} s" if s.timestamp_window_s else "their window"
    peers = {n: i for n, i in (status.get("peers") or {}).items() if isinstance(i, dict)}
    read = {n: i for n, i in peers.items() if i.get("clock") in ("ok", "drifting", "refused")}
    refused = sorted(n for n, i in read.items() if i["clock"] == "refused")
    drifting = sorted(n for n, i in read.items() if i["clock"] == "drifting")

    def skews(who: list[str]) -> str:
        return names([f"{n} {_signed(peers[n].get('clock_skew_s'))} s" for n in who])

    if refused:
        alerts.append(
            Alert(
                "critical",
                "clock",
                f"Clock skew: {len(refused)} of {len(peers)} neighbours refuse this node's "
                "requests",
                f"their clocks are {skews(refused)} from this node's, beyond the {window} "
                "timestamp window, so every envelope to them is refused: if most neighbours "
                "are off by about the same, this node's clock is wrong; check the system "
                "clock (NTP)",
                peer=refused[0] if len(refused) == 1 else None,
            )
        )
    if drifting:
        alerts.append(
            Alert(
                "warning",
                "clock_drift",
                f"Clock drifting: {names(drifting)}",
                f"clocks {skews(drifting)} from this node's, past half the {window} window; "
                "beyond it every request between them and this node is refused: check the "
                "system clocks (NTP)",
                peer=drifting[0] if len(drifting) == 1 else None,
            )
        )
    if refused or drifting:
        return Check("clock", label, "alert", f"clock skew: {skews(refused + drifting)}")
    if read:
        worst = max(read, key=lambda n: abs(read[n].get("clock_skew_s") or 0.0))
        return Check(
            "clock",
            label,
            "ok",
            f"neighbours' clocks within half the {window} window (largest: {skews([worst])})",
        )
    return _clock_from_answers(window, alerts, last_sent)


def _clock_from_answers(window: str, alerts: list[Alert], last_sent: AuditRecord | None) -> Check:
    """No clock reading yet (no reply had a `Date`): a v3 neighbour's `stale` answers."""
    label = "clock"
    if last_sent is None:
        return Check(
            "clock",
            label,
            "unavailable",
            "not yet available: measured from the neighbours' replies to this node's "
            "requests, and none has come yet",
        )
    recipients = last_sent.fields.get("recipients") or []
    failed = last_sent.fields.get("failed") or {}
    stale = sorted(p for p, reason in failed.items() if reason == "stale")
    if stale and 2 * len(stale) >= len(recipients):
        alerts.append(
            Alert(
                "critical",
                "clock",
                "This node's clock looks wrong",
                f"{len(stale)} of {len(recipients)} neighbours refused its round "
                f"{last_sent.round} envelope as stale (timestamp outside {window}): "
                "check the system clock (NTP)",
            )
        )
        return Check("clock", label, "alert", f"{names(stale)} refused this node's timestamp")
    if stale:
        return Check(
            "clock",
            label,
            "ok",
            f"most neighbours accept this node's timestamps; {names(stale)} refused them "
            "(their clock may be off)",
        )
    return Check(
        "clock",
        label,
        "ok",
        f"neighbours accepted this node's round {last_sent.round} timestamps (within {window})",
    )


def _signed(value: Any) -> str:
    """-412.3 -> '-412', 3 -> '+3' (a skew in whole seconds, with its sign)."""
    return f"{value:+.0f}" if isinstance(value, int | float) else "?"


def _positive(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value > 0


def _seconds(value: float | None) -> str:
    """10.0 -> '10', 1.5 -> '1.5' (a deadline read back as configured)."""
    return f"{value:g}"
