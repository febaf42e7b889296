"""`murmur audit report` (node/compliance/): one plain-language document per hospital.

The logs are real: run_cluster's network with its nodes' round loops in this process (three
hospitals and an equivocating attacker, DP at ε = 1), so every record was written by
node/node.py. Those in-process nodes write no `node_start` record (that is `murmur node`'s
start), so the tests that check `--config` append the one the node would have written, with
the node's own key.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from murmur.crypto.identity import fingerprint, generate_identity, load_identity, load_public_key
from murmur.node.audit import AUDIT_FILE, AuditLog, records_of_kind
from murmur.node.cli import main
from murmur.node.compliance import build_report, find_chromium, render_html, summary_paragraph
from murmur.node.config import load_config
from murmur.node.peer_heads import heads_command

from tests.browser import browser, console_errors, require_browser, save_screenshot
from tests.netutil import run_in_process

ROUNDS = 4
ATTACKER = "byzantine_0"


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    out = tmp_path_factory.mktemp("compliance")
    report, _ = run_in_process(
        ["--nodes", "3", "--rounds", str(ROUNDS), "--byzantine", "1", "--attack", "equivocation"],
        out,
    )
    return out, report


@pytest.fixture
def state(run: tuple[Path, dict[str, Any]], tmp_path: Path) -> Path:
    """A copy of hospital_0's state directory that a test may change."""
    copy = tmp_path / "hospital_0"
    shutil.copytree(run[0] / "nodes" / "hospital_0", copy)
    return copy


def test_the_report_holds_what_the_log_says_round_by_round(
    run: tuple[Path, dict[str, Any]], state: Path
) -> None:
    run_dir, cluster = run
    key = load_public_key(run_dir / "keys" / "hospital_0.pub")
    report = build_report(state, public_key=key)
    assert report.node_name == "hospital_0"
    assert report.fingerprint == fingerprint(key)
    assert report.verification.ok and "audit log OK" in report.verification.output
    assert report.completed_rounds() == ROUNDS == len(report.rounds)
    hospital = next(h for h in cluster["hospitals"] if h["name"] == "hospital_0")
    assert report.final is not None
    assert report.final.epsilon_spent == pytest.approx(hospital["epsilon"])
    assert report.final.noise_multiplier == hospital["noise_multiplier"]
    assert report.final.steps_taken == hospital["dp_steps"]
    assert sorted(report.recipients()) == ["byzantine_0", "hospital_1", "hospital_2"]
    # Each round's sent model is the update_sent record's, delivered to every neighbour.
    sent = records_of_kind(state, "update_sent")
    for section, record in zip(report.rounds, sent, strict=True):
        (model,) = section.sent
        assert model.model_sha256 == record.fields["model_sha256"]
        assert model.bytes == record.fields["bytes"] and model.failed == {}
        assert sorted(model.delivered) == sorted(record.fields["recipients"])
        assert {m.sender for m in section.received} == {"hospital_1", "hospital_2", ATTACKER}
    # The per-round ε adds up to the total, from the accountant's own readings.
    assert sum(r.epsilon_this_round for r in report.rounds) == pytest.approx(
        report.final.epsilon_spent
    )
    assert sum(r.steps_this_round for r in report.rounds) == report.final.steps_taken
    # The attacker is proven in round 2 and left out from then on, with the reason.
    proof_rounds = [
        r.round for r in report.rounds if any(ev.kind == "equivocation_proof" for ev in r.events)
    ]
    assert proof_rounds == [2]
    for section in report.rounds[1:]:
        assert section.excluded == [(ATTACKER, "proven_equivocation")]
        assert ATTACKER not in section.used
    summary = summary_paragraph(report)
    assert "<b>hospital_0</b>" in summary and fingerprint(key) in summary
    assert f"<b>{ROUNDS} rounds</b>" in summary and "100% of its budget" in summary
    assert "<b>hospital_1, hospital_2 and byzantine_0</b>" in summary
    assert "verifies" in summary and "1 equivocation proof" in summary


def test_the_cli_writes_the_report_checks_peer_heads_and_the_config(
    run: tuple[Path, dict[str, Any]], state: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    run_dir, _ = run
    config_path = run_dir / "configs" / "hospital_0.toml"
    # What `murmur node` writes when it starts (node/node.py), with the node's own key.
    with AuditLog(state / AUDIT_FILE, load_identity(run_dir / "keys" / "hospital_0.key")) as log:
        log.append("node_start", ROUNDS + 1, config_sha256=load_config(config_path).sha256)
    heads = tmp_path / "heads.json"
    with heads.open("w") as fh:
        assert heads_command(run_dir / "nodes" / "hospital_1", "hospital_0", fh) == 0
    monkeypatch.setenv("MURMUR_CHROMIUM", "no-such-chromium-here")
    out = tmp_path / "out" / "report.html"
    args = ["audit", "report", "--state", str(state), "--out", str(out)]
    args += ["--public-key", str(run_dir / "keys" / "hospital_0.pub")]
    args += ["--peer-heads", str(heads), "--config", str(config_path)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "no PDF renderer" in printed and "skipped the PDF" in printed
    assert "the log verifies" in printed and not out.with_suffix(".pdf").exists()
    page = out.read_text()
    # The summary comes first, then the facts, the rounds and the verification.
    parts = ("class='summary'", "Key facts", "Round 1 ", "<h2>Verification")
    order = [page.index(x) for x in parts]
    assert order == sorted(order)
    assert "contains every audit head its neighbours hold" in page
    assert "peer heads: all" in page  # murmur audit verify's own line
    assert "whose SHA-256 matches the one the node recorded" in page
    assert "<b>breast-cancer</b>" in page  # the study, from the matching config
    # A config that is not the one the node ran is named as such.
    other = tmp_path / "other.toml"
    other.write_text(config_path.read_text().replace("rounds = 4", "rounds = 40"))
    assert main([*args[:-1], str(other), "--no-pdf"]) == 0
    assert "does NOT match any configuration the node recorded" in out.read_text()


def test_a_tampered_log_is_reported_as_not_verifying(
    run: tuple[Path, dict[str, Any]], state: Path, tmp_path: Path
) -> None:
    (sent,) = records_of_kind(state, "update_sent")[:1]
    fields = dict(sent.fields, recipients=["hospital_1"])  # hide two recipients
    with sqlite3.connect(state / AUDIT_FILE) as db:
        db.execute(
            "UPDATE records SET fields = ? WHERE seq = ?",
            (json.dumps(fields, sort_keys=True, separators=(",", ":")), sent.seq),
        )
    out = tmp_path / "report.html"
    key = str(run[0] / "keys" / "hospital_0.pub")
    args = ["audit", "report", "--state", str(state), "--public-key", key, "--out", str(out)]
    assert main([*args, "--no-pdf"]) == 1
    page = out.read_text()
    assert "does NOT verify" in page and f"FAILED at record {sent.seq}" in page
    assert "cannot be relied on" in page
    # Another hospital's key: the log is not the one it claims to be.
    other = run[0] / "keys" / "hospital_1.pub"
    assert main([*args[:4], "--public-key", str(other), "--out", str(out), "--no-pdf"]) == 1
    assert "does NOT match the key stored in the log" in out.read_text()
    # No log at all: exit 2 and nothing written.
    missing = tmp_path / "missing.html"
    assert main(["audit", "report", "--state", str(tmp_path / "none"), "--out", str(missing)]) == 2
    assert not missing.exists()


def test_every_string_from_the_log_is_escaped(tmp_path: Path) -> None:
    """Peer names and reasons come from config files and peers; the node name in the log's
    meta table is not signed, so anyone who can write the file can change it."""
    hostile = "<script>alert(1)</script>"
    with AuditLog(tmp_path / AUDIT_FILE, generate_identity("hospital_x")) as log:
        log.append(
            "update_sent",
            1,
            recipients=[f"peer{hostile}"],
            delivered=[],
            failed={f"peer{hostile}": f"unreachable: {hostile}"},
            bytes=10,
            model_sha256="ab" * 32,
        )
        log.append("quarantine", 1, peer=f"peer{hostile}", evidence={"score": 0.1})
    with sqlite3.connect(tmp_path / AUDIT_FILE) as db:
        db.execute("UPDATE meta SET value = ? WHERE key = 'node_name'", (f"node{hostile}",))
    page = render_html(build_report(tmp_path))
    assert "<script" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "WITHOUT differential privacy" in page  # no privacy record: no DP


def test_the_pdf_is_printed_where_chromium_is_installed(state: Path, tmp_path: Path) -> None:
    if find_chromium() is None:
        pytest.skip("headless Chromium is not installed (apt-get install chromium)")
    out = tmp_path / "report.html"
    assert main(["audit", "report", "--state", str(state), "--out", str(out)]) == 0
    pdf = out.with_suffix(".pdf").read_bytes()
    assert pdf.startswith(b"%PDF-") and len(pdf) > 10_000


def test_the_reports_render_in_a_browser(run: tuple[Path, dict[str, Any]], state: Path) -> None:
    """The compliance report and run_cluster's report.html load in Chromium with no console
    error (so the compliance report's CSP admits its own style), and report.html's plots load."""
    require_browser()
    from murmur.node.report import write_html_report

    run_dir, cluster = run
    out = state.parent / "compliance.html"
    key = str(run_dir / "keys" / "hospital_0.pub")
    assert main(["audit", "report", "--state", str(state), "--public-key", key, "--out", str(out),
                 "--no-pdf"]) == 0  # fmt: skip
    run_report = write_html_report(cluster, run_dir)
    with browser(1100, 900) as d:
        d.get(out.resolve().as_uri())
        summary = d.find_element("css selector", "p.summary")
        assert summary.text.startswith("This report describes what the murmur node hospital_0")
        # The style applied (a CSP mismatch would leave the page unstyled and log an error).
        border = d.execute_script(
            "return getComputedStyle(document.querySelector('p.summary')).borderLeftStyle"
        )
        assert border == "solid"
        assert len(d.find_elements("css selector", "section.round")) == ROUNDS
        assert console_errors(d) == []
        save_screenshot(d, "compliance-report.png", height=1600)
        d.get(Path(run_report).resolve().as_uri())
        sizes = d.execute_script(
            "return [...document.images].map(i => [i.getAttribute('src'), i.naturalWidth])"
        )
        assert sizes and all(width > 100 for _, width in sizes), sizes
        assert console_errors(d) == []
