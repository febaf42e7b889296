"""The report as PDF, printed by headless Chromium where one is installed (skipped, saying
so, where none is)."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

PDF_TIMEOUT_S = 120.0
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


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
