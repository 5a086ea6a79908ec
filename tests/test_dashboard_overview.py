"""The dashboard's overview, queues and audit log in a real browser (Debian's Chromium through
Playwright): the overview shows the queues' sampled counts and the daemon alive as leader;
pausing a queue stops claiming and resuming starts it again, seen without a reload; a viewer
sees no button and a forged action is refused, as is an action without the CSRF token; the
audit log lists the pause with its role and address."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import asyncpg
from playwright.async_api import Browser, Dialog, Page, expect

from daemon.enqueue import enqueue
from daemon.operate import throughput
from tests.browser import DASHBOARD_CONFIG, VIEWER_TOKEN, http_port, screenshot, sign_in
from tests.conftest import DaemonFactory, eventually, finished

WORKER = "dash-overview-1"
CONFIG = (
    f'worker_id = "{WORKER}"\n'
    + DASHBOARD_CONFIG
    + """
[queues.default]
concurrency = 2
[queues.mail]
concurrency = 1
"""
)
TIMEOUT = 15_000  # ms: the live refresh runs every 2 s, the sampler every 0.3 s here


async def start(daemons: DaemonFactory) -> str:
    daemon = await daemons.start(CONFIG, STOKER_HTTP__DEPTH_SAMPLE_INTERVAL="0.3")
    return f"http://127.0.0.1:{http_port(daemon.log())}"


def accept_dialogs(page: Page) -> None:
    async def accept(dialog: Dialog) -> None:
        await dialog.accept()

    page.on("dialog", accept)


async def paused(db: asyncpg.Connection, queue: str) -> bool:
    return bool(await db.fetchval("SELECT paused FROM stoker.queues WHERE name = $1", queue))


async def test_overview_pause_and_resume_a_queue_and_the_audit_log(
    daemons: DaemonFactory, browser: Browser, db: asyncpg.Connection
) -> None:
    base = await start(daemons)
    later = datetime.now(UTC) + timedelta(hours=1)
    for _ in range(2):
        await enqueue(db, queue="mail", kind="test.sleep", payload={"seconds": 0}, run_at=later)
    page = await browser.new_page()
    accept_dialogs(page)
    await sign_in(page, base)

    # The overview: the queues with their sampled counts, the daemon alive and leading.
    mail = page.locator("table.queues tr[data-queue=mail]")
    await expect(mail.locator("td.queued")).to_have_text("2", timeout=TIMEOUT)
    await expect(page.locator("table.queues tr[data-queue=default]")).to_be_visible()
    me = page.locator(f"table.daemons tr[data-worker={WORKER}]")
    await expect(me).to_contain_text("default, mail")
    await expect(me).to_contain_text("leader", timeout=TIMEOUT)
    await expect(page.locator("svg.chart")).to_have_count(2)
    await screenshot(page, "overview")

    # Pause: the row says so without a reload; a job enqueued now stays queued.
    await page.goto(f"{base}/dashboard/queues")
    row = page.locator("table.queues tr[data-queue=default]")
    await row.get_by_role("button", name="Pause").click()
    await expect(row.locator(".paused-state")).to_have_text("paused")
    assert await paused(db, "default")
    job = await enqueue(db, queue="default", kind="test.sleep", payload={"seconds": 0})
    # Seen queued by a sample taken after the enqueue (and its notification) went out.
    await expect(row.locator("td.queued")).to_have_text("1", timeout=TIMEOUT)
    state = await db.fetchval("SELECT state::text FROM stoker.jobs WHERE id = $1", job)
    assert state == "queued"
    await screenshot(page, "queues")

    # Resume: the job runs, and the page shows the queue running and empty again.
    await row.get_by_role("button", name="Resume").click()
    assert (await finished(db, job))["state"] == "succeeded"
    await expect(row.locator(".paused-state")).to_have_text("running", timeout=TIMEOUT)
    await expect(row.locator("td.queued")).to_have_text("0", timeout=TIMEOUT)

    # The audit log: newest first, with the role and the address.
    await page.goto(f"{base}/dashboard/audit")
    entries = page.locator("table.audit tbody tr")
    await expect(entries).to_have_count(2)
    await expect(entries.nth(0).locator(".action-name")).to_have_text("queue.resume")
    await expect(entries.nth(1).locator(".action-name")).to_have_text("queue.pause")
    await expect(entries.nth(1).locator(".target")).to_have_text("default")
    await expect(entries.nth(1)).to_contain_text("admin")
    await expect(entries.nth(1).locator(".address")).to_have_text("127.0.0.1")
    await screenshot(page, "audit")


async def test_a_viewer_sees_no_button_and_forged_or_unsigned_actions_are_refused(
    daemons: DaemonFactory, browser: Browser, db: asyncpg.Connection
) -> None:
    base = await start(daemons)
    viewer = await browser.new_page()
    await sign_in(viewer, base, VIEWER_TOKEN)
    await viewer.goto(f"{base}/dashboard/queues")
    row = viewer.locator("table.queues tr[data-queue=default]")
    await expect(row).to_be_visible()
    await expect(viewer.get_by_role("button", name="Pause")).to_have_count(0)
    await expect(viewer.get_by_role("button", name="Resume")).to_have_count(0)
    # A forged POST with the viewer's session and even its own valid CSRF token.
    csrf = await viewer.locator("main").get_attribute("data-csrf")
    assert csrf
    forged = await viewer.request.post(
        f"{base}/dashboard/queues/default/pause",
        form={"csrf": csrf, "back": "/dashboard/queues"},
        max_redirects=0,
    )
    assert forged.status == 403
    assert "look but not act" in await forged.text()

    # An admin's action without the CSRF token is refused, and changes nothing.
    admin = await browser.new_page()
    await sign_in(admin, base)
    unsigned = await admin.request.post(
        f"{base}/dashboard/queues/default/pause",
        form={"back": "/dashboard/queues"},
        max_redirects=0,
    )
    assert unsigned.status == 403
    assert "CSRF" in await unsigned.text()
    wrong = await admin.request.post(
        f"{base}/dashboard/queues/default/pause",
        form={"csrf": csrf, "back": "/dashboard/queues"},  # the viewer's token, not ours
        max_redirects=0,
    )
    assert wrong.status == 403
    assert not await paused(db, "default")
    assert await db.fetchval("SELECT count(*) FROM stoker.audit_log") == 0

    # The overview says when the sample is still pending or how old it is, never a count
    # taken at request time.
    await admin.goto(f"{base}/dashboard/")
    await expect(admin.locator(".sample-age, .sample-pending")).to_have_count(1)

    async def registered() -> str | None:
        row = await db.fetchrow("SELECT * FROM stoker.workers WHERE worker = $1", WORKER)
        return json.dumps(dict(row), default=str) if row else None

    assert "default" in await eventually(registered)


async def test_the_throughput_pass_counts_closed_minutes_once_whatever_it_is_run(
    db: asyncpg.Connection,
) -> None:
    await db.execute(
        """INSERT INTO stoker.job_history (id, queue, kind, payload, meta, priority, state,
               run_at, attempts, errors, created_at, started_at, finished_at)
           SELECT 900000 + i, 'mail', 'noop', '{}', '{}', 0,
                  CASE WHEN i % 4 = 0 THEN 'failed' ELSE 'succeeded' END::stoker.job_state,
                  t, 1, '[]', t, t, t
             FROM generate_series(1, 12) AS i,
                  LATERAL (SELECT date_trunc('minute', now()) - make_interval(mins => i % 3)
                                  + interval '5 seconds') AS x(t)"""
    )
    for _ in range(2):  # idempotent
        await throughput.record(db)
    rows = await db.fetch(
        """SELECT extract(epoch FROM date_trunc('minute', now()) - minute)::int / 60 AS back,
                  completed, failed
             FROM stoker.throughput WHERE queue = 'mail' ORDER BY minute"""
    )
    # The minute in progress is not counted yet; the two closed ones are, 4 jobs each.
    assert [tuple(r) for r in rows] == [(2, 3, 1), (1, 3, 1)]
    rates = await throughput.rates(db)
    assert rates["mail"] == (6 / 5, 2 / 5)
