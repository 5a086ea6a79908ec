"""Cancelling a running job (issue 17) with real daemons and a real PostgreSQL: the admin API,
the CLI and plain SQL (stoker.cancel); the handler sees ctx.cancelled, one that ignores it is
interrupted after cancel_grace, a command's process group is stopped, the job ends cancelled
and never runs again, and a cancel racing the job's own end leaves exactly one final state."""

from __future__ import annotations

import asyncio
import json
import random
import time
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg

from handlers.command import group_alive
from tests.conftest import DaemonFactory, eventually, stoker_cli, write_outcome
from tests.test_handler_command import gone, pid_file, script, strays  # noqa: F401
from tests.test_http import http_port

TOKEN = "c" * 32


async def enqueue(
    db: asyncpg.Connection, kind: str, payload: dict[str, Any], queue: str = "default"
) -> int:
    job_id: int = await db.fetchval(
        "INSERT INTO stoker.jobs (queue, kind, payload) VALUES ($1, $2, $3) RETURNING id",
        queue,
        kind,
        payload,
    )
    return job_id


async def state_of(db: asyncpg.Connection, job_id: int) -> str | None:
    state: str | None = await db.fetchval(
        "SELECT state::text FROM stoker.all_jobs WHERE id = $1", job_id
    )
    return state


async def wait_state(
    db: asyncpg.Connection, job_id: int, wanted: str, timeout: float = 20
) -> asyncpg.Record:
    async def check() -> asyncpg.Record | None:
        row: asyncpg.Record | None = await db.fetchrow(
            "SELECT * FROM stoker.job_history WHERE id = $1 AND state::text = $2", job_id, wanted
        )
        return row

    return await eventually(check, timeout, interval=0.01)


async def wait_active(db: asyncpg.Connection, ids: list[int], timeout: float = 20) -> None:
    async def check() -> bool:
        n: int = await db.fetchval(
            "SELECT count(*) FROM stoker.jobs WHERE id = ANY($1) AND state = 'active'", ids
        )
        return n == len(ids)

    await eventually(check, timeout)


def events(tmp: Path) -> list[dict[str, Any]]:
    path = tmp / "events.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line]


async def wait_started(tmp: Path, ids: list[int]) -> None:
    """Until each job's handler has begun (claimed is not enough)."""

    async def check() -> bool:
        return set(ids) <= {e["id"] for e in events(tmp) if e["event"] == "start"}

    await eventually(check)


async def test_three_daemons_a_running_job_cancelled_through_the_api_stops_at_once(
    daemons: DaemonFactory, db: asyncpg.Connection, tmp_path: Path
) -> None:
    config = """
    lease_seconds = 30
    [queues.default]
    concurrency = 1
    poll_interval = 60
    """
    first = await daemons.start(config, STOKER_HTTP__ADMIN_TOKEN=TOKEN)
    await daemons.start(config)
    await daemons.start(config)
    port = await http_port(first)
    ids = [await enqueue(db, "test.cancellable", {"seconds": 120}) for _ in range(3)]
    await wait_active(db, ids)
    await wait_started(tmp_path, ids)
    workers = await db.fetch("SELECT DISTINCT worker FROM stoker.jobs WHERE id = ANY($1)", ids)
    assert len(workers) == 3  # one on each daemon: each is cancelled from the first's API
    headers = {"Authorization": f"Bearer {TOKEN}"}
    async with aiohttp.ClientSession(headers=headers) as http:
        for job_id in ids:
            started = time.monotonic()
            async with http.post(f"http://127.0.0.1:{port}/api/v1/jobs/{job_id}/cancel") as r:
                assert r.status == 200, await r.text()
                assert await r.json() == {"cancelled": False, "cancel_requested": True}
            row = await wait_state(db, job_id, "cancelled")
            took = time.monotonic() - started
            assert took < 1.0, f"job {job_id} took {took:.2f}s to stop"
            assert row["attempts"] == 1
            assert row["last_error"].startswith("cancelled by the admin API at ")
            # A handler that returns once ctx.cancelled is set still ends cancelled; its
            # result is kept.
            assert row["result"] == {"stopped": True}
        # Finished: 409, saying so.
        async with http.post(f"http://127.0.0.1:{port}/api/v1/jobs/{ids[0]}/cancel") as r:
            assert r.status == 409
            body = await r.json()
            assert body["error"] == f"job {ids[0]} is already cancelled"
        async with http.post(f"http://127.0.0.1:{port}/api/v1/jobs/nope/cancel") as r:
            assert r.status in (400, 404, 422)
            assert "id" in await r.text()
    # Never retried: each ran once, and nothing of them is left to run.
    await asyncio.sleep(1.5)
    starts = [e["id"] for e in events(tmp_path) if e["event"] == "start"]
    assert sorted(starts) == sorted(ids)
    assert await db.fetchval("SELECT count(*) FROM stoker.jobs WHERE id = ANY($1)", ids) == 0
    stopped = {e["id"] for e in events(tmp_path) if e["event"] == "stopped"}
    assert stopped == set(ids)


async def test_a_handler_that_ignores_the_cancel_is_interrupted_after_cancel_grace(
    daemons: DaemonFactory, db: asyncpg.Connection, tmp_path: Path
) -> None:
    await daemons.start(
        """
        cancel_grace = 30
        [queues.default]
        poll_interval = 60
        cancel_grace = 1.5
        """
    )
    job_id = await enqueue(db, "test.cancellable", {"seconds": 120, "watch": False})
    await wait_started(tmp_path, [job_id])
    started = time.monotonic()
    # Plain SQL, as any client could.
    assert await db.fetchval("SELECT stoker.cancel($1)", job_id) == "requested"
    assert await db.fetchval("SELECT stoker.cancel($1)", job_id) == "requested"  # idempotent
    row = await wait_state(db, job_id, "cancelled", timeout=10)
    took = time.monotonic() - started
    assert 1.5 <= took < 2.5, took
    assert row["last_error"].startswith("cancelled by sql:")
    assert [e["event"] for e in events(tmp_path) if e["id"] == job_id] == ["start", "interrupted"]
    assert await db.fetchval("SELECT stoker.cancel($1)", job_id) == "already cancelled"
    # A queued job is cancelled at once; an unknown one is said so.
    queued = await db.fetchval(
        "INSERT INTO stoker.jobs (queue, kind, run_at) VALUES ('default', 'noop', "
        "now() + interval '1 hour') RETURNING id"
    )
    assert await db.fetchval("SELECT stoker.cancel($1, 'a trigger')", queued) == "cancelled"
    assert await state_of(db, queued) == "cancelled"
    assert (
        await db.fetchval("SELECT last_error FROM stoker.job_history WHERE id = $1", queued)
    ).startswith("cancelled by a trigger at ")
    assert await db.fetchval("SELECT stoker.cancel(987654321)") == "not found"


async def test_a_cancelled_command_loses_its_whole_process_group(
    daemons: DaemonFactory,
    db: asyncpg.Connection,
    strays: Path,  # noqa: F811
) -> None:
    tmp = strays
    body = f"""
        sh -c 'echo $$ > {tmp}/grandchild.pid; exec sleep 60' &
        echo $$ > {tmp}/main.pid
        sleep 60
        """
    slow = script(tmp, "slow.sh", body)
    config = daemons.write_config(
        f"""
        [queues.default]
        poll_interval = 60
        cancel_grace = 0.5
        [commands.slow]
        argv = ["/bin/sh", "{slow}"]
        kill_grace = 1
        """,
        "cli.toml",
    )
    await daemons.start_files([config])
    job_id = await enqueue(db, "command.run", {"command": "slow"})
    main = await pid_file(tmp / "main.pid")
    grandchild = await pid_file(tmp / "grandchild.pid")
    assert group_alive(main)
    done = await asyncio.to_thread(stoker_cli, daemons.dsn, "jobs", "cancel", str(job_id))
    assert done.returncode == 0, done.stderr
    assert f"cancel requested for running job {job_id}" in done.stdout
    row = await wait_state(db, job_id, "cancelled", timeout=15)
    assert "stoker jobs cancel" in row["last_error"]
    assert not group_alive(main)
    assert gone(main) and gone(grandchild)
    again = await asyncio.to_thread(stoker_cli, daemons.dsn, "jobs", "cancel", str(job_id))
    assert again.returncode != 0
    assert f"job {job_id} is already cancelled" in again.stderr
    bad = await asyncio.to_thread(stoker_cli, daemons.dsn, "jobs", "cancel", "x1")
    assert bad.returncode != 0 and "id" in bad.stderr


async def test_cancels_racing_the_jobs_own_ends_leave_exactly_one_final_state(
    daemons: DaemonFactory, db: asyncpg.Connection, tmp_path: Path, dsn: str
) -> None:
    # 600 short jobs that record each run, and 150 that fail twice before they succeed (their
    # retries race the cancels too), on three daemons; 375 cancels fired at random moments
    # from 6 connections, each going through its share in the order the jobs are claimed.
    config = """
    cancel_grace = 0.05
    flush_interval = 0.005
    [queues.default]
    concurrency = 20
    poll_interval = 60
    max_attempts = 5
    backoff = { base = 0.02, cap = 0.1, jitter = 0 }
    """
    for _ in range(3):
        await daemons.start(config)
    rng = random.Random(17)
    n, n_flaky = 600, 150
    payloads = [
        json.dumps({"seconds": rng.choice([0, 0.002, 0.01, 0.03, 0.08]), "label": str(i)})
        for i in range(n)
    ]
    ids: list[int] = [
        r["id"]
        for r in await db.fetch(
            "INSERT INTO stoker.jobs (queue, kind, payload) "
            "SELECT 'default', 'test.record', p::jsonb FROM unnest($1::text[]) AS p RETURNING id",
            payloads,
        )
    ]
    flaky: list[int] = [
        r["id"]
        for r in await db.fetch(
            "INSERT INTO stoker.jobs (queue, kind, payload) SELECT 'default', 'test.flaky', "
            "'{\"succeed_on\": 3}' FROM generate_series(1, $1) RETURNING id",
            n_flaky,
        )
    ]
    everything = ids + flaky
    answers: dict[int, str] = {}

    async def cancel_some(targets: list[int]) -> None:
        conn = await asyncpg.connect(dsn)
        try:
            for job_id in targets:
                await asyncio.sleep(rng.random() * 0.006)
                answers[job_id] = await conn.fetchval("SELECT stoker.cancel($1)", job_id)
        finally:
            await conn.close()

    targets = sorted(rng.sample(ids, n // 2) + rng.sample(flaky, n_flaky // 2))
    await asyncio.gather(*(cancel_some(targets[i::6]) for i in range(6)))

    async def all_done() -> bool:
        left: int = await db.fetchval(
            "SELECT count(*) FROM stoker.jobs WHERE id = ANY($1)", everything
        )
        return left == 0

    await eventually(all_done, timeout=60)
    await asyncio.sleep(0.5)
    rows = await db.fetch(
        "SELECT id, state::text AS state, attempts, count(*) OVER (PARTITION BY id) AS n "
        "FROM stoker.all_jobs WHERE id = ANY($1)",
        everything,
    )
    assert len(rows) == len(everything) and all(r["n"] == 1 for r in rows)
    final = {r["id"]: r["state"] for r in rows}
    runs: dict[int, int] = {}
    for e in events(tmp_path):
        runs[e["id"]] = runs.get(e["id"], 0) + 1
    assert all(count == 1 for count in runs.values()), "a job ran twice"
    kinds: dict[str, int] = {}
    for job_id in everything:
        answer = answers.get(job_id)
        state = final[job_id]
        if answer is None:
            assert state == "succeeded"
        elif answer == "cancelled":  # it was queued (a first run, or a retry): no more runs
            assert state == "cancelled"
            assert job_id not in runs
        elif answer == "requested":  # it ran: stopped, or its own end came first
            assert state in ("cancelled", "succeeded")
        else:
            assert answer == f"already {state}", (job_id, answer, state)
        kind = "flaky " if job_id in flaky else ""
        kinds[f"{kind}{answer}->{state}"] = kinds.get(f"{kind}{answer}->{state}", 0) + 1
    print(kinds)
    # The hammer hit the racing cases (a fixed seed, timing aside). Whether some cancels
    # still find their job queued depends on the machine's speed (none did in one CI run);
    # cancelling a queued job is tested on its own (the SQL test).
    assert kinds.get("already succeeded->succeeded", 0) > 0
    assert kinds.get("requested->cancelled", 0) + kinds.get("requested->succeeded", 0) > 0


async def test_a_killed_daemons_job_with_a_cancel_request_is_not_run_again(
    daemons: DaemonFactory, db: asyncpg.Connection, tmp_path: Path
) -> None:
    config = """
    lease_seconds = 3
    rescue_interval = 0.5
    [queues.default]
    poll_interval = 1
    """
    first = await daemons.start(config)
    job_id = await enqueue(db, "test.cancellable", {"seconds": 120, "watch": False})

    await wait_started(tmp_path, [job_id])
    first.proc.kill()
    await first.wait_exit()
    # Nobody hears the NOTIFY; the request waits on the row.
    assert await db.fetchval("SELECT stoker.cancel($1)", job_id) == "requested"
    second = await daemons.start(config)
    row = await wait_state(db, job_id, "cancelled", timeout=15)
    assert row["last_error"].startswith("cancelled by sql:")
    await asyncio.sleep(1.5)
    assert [e["event"] for e in events(tmp_path) if e["id"] == job_id] == ["start"]
    assert "it had a cancel request: cancelled" in second.log()


async def claimed(db: asyncpg.Connection, worker: str = "w") -> int:
    """A job claimed by `worker` (attempt 1), as a daemon's claim leaves it."""
    job_id: int = await db.fetchval(
        "INSERT INTO stoker.jobs (queue, kind, state, attempts, worker, started_at, "
        "lease_expires_at) VALUES ('default', 'noop', 'active', 1, $1, now(), "
        "now() + interval '30 s') RETURNING id",
        worker,
    )
    return job_id


async def requeue(conn: asyncpg.Connection, job_id: int, outcome: str) -> list[asyncpg.Record]:
    from daemon.store import queries

    rows: list[asyncpg.Record] = await conn.fetch(
        queries.COMPLETE,
        [],
        [],
        [],
        [],
        [],
        [],
        [job_id],
        [1],
        [outcome],
        ["boom"],
        [None],
        [0.0],
        "w",
    )
    return rows


async def test_a_retry_written_while_a_cancel_holds_the_row_ends_cancelled(
    db: asyncpg.Connection, dsn: str
) -> None:
    # The daemon decided to retry (it had not heard of the cancel), and writes it while the
    # cancel's transaction holds the row: the write waits, then sees the request.
    job_id = await claimed(db)
    other = await asyncpg.connect(dsn)
    try:
        tx = other.transaction()
        await tx.start()
        assert await other.fetchval("SELECT stoker.cancel($1, 'racer')", job_id) == "requested"
        write = asyncio.ensure_future(requeue(db, job_id, "retry"))
        await asyncio.sleep(0.3)
        assert not write.done()  # waiting for the row lock
        await tx.commit()
        rows = await write
    finally:
        await other.close()
    assert [(r["id"], r["run_at"], r["cancelled_here"]) for r in rows] == [(job_id, None, True)]
    row = await db.fetchrow("SELECT * FROM stoker.jobs WHERE id = $1", job_id)
    assert row["state"] == "cancelled" and row["attempts"] == 1
    assert row["last_error"].startswith("cancelled by racer at ")
    from daemon.engine.maintenance import move_parked
    from daemon.store.db import create_pool

    pool = await create_pool(dsn, max_size=1)
    try:
        assert await move_parked(pool) == 1
    finally:
        await pool.close()
    assert await state_of(db, job_id) == "cancelled"
    assert await db.fetchval("SELECT count(*) FROM stoker.jobs WHERE id = $1", job_id) == 0


async def test_a_cancel_waiting_for_an_outcome_write_says_the_job_finished(
    db: asyncpg.Connection, dsn: str
) -> None:
    job_id = await claimed(db)
    other = await asyncpg.connect(dsn)
    try:
        tx = other.transaction()
        await tx.start()
        await write_outcome(other, job_id, attempt=1, outcome="succeeded", worker="w")
        cancel = asyncio.ensure_future(db.fetchval("SELECT stoker.cancel($1)", job_id))
        await asyncio.sleep(0.3)
        assert not cancel.done()
        await tx.commit()
        assert await cancel == "already succeeded"
    finally:
        await other.close()
    assert await state_of(db, job_id) == "succeeded"
    # And a handback of a job with a request ends cancelled, its attempt kept.
    handed = await claimed(db)
    assert await db.fetchval("SELECT stoker.cancel($1)", handed) == "requested"
    rows = await requeue(db, handed, "handback")
    assert rows[0]["cancelled_here"]
    row = await db.fetchrow("SELECT state::text, attempts FROM stoker.jobs WHERE id = $1", handed)
    assert (row["state"], row["attempts"]) == ("cancelled", 1)


async def test_the_dashboard_cancels_a_running_job_from_its_page(
    daemons: DaemonFactory, browser: Any, db: asyncpg.Connection
) -> None:
    from playwright.async_api import Dialog, expect

    from tests.browser import DASHBOARD_CONFIG, sign_in
    from tests.browser import http_port as port_in

    running = await daemons.start(DASHBOARD_CONFIG)
    base = f"http://127.0.0.1:{port_in(running.log())}"
    job_id = await enqueue(db, "test.cancellable", {"seconds": 120})
    await wait_active(db, [job_id])
    context = await browser.new_context()
    page = await context.new_page()
    await sign_in(page, base)
    asked: list[str] = []

    async def accept(dialog: Dialog) -> None:
        asked.append(dialog.message)
        await dialog.accept()

    page.on("dialog", accept)
    await page.goto(f"{base}/dashboard/jobs/{job_id}")
    await expect(page.locator("#job-state")).to_have_text("active")
    await page.click("button:has-text('Cancel')")
    row = await wait_state(db, job_id, "cancelled", timeout=5)
    assert row["last_error"].startswith("cancelled by the dashboard at ")
    assert asked == [f"Cancel job {job_id}?"]
    await page.goto(f"{base}/dashboard/jobs/{job_id}")
    await expect(page.locator("#job-state")).to_have_text("cancelled")
    await expect(page.locator("main button:has-text('Cancel')")).to_have_count(0)


async def test_a_bare_notify_without_a_cancel_request_stops_nothing(
    daemons: DaemonFactory, db: asyncpg.Connection, tmp_path: Path
) -> None:
    # Any role that can connect may NOTIFY stoker_cancel: the daemon reads the request from
    # the job's row first.
    running = await daemons.start("[queues.default]\npoll_interval = 60\n")
    job_id = await enqueue(db, "test.cancellable", {"seconds": 120})
    await wait_active(db, [job_id])
    await db.execute("SELECT pg_notify('stoker_cancel', $1::text)", str(job_id))
    await running.wait_log("without a cancel request; ignored", timeout=5)
    assert await state_of(db, job_id) == "active"
    assert await db.fetchval("SELECT stoker.cancel($1)", job_id) == "requested"
    await wait_state(db, job_id, "cancelled", timeout=2)
