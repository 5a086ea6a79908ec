"""How pools learn of work (#16): a stream of inserts is not woken one NOTIFY per job, yet no
wake-up is ever lost at the moment a pool goes from claiming to waiting, and a daemon with
nothing to do barely talks to the database."""

from __future__ import annotations

import asyncio
import random
import time

import asyncpg

from tests.conftest import DaemonFactory, eventually

# poll_interval 60: a lost wake-up shows as a job that waits for the next look, a minute away.
HAMMERED = """
[queues.default]
concurrency = 8
batch_size = 8
poll_interval = 60
"""


async def wait_all_done(
    db: asyncpg.Connection, ids: list[int], timeout: float = 60, interval: float = 0.02
) -> None:
    async def done() -> bool:
        n: int = await db.fetchval(
            "SELECT count(*) FROM stoker.job_history WHERE id = ANY($1) AND state = 'succeeded'",
            ids,
        )
        return n == len(ids)

    await eventually(done, timeout=timeout, interval=interval)


async def test_no_lost_wake_up_with_multi_statement_transactions(
    daemons: DaemonFactory, db: asyncpg.Connection, dsn: str
) -> None:
    # Rounds of three producers whose transactions insert one or two jobs, stay open 0-8 ms
    # (now and then 50-150 ms), and commit or roll back; each round starts 0-5 ms after the
    # last one's jobs ended (seen within a millisecond), so it meets the pool lingering (1-10
    # ms between claims), saying it waits, looking for transactions in flight, or asleep.
    # Nothing inserts after a round until its jobs are done: a lost wake-up strands a job
    # until the next look, a minute away. (Without the look for transactions in flight, this
    # failed in 3 runs out of 3, within the first 30 rounds.)
    await daemons.start(HAMMERED)
    rng = random.Random(16)
    producers = [await asyncpg.connect(dsn) for _ in range(3)]

    async def transaction(conn: asyncpg.Connection, seed: int) -> list[int]:
        local = random.Random(seed)
        tx = conn.transaction()
        await tx.start()
        ids = [await conn.fetchval("SELECT stoker.enqueue('default', 'noop')")]
        await asyncio.sleep(local.choice((0, 0.001, 0.002, 0.004, 0.008)))
        if local.random() < 0.5:
            ids.append(await conn.fetchval("SELECT stoker.enqueue('default', 'noop')"))
        if local.random() < 0.05:
            await asyncio.sleep(local.uniform(0.05, 0.15))
        if local.random() < 0.1:
            await tx.rollback()
            return []
        await tx.commit()
        return ids

    try:
        for round_no in range(250):
            await asyncio.sleep(rng.choice((0, 0.0005, 0.001, 0.002, 0.003, 0.005)))
            batches = await asyncio.gather(
                *(transaction(conn, rng.randrange(1 << 30)) for conn in producers)
            )
            ids = [job_id for batch in batches for job_id in batch]
            try:
                await wait_all_done(db, ids, timeout=10, interval=0.001)
            except AssertionError as exc:
                raise AssertionError(f"round {round_no}: a wake-up was lost") from exc
    finally:
        for conn in producers:
            await conn.close()
    left = await db.fetchval("SELECT count(*) FROM stoker.jobs")
    assert left == 0  # and the rolled-back jobs never existed


async def test_a_stream_of_inserts_sends_few_notifications(
    daemons: DaemonFactory, db: asyncpg.Connection, dsn: str
) -> None:
    # Every NOTIFY serialises commits (a database-wide lock held through the WAL flush): a
    # daemon that keeps up with a stream must not have every insert send one.
    await daemons.start(
        """
        [queues.default]
        concurrency = 100
        poll_interval = 60
        """
    )  # room to keep up: a pool whose claims come back full is busy, and never waits
    first = await db.fetchval("SELECT stoker.enqueue('default', 'noop')")
    await wait_all_done(db, [first])

    async def registered() -> bool:
        n: int = await db.fetchval("SELECT count(*) FROM stoker.waiting WHERE queue = 'default'")
        return n == 1

    await eventually(registered)  # idle and waiting: the stream's first insert wakes it
    listener = await asyncpg.connect(dsn)
    notified = 0

    def count(*_args: object) -> None:
        nonlocal notified
        notified += 1

    await listener.add_listener("stoker_jobs", count)
    ids: list[int] = []

    async def producer() -> None:
        conn = await asyncpg.connect(dsn)
        try:
            for _ in range(500):
                ids.append(await conn.fetchval("SELECT stoker.enqueue('default', 'noop')"))
        finally:
            await conn.close()

    try:
        await asyncio.gather(*(producer() for _ in range(4)))
        await wait_all_done(db, ids)
        await listener.execute("SELECT 1")  # notifications sent before this have arrived
    finally:
        await listener.close()
    assert notified <= len(ids) // 10, f"{notified} NOTIFYs for {len(ids)} inserts"


async def test_a_job_that_falls_due_without_an_insert_is_found_by_the_idle_sweep(
    daemons: DaemonFactory, db: asyncpg.Connection
) -> None:
    # A delayed job brought forward by an UPDATE sends no NOTIFY; the one look of all idle
    # queues every poll interval finds it.
    await daemons.start(
        """
        [queues.default]
        poll_interval = 1
        [queues.other]
        poll_interval = 1
        """
    )
    job_id = await db.fetchval(
        "SELECT stoker.enqueue('default', 'noop', run_at => now() + interval '1 hour')"
    )

    async def registered() -> bool:
        n: int = await db.fetchval("SELECT count(*) FROM stoker.waiting")
        return n == 2

    await eventually(registered)
    await db.execute("UPDATE stoker.jobs SET run_at = now() WHERE id = $1", job_id)
    moved = time.monotonic()
    await wait_all_done(db, [job_id], timeout=15)
    assert time.monotonic() - moved < 5


async def test_an_idle_daemon_barely_talks_to_the_database(
    daemons: DaemonFactory, db: asyncpg.Connection
) -> None:
    # Twenty idle queues at the default poll interval (2 s). Each pool looking on its own
    # (a claim, a next-due look, a renewal) made 34 transactions a second in this test (with
    # the rest of the daemon: leader, samplers, probes); one look for all idle pools, 11.
    config = "".join(f"[queues.q{i:02d}]\n" for i in range(20))
    await daemons.start(config)

    async def registered() -> bool:
        n: int = await db.fetchval("SELECT count(*) FROM stoker.waiting")
        return n == 20

    await eventually(registered)
    await asyncio.sleep(3)  # start-up's statements reported (backends report each second)
    count = (
        "SELECT xact_commit + xact_rollback FROM pg_stat_database"
        " WHERE datname = current_database()"
    )
    before = await db.fetchval(count)
    window = 10.0
    started = time.monotonic()
    await asyncio.sleep(window)
    await asyncio.sleep(2)  # statements of the window reported
    after = await db.fetchval(count)
    per_second = (after - before - 1) / (time.monotonic() - started)
    assert per_second < 16, f"{per_second:.1f} transactions a second from an idle daemon"


async def test_waiting_rows_of_killed_daemons_are_cleaned_up(
    daemons: DaemonFactory, db: asyncpg.Connection
) -> None:
    # Every insert's trigger reads stoker.waiting; the rows of daemons killed with SIGKILL
    # (each with a worker id of its own) must not pile up in it.
    await db.execute(
        "INSERT INTO stoker.waiting SELECT 'default', 'killed-' || i, now() - interval '2 min'"
        " FROM generate_series(1, 50) AS i"
    )
    await daemons.start("[queues.default]\npoll_interval = 0.5\n")

    async def cleaned() -> bool:
        n: int = await db.fetchval(
            "SELECT count(*) FROM stoker.waiting WHERE worker LIKE 'killed-%'"
        )
        return n == 0

    await eventually(cleaned, timeout=10)
