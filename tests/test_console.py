"""The operator's dashboard in a real browser (headless Chromium), on a live network.

The network is run_cluster's, with its nodes' real round loops in this process (envelopes
handed over by direct calls, as bench/byzantine.py does) and hospital_0's two listeners on
real loopback ports: four hospitals and one equivocating attacker, DP at ε = 1 (so the budget
is spent by the last round), and hospital_3 configured but never started (a dead neighbour of
hospital_0 and hospital_1: their first three rounds end at the deadline, then they mark it
down and stop waiting for it). The page is opened before round 1 with the operator token in
the URL fragment and must then fill in by itself.
"""

from __future__ import annotations

import asyncio
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from murmur.crypto.allowlist import Peer
from murmur.crypto.identity import Identity
from murmur.gossip.memory_transport import MemoryTransport
from murmur.gossip.probe import Contact
from murmur.gossip.transport import SendResult
from murmur.node.api import operator_token, start_api
from murmur.node.config import load_config
from murmur.node.node import HospitalNode

from tests.browser import browser, console_errors, require_browser, save_screenshot
from tests.netutil import make_network

ROUNDS = 5
ROUND_TIMEOUT_S = 1.5  # rounds 1-3 wait this long for hospital_3: longer than a page refresh
DOWN_AFTER = 3  # [gossip] down_after_rounds, the default
TOKEN = "console-test-token-" + "y" * 32
# hospital_3 (index 3) neighbours hospital_0 and hospital_1 only, so the attacker (index 4)
# never waits for the dead node and its round-r models arrive within every deadline.
EDGES = "0 1\n0 2\n0 4\n1 2\n1 4\n2 4\n3 0\n3 1\n"
WAIT_S = 90.0


REFUSED = "unreachable: ConnectionRefusedError"


class DeadPeerTransport(MemoryTransport):
    """MemoryTransport where a node that is not running cannot be reached."""

    async def send(self, peer: Peer, envelope: bytes, signer: Identity | None = None) -> SendResult:
        if peer.address not in self.nodes:
            return SendResult(peer.name, False, None, REFUSED, 0.0)
        return await super().send(peer, envelope, signer)

    async def probe(self, peer: Peer, probe: bytes, timeout_s: float) -> Contact:
        if peer.address not in self.nodes:
            return Contact.from_answer(None, REFUSED, "", source="probe")
        return await super().probe(peer, probe, timeout_s)


def wait_until(predicate: Callable[[], Any], what: str, timeout_s: float = WAIT_S) -> Any:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(0.25)
    raise AssertionError(f"timed out waiting for {what}")


def js(driver: Any, script: str) -> Any:
    return driver.execute_script(script)


def dashboard_checks(url: str, started: threading.Event, finished: threading.Event) -> None:
    """Everything the browser must see, run in a thread while the event loop serves the page."""
    with browser() as d:
        d.get(url + f"/#token={TOKEN}")
        wait_until(lambda: js(d, "return document.body.dataset.loaded"), "the first refresh")
        # The token left the address bar; before round 1 the plots say there is no data.
        assert js(d, "return location.hash") == ""
        assert "no rounds yet" in d.find_element("id", "plot-auc").text
        started.set()
        # While rounds 1-3 wait for the dead neighbour, the page says they end at the deadline.
        seen: set[str] = set()
        end = time.monotonic() + WAIT_S
        while not finished.is_set() and time.monotonic() < end:
            seen.update(
                js(d, "return [...document.querySelectorAll('#alerts li')].map(x=>x.dataset.code)")
            )
            time.sleep(0.2)
        assert "deadline" in seen, seen
        wait_until(
            lambda: f"round {ROUNDS} of {ROUNDS}" in d.find_element("id", "summary").text,
            "the page to show the last round without a reload",
        )
        time.sleep(2.5)  # one more refresh, with the last audit records
        # Plots: one point per round in AUC, ε and disagreement, a line per peer for trust.
        for plot in ("plot-auc", "plot-eps", "plot-dis"):
            line = f"document.querySelector('#{plot} polyline')"
            points = js(d, f"return {line}.getAttribute('points')")
            assert len(points.split()) == ROUNDS, (plot, points)
            assert all(len(p.split(",")) == 2 for p in points.split())
        trust_lines = js(
            d,
            "return [...document.querySelectorAll('#plot-trust polyline')]"
            ".map(p => p.dataset.series)",
        )
        assert set(trust_lines) >= {"hospital_1", "hospital_2", "byzantine_0"}
        # The ε plot draws the budget and the 80% line.
        assert "budget" in d.find_element("id", "plot-eps").text
        # Alerts, provoked: proven equivocation, budget spent, a silent neighbour that the
        # node's liveness marked down; rounds 4-5 no longer waited for it.
        codes = js(d, "return [...document.querySelectorAll('#alerts li')].map(x=>x.dataset.code)")
        assert {"equivocation", "budget_spent", "silent"} <= set(codes), codes
        assert "deadline" not in codes
        alerts_text = d.find_element("id", "alerts").text
        assert "byzantine_0 proven to equivocate" in alerts_text
        assert f"hospital_3 silent for {ROUNDS} rounds" in alerts_text
        assert "the node marks it down" in alerts_text
        assert d.find_element("css selector", "#alerts li.critical").text.startswith("byzantine_0")
        checks = d.find_element("id", "checks").text
        tally = f"{DOWN_AFTER} of the last {ROUNDS} rounds waited the full {ROUND_TIMEOUT_S:g} s"
        assert tally in checks
        assert "clock: neighbours accepted" in checks  # derivable here: envelopes were sent
        # Neighbours: trust, standing and reachability per peer.
        rows = {
            r[0]: r
            for r in js(
                d,
                "return [...document.querySelectorAll('#peers tr')].slice(1)"
                ".map(r => [...r.cells].map(c => c.textContent))",
            )
        }
        assert rows["byzantine_0"][5] == "proven equivocation" and rows["byzantine_0"][4] == "0.00"
        assert rows["hospital_2"][1] == "up · sending" and rows["hospital_2"][2] == str(ROUNDS)
        assert rows["hospital_3"][1].startswith("down: ") and rows["hospital_3"][2] == "0"
        assert "unreachable: ConnectionRefusedError" in rows["hospital_3"][1]
        # Rejected messages by reason, with a meaning and a rate; counts are integers.
        rejected = d.find_element("id", "rejected").text
        assert re.search(r"unauthenticated no valid request signature.* 2 0\.4", rejected), rejected
        metrics = dict(
            js(
                d,
                "return [...document.querySelectorAll('#metrics tr')].slice(1)"
                ".map(r => [r.cells[0].textContent, r.cells[1].textContent])",
            )
        )
        assert metrics["n"].isdigit() and metrics["positives"].isdigit()
        assert len(metrics["auc"].split(".")[1]) == 3
        # The newest audit records, newest first, in words.
        audit = d.find_element("id", "audit").text
        assert "privacy: ε" in audit and "evaluated: AUC" in audit
        assert console_errors(d) == []
        save_screenshot(d, "console-dashboard.png", height=1500)
        # Without the token the page says how to open it, and shows no node data.
        js(d, "sessionStorage.clear()")
        d.get(url + "/")
        wait_until(lambda: d.find_element("id", "banner").is_displayed(), "the banner")
        assert "Unauthorized" in d.find_element("id", "banner").text
        assert d.find_element("id", "title").text == "murmur node"
        # The browser logs the refused fetches (401) as errors, and nothing else.
        assert all("401" in e for e in console_errors(d))


async def test_dashboard_shows_a_live_network_with_plots_and_alerts(tmp_path: Path) -> None:
    require_browser()
    edges = tmp_path / "edges.txt"
    edges.write_text(EDGES)
    args = ["--nodes", "4", "--rounds", str(ROUNDS), "--topology", f"edges:{edges}"]
    args += ["--byzantine", "1", "--attack", "equivocation"]
    args += ["--round-timeout", str(ROUND_TIMEOUT_S)]
    net = make_network(tmp_path / "run", *args)
    token_file = tmp_path / "operator.token"
    token_file.write_text(TOKEN)
    token_file.chmod(0o600)
    net.edit_config("hospital_0", "node", listen="127.0.0.1:0")
    net.edit_config("hospital_0", "operator", listen="127.0.0.1:0", token_file=str(token_file))
    running = [n for n in net.nodes if n.name != "hospital_3"]
    for n in running:  # do not give the dead node the usual minute to come up
        net.edit_config(n.name, "gossip", startup_timeout_s=2.0)
    hospitals = {n.name: HospitalNode(load_config(n.config_path)) for n in running}
    by_address = {n.address: hospitals[n.name] for n in running}
    watched = hospitals["hospital_0"]
    api = await start_api(watched, operator_token(watched.config))
    started, finished = threading.Event(), threading.Event()
    checks = asyncio.ensure_future(
        asyncio.to_thread(dashboard_checks, api.operator.address, started, finished)
    )
    try:
        while not started.is_set():  # the page is open, before round 1
            if checks.done():
                await checks  # the browser side failed: its assertion is the test's
            await asyncio.sleep(0.1)
        async with aiohttp.ClientSession() as session:
            for body in (b"not an envelope", b"\x00" * 64):
                async with session.post(api.peer.address + "/gossip", data=body) as r:
                    assert r.status == 401  # no Murmur-Auth: refused before the body
        await asyncio.gather(
            *(h.run_rounds(DeadPeerTransport(by_address, h.identity)) for h in hospitals.values())
        )
        finished.set()
        await checks
    finally:
        finished.set()
        if not checks.done():
            checks.cancel()
        await api.close()
        for h in hospitals.values():
            h.audit.close()
    assert watched.state.phase == "done"


@pytest.mark.parametrize("field", ["name", "peer"])
async def test_hostile_names_are_shown_as_text(tmp_path: Path, field: str) -> None:
    """A node or peer name full of markup reaches the page as text: nothing it holds runs."""
    require_browser()
    hostile = "<img src=x onerror=\"document.title='pwned'\">"
    net = make_network(tmp_path, "--nodes", "2", "--no-dp", "--aggregator", "mean")
    name = net.nodes[0].name
    net.edit_config(name, "node", listen="127.0.0.1:0")
    net.edit_config(name, "operator", listen="127.0.0.1:0")
    node = HospitalNode(load_config(net.node(name).config_path))
    if field == "name":
        node.state.name = hostile
    else:
        node.state.peers[hostile] = {"address": hostile, "last_round": 1, "last_seen": None}
    api = await start_api(node, None)

    def look() -> None:
        with browser() as d:
            d.get(api.operator.address + "/")
            wait_until(lambda: js(d, "return document.body.dataset.loaded"), "the page")
            assert js(d, "return document.querySelectorAll('img').length") == 0
            assert d.title != "pwned"
            shown = d.find_element("id", "title" if field == "name" else "peers").text
            assert hostile in shown
            assert console_errors(d) == []

    try:
        await asyncio.to_thread(look)
    finally:
        await api.close()
        node.audit.close()


def test_without_chromium_the_browser_tests_skip_saying_how_to_install_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MURMUR_CHROMIUM", "no-such-chromium-here")
    with pytest.raises(pytest.skip.Exception, match="apt-get install chromium chromium-driver"):
        require_browser()
