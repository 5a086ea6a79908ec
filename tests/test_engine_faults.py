"""Issue 11's engine points seen from outside, on real `stoker run` processes: no wake-up lost
inside a producer's transaction, a success kept through an outage longer than the lease, size
caps, a blocked loop named, and a history purge that holds nothing up."""

from __future__ import annotations

import asyncio
import re
import signal

import asyncpg

from daemon.store import queries
from tests.conftest import DaemonFactory, eventually, with_database
from tests.test_daemon_engine import finished, insert, job

ONE_AT_A_TIME = """
[queues.default]
concurrency = 1
batch_size = 1
poll_interval = 60
"""


async def waiting_rows(db: asyncpg.Connection) -> int:
    count: int = await db.fetchval(
        "SELECT count(*) FROM stoker.waiting WHERE queue = 'default' AND expires_at > now()"
    )
    return count


async def lost_wake_up_round(db: asyncpg.Connection, producer: asyncpg.Connection) -> None:
    """The pool is busy (not waiting) when the producer inserts, idle (waiting) when it
    commits: the job must start well before the 60 s poll interval."""
    blocker = await insert(db, "test.sleep", {"seconds": 0.3})

    async def busy() -> bool:
        row = await job(db, blocker)
        return row is not None and row["state"] == "active" and await waiting_rows(db) == 0

    await eventually(busy)
    tx = producer.transaction(isolation=None)
    await tx.start()
    late = await producer.fetchval("SELECT stoker.enqueue('default', 'noop')")
    await finished(db, blocker)

    async def idle() -> bool:
        return await waiting_rows(db) == 1

    await eventually(idle)
    await tx.commit()
    row = await finished(db, late, timeout=10)
    assert row["state"] == "succeeded"


async def test_a_job_committed_after_the_pool_went_idle_is_not_missed(
    daemons: DaemonFactory, db: asyncpg.Connection, dsn: str
) -> None:
    await daemons.start(ONE_AT_A_TIME)
    producer = await asyncpg.connect(dsn)
    try:
        for _ in range(3):
            await lost_wake_up_round(db, producer)
    finally:
        await producer.close()


async def test_a_repeatable_read_producer_is_not_missed_either(
    daemons: DaemonFactory, db: asyncpg.Connection, dsn: str
) -> None:
    await daemons.start(ONE_AT_A_TIME)
    producer = await asyncpg.connect(
        dsn, server_settings={"default_transaction_isolation": "repeatable read"}
    )
    try:
        await lost_wake_up_round(db, producer)
    finally:
        await producer.close()


async def test_multi_statement_producers_hammering_the_idle_boundary_lose_no_wake_up(
    daemons: DaemonFactory, db: asyncpg.Connection, dsn: str
) -> None:
    await daemons.start(
        """
        [queues.default]
        concurrency = 2
        batch_size = 2
        poll_interval = 60
        """
    )
    producers = [await asyncpg.connect(dsn) for _ in range(3)]
    ids: list[int] = []

    async def produce(conn: asyncpg.Connection, seed: int) -> None:
        for i in range(30):
            async with conn.transaction():
                for _ in range(1 + (i + seed) % 3):
                    ids.append(await conn.fetchval("SELECT stoker.enqueue('default', 'noop')"))
                    await asyncio.sleep(((i * 7 + seed) % 5) / 1000)
                await asyncio.sleep(((i * 3 + seed) % 11) / 1000)

    try:
        await asyncio.gather(*(produce(c, n) for n, c in enumerate(producers)))
    finally:
        for conn in producers:
            await conn.close()

    async def all_done() -> bool:
        done: int = await db.fetchval(
            "SELECT count(*) FROM stoker.job_history WHERE id = ANY($1)", ids
        )
        return done == len(ids)

    await eventually(all_done, timeout=30)


async def test_a_success_unwritten_through_an_outage_longer_than_the_lease_is_not_run_again(
    daemons: DaemonFactory, db: asyncpg.Connection, dsn: str
) -> None:
    daemon = await daemons.start(
        """
        lease_seconds = 2
        rescue_interval = 0.2
        [queues.default]
        poll_interval = 0.2
        max_attempts = 1
        """
    )
    job_id = await insert(db, "test.record", {"seconds": 1.0, "label": "outage"})

    async def active() -> bool:
        row = await job(db, job_id)
        return row is not None and row["state"] == "active"

    await eventually(active)
    name = dsn.rsplit("/", 1)[1]
    admin = await asyncpg.connect(with_database(dsn, "postgres"))
    # The database goes away for the daemon (not for this test's session) while the job runs.
    await admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
    await db.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
        "WHERE datname = current_database() AND pid <> pg_backend_pid()"
    )
    try:

        async def ran() -> bool:
            return any(e["id"] == job_id for e in daemon.events())

        await eventually(ran)
        # Longer than the lease: another daemon would rescue it; do what its rescue does.
        await db.execute(
            "UPDATE stoker.jobs SET lease_expires_at = now() - interval '1 second' WHERE id = $1",
            job_id,
        )
        assert [r["id"] for r in await db.fetch(queries.RESCUE)] == [job_id]
    finally:
        await admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
        await admin.close()
    row = await finished(db, job_id, timeout=20)
    # The outcome is written for attempt 1, unless a claim in flight when the outage began
    # took the rescued job again first (attempt 2): the buffered outcome then answers for
    # that claim, which is never run (Completer.adopt). Either way the job ran once.
    adopted = "claimed again (attempt 2)" in daemon.log()
    assert (row["state"], row["attempts"]) == ("succeeded", 2 if adopted else 1)
    assert [e["id"] for e in daemon.events()].count(job_id) == 1
    assert daemon.proc.poll() is None


async def test_results_and_payloads_past_their_caps_are_refused_clearly(
    daemons: DaemonFactory, db: asyncpg.Connection
) -> None:
    await daemons.start(
        """
        [queues.default]
        poll_interval = 60
        max_result_bytes = 1000
        max_payload_bytes = 2048
        """
    )
    big = await insert(db, "test.big_result", {"chars": 5000})
    fits = await insert(db, "test.big_result", {"chars": 500})
    huge = await insert(db, "noop", {"pad": "x" * 5000})
    row = await finished(db, big)
    assert row["state"] == "succeeded"
    assert "larger than max_result_bytes (1000)" in row["result"]["unrecorded_result"]
    assert (await finished(db, fits))["result"] == {"text": "x" * 500}
    row = await finished(db, huge)
    assert (row["state"], row["attempts"]) == ("failed", 1)
    assert "exceeds max_payload_bytes (2048) of queue 'default'" in row["last_error"]


async def test_a_handler_blocking_the_loop_is_named_with_how_long(
    daemons: DaemonFactory, db: asyncpg.Connection
) -> None:
    daemon = await daemons.start(
        """
        lease_seconds = 1.5
        [queues.default]
        poll_interval = 60
        """
    )
    job_id = await insert(db, "test.block_loop", {"seconds": 2.5})
    await daemon.wait_log("the event loop was blocked for")
    (message,) = [
        r["message"]
        for r in daemon.log_records()
        if r["message"].startswith("the event loop was blocked for")
    ]
    assert f"job {job_id} (kind 'test.block_loop', handler tests.job_handlers.block_loop" in message
    seconds = float(re.search(r"blocked for ([0-9.]+)s", message).group(1))  # type: ignore[union-attr]
    assert seconds >= 2.0
    assert "leases may have expired" in message


OLD_HISTORY = 400_000


async def test_a_long_history_purge_holds_up_neither_rescue_nor_shutdown(
    daemons: DaemonFactory, db: asyncpg.Connection
) -> None:
    await db.execute(
        """INSERT INTO stoker.job_history (id, queue, kind, payload, meta, priority, state,
               run_at, attempts, errors, created_at, finished_at)
           SELECT -i, 'default', 'noop', '{}', '{}', 0, 'succeeded', t, 1, '[]', t, t
             FROM generate_series(1, $1) AS i,
                  LATERAL (SELECT now() - interval '2 days') AS x(t)""",
        OLD_HISTORY,
    )

    async def old_rows() -> int:
        count: int = await db.fetchval("SELECT count(*) FROM stoker.job_history WHERE id < 0")
        return count

    daemon = await daemons.start("history_retention_days = 1\nrescue_interval = 0.2\n")

    async def purging() -> bool:
        return await old_rows() < OLD_HISTORY

    await eventually(purging)
    # A job whose worker died: rescue must not wait for the purge to finish.
    lost = await db.fetchval(
        """INSERT INTO stoker.jobs (queue, kind, state, worker, attempts, lease_expires_at)
           VALUES ('default', 'noop', 'active', 'ghost', 1, now() - interval '1 second')
           RETURNING id"""
    )
    assert (await finished(db, lost))["state"] == "succeeded"
    assert await old_rows() > 0, "the rescue waited for the whole purge"
    daemon.proc.send_signal(signal.SIGTERM)
    assert await daemon.wait_exit() == 0
    assert await old_rows() > 0, "shutdown waited for the whole purge"
