"""daemon.client's *_sync functions on psycopg 3 and SQLAlchemy (Connection, Session)."""

from __future__ import annotations

import asyncio
import threading

import asyncpg
import pytest

from daemon import client
from daemon.store import queries
from tests.client_drivers import SYNC_DRIVERS, sync_tx
from tests.conftest import eventually, write_outcome


@pytest.mark.parametrize("driver", SYNC_DRIVERS)
async def test_rollback_leaves_nothing_commit_queues(
    dsn: str, db: asyncpg.Connection, driver: str
) -> None:
    def produce() -> tuple[list[int], list[int]]:
        with sync_tx(dsn, driver) as tx:
            gone = [client.enqueue_sync(tx.conn, queue="default", kind="k", meta={"org": "o"})]
            gone += client.enqueue_many_sync(tx.conn, [client.Job("default", "k")])
            tx.rollback()
            kept = [client.enqueue_sync(tx.conn, queue="default", kind="k", payload=[1, 2])]
            kept += client.enqueue_many_sync(tx.conn, [client.Job("default", "k2")])
            client.save_schedule_sync(tx.conn, name="s", cron="*/5 * * * *", kind="k")
            status = client.get_job_sync(tx.conn, kept[0])
            assert status is not None and status.state == "queued"
            tx.commit()
        return gone, kept

    gone, kept = await asyncio.to_thread(produce)
    assert await db.fetchval("SELECT count(*) FROM stoker.jobs WHERE id = ANY($1)", gone) == 0
    rows = await db.fetch(
        "SELECT kind, payload FROM stoker.jobs WHERE id = ANY($1) ORDER BY id", kept
    )
    assert [(r["kind"], r["payload"]) for r in rows] == [("k", [1, 2]), ("k2", {})]
    claimed = await db.fetch(queries.CLAIM, "default", 10, "w", 30.0)
    assert sorted(r["id"] for r in claimed) == sorted(kept)
    assert await db.fetchval("SELECT cron FROM stoker.schedules WHERE name = 's'") == "*/5 * * * *"


@pytest.mark.parametrize("driver", SYNC_DRIVERS)
async def test_wait_for_sync_returns_the_finished_job_or_times_out(
    dsn: str, db: asyncpg.Connection, driver: str
) -> None:
    job_id = await client.enqueue(db, queue="default", kind="k")
    stuck = await client.enqueue(db, queue="other", kind="k")
    outcome: list[object] = []

    def wait() -> None:
        with sync_tx(dsn, driver) as tx:
            tx.commit()  # the caller's connection is idle: no transaction of its own open
            try:
                outcome.append(client.wait_for_sync(tx.conn, job_id, timeout=20))
                client.wait_for_sync(tx.conn, stuck, timeout=0.3)
            except TimeoutError as exc:
                outcome.append(exc)

    thread = threading.Thread(target=wait)
    thread.start()

    async def registered() -> bool:
        return bool(
            await db.fetchval("SELECT count(*) FROM stoker.job_waiters WHERE job_id = $1", job_id)
        )

    await eventually(registered)
    await db.fetch(queries.CLAIM, "default", 10, "w", 30.0)
    await write_outcome(db, job_id, attempt=1, outcome="succeeded", worker="w")
    await asyncio.to_thread(thread.join, 30)
    assert not thread.is_alive()
    done, timed_out = outcome
    assert isinstance(done, client.JobStatus) and (done.id, done.state) == (job_id, "succeeded")
    assert isinstance(timed_out, TimeoutError)
    assert await db.fetchval("SELECT count(*) FROM stoker.job_waiters") == 0
