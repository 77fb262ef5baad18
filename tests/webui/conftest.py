"""The browser of the web page tests: Debian's headless Chromium (``/usr/bin/chromium``,
``apt-get install chromium``) driven by Playwright; Playwright's own browser download is never
used. Without either, the tests that ask for it are skipped."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from playwright.sync_api import BrowserContext

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)

LaunchChromium = Callable[..., AbstractContextManager["BrowserContext"]]


@pytest.fixture(scope="session")
def launch_chromium(tmp_path_factory: pytest.TempPathFactory) -> LaunchChromium:
    """``launch_chromium(extra_args=(), height=1100)``: a context manager that starts Chromium
    with ``CHROMIUM_ARGS`` and ``extra_args``, a fresh profile and a 1280 x ``height`` viewport,
    gives its browser context, and closes it at the end."""
    if not CHROMIUM.exists():
        pytest.skip("Debian's chromium is not installed (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api")

    @contextmanager
    def launch(extra_args: Sequence[str] = (), height: int = 1100) -> Iterator[BrowserContext]:
        profile = tmp_path_factory.mktemp("chromium-profile")
        with sync_api.sync_playwright() as pw:
            context = pw.chromium.launch_persistent_context(
                str(profile),
                executable_path=str(CHROMIUM),
                headless=True,
                args=[*CHROMIUM_ARGS, *extra_args],
                viewport={"width": 1280, "height": height},
            )
            try:
                yield context
            finally:
                context.close()

    return launch
