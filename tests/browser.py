"""Headless Chromium for the tests that check pages really render (Selenium + chromedriver).

A test that needs it calls `require_browser()`, which skips with the reason when Chromium,
its driver or Selenium is missing (.ci/run installs them where it can). Console messages are
collected so a test can assert that the page logged no error.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from murmur.node.compliance import find_chromium

# Set to a directory to also save the screenshots docs/ shows (docs/console.md).
SCREENSHOT_DIR = os.environ.get("MURMUR_SCREENSHOT_DIR")


def require_browser() -> tuple[str, str]:
    """(chromium, chromedriver) paths, or skip the test saying what is missing."""
    chromium, driver = find_chromium(), shutil.which("chromedriver")
    try:
        import selenium  # noqa: F401
    except ImportError:
        pytest.skip("selenium is not installed (pip install -e '.[test]')")
    if chromium is None or driver is None:
        pytest.skip(
            "headless Chromium is not installed (on Debian: apt-get install chromium "
            "chromium-driver); the browser tests need it"
        )
    return chromium, driver


@contextlib.contextmanager
def browser(width: int = 1280, height: int = 1000) -> Iterator[Any]:
    """A headless Chromium session that records console messages; closed afterwards."""
    chromium, driver_path = require_browser()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in (
        "--headless=new",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        f"--window-size={width},{height}",
        *(["--no-sandbox"] if os.geteuid() == 0 else []),
    ):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def console_errors(driver: Any) -> list[str]:
    """Console messages at error level since the last call (Chromium's SEVERE)."""
    return [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def save_screenshot(driver: Any, name: str, height: int | None = None) -> Path | None:
    """With MURMUR_SCREENSHOT_DIR set: a PNG of the page (its first `height` CSS pixels, or
    all of it), reduced to a small palette so it stays small in the repository."""
    if not SCREENSHOT_DIR:
        return None
    from PIL import Image

    full = driver.execute_script("return document.documentElement.scrollHeight")
    width = driver.execute_script("return document.documentElement.scrollWidth")
    driver.set_window_size(width, min(full, height or full) + 140)  # + the window's chrome
    path = Path(SCREENSHOT_DIR) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(path))
    with Image.open(path) as image:
        small = image.convert("RGB").quantize(colors=96, method=Image.Quantize.MEDIANCUT)
    small.save(path, optimize=True)
    return path
