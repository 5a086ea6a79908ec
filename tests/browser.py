"""A real browser for the dashboard's tests: Debian's Chromium, started by the test itself
(so that its process group is stopped by PID at teardown, whatever happens) and driven by
Playwright over the DevTools protocol. Playwright never downloads a browser here."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path

from playwright.async_api import Browser, Page, ViewportSize, async_playwright

REPO = Path(__file__).resolve().parent.parent
DESKTOP = ViewportSize(width=1280, height=800)
PHONE = ViewportSize(width=390, height=844)
DEVTOOLS = re.compile(r"DevTools listening on (ws://\S+)")


def chromium_path() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        raise RuntimeError(
            "the dashboard's browser tests need Chromium: `make test` installs Debian's "
            "chromium package (apt-get install chromium)"
        )
    return found


@contextlib.asynccontextmanager
async def chromium() -> AsyncIterator[Browser]:
    """A headless Chromium of our own, connected to Playwright; killed with its whole process
    group at the end."""
    profile = tempfile.mkdtemp(prefix="stoker-chromium-")
    log_path = Path(profile) / "chromium.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [
                chromium_path(),
                "--headless=new",
                "--no-sandbox",  # we run as root in CI
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--no-default-browser-check",
                "--remote-debugging-port=0",
                "--remote-debugging-address=127.0.0.1",
                f"--user-data-dir={profile}",
                "about:blank",
            ],
            stdout=subprocess.DEVNULL,
            stderr=log,
            start_new_session=True,
        )
    try:
        url = _devtools_url(proc, log_path)
        async with async_playwright() as playwright:
            browser = await playwright.chromium.connect_over_cdp(url)
            try:
                yield browser
            finally:
                with contextlib.suppress(Exception):
                    await browser.close()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        shutil.rmtree(profile, ignore_errors=True)


def _devtools_url(proc: subprocess.Popen[bytes], log_path: Path, timeout: float = 30) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = DEVTOOLS.search(log_path.read_text(errors="replace"))
        if found:
            return found[1]
        if proc.poll() is not None:
            raise RuntimeError(f"chromium exited ({proc.returncode}):\n{log_path.read_text()}")
        time.sleep(0.05)  # polling a log file with a deadline: nothing to wait on instead
    raise RuntimeError(f"chromium did not open its DevTools port:\n{log_path.read_text()}")


async def screenshot(page: Page, name: str) -> None:
    """With STOKER_SCREENSHOTS set (`make screenshots` sets it to docs/screenshots, which the
    README links), save the page at desktop and phone sizes; otherwise nothing."""
    folder = os.environ.get("STOKER_SCREENSHOTS")
    if not folder:
        return
    Path(folder).mkdir(parents=True, exist_ok=True)
    for label, size in (("desktop", DESKTOP), ("phone", PHONE)):
        await page.set_viewport_size(size)
        await page.screenshot(path=str(Path(folder) / f"{name}-{label}.png"), full_page=True)
    await page.set_viewport_size(DESKTOP)


ADMIN_TOKEN = "admin-token-for-the-dashboard-tests"
VIEWER_TOKEN = "viewer-token-for-the-dashboard-tests"
DASHBOARD_CONFIG = f"""
[http]
admin_token = "{ADMIN_TOKEN}"
viewer_token = "{VIEWER_TOKEN}"
"""


def http_port(log: str) -> int:
    found = re.search(r"http listening on 127\.0\.0\.1:(\d+)", log)
    if found is None:
        raise AssertionError(f"the daemon did not say its port:\n{log}")
    return int(found[1])


async def sign_in(page: Page, base: str, token: str = ADMIN_TOKEN) -> None:
    await page.goto(f"{base}/dashboard/login")
    await page.fill("#token", token)
    await page.click("button[type=submit]")
    await page.wait_for_url(f"{base}/dashboard/")
