"""The completer against a real PostgreSQL: every outcome is written exactly once, whatever
PostgreSQL refuses and whenever the connection drops; none wedges the ones behind it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import asyncpg
import pytest

from daemon.config import ScheduleConfig
from daemon.cron.schedules import Schedule, fire
from daemon.engine.maintenance import move_parked
from daemon.engine.outcomes import Completer, Outcome
from daemon.store import queries
from daemon.store.db import create_pool
from tests.conftest import eventually

WORKER = "w-test"


@pytest.fixture
async def pool(dsn: str) -> AsyncIterator[asyncpg.Pool]:
    db = await create_pool(dsn, max_size=4)
    try:
        yield db
    finally:
        await db.close()


@pytest.fixture
async def completer(pool: asyncpg.Pool) -> AsyncIterator[tuple[Completer, asyncio.Task[None]]]:
    """A running completer; the test adds outcomes and watches the database."""
    requeued: list[str] = []
    c = Completer(
        pool,
        worker_id=WORKER,
        flush_interval=0.01,
        flush_max=1000,
        on_requeued=lambda queue, _at: requeued.append(queue),
    )
    task = asyncio.create_task(c.run())
    try:
        yield c, task
    finally:
        await c.close()
        try:
            await asyncio.wait_for(task, timeout=10)
        except Exception:  # the test has already said what went wrong
            task.cancel()


async def claimed_jobs(db: asyncpg.Connection, kinds: list[str]) -> list[int]:
    """Insert jobs of `kinds` and claim them all as WORKER (attempt 1), in insertion order."""
    ids = [
        await db.fetchval(
            "INSERT INTO stoker.jobs (queue, kind) VALUES ('default', $1) RETURNING id", kind
        )
        for kind in kinds
    ]
    rows = await db.fetch(queries.CLAIM, "default", len(ids), WORKER, 60)
    assert sorted(r["id"] for r in rows) == sorted(ids)
    return ids


async def lease_lapses(db: asyncpg.Connection, job_id: int) -> None:
    """The job's lease expires (its worker was cut off) and a rescue puts it back in the queue."""
    await db.execute(
        "UPDATE stoker.jobs SET lease_expires_at = now() - interval '1 second' WHERE id = $1",
        job_id,
    )
    assert [r["id"] for r in await db.fetch(queries.RESCUE)] == [job_id]


async def state_of(db: asyncpg.Connection, job_id: int) -> asyncpg.Record:
    row: asyncpg.Record = await db.fetchrow(
        "SELECT state::text AS state, attempts, last_error, result, worker "
        "FROM stoker.all_jobs WHERE id = $1",
        job_id,
    )
    return row


async def flushed(pool: asyncpg.Pool, *outcomes: Outcome) -> Completer:
    """A completer that writes `outcomes` in one go, run until its buffer is empty."""
    c = Completer(pool, worker_id=WORKER, flush_interval=0, flush_max=1000, on_requeued=print)
    for outcome in outcomes:
        c.add(outcome)
    task = asyncio.create_task(c.run())
    try:

        async def written() -> bool:
            return c.buffered == 0

        await eventually(written, timeout=10)
    finally:
        await c.close()
        await asyncio.wait_for(task, timeout=10)
    return c


def succeeded(job_id: int, attempt: int = 1, result: str | None = None) -> Outcome:
    return Outcome(job_id, attempt, "default", "succeeded", result=result)


async def test_an_outcome_history_refuses_for_good_does_not_wedge_the_rest(
    db: asyncpg.Connection, completer: tuple[Completer, asyncio.Task[None]]
) -> None:
    # History already holds the id (what `TRUNCATE stoker.jobs RESTART IDENTITY` leads to).
    ids = await claimed_jobs(db, ["noop"] * 6)
    await db.execute("UPDATE stoker.jobs SET unique_key = 'report:42' WHERE id = $1", ids[2])
    await db.execute(
        """INSERT INTO stoker.job_history (id, queue, kind, payload, meta, priority, state,
                                           run_at, attempts, errors, created_at)
           VALUES ($1, 'default', 'older', '{}', '{}', 0, 'succeeded', now(), 1, '[]', now())""",
        ids[2],
    )
    c, task = completer
    for job_id in ids:
        c.add(succeeded(job_id))

    async def written() -> bool:
        return c.buffered == 0

    await eventually(written, timeout=10)
    for job_id in ids[:2] + ids[3:]:
        assert (await state_of(db, job_id))["state"] == "succeeded"
    # The refused one is parked in stoker.jobs: finished, never claimed or rescued again,
    # with the reason where an operator looks.
    parked = await db.fetchrow("SELECT * FROM stoker.jobs WHERE id = $1", ids[2])
    assert parked["state"] == "succeeded"
    assert parked["lease_expires_at"] is None
    assert "could not be moved to stoker.job_history" in parked["last_error"]
    assert "job_history_pkey" in parked["last_error"]
    older = await db.fetchval("SELECT kind FROM stoker.job_history WHERE id = $1", ids[2])
    assert older == "older"  # the old record is left alone
    # A parked job lets its unique_key go, as a finished job does, and says what it was.
    assert parked["unique_key"] is None
    assert "(unique_key was report:42)" in parked["last_error"]
    fresh = await db.fetchval("SELECT stoker.enqueue('default', 'noop', unique_key => 'report:42')")
    assert fresh != ids[2]
    assert not task.done()


async def test_a_dba_trigger_refusing_one_kind_blocks_nothing_else(
    db: asyncpg.Connection, pool: asyncpg.Pool, completer: tuple[Completer, asyncio.Task[None]]
) -> None:
    await db.execute(
        """CREATE FUNCTION public.refuse() RETURNS trigger LANGUAGE plpgsql AS $$
           BEGIN
               IF NEW.kind = 'refused' THEN RAISE EXCEPTION 'kind refused by policy'; END IF;
               RETURN NEW;
           END $$;
           CREATE TRIGGER refuse BEFORE INSERT ON stoker.job_history
               FOR EACH ROW EXECUTE FUNCTION public.refuse();"""
    )
    ids = await claimed_jobs(db, ["noop", "refused", "noop", "refused", "noop"])
    c, task = completer
    c.add(succeeded(ids[0]))
    c.add(Outcome(ids[1], 1, "default", "failed", error="it broke"))
    c.add(succeeded(ids[2]))
    c.add(Outcome(ids[3], 1, "default", "succeeded", result='{"n": 1}'))
    c.add(Outcome(ids[4], 1, "default", "retry", error="again", delay=0))

    async def written() -> bool:
        return c.buffered == 0

    await eventually(written, timeout=10)
    assert (await state_of(db, ids[0]))["state"] == "succeeded"
    assert (await state_of(db, ids[2]))["state"] == "succeeded"
    requeued = await state_of(db, ids[4])
    assert (requeued["state"], requeued["last_error"]) == ("queued", "again")
    failed = await db.fetchrow("SELECT * FROM stoker.jobs WHERE id = $1", ids[1])
    assert failed["state"] == "failed"
    assert "it broke" in failed["last_error"]
    assert "kind refused by policy" in failed["last_error"]
    done = await db.fetchrow("SELECT * FROM stoker.jobs WHERE id = $1", ids[3])
    assert done["state"] == "succeeded"
    assert not task.done()
    assert c.parked == 2
    # Once the DBA drops the trigger, the maintenance moves the parked jobs on to history.
    assert await move_parked(pool) == 0
    await db.execute("DROP TRIGGER refuse ON stoker.job_history")
    assert await move_parked(pool) == 2
    assert await db.fetchval("SELECT count(*) FROM stoker.jobs") == 1  # the requeued one
    moved = await db.fetch(
        "SELECT state::text, last_error FROM stoker.job_history WHERE id = ANY($1) ORDER BY id",
        [ids[1], ids[3]],
    )
    assert [r["state"] for r in moved] == ["failed", "succeeded"]
    assert all("kind refused by policy" in r["last_error"] for r in moved)


async def test_a_connection_lost_during_one_by_one_writes_keeps_the_completer_running(
    db: asyncpg.Connection, completer: tuple[Completer, asyncio.Task[None]]
) -> None:
    # A data error sends the batch one by one; the first single write of 'cut' loses its
    # connection (a sequence counts tries: it is not rolled back with the write).
    await db.execute(
        """CREATE SEQUENCE public.cuts;
           CREATE FUNCTION public.trouble() RETURNS trigger LANGUAGE plpgsql AS $$
           BEGIN
               IF NEW.kind = 'bad' THEN
                   RAISE EXCEPTION 'value refused' USING ERRCODE = 'data_exception';
               END IF;
               IF NEW.kind = 'cut' THEN
                   IF nextval('public.cuts') = 2 THEN  -- 1: in the batch; 2: alone
                       PERFORM pg_terminate_backend(pg_backend_pid());
                   END IF;
               END IF;
               RETURN NEW;
           END $$;
           CREATE TRIGGER trouble BEFORE INSERT ON stoker.job_history
               FOR EACH ROW EXECUTE FUNCTION public.trouble();"""
    )
    ids = await claimed_jobs(db, ["cut", "bad", "noop", "noop"])
    c, task = completer
    for job_id in ids:
        c.add(succeeded(job_id))

    async def written() -> bool:
        if task.done():
            raise AssertionError(f"the completer died: {task.exception()!r}")
        return c.buffered == 0

    await eventually(written, timeout=15)
    assert await db.fetchval("SELECT last_value FROM public.cuts") >= 3  # cut, then written
    for job_id in [ids[0], *ids[2:]]:
        assert (await state_of(db, job_id))["state"] == "succeeded"
    bad = await db.fetchrow("SELECT * FROM stoker.jobs WHERE id = $1", ids[1])
    assert bad["state"] == "succeeded"
    assert "value refused" in bad["last_error"]
    assert not task.done()


async def test_two_outcomes_of_one_job_in_one_flush_keep_the_live_one(
    db: asyncpg.Connection, pool: asyncpg.Pool
) -> None:
    # Attempt 1's lease lapsed, the job was rescued and claimed again by the same worker;
    # both attempts end and their outcomes share a flush.
    (job_id,) = await claimed_jobs(db, ["noop"])
    await lease_lapses(db, job_id)
    again = await db.fetch(queries.CLAIM, "default", 1, WORKER, 60)
    assert [(r["id"], r["attempts"]) for r in again] == [(job_id, 2)]
    c = await flushed(pool, succeeded(job_id, 1, '"first"'), succeeded(job_id, 2, '"second"'))
    row = await state_of(db, job_id)
    assert (row["state"], row["attempts"], row["result"]) == ("succeeded", 2, "second")
    assert c.discarded == 1


async def test_a_success_buffered_past_its_lease_is_written_to_the_rescued_row(
    db: asyncpg.Connection, pool: asyncpg.Pool
) -> None:
    # The database was out longer than lease_seconds: a rescue put the job back in the queue
    # before the buffered success could be written. Nobody has claimed it since: the success
    # still belongs to the latest attempt and must be kept, not run again.
    (job_id,) = await claimed_jobs(db, ["noop"])
    await lease_lapses(db, job_id)
    c = await flushed(pool, succeeded(job_id, 1, '"done"'))
    row = await state_of(db, job_id)
    assert (row["state"], row["attempts"], row["result"]) == ("succeeded", 1, "done")
    assert c.discarded == 0


async def test_a_parked_run_does_not_stop_an_overlap_skip_schedule(
    db: asyncpg.Connection, pool: asyncpg.Pool
) -> None:
    # The schedule's last run finished but history refused it: it is parked, not running.
    schedule = Schedule.from_config(
        "nightly", ScheduleConfig(cron="0 2 * * *", kind="noop", queue="default")
    )
    first = await fire(db, schedule, datetime(2026, 11, 29, 2, tzinfo=UTC))
    assert first == "fired"
    (job_id,) = [r["id"] for r in await db.fetch(queries.CLAIM, "default", 10, WORKER, 60)]
    assert await db.fetchval(queries.PARK, job_id, 1, WORKER, "succeeded", "refused") == job_id
    second = await fire(db, schedule, datetime(2026, 11, 30, 2, tzinfo=UTC))
    assert second == "fired"


@pytest.mark.parametrize("sqlstate", ["25006", "53100", "55P03", "57014"])
async def test_errors_of_the_server_state_are_retried_unchanged_never_rewritten_or_dropped(
    db: asyncpg.Connection,
    completer: tuple[Completer, asyncio.Task[None]],
    sqlstate: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Read-only after a failover, a full disk, a lock timeout, a statement cancelled: none of
    # them is the outcome's fault. It must land as it was once the server recovers.
    await db.execute(
        f"""CREATE TABLE public.outage (on_ boolean);
            INSERT INTO public.outage VALUES (true);
            CREATE FUNCTION public.outage() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
                IF EXISTS (SELECT 1 FROM public.outage) THEN
                    RAISE EXCEPTION 'server trouble' USING ERRCODE = '{sqlstate}';
                END IF;
                RETURN NEW;
            END $$;
            CREATE TRIGGER outage BEFORE INSERT ON stoker.job_history
                FOR EACH ROW EXECUTE FUNCTION public.outage();"""
    )
    ids = await claimed_jobs(db, ["noop", "noop"])
    c, task = completer
    c.add(succeeded(ids[0], result='{"kept": true}'))
    c.add(Outcome(ids[1], 1, "default", "failed", error="its own error"))

    async def long_enough_to_look_stuck() -> bool:
        return "retrying it after the others" in caplog.text

    await eventually(long_enough_to_look_stuck)
    assert (c.parked, c.lost, c.buffered) == (0, 0, 2)
    await db.execute("DELETE FROM public.outage")

    async def written() -> bool:
        return c.buffered == 0 and c.settled.is_set()

    await eventually(written, timeout=15)
    first = await state_of(db, ids[0])
    assert (first["state"], first["result"]) == ("succeeded", {"kept": True})
    second = await state_of(db, ids[1])
    assert (second["state"], second["last_error"]) == ("failed", "its own error")
    assert (c.parked, c.lost, c.discarded) == (0, 0, 0)
    assert not task.done()


async def test_a_finished_outcome_in_a_write_when_the_job_is_claimed_again_answers_for_it(
    db: asyncpg.Connection, dsn: str
) -> None:
    # The network black-holed the write; meanwhile the lease lapsed, a rescue re-queued the
    # job and this worker's pool claimed it again. The write will be fenced out: the outcome
    # must be written for the new claim, not discarded (the pool does not run the job again).
    one = await create_pool(dsn, max_size=1)
    try:
        (job_id,) = await claimed_jobs(db, ["noop"])
        c = Completer(one, worker_id=WORKER, flush_interval=0, flush_max=100, on_requeued=print)
        held = await one.acquire()  # the write waits for a connection: it is in flight
        c.add(succeeded(job_id, 1, '"done"'))
        task = asyncio.create_task(c.run())
        await eventually(lambda: _true_async(c._writing == 1))
        await lease_lapses(db, job_id)
        assert len(await db.fetch(queries.CLAIM, "default", 1, WORKER, 60)) == 1
        assert c.adopt(job_id, 2)
        await one.release(held)

        async def written() -> bool:
            return c.buffered == 0

        await eventually(written, timeout=10)
        await c.close()
        await asyncio.wait_for(task, timeout=10)
    finally:
        await one.close()
    row = await state_of(db, job_id)
    assert (row["state"], row["attempts"], row["result"]) == ("succeeded", 2, "done")
    assert c.discarded == 0


async def test_an_outcome_fenced_out_before_the_pool_learns_of_its_reclaim_is_kept(
    db: asyncpg.Connection, pool: asyncpg.Pool
) -> None:
    (job_id,) = await claimed_jobs(db, ["noop"])
    await lease_lapses(db, job_id)
    assert len(await db.fetch(queries.CLAIM, "default", 1, WORKER, 60)) == 1
    c = Completer(pool, worker_id=WORKER, flush_interval=0, flush_max=100, on_requeued=print)
    c.add(succeeded(job_id, 1, '"done"'))
    task = asyncio.create_task(c.run())
    try:

        async def fenced() -> bool:
            return c.discarded == 1

        await eventually(fenced)
        assert c.adopt(job_id, 2)  # the claim's rows reach the pool only now

        async def written() -> bool:
            return c.buffered == 0 and c.discarded == 0

        await eventually(written, timeout=10)
    finally:
        await c.close()
        await asyncio.wait_for(task, timeout=10)
    row = await state_of(db, job_id)
    assert (row["state"], row["attempts"], row["result"]) == ("succeeded", 2, "done")


async def _true_async(value: bool) -> bool:
    return value


class _Rider:
    """A pool held back by its global limit of 3 on queue 'capped', as QueuePool answers."""

    def __init__(self) -> None:
        self.found: list[list[asyncpg.Record] | None] = []

    def claim_along(self) -> tuple[object, ...] | None:
        return ("capped", 3, WORKER, 60.0, False, 3, None, None, None, False, None)

    def claimed_along(self, rows: list[asyncpg.Record] | None) -> None:
        self.found.append(rows)


async def test_a_write_along_counts_written_and_fenced_outcomes_and_hands_over_the_claim(
    pool: asyncpg.Pool, db: asyncpg.Connection
) -> None:
    """The write of a limited queue's succeeded outcomes with its next claim
    (stoker.finish_and_claim): the outcomes written are counted and their queue released, one
    whose attempt was taken over is fenced out (discarded, not written), and the rider gets
    the jobs the claim found: as many as the written outcomes freed."""
    ids = [
        await db.fetchval(
            "INSERT INTO stoker.jobs (queue, kind) VALUES ('capped', 'noop') RETURNING id"
        )
        for _ in range(6)
    ]
    rows = await db.fetch(
        queries.CLAIM_LIMITED, "capped", 3, WORKER, 60.0, False, 3, *[None] * 3, False, None
    )
    first = sorted(r["id"] for r in rows if r["id"] is not None)
    assert first == ids[:3]
    released: list[str] = []
    rider = _Rider()
    c = Completer(
        pool,
        worker_id=WORKER,
        flush_interval=0,
        flush_max=1000,
        on_requeued=print,
        on_released=released.append,
        rider=lambda queue: rider if queue == "capped" else None,
    )
    c.add(Outcome(first[0], 1, "capped", "succeeded", result='{"n": 1}'))
    c.add(Outcome(first[1], 1, "capped", "succeeded"))
    c.add(Outcome(first[2], 7, "capped", "succeeded"))  # not this attempt: fenced out
    task = asyncio.create_task(c.run())
    try:

        async def handed_over() -> bool:
            return c.buffered == 0 and bool(rider.found)

        await eventually(handed_over, timeout=10)
    finally:
        await c.close()
        await asyncio.wait_for(task, timeout=10)
    assert (c.written, c.discarded) == (2, 1)
    assert released == []  # the pool it claimed for: its claim saw the slots
    assert (await state_of(db, first[0]))["result"] == {"n": 1}
    assert (await state_of(db, first[2]))["state"] == "active"
    found = rider.found[0]
    assert found is not None
    assert sorted(r["id"] for r in found if r["id"] is not None) == ids[3:5]
    assert [r["blocked"] for r in found if r["id"] is None] == ["global"]
