"""Fixtures for the dashboard's browser tests: Debian's Chromium, driven by Playwright."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from typing import Any

import pytest

CHROMIUM_ENV = "FEDLOOM_CHROMIUM"
# As the machine's notes advise for a closed network: no background connections, no sandbox (tests run as root).
CHROMIUM_ARGS = (
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)


@pytest.fixture(scope="session")
def chromium() -> str:
    """The Chromium to drive: ``$FEDLOOM_CHROMIUM``, else Debian's (``apt-get install chromium``; the README's
    test command installs it). Missing, the browser tests skip, except under CI (``CI`` set), where they fail."""
    path = os.environ.get(CHROMIUM_ENV) or shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        message = f"no Chromium: install Debian's chromium package or set {CHROMIUM_ENV}"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture(scope="session")
def browser(chromium: str) -> Iterator[Any]:
    """One headless Chromium for the session's browser tests."""
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as playwright:
        instance = playwright.chromium.launch(executable_path=chromium, args=list(CHROMIUM_ARGS))
        yield instance
        instance.close()
