"""Review of issue #18 (client, wait_for, meta filter, pooler probe, failover, Django): each
test is a bug found in review, seen failing (xfail, strict) before its fix and passing since.
The Django one lives in tests/test_django.py (it needs Django's setup of that module)."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Iterator

import asyncpg
import pytest

from daemon import client
from daemon.store.db import probe_pooling
from tests.conftest import eventually
from tests.pgbouncer import Bouncer, start_pgbouncer


@pytest.fixture
def small_bouncer(server_dsn: str) -> Iterator[Bouncer]:
    """pgbouncer in transaction mode with ONE server connection per pool (default_pool_size=1)."""
    bouncer = start_pgbouncer(server_dsn, pool_size=1)
    try:
        yield bouncer
    finally:
        bouncer.stop()


# The bug: probe_pooling deadlocks on a transaction pooler with one server connection: client B
# holds the only server session in its open transaction while client A's statement waits for a
# server session (until pgbouncer's query_wait_timeout, 120 s by default)
async def test_pooling_probe_does_not_deadlock_on_a_one_connection_pool(
    small_bouncer: Bouncer, dsn: str
) -> None:
    through = small_bouncer.dsn(dsn)
    pooling = await asyncio.wait_for(probe_pooling(through, statement_cache_size=0), 10)
    assert pooling.pooler and pooling.transaction


async def _idle_after_look(db: asyncpg.Connection) -> bool:
    """A waiter has registered, looked at the job (LIVE_STATE) and now waits for a NOTIFY."""
    return bool(
        await db.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE state = 'idle'"
            " AND query LIKE '%FOR KEY SHARE%' AND pid <> pg_backend_pid()"
        )
    )


# The bug: announce_finished() checks stoker.job_waiters with the finishing transaction's
# snapshot: a REPEATABLE READ (or SERIALIZABLE) transaction whose snapshot predates the waiter's
# REGISTER cancels the job after the waiter looked, sends no NOTIFY, and wait_for times out on a
# cancelled job
async def test_wait_for_sees_a_cancel_from_a_repeatable_read_transaction(
    dsn: str, db: asyncpg.Connection
) -> None:
    job_id = await client.enqueue(db, queue="default", kind="k")
    app = await asyncpg.connect(dsn)
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=2)
    try:
        tx = app.transaction(isolation="repeatable_read")
        await tx.start()
        await app.fetchval("SELECT 1")  # the transaction's snapshot: no waiter yet
        waiting = asyncio.create_task(client.wait_for(pool, job_id, timeout=5))
        await eventually(lambda: _idle_after_look(db))
        await app.execute("SELECT stoker.cancel($1, 'app')", job_id)
        await tx.commit()
        done = await waiting
    finally:
        await pool.close()
        await app.close()
    assert (done.id, done.state) == (job_id, "cancelled")


async def test_timeout_while_the_look_waits_on_a_row_lock_cleans_up(
    dsn: str, db: asyncpg.Connection
) -> None:
    job_id = await client.enqueue(db, queue="default", kind="k")
    locker = await asyncpg.connect(dsn)
    conn = await asyncpg.connect(dsn)
    try:
        tx = locker.transaction()
        await tx.start()
        await locker.execute("SELECT 1 FROM stoker.jobs WHERE id = $1 FOR UPDATE", job_id)
        with pytest.raises(TimeoutError):
            await client.wait_for(conn, job_id, timeout=1)
        await tx.rollback()
        assert await conn.fetchval("SELECT 1") == 1
        assert not conn.is_in_transaction()
        assert await conn.fetchval("SELECT count(*) FROM pg_listening_channels()") == 0
        assert await db.fetchval("SELECT count(*) FROM stoker.job_waiters") == 0
    finally:
        await conn.close()
        await locker.close()


# The bug: probe_pooling takes 'A ran on the same server session before and during B's
# transaction' for a session pooler; with pgbouncer's server_round_robin = 1 and two idle server
# sessions, A alternates back to its own session every round, so a transaction pooler is reported
# as transaction=False and the LISTEN/leader-lock/migration checks are skipped
async def test_pooling_probe_finds_a_round_robin_transaction_pooler(
    small_bouncer: Bouncer, dsn: str
) -> None:
    ini = small_bouncer.root / "pgbouncer.ini"
    text = ini.read_text().replace("default_pool_size = 1", "default_pool_size = 4")
    ini.write_text(text + "server_round_robin = 1\n")
    small_bouncer.proc.send_signal(signal.SIGHUP)  # pgbouncer reloads its configuration
    through = small_bouncer.dsn(dsn)
    holders = [await asyncpg.connect(through, statement_cache_size=0) for _ in range(2)]
    try:

        async def two_servers() -> bool:
            txs = [h.transaction() for h in holders]
            for tx in txs:
                await tx.start()
            pids = {await h.fetchval("SELECT pg_backend_pid()") for h in holders}
            for tx in txs:
                await tx.commit()
            return len(pids) == 2  # after the reload: two server sessions, now both idle

        await eventually(two_servers)
        pooling = await asyncio.wait_for(probe_pooling(through, statement_cache_size=0), 15)
    finally:
        for h in holders:
            await h.close()
    assert pooling.transaction, pooling
