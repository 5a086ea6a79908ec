"""daemon.client on async connections (asyncpg, psycopg 3, SQLAlchemy): enqueue inside the
caller's transaction, save_schedule, get_job, wait_for; each against a real database."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest

from daemon import client
from daemon.store import queries
from tests.client_drivers import ASYNC_DRIVERS, async_tx
from tests.conftest import DaemonFactory, eventually, write_outcome


async def _finish(db: asyncpg.Connection, job_id: int, outcome: str = "succeeded") -> None:
    """Claim and finish a job as a daemon does (claim, then the outcome write)."""
    claimed = await db.fetch(queries.CLAIM, "default", 10, "w", 30.0)
    assert job_id in [r["id"] for r in claimed]
    await write_outcome(db, job_id, attempt=1, outcome=outcome, worker="w", error="boom")


@pytest.mark.parametrize("driver", ASYNC_DRIVERS)
async def test_rolled_back_enqueue_leaves_nothing(
    dsn: str, db: asyncpg.Connection, driver: str
) -> None:
    async with async_tx(dsn, driver) as tx:
        job_id = await client.enqueue(tx.conn, queue="default", kind="test.record")
        [many] = await client.enqueue_many(tx.conn, [client.Job("default", "test.record")])
        await tx.rollback()
    assert (
        await db.fetchval("SELECT count(*) FROM stoker.jobs WHERE id IN ($1, $2)", job_id, many)
        == 0
    )


@pytest.mark.parametrize("driver", ASYNC_DRIVERS)
async def test_committed_enqueue_is_queued_with_every_field(
    dsn: str, db: asyncpg.Connection, driver: str
) -> None:
    run_at = datetime.now(UTC) + timedelta(minutes=5)
    async with async_tx(dsn, driver) as tx:
        job_id = await client.enqueue(
            tx.conn,
            queue="reports",
            kind="reports.build",
            payload={"n": 1},
            run_at=run_at,
            priority=3,
            unique_key="u-1",
            max_attempts=4,
            meta={"org": "org_1"},
            concurrency_key="org_1",
        )
        again = await client.enqueue(tx.conn, queue="reports", kind="x", unique_key="u-1")
        ids = await client.enqueue_many(
            tx.conn,
            [
                client.Job("default", "a", payload={"i": 1}, meta={"org": "o"}),
                client.Job("default", "b", run_at=run_at.replace(tzinfo=None), priority=2),
                client.Job("default", "c", unique_key="u-1"),  # held: skipped
            ],
        )
        seen = await client.get_job(tx.conn, job_id)
        await tx.commit()
    assert again == job_id
    assert seen is not None and (seen.state, seen.kind, seen.finished) == (
        "queued",
        "reports.build",
        False,
    )
    row = await db.fetchrow("SELECT * FROM stoker.jobs WHERE id = $1", job_id)
    assert row is not None
    assert (row["payload"], row["meta"], row["priority"], row["max_attempts"]) == (
        {"n": 1},
        {"org": "org_1"},
        3,
        4,
    )
    assert (row["run_at"], row["concurrency_key"], row["unique_key"]) == (run_at, "org_1", "u-1")
    assert len(ids) == 2
    rows = await db.fetch(
        "SELECT kind, run_at, priority FROM stoker.jobs WHERE id = ANY($1) ORDER BY id", ids
    )
    assert [r["kind"] for r in rows] == ["a", "b"]
    assert rows[1]["run_at"] == run_at  # a naive datetime is UTC, whatever the driver
    assert rows[1]["priority"] == 2


async def test_committed_job_runs_once_in_a_daemon(dsn: str, daemons: DaemonFactory) -> None:
    await daemons.start("[queues.default]\nconcurrency = 2\n")
    async with async_tx(dsn, "psycopg") as tx:
        job_id = await client.enqueue(
            tx.conn, queue="default", kind="test.record", payload={"label": "once"}
        )
        await tx.commit()
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=2)
    try:
        done = await client.wait_for(pool, job_id, timeout=30)
    finally:
        await pool.close()
    assert (done.id, done.state, done.finished_at is not None) == (job_id, "succeeded", True)

    def runs() -> list[dict[str, object]]:
        return [e for e in daemons.started[0].events() if e["id"] == job_id]

    async def ran() -> bool:
        return len(runs()) == 1

    await eventually(ran)
    await asyncio.sleep(0)
    assert len(runs()) == 1


@pytest.mark.parametrize("driver", ASYNC_DRIVERS)
async def test_wait_for_returns_the_finished_job(
    dsn: str, db: asyncpg.Connection, driver: str
) -> None:
    async with async_tx(dsn, driver) as tx:
        job_id = await client.enqueue(tx.conn, queue="default", kind="test.record")
        await tx.commit()
        waiting = asyncio.create_task(client.wait_for(tx.conn, job_id, timeout=20))

        async def registered() -> bool:
            return bool(
                await db.fetchval(
                    "SELECT count(*) FROM stoker.job_waiters WHERE job_id = $1", job_id
                )
            )

        await eventually(registered)
        await _finish(db, job_id, "failed")
        done = await waiting
    assert (done.id, done.state, done.error, done.finished) == (job_id, "failed", "boom", True)
    assert await db.fetchval("SELECT count(*) FROM stoker.job_waiters") == 0


@pytest.mark.parametrize("driver", ASYNC_DRIVERS)
async def test_wait_for_a_job_already_finished_and_timeout(
    dsn: str, db: asyncpg.Connection, driver: str
) -> None:
    done_id = await client.enqueue(db, queue="default", kind="test.record")
    await _finish(db, done_id)
    stuck_id = await client.enqueue(db, queue="other", kind="test.record")
    async with async_tx(dsn, driver) as tx:
        await tx.commit()
        done = await client.wait_for(tx.conn, done_id, timeout=5)
        assert (done.state, done.result) == ("succeeded", None)
        started = asyncio.get_running_loop().time()
        with pytest.raises(TimeoutError):
            await client.wait_for(tx.conn, stuck_id, timeout=0.5)
        assert asyncio.get_running_loop().time() - started < 5
        with pytest.raises(LookupError, match="no job with id 999999"):
            await client.wait_for(tx.conn, 999999, timeout=5)
    assert await db.fetchval("SELECT count(*) FROM stoker.job_waiters") == 0


async def test_wait_for_refuses_a_connection_inside_a_transaction(dsn: str) -> None:
    async with async_tx(dsn, "asyncpg") as tx:
        with pytest.raises(ValueError, match="outside a transaction"):
            await client.wait_for(tx.conn, 1, timeout=1)
    async with async_tx(dsn, "psycopg") as tx:
        await client.get_job(tx.conn, 1)  # opens the transaction
        with pytest.raises(ValueError, match="outside a transaction"):
            await client.wait_for(tx.conn, 1, timeout=1)


async def test_no_waiter_no_notify(db: asyncpg.Connection, dsn: str) -> None:
    """A finished job announces itself only while someone waits for it."""
    heard: list[str] = []
    listener = await asyncpg.connect(dsn)
    try:
        await listener.add_listener("stoker_done", lambda *a: heard.append(a[3]))
        quiet = await client.enqueue(db, queue="default", kind="k")
        await _finish(db, quiet)
        loud = await client.enqueue(db, queue="default", kind="k")
        await db.execute("INSERT INTO stoker.job_waiters (job_id) VALUES ($1)", loud)
        await _finish(db, loud)

        async def got() -> bool:
            return str(loud) in heard

        await eventually(got)
        assert str(quiet) not in heard
    finally:
        await listener.close()


@pytest.mark.parametrize("driver", ASYNC_DRIVERS)
async def test_save_schedule_in_the_callers_transaction(
    dsn: str, db: asyncpg.Connection, driver: str
) -> None:
    async with async_tx(dsn, driver) as tx:
        await client.save_schedule(
            tx.conn,
            name="nightly",
            cron="0 3 * * *",
            kind="reports.build",
            timezone="Europe/Paris",
            payload={"x": 1},
            overlap="allow",
        )
        await client.save_schedule(tx.conn, name="nightly", cron="0 4 * * *", kind="reports.build")
        await tx.commit()
    row = await db.fetchrow(
        "SELECT cron, timezone, overlap FROM stoker.schedules WHERE name = 'nightly'"
    )
    assert row is not None and tuple(row) == ("0 4 * * *", "UTC", "skip")


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"cron": "61 * * * *"}, "cron"),
        ({"cron": "* * *"}, "cron"),
        ({"timezone": "Mars/Olympus"}, "timezone"),
        ({"overlap": "sometimes"}, "overlap"),
        ({"colour": "red"}, "colour"),
    ],
)
async def test_save_schedule_names_the_bad_field(
    db: asyncpg.Connection, fields: dict[str, str], named: str
) -> None:
    args: dict[str, Any] = {"name": "s", "cron": "* * * * *", "kind": "k", **fields}
    with pytest.raises(ValueError, match=named):
        await client.save_schedule(db, **args)
    with pytest.raises(ValueError, match="name"):
        await client.save_schedule(db, name="Bad Name", cron="* * * * *", kind="k")
    assert await db.fetchval("SELECT count(*) FROM stoker.schedules") == 0


async def test_unsupported_connection_is_a_clear_type_error() -> None:
    with pytest.raises(TypeError, match="unsupported connection"):
        await client.enqueue(object(), queue="q", kind="k")


async def test_wait_for_sees_an_end_whose_statement_ran_before_it_registered(
    dsn: str, db: asyncpg.Connection
) -> None:
    """The outcome's statement ran with no waiter in sight (so it will not NOTIFY) and commits
    only after wait_for has registered and looked: the look waits on the job's row lock."""
    job_id = await client.enqueue(db, queue="default", kind="k")
    await db.fetch(queries.CLAIM, "default", 1, "w", 30.0)
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=2)
    try:
        tx = db.transaction()
        await tx.start()
        await write_outcome(db, job_id, attempt=1, outcome="succeeded", worker="w")
        waiting = asyncio.create_task(client.wait_for(pool, job_id, timeout=20))

        async def blocked_on_the_row() -> bool:
            return bool(
                await pool.fetchval(
                    "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                    " AND query LIKE '%FOR KEY SHARE%'"
                )
            )

        await eventually(blocked_on_the_row)
        await tx.commit()
        done = await waiting
    finally:
        await pool.close()
    assert (done.id, done.state) == (job_id, "succeeded")


@pytest.mark.parametrize("how", ["stoker.cancel", "bulk"])
async def test_wait_for_a_cancelled_job(dsn: str, db: asyncpg.Connection, how: str) -> None:
    from daemon.operate import jobs as operate_jobs

    job_id = await client.enqueue(db, queue="default", kind="k")
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=2)
    try:
        waiting = asyncio.create_task(client.wait_for(pool, job_id, timeout=20))

        async def registered() -> bool:
            return bool(await db.fetchval("SELECT count(*) FROM stoker.job_waiters"))

        await eventually(registered)
        if how == "bulk":
            await operate_jobs.cancel_jobs(db, [job_id])
        else:
            await db.execute("SELECT stoker.cancel($1, 'test')", job_id)
        done = await waiting
    finally:
        await pool.close()
    assert (done.id, done.state) == (job_id, "cancelled")
