"""Headless Chromium (Debian's package) driven by Playwright, for the viewer's tests and the
first-paint benchmark. Playwright never downloads a browser here: it launches /usr/bin/chromium.

`make test` installs chromium when it is missing (`make browser`); a test that needs it is
skipped, with the reason, only where it cannot be installed, and never in CI (CI=true fails)."""

from __future__ import annotations

import os
import shutil
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from vlmscope.viewer.server import ViewerConfig, ViewerServer, make_server

#: the flags the machine notes give for a headless, offline chromium.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]  # fmt: skip


def chromium_path() -> str | None:
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    return None


def missing_browser_reason() -> str | None:
    """Why the browser tests cannot run here (None when they can)."""
    try:
        import playwright  # noqa: F401
    except ImportError:
        return "playwright is not installed (pip install -e '.[dev]')"
    if chromium_path() is None:
        return "no chromium: `make browser` (apt-get install chromium) could not install it"
    return None


@contextmanager
def browser_page(width: int = 1500, height: int = 900) -> Iterator[Any]:
    """A fresh Chromium (own profile folder) and page; closed on exit."""
    import tempfile

    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory() as profile, sync_playwright() as p:
        ctx = p.chromium.launch_persistent_context(
            profile, executable_path=chromium_path(), args=CHROMIUM_ARGS, headless=True,
            viewport={"width": width, "height": height},
        )  # fmt: skip
        page = ctx.new_page()
        page.errors = []  # type: ignore[attr-defined]
        page.on("pageerror", lambda e: page.errors.append(str(e)))  # type: ignore[attr-defined]
        # Console errors count, except the browser's own line for an HTTP error status (the
        # tests ask for refusals on purpose; the page shows those in its message line).
        page.on(
            "console",
            lambda m: (
                m.type == "error"
                and not m.text.startswith("Failed to load resource")
                and page.errors.append(m.text)
            ),
        )  # type: ignore[attr-defined]
        try:
            yield page
        finally:
            ctx.close()


def wait_ready(page: Any, timeout: float = 60.0) -> None:
    """Until the page says it finished opening a graph (polled: the page's CSP forbids the
    string evaluation Playwright's wait_for_function uses)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if page.evaluate("() => !!(window.__vlmscope && window.__vlmscope.ready)"):
            return
        time.sleep(0.02)
    raise TimeoutError("the viewer page did not become ready")


def wait_for(page: Any, js: str, timeout: float = 30.0) -> Any:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = page.evaluate(js)
        if value:
            return value
        time.sleep(0.05)
    raise TimeoutError(f"timed out waiting for {js}")


@contextmanager
def running(cfg: ViewerConfig) -> Iterator[ViewerServer]:
    server = make_server(cfg)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")
