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

The package: model.py (the report as data), reading.py (`build_report`), render.py
(`render_html`), pdf.py (`write_pdf`), command.py (`report_command`).
"""

from __future__ import annotations

from murmur.node.compliance.command import (
    report_command,
)
from murmur.node.compliance.pdf import (
    CHROMIUM_NAMES,
    PDF_TIMEOUT_S,
    find_chromium,
    write_pdf,
)
from murmur.node.compliance.reading import (
    build_report,
)
from murmur.node.compliance.render import (
    render_html,
    summary_paragraph,
)

__all__ = [
    "CHROMIUM_NAMES",
    "PDF_TIMEOUT_S",
    "build_report",
    "find_chromium",
    "render_html",
    "report_command",
    "summary_paragraph",
    "write_pdf",
]
