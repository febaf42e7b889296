"""Clock skew surfaced to the operator (issue #25): a neighbour that refuses this node's
requests because their clocks are too far apart, or a skew past half the timestamp window,
shows in /status (per-peer `clock_skew_s` and `clock`), in /metrics, in the `clock` alerts,
and in the audit log as one `clock_skew` record per change, never one per reply."""

from __future__ import annotations

import email.utils
import re
import time
from pathlib import Path

from murmur.crypto.allowlist import Peer
from murmur.gossip.transport import ClockState, ClockWatch, PeerTransport
from murmur.gossip.wire import ModelUpdate, build_envelope
from murmur.node.alerts import AlertSettings, evaluate
from murmur.node.audit import records_of_kind

from tests.test_http import _template, running

WINDOW = 300.0


def http_date(at: float) -> str:
    return email.utils.formatdate(at, usegmt=True)


def test_the_watch_classifies_each_reply_and_flags_only_changes() -> None:
    readings = []
    watch = ClockWatch(WINDOW, on_reading=readings.append)
    now = 1_000_000.0
    watch.observe("b", http_date(now + 10), "accepted", now)
    watch.observe("b", http_date(now + 200), "accepted", now)  # past half the window
    watch.observe("b", http_date(now + 210), "accepted", now)
    watch.observe("b", http_date(now - 400), "unauthenticated", now)  # refused, beyond it
    watch.observe("b", http_date(now - 400), "unauthenticated", now)
    watch.observe("b", http_date(now + 3), "unauthenticated", now)  # refused, not the clock
    watch.observe("b", None, "accepted", now)  # no Date: no reading at all
    states = [(r.state, r.changed) for r in readings]
    assert states == [
        (ClockState.OK, False),
        (ClockState.DRIFTING, True),
        (ClockState.DRIFTING, False),
        (ClockState.REFUSED, True),
        (ClockState.REFUSED, False),
        (ClockState.OK, True),
    ]
    assert abs(readings[3].skew_s + 399.5) < 1e-6  # the Date's second, its middle


def test_a_skew_hovering_at_half_the_window_is_not_a_change_per_reply() -> None:
    readings = []
    watch = ClockWatch(WINDOW, on_reading=readings.append)
    now = 1_000_000.0
    for skew in (151, 149, 151, 148, 152, 130):
        watch.observe("b", http_date(now + skew), "accepted", now)
    assert [r.state for r in readings if r.changed] == [ClockState.DRIFTING, ClockState.OK]


async def test_a_neighbour_refusing_a_skewed_node_shows_in_status_alerts_and_audit(
    tmp_path: Path,
) -> None:
    """hospital_1's clock runs 1,000 s ahead: hospital_0 (a real peer listener) refuses its
    requests as unauthenticated. hospital_1's own /status, metrics, alerts and audit log say
    which neighbour refuses it and by how much; three refused sends make one record; fixing
    the clock makes one more, then a skew past half the window a warning."""
    from murmur.node.config import load_config
    from murmur.node.node import HospitalNode

    async with running(tmp_path) as (receiver, api):
        node = HospitalNode(load_config(tmp_path / "configs" / "hospital_1.toml"))
        try:
            me = Peer("hospital_0", api.peer.address, receiver.identity.public_key)
            offset = {"s": 1000.0}
            settings = AlertSettings.from_config(node.config)
            async with PeerTransport(
                identity=node.identity,
                send_timeout_s=10,
                timestamp_window_s=node.config.gossip.timestamp_window_s,
                clock=lambda: time.time() + offset["s"],
                on_clock=node.clock_report,
            ) as transport:

                async def send(round_: int = 1) -> str:
                    envelope = build_envelope(
                        ModelUpdate(_template()),
                        node.identity,
                        [me.public_key],
                        round_,
                        now=time.time() + offset["s"],
                    )
                    return (await transport.send(me, envelope)).reason

                assert [await send() for _ in range(3)] == ["unauthenticated"] * 3
                peer = node.status()["peers"]["hospital_0"]
                assert peer["clock"] == "refused" and abs(peer["clock_skew_s"] + 1000) < 3
                gauge = 'murmur_peer_clock_skew_seconds{peer="hospital_0"} '
                line = next(x for x in node.metrics.render().decode().splitlines() if gauge in x)
                assert abs(float(line.split()[-1]) + 1000) < 3
                report = evaluate(node.status(), settings)
                alert = next(a for a in report.alerts if a.code == "clock")
                assert alert.level == "critical" and alert.peer == "hospital_0"
                assert re.search(r"hospital_0 -(999|1000|1001) s", alert.detail), alert.detail
                assert "±300 s" in alert.detail

                offset["s"] = 0.0  # NTP fixed it
                assert await send() == "accepted"
                assert node.status()["peers"]["hospital_0"]["clock"] == "ok"
                assert not [
                    a for a in evaluate(node.status(), settings).alerts if "clock" in a.code
                ]

                offset["s"] = -200.0  # drifting: past half the window, still accepted
                assert await send(2) == "accepted"
                report = evaluate(node.status(), settings)
                assert [a.code for a in report.alerts if "clock" in a.code] == ["clock_drift"]
                assert report.alerts[0].level == "warning"
        finally:
            node.audit.close()
        records = records_of_kind(node.state_dir, "clock_skew")
        assert [(r.fields["peer"], r.fields["state"]) for r in records] == [
            ("hospital_0", "refused"),
            ("hospital_0", "ok"),
            ("hospital_0", "drifting"),
        ]
        assert abs(records[0].fields["skew_s"] + 1000) < 3 and records[0].fields["window_s"] == 300
    assert receiver.state.unauthenticated == {"stale": 3}
