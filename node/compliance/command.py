"""`murmur audit report`: read the log, write the page (and the PDF), say whether the log
verifies."""

from __future__ import annotations

from pathlib import Path

from murmur.node.audit import (
    AuditError,
    PeerHead,
)
from murmur.node.compliance.pdf import (
    write_pdf,
)
from murmur.node.compliance.reading import (
    build_report,
)
from murmur.node.compliance.render import (
    _first_failure,
    render_html,
)


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
