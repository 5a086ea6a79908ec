"""The dashboard's jobs pages in a real browser (Debian's Chromium through Playwright): a failed
job found by its state, opened, its traceback read and retried without a reload; a payload
holding markup shown as text; a viewer who sees no buttons and is refused a forged action; an
action without the CSRF token refused; the filters, paging and bulk actions."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
from playwright.async_api import Browser, BrowserContext, Dialog, Page, expect

import daemon
from tests.browser import ADMIN_TOKEN, DASHBOARD_CONFIG, VIEWER_TOKEN, http_port, screenshot
from tests.browser import sign_in as browser_sign_in
from tests.conftest import DaemonFactory, eventually, finished

XSS_SCRIPT = "<script>window.__pwned=1</script>"
XSS_ATTR = '"><img src=x onerror="window.__pwned=1">'


async def start(daemons: DaemonFactory) -> str:
    running = await daemons.start(DASHBOARD_CONFIG)
    return f"http://127.0.0.1:{http_port(running.log())}"


async def signed_in(browser: Browser, base: str, token: str = ADMIN_TOKEN) -> Page:
    context = await browser.new_context()
    page = await context.new_page()
    await browser_sign_in(page, base, token)
    return page


async def session_cookie(context: BrowserContext) -> str:
    cookies = {c["name"]: c["value"] for c in await context.cookies()}
    return f"stoker_session={cookies['stoker_session']}"


async def post(base: str, path: str, cookie: str, data: dict[str, str]) -> int:
    """A POST made outside the page (a forgery, or a form without its token)."""
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            f"{base}{path}", data=data, headers={"Cookie": cookie}, allow_redirects=False
        ) as response,
    ):
        return response.status


async def state_of(db: asyncpg.Connection, job_id: int) -> str:
    state: str = await db.fetchval("SELECT state::text FROM stoker.all_jobs WHERE id = $1", job_id)
    return state


async def test_a_failed_job_is_listed_opened_read_and_retried_without_a_reload(
    daemons: DaemonFactory, browser: Browser, db: asyncpg.Connection, tmp_path: Path
) -> None:
    base = await start(daemons)
    flag = tmp_path / "the-cause-is-fixed"
    job_id = await daemon.enqueue(
        db,
        queue="default",
        kind="test.needs_file",
        payload={"path": str(flag)},
        max_attempts=1,
        meta={"org": "org_123", "schedule": "nightly-report", "tick": "2024-05-01T02:00:00+00:00"},
    )
    assert (await finished(db, job_id))["state"] == "failed"

    page = await signed_in(browser, base)
    await page.goto(f"{base}/dashboard/jobs")
    await page.select_option("select[name=state]", "failed")
    await page.click("form.filters button[type=submit]")
    await page.wait_for_url(f"{base}/dashboard/jobs?state=failed**")
    row = page.locator(f"tr[data-id='{job_id}']")
    await expect(row).to_contain_text("FileNotFoundError")
    await expect(row.locator(".state")).to_have_text("failed")
    await screenshot(page, "jobs")

    await row.locator(f"a[href='/dashboard/jobs/{job_id}']").click()
    await page.wait_for_url(f"{base}/dashboard/jobs/{job_id}")
    await expect(page.locator("#job-state")).to_have_text("failed")
    traceback = page.locator("pre.traceback").first
    await expect(traceback).to_contain_text("Traceback (most recent call last)")
    await expect(traceback).to_contain_text("FileNotFoundError")
    await expect(page.locator("pre.meta")).to_contain_text('"org": "org_123"')
    link = page.locator("a.schedule-link")
    assert await link.get_attribute("href") == "/dashboard/schedules/nightly-report"
    await expect(page.locator("button", has_text="Cancel")).to_have_count(0)  # not queued
    await screenshot(page, "job")

    flag.write_text("fixed")
    await page.evaluate("window.__notReloaded = true")
    await page.click("button:has-text('Retry')")
    await expect(page.locator("#job-state")).to_have_text("succeeded", timeout=20_000)
    assert await page.evaluate("window.__notReloaded") is True  # the same page, refreshed
    await expect(page.locator("pre.result")).to_have_text("found")
    await expect(page.locator("button", has_text="Retry")).to_have_count(0)
    assert await state_of(db, job_id) == "succeeded"
    audit = await db.fetchrow(
        "SELECT role, action, target FROM stoker.audit_log ORDER BY id DESC LIMIT 1"
    )
    assert dict(audit) == {"role": "admin", "action": "jobs.retry", "target": f"job {job_id}"}


async def test_markup_is_shown_as_text_viewers_cannot_act_and_csrf_is_required(
    daemons: DaemonFactory, browser: Browser, db: asyncpg.Connection
) -> None:
    base = await start(daemons)
    # A queue no daemon serves: the job stays queued, so Cancel applies.
    job_id = await daemon.enqueue(
        db,
        queue="nobody-serves-this",
        kind="test.record",
        payload={"note": XSS_SCRIPT, "attr": XSS_ATTR},
        meta={XSS_ATTR: XSS_SCRIPT},
    )

    admin = await signed_in(browser, base)
    await admin.goto(f"{base}/dashboard/jobs/{job_id}")
    payload = admin.locator("pre.payload")
    await expect(payload).to_contain_text(XSS_SCRIPT)
    await expect(payload).to_contain_text(json.dumps(XSS_ATTR)[1:-1])
    await expect(admin.locator("pre.meta")).to_contain_text(XSS_SCRIPT)
    await admin.goto(f"{base}/dashboard/jobs?queue=nobody-serves-this")
    await expect(admin.locator(f"tr[data-id='{job_id}']")).to_have_count(1)
    await admin.goto(f"{base}/dashboard/jobs/{job_id}")
    assert await admin.evaluate("typeof window.__pwned") == "undefined"
    assert await admin.locator("main img, main script").count() == 0

    # A running job: its progress bar (a <progress> element: the CSP allows no inline style).
    running = await daemon.enqueue(db, queue="default", kind="test.sleep", payload={"seconds": 60})
    await admin.goto(f"{base}/dashboard/jobs/{running}")
    await expect(admin.locator("#job-state")).to_have_text("active")
    await expect(admin.locator(".job-progress progress")).to_have_attribute("value", "10.0")
    await expect(admin.locator(".progress-message")).to_have_text("sleeping")
    await expect(admin.locator("main [style]")).to_have_count(0)

    # Non-numeric, too large or unknown ids: a 404 page, never a 500.
    cookie = await session_cookie(admin.context)
    async with aiohttp.ClientSession(headers={"Cookie": cookie}) as http:
        for path in ("abc", "1e3", "99999999999999999999", "987654321"):
            async with http.get(f"{base}/dashboard/jobs/{path}") as response:
                assert response.status == 404, path
                assert "404" in await response.text()

    # Without the CSRF token: refused, and the job stays queued.
    assert await post(base, f"/dashboard/jobs/{job_id}/cancel", cookie, {}) == 403
    assert await post(base, f"/dashboard/jobs/{job_id}/cancel", cookie, {"csrf": "x"}) == 403
    assert await state_of(db, job_id) == "queued"

    # A viewer sees the job, but no button or checkbox, and its forged action is refused.
    viewer = await signed_in(browser, base, VIEWER_TOKEN)
    await viewer.goto(f"{base}/dashboard/jobs")
    await expect(viewer.locator(f"tr[data-id='{job_id}']")).to_have_count(1)
    actions = "main form[method=post], main input[type=checkbox], main button:has-text('Retry')"
    await expect(viewer.locator(actions)).to_have_count(0)
    await viewer.goto(f"{base}/dashboard/jobs/{job_id}")
    await expect(viewer.locator("#job-state")).to_have_text("queued")
    await expect(viewer.locator("main button")).to_have_count(0)
    csrf = await viewer.locator("main").get_attribute("data-csrf") or ""
    viewer_cookie = await session_cookie(viewer.context)
    for path, data in (
        (f"/dashboard/jobs/{job_id}/cancel", {"csrf": csrf}),
        ("/dashboard/jobs/selected", {"csrf": csrf, "do": "cancel", "id": str(job_id)}),
        ("/dashboard/jobs/cancel-filter", {"csrf": csrf, "queue": "nobody-serves-this"}),
    ):
        assert await post(base, path, viewer_cookie, data) == 403, path
    assert await state_of(db, job_id) == "queued"

    # The admin cancels it from the page, after confirming.
    asked: list[str] = []

    async def accept(dialog: Dialog) -> None:
        asked.append(dialog.message)
        await dialog.accept()

    admin.on("dialog", accept)
    await admin.goto(f"{base}/dashboard/jobs/{job_id}")
    await admin.click("button:has-text('Cancel')")
    await expect(admin.locator("#job-state")).to_have_text("cancelled")
    assert asked == [f"Cancel job {job_id}?"]
    assert await state_of(db, job_id) == "cancelled"
    assert await admin.evaluate("typeof window.__pwned") == "undefined"


async def add_failures(db: asyncpg.Connection, count: int) -> list[int]:
    """Failed jobs in history, oldest first: org_1 for odd i, org_0 for even; the third says
    'disk full'. On a queue no daemon serves, so retried ones stay queued."""
    ids: list[int] = []
    for i in range(1, count + 1):
        error = f"error number {i}" + (": disk full" if i == 3 else "")
        ids.append(
            await db.fetchval(
                """
                INSERT INTO stoker.job_history (id, queue, kind, payload, meta, priority, state,
                    run_at, attempts, max_attempts, last_error, errors, created_at, finished_at)
                VALUES (nextval(pg_get_serial_sequence('stoker.jobs', 'id')), 'reports',
                    'test.record', '{}', $1::jsonb, 0, 'failed', now(), 1, 1, $2,
                    jsonb_build_array(jsonb_build_object('attempt', 1, 'error', $2::text,
                                                         'traceback', 'Traceback ...')),
                    now(), now())
                RETURNING id
                """,
                {"org": f"org_{i % 2}"},
                error,
            )
        )
    return ids


async def rows(page: Page) -> list[int]:
    found = await page.locator("table.jobs tbody tr[data-id]").evaluate_all(
        "rows => rows.map(r => Number(r.dataset.id))"
    )
    return [int(x) for x in found]


async def test_filters_paging_and_bulk_actions(
    daemons: DaemonFactory, browser: Browser, db: asyncpg.Connection
) -> None:
    base = await start(daemons)
    ids = await add_failures(db, 7)
    org_1 = [j for i, j in enumerate(ids, 1) if i % 2 == 1][::-1]  # newest first
    org_0 = [j for i, j in enumerate(ids, 1) if i % 2 == 0][::-1]
    page = await signed_in(browser, base)

    # Meta key and value, two a page: Older pages through them all, newest first.
    await page.goto(f"{base}/dashboard/jobs?meta_key=org&meta_value=org_1&limit=2")
    seen: list[int] = []
    while True:
        seen += await rows(page)
        older = page.locator("a.next")
        if not await older.count():
            break
        await older.click()
        await page.wait_for_url("**before=**")
    assert seen == org_1
    await expect(page.locator(".jobs-bounded")).to_contain_text("newest 20,000 jobs")

    # Plain paging (no filter): two a page, from the newest.
    await page.goto(f"{base}/dashboard/jobs?limit=2")
    assert await rows(page) == ids[::-1][:2]
    await page.click("a.next")
    await page.wait_for_url("**before=**")
    assert await rows(page) == ids[::-1][2:4]

    # Error text, matched as text (a % is no wildcard).
    await page.goto(f"{base}/dashboard/jobs")
    await page.fill("input[name=error]", "DISK full")
    await page.click("form.filters button[type=submit]")
    await page.wait_for_url("**error=DISK+full**")
    assert await rows(page) == [ids[2]]
    await page.goto(f"{base}/dashboard/jobs?error=%25disk")
    assert await rows(page) == []

    # The selection: two checked rows retried, in the background.
    await page.goto(f"{base}/dashboard/jobs?state=failed&meta_key=org&meta_value=org_1")
    for job_id in org_1[:2]:
        await page.check(f"input[name=id][value='{job_id}']")
    await page.click("button:has-text('Retry selected')")

    async def retried() -> bool:
        states = [await state_of(db, j) for j in org_1[:2]]
        return states == ["queued", "queued"]

    await eventually(retried)
    await expect(page.locator(f"tr[data-id='{org_1[0]}']")).to_have_count(0)  # now not failed
    assert [await state_of(db, j) for j in org_1[2:]] == ["failed", "failed"]

    # The whole filter: confirmed, naming its bound; then cancelled the same way.
    asked: list[str] = []

    async def accept(dialog: Dialog) -> None:
        asked.append(dialog.message)
        await dialog.accept()

    page.on("dialog", accept)
    await page.goto(f"{base}/dashboard/jobs?state=failed&meta_key=org&meta_value=org_0")
    assert sorted(await rows(page)) == sorted(org_0)
    retry_all = page.locator("form.action:has(button:has-text('Retry all matching'))")
    await retry_all.locator("input[name=confirm]").check()
    await retry_all.locator("button").click()

    async def all_queued() -> bool:
        return all([await state_of(db, j) == "queued" for j in org_0])

    await eventually(all_queued)
    assert asked == ["Retry up to 1,000 failed or cancelled jobs matching this filter?"]
    await page.goto(f"{base}/dashboard/jobs?queue=reports&state=queued")
    cancel_all = page.locator("form.action:has(button:has-text('Cancel all matching'))")
    await cancel_all.locator("input[name=confirm]").check()
    await cancel_all.locator("button").click()
    queued = org_0 + org_1[:2]

    async def all_cancelled() -> bool:
        return all([await state_of(db, j) == "cancelled" for j in queued])

    await eventually(all_cancelled)
    assert asked[-1] == "Cancel up to 1,000 queued jobs matching this filter?"

    async def audited() -> Any:
        # Written after the batches of cancels commit: seen a moment after the jobs' states.
        row = await db.fetchrow(
            "SELECT action, details FROM stoker.audit_log ORDER BY id DESC LIMIT 1"
        )
        return row if row is not None and row["action"] == "jobs.cancel_filter" else None

    last: Any = await eventually(audited)
    assert sorted(last["details"]["ids"]) == sorted(queued)
