"""The dashboard's sign-in and its guards, in a real browser (Debian's Chromium through
Playwright) and over plain HTTP: a request without a session is sent to the login page, a
wrong token is refused, the session cookie is HttpOnly and SameSite=Strict, every page carries
a Content-Security-Policy without inline scripts."""

from __future__ import annotations

import aiohttp
from playwright.async_api import Browser

from tests.browser import (
    ADMIN_TOKEN,
    DASHBOARD_CONFIG,
    VIEWER_TOKEN,
    http_port,
    screenshot,
    sign_in,
)
from tests.conftest import DaemonFactory


async def start(daemons: DaemonFactory, extra: str = "") -> str:
    daemon = await daemons.start(DASHBOARD_CONFIG + extra)
    return f"http://127.0.0.1:{http_port(daemon.log())}"


async def test_a_request_without_a_session_is_sent_to_the_login_page_and_back(
    daemons: DaemonFactory, browser: Browser
) -> None:
    base = await start(daemons)
    page = await browser.new_page()
    await page.goto(f"{base}/dashboard/queues")
    assert page.url == f"{base}/dashboard/login?next=/dashboard/queues"
    await screenshot(page, "login")
    await page.fill("#token", "not-the-token-at-all")
    await page.click("button[type=submit]")
    assert await page.locator("[role=alert]").inner_text() == "That token is not valid here."
    await page.fill("#token", ADMIN_TOKEN)
    await page.click("button[type=submit]")
    await page.wait_for_url(f"{base}/dashboard/queues")
    cookies = {c["name"]: c for c in await page.context.cookies()}
    session = cookies["stoker_session"]
    assert session["httpOnly"] and session["sameSite"] == "Strict"
    assert ADMIN_TOKEN not in session["value"]
    assert await page.locator(".role").inner_text() == "admin"


async def test_a_viewer_session_is_marked_and_signing_out_ends_it(
    daemons: DaemonFactory, browser: Browser
) -> None:
    base = await start(daemons)
    page = await browser.new_page()
    await sign_in(page, base, VIEWER_TOKEN)
    assert await page.locator(".role").inner_text() == "viewer"
    await page.click("text=Sign out")
    await page.wait_for_url(f"{base}/dashboard/login")
    await page.goto(f"{base}/dashboard/")
    assert page.url.startswith(f"{base}/dashboard/login")


async def test_pages_carry_a_strict_content_security_policy_and_forged_cookies_are_refused(
    daemons: DaemonFactory,
) -> None:
    base = await start(daemons)
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{base}/dashboard/", allow_redirects=False) as response:
            assert response.status == 303
            assert response.headers["Location"] == "/dashboard/login?next=/dashboard/"
        async with http.get(f"{base}/dashboard/login") as response:
            policy = response.headers["Content-Security-Policy"]
            assert "script-src 'self'" in policy and "unsafe-inline" not in policy
            assert response.headers["X-Frame-Options"] == "DENY"
        forged = {"stoker_session": "WyJhZG1pbiIsIDk5OTk5OTk5OTksICJ4Il0.0000"}
        async with http.get(
            f"{base}/dashboard/", cookies=forged, allow_redirects=False
        ) as response:
            assert response.status == 303  # not signed in
        async with http.post(
            f"{base}/dashboard/login", data={"token": ADMIN_TOKEN}, allow_redirects=False
        ) as response:
            assert response.status == 303
            cookie = response.cookies["stoker_session"]
            assert cookie["httponly"] and cookie["samesite"] == "Strict"
            assert not cookie["secure"]  # plain HTTP here; Secure when the request was HTTPS
        async with http.post(f"{base}/dashboard/queues/default/pause") as response:
            assert response.status in (401, 403, 404, 405)


async def test_the_dashboard_is_off_without_an_admin_token(daemons: DaemonFactory) -> None:
    daemon = await daemons.start("")
    base = f"http://127.0.0.1:{http_port(daemon.log())}"
    async with aiohttp.ClientSession() as http, http.get(f"{base}/dashboard/") as response:
        assert response.status == 404


async def test_failed_sign_ins_are_throttled(daemons: DaemonFactory) -> None:
    base = await start(daemons)
    async with aiohttp.ClientSession() as http:
        statuses = []
        for _ in range(21):
            async with http.post(
                f"{base}/dashboard/login", data={"token": "a wrong guess, again"}
            ) as response:
                statuses.append(response.status)
                retry_after = response.headers.get("Retry-After")
        assert statuses[:20] == [401] * 20
        assert statuses[20] == 429 and retry_after is not None and int(retry_after) >= 1
        # even the right token waits its turn: the throttle does not tell guesses apart
        async with http.post(
            f"{base}/dashboard/login", data={"token": ADMIN_TOKEN}, allow_redirects=False
        ) as response:
            assert response.status == 429
