"""The dashboard's Schedules pages (issue 15) in a real browser: every schedule with its cron in
words and its recent runs; Run now, Pause and Resume, seen on the page without a reload and in
the database (ticks stop while paused, and fire again after); a viewer sees no buttons and a
forged action of theirs is refused; failed runs are coloured as failed."""

from __future__ import annotations

from datetime import datetime

import asyncpg
from playwright.async_api import Browser, Dialog, Page

from daemon.cron.schedules import save_schedule
from tests.browser import DASHBOARD_CONFIG, VIEWER_TOKEN, http_port, screenshot, sign_in
from tests.conftest import DaemonFactory, eventually

SCHEDULES = """
[schedules.nightly]
cron = "30 2 * * *"
kind = "noop"
description = "the nightly clean-up"

[schedules.tick]
cron = "* * * * * *"
kind = "noop"
overlap = "allow"
"""


async def start(daemons: DaemonFactory, extra: str = SCHEDULES) -> str:
    daemon = await daemons.start("leader_retry = 1\n" + DASHBOARD_CONFIG + extra)
    await daemon.wait_log("became leader")
    return f"http://127.0.0.1:{http_port(daemon.log())}"


async def accept(dialog: Dialog) -> None:
    await dialog.accept()


async def count(db: asyncpg.Connection, sql: str, *args: object) -> int:
    n: int = await db.fetchval(sql, *args)
    return n


FIRED_SINCE = (
    "SELECT count(*) FROM stoker.schedule_ticks WHERE schedule = $1 AND outcome = 'fired' "
    "AND created_at >= $2"
)


async def test_run_now_pause_and_resume_a_schedule_without_reloading(
    daemons: DaemonFactory, db: asyncpg.Connection, browser: Browser
) -> None:
    base = await start(daemons)
    page = await browser.new_page()
    page.on("dialog", accept)
    await sign_in(page, base)
    await page.click("nav >> text=Schedules")
    await page.wait_for_url(f"{base}/dashboard/schedules")
    nightly = page.locator("#schedule-nightly")
    assert await nightly.locator(".cron-words").inner_text() == "At 02:30"
    assert "every second" in (await page.locator("#schedule-tick .cron-words").inner_text()).lower()

    # Run now, from the schedule's page: its run appears in the ledger without a reload.
    await nightly.locator("a", has_text="nightly").click()
    await page.wait_for_url(f"{base}/dashboard/schedules/nightly")
    await page.locator(".schedule-facts button", has_text="Run now").click()
    run = page.locator("tr.run-manual", has_text="by hand: dashboard")
    await run.wait_for(timeout=10_000)
    job_link = run.locator("a[href^='/dashboard/jobs/']")
    assert await job_link.count() == 1
    await page.locator("tr.run-manual .state-succeeded").first.wait_for(timeout=10_000)

    # Pause the per-second schedule: its ledger stops growing, on the page and in the database.
    await page.goto(f"{base}/dashboard/schedules/tick")
    await page.locator("tr.run-fired").first.wait_for(timeout=10_000)
    await page.locator(".schedule-facts button", has_text="Pause").click()
    await page.locator("h1 .state-paused").wait_for(timeout=5_000)
    paused_at: datetime = await db.fetchval(
        "SELECT paused_at FROM stoker.schedule_state WHERE name = 'tick'"
    )
    assert paused_at is not None
    assert (
        await db.fetchval("SELECT paused_by FROM stoker.schedule_state WHERE name = 'tick'")
        == "dashboard (admin)"
    )
    await eventually(  # three seconds of the database's clock: a deadline, not a guess
        lambda: db.fetchval(
            "SELECT clock_timestamp() > $1::timestamptz + interval '3s'", paused_at
        ),
        timeout=10,
        interval=0.1,
    )
    assert await count(db, FIRED_SINCE, "tick", paused_at) == 0
    assert "paused" in await page.locator(".schedule-facts").inner_text()

    # Resume: ticks fire again, and the page shows them.
    await page.locator(".schedule-facts button", has_text="Resume").click()
    resumed: datetime = await eventually(
        lambda: db.fetchval(
            "SELECT updated_at FROM stoker.schedule_state WHERE name = 'tick' AND paused_at IS NULL"
        ),
        timeout=5,
    )
    await eventually(lambda: count(db, FIRED_SINCE, "tick", resumed), timeout=10)
    newest = page.locator("table.ledger tbody tr").first
    await eventually(
        lambda: _text_has(newest, "fired"), timeout=10, interval=0.2
    )  # the page refreshes itself
    assert await page.locator("h1 .state-paused").count() == 0

    actions = await db.fetch(
        "SELECT role, action, target FROM stoker.audit_log WHERE action LIKE 'schedule.%' "
        "ORDER BY id"
    )
    assert [(r["role"], r["action"], r["target"]) for r in actions] == [
        ("admin", "schedule.run_now", "nightly"),
        ("admin", "schedule.pause", "tick"),
        ("admin", "schedule.resume", "tick"),
    ]


async def _text_has(locator: object, text: str) -> bool:
    from playwright.async_api import Locator

    assert isinstance(locator, Locator)
    return text in await locator.inner_text()


async def test_a_viewer_sees_no_buttons_and_a_forged_action_is_refused(
    daemons: DaemonFactory, db: asyncpg.Connection, browser: Browser
) -> None:
    base = await start(daemons)
    page = await browser.new_page()
    await sign_in(page, base, VIEWER_TOKEN)
    await page.goto(f"{base}/dashboard/schedules")
    await page.locator("#schedule-nightly").wait_for()
    assert await page.locator("main button").count() == 0
    await page.goto(f"{base}/dashboard/schedules/nightly")
    assert await page.locator("main button").count() == 0
    csrf = await page.locator("#main").get_attribute("data-csrf")
    for verb in ("run", "pause", "resume"):
        forged = await page.request.post(
            f"{base}/dashboard/schedules/nightly/{verb}",
            form={"csrf": csrf or "", "back": "/dashboard/schedules"},
            max_redirects=0,
        )
        assert forged.status == 403, verb
    assert await count(db, "SELECT count(*) FROM stoker.audit_log") == 0
    assert await count(db, "SELECT count(*) FROM stoker.schedule_ticks") >= 0
    assert (
        await count(db, "SELECT count(*) FROM stoker.schedule_ticks WHERE outcome = 'manual'") == 0
    )
    assert (
        await db.fetchval("SELECT paused_at FROM stoker.schedule_state WHERE name = 'nightly'")
        is None
    )

    # An unknown schedule is a 404 page with a way back, never a 500.
    missing = await page.goto(f"{base}/dashboard/schedules/no-such-schedule")
    assert missing is not None and missing.status == 404
    await page.click("text=Back to the schedules")
    await page.wait_for_url(f"{base}/dashboard/schedules")


async def _runs(db: asyncpg.Connection, state: str, at_least: int) -> bool:
    n = await count(
        db,
        "SELECT count(*) FROM stoker.schedule_ticks WHERE schedule = 'reports' AND state = $1",
        state,
    )
    return n >= at_least


async def test_failed_runs_are_red_in_the_strip_and_the_chart(
    daemons: DaemonFactory, db: asyncpg.Connection, browser: Browser
) -> None:
    base = await start(daemons, "")
    # A schedule made at run time that succeeds, fails for a while, then succeeds again: its
    # kind is changed in between (the timetable, and so the cursor, stays).
    sleep = {"seconds": 0.2}
    await save_schedule(
        db, name="reports", cron="* * * * * *", overlap="allow", kind="test.sleep", payload=sleep
    )
    await eventually(lambda: _runs(db, "succeeded", 3), timeout=15)
    await save_schedule(
        db, name="reports", cron="* * * * * *", overlap="allow", kind="test.permanent"
    )
    await eventually(lambda: _runs(db, "failed", 2), timeout=15)
    await save_schedule(
        db, name="reports", cron="* * * * * *", overlap="allow", kind="test.sleep", payload=sleep
    )
    await eventually(lambda: _runs(db, "succeeded", 5), timeout=15)

    page: Page = await browser.new_page()
    await sign_in(page, base)
    await page.goto(f"{base}/dashboard/schedules")
    row = page.locator("#schedule-reports")
    assert await row.locator(".strip .cell.failed").count() >= 2
    assert await row.locator(".strip .cell.succeeded").count() >= 3
    await screenshot(page, "schedules")
    await row.locator("a", has_text="reports").click()
    await page.wait_for_url(f"{base}/dashboard/schedules/reports")
    assert await page.locator("svg.chart rect.bar.failed").count() >= 2
    assert await page.locator("svg.chart rect.bar.succeeded").count() >= 3
    assert await page.locator("table.ledger tr.run-fired .error").count() >= 2
    await screenshot(page, "schedule")
