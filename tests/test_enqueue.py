"""Enqueueing from SQL and Python: ids, dedupe, transactions, wake-ups, the fetch index."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

import daemon
from daemon.store import queries
from tests.conftest import write_outcome


async def test_enqueue_returns_id_and_stores_every_field(db: asyncpg.Connection) -> None:
    run_at = datetime.now(UTC) + timedelta(hours=1)
    job_id = await daemon.enqueue(
        db,
        queue="reports",
        kind="reports.build",
        payload={"org": 7},
        run_at=run_at,
        priority=5,
        max_attempts=3,
        meta={"by": "alice"},
    )
    row = await db.fetchrow("SELECT * FROM stoker.jobs WHERE id = $1", job_id)
    assert row is not None
    assert (row["queue"], row["kind"], row["payload"], row["meta"]) == (
        "reports",
        "reports.build",
        {"org": 7},
        {"by": "alice"},
    )
    assert (row["priority"], row["max_attempts"], row["state"]) == (5, 3, "queued")
    assert row["run_at"] == run_at


async def test_unique_key_second_enqueue_returns_first_jobs_id(db: asyncpg.Connection) -> None:
    first = await daemon.enqueue(db, queue="default", kind="noop", unique_key="invoice-42")
    second = await daemon.enqueue(db, queue="default", kind="noop", unique_key="invoice-42")
    from_sql = await db.fetchval(
        "SELECT stoker.enqueue('default', 'noop', unique_key => 'invoice-42')"
    )
    assert first == second == from_sql
    assert await db.fetchval("SELECT count(*) FROM stoker.jobs") == 1


async def test_unique_key_is_free_again_once_the_job_finished(db: asyncpg.Connection) -> None:
    first = await daemon.enqueue(db, queue="default", kind="noop", unique_key="k")
    # Run it to completion the way a worker does: claim, then write the outcome.
    await db.fetch(queries.CLAIM, "default", 1, "w", 30.0)
    await write_outcome(db, first, attempt=1, outcome="succeeded", worker="w")
    second = await daemon.enqueue(db, queue="default", kind="noop", unique_key="k")
    assert second != first


async def test_enqueue_many_inserts_in_one_statement_and_skips_held_keys(
    db: asyncpg.Connection,
) -> None:
    held = await daemon.enqueue(db, queue="default", kind="noop", unique_key="dup")
    ids = await daemon.enqueue_many(
        db,
        [daemon.Job("default", "noop", {"i": i}) for i in range(100)]
        + [daemon.Job("default", "noop", unique_key="dup")],
    )
    assert len(ids) == 100
    assert held not in ids
    assert await db.fetchval("SELECT count(*) FROM stoker.jobs") == 101


async def listen(
    dsn: str, waiting_queues: list[str]
) -> tuple[asyncpg.Connection, asyncio.Queue[str]]:
    """Listen as a daemon does, registered as waiting on `waiting_queues` (inserts only NOTIFY
    queues that an idle daemon waits for)."""
    conn = await asyncpg.connect(dsn)
    await conn.execute(
        "INSERT INTO stoker.waiting SELECT q, 'test', now() + interval '1 hour' "
        "FROM unnest($1::text[]) AS q",
        waiting_queues,
    )
    received: asyncio.Queue[str] = asyncio.Queue()
    await conn.add_listener("stoker_jobs", lambda *args: received.put_nowait(args[3]))
    return conn, received


async def test_rolled_back_enqueue_leaves_no_job_and_wakes_nobody(
    db: asyncpg.Connection, dsn: str
) -> None:
    listener, received = await listen(dsn, ["rolled-back", "committed"])
    try:
        tx = db.transaction()
        await tx.start()
        await daemon.enqueue(db, queue="rolled-back", kind="noop")
        await tx.rollback()
        await daemon.enqueue(db, queue="committed", kind="noop")
        # Notifications arrive in commit order: the first one must be the committed job's.
        first = await asyncio.wait_for(received.get(), timeout=10)
        assert first == "committed"
        assert received.empty()
        assert await db.fetchval("SELECT count(*) FROM stoker.jobs") == 1
    finally:
        await listener.close()


async def test_one_notify_per_queue_per_statement_and_delayed_jobs_carry_their_time(
    db: asyncpg.Connection, dsn: str
) -> None:
    listener, received = await listen(dsn, ["a", "b", "later", "end"])
    try:
        await db.execute(
            """INSERT INTO stoker.jobs (queue, kind)
               SELECT CASE WHEN i % 2 = 0 THEN 'a' ELSE 'b' END, 'noop'
                 FROM generate_series(1, 500) AS i"""
        )
        due = datetime.now(UTC) + timedelta(minutes=5)
        await daemon.enqueue(db, queue="later", kind="noop", run_at=due)
        await daemon.enqueue(db, queue="end", kind="noop")
        got = [await asyncio.wait_for(received.get(), timeout=10) for _ in range(4)]
        assert sorted(got[:2]) == ["a", "b"]
        queue, epoch = got[2].split(" ")
        assert queue == "later"
        assert abs(float(epoch) - due.timestamp()) < 0.001
        assert got[3] == "end"
    finally:
        await listener.close()


@pytest.mark.parametrize("bad_queue", ["", "has space", "x" * 129])
async def test_invalid_queue_name_is_refused_by_the_database(
    db: asyncpg.Connection, bad_queue: str
) -> None:
    with pytest.raises(asyncpg.CheckViolationError):
        await daemon.enqueue(db, queue=bad_queue, kind="noop")


async def test_claim_uses_the_partial_fetch_index(db: asyncpg.Connection) -> None:
    await db.execute(
        """INSERT INTO stoker.jobs (queue, kind, state, run_at, worker)
           SELECT 'q' || (i % 10), 'noop', 'queued', now() - interval '1 minute', NULL
             FROM generate_series(1, 20000) AS i"""
    )
    await db.execute("ANALYZE stoker.jobs")
    plan = "\n".join(
        r[0]
        for r in await db.fetch(
            "EXPLAIN "
            + queries.CLAIM.replace("$1", "'q1'")
            .replace("$2", "10")
            .replace("$3", "'w'")
            .replace("$4", "30")
        )
    )
    assert "jobs_fetch_idx" in plan, plan
    assert "Seq Scan" not in plan, plan


async def test_jobs_scheduled_for_later_do_not_slow_the_claim_or_the_idle_look(
    db: asyncpg.Connection,
) -> None:
    # Delayed jobs and retries in backoff wait in the same index as the due ones; read across
    # priorities, every claim and every idle pool's look at the next run_at scanned them all
    # (here ~1000 blocks each; now ~70 and ~30).
    await db.execute(
        """INSERT INTO stoker.jobs (queue, kind, run_at, priority)
           SELECT 'q', 'noop', now() + make_interval(hours => 1, secs => i), (i % 3)::smallint
             FROM generate_series(1, 50000) AS i"""
    )
    due = [
        await daemon.enqueue(db, queue="q", kind="noop", priority=priority)
        for priority in (0, 2, 0, 1)
    ]
    await db.execute("VACUUM ANALYZE stoker.jobs")

    def literal(statement: str, *args: str) -> str:
        for n, arg in enumerate(args, start=1):
            statement = statement.replace(f"${n}", arg)
        return statement

    async def blocks_read(statement: str) -> int:
        plan = await db.fetchval("EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) " + statement)
        top = json.loads(plan)[0]["Plan"]
        return int(top["Shared Hit Blocks"]) + int(top["Shared Read Blocks"])

    explained = db.transaction()  # EXPLAIN ANALYZE runs the claim: roll it back
    await explained.start()
    claim_blocks = await blocks_read(literal(queries.CLAIM, "'q'", "10", "'w'", "30"))
    await explained.rollback()
    assert claim_blocks < 300, f"the claim read {claim_blocks} blocks"
    next_blocks = await blocks_read(literal(queries.NEXT_DUE, "'q'"))
    assert next_blocks < 100, f"the look at the next run_at read {next_blocks} blocks"

    claimed = await db.fetch(queries.CLAIM, "q", 10, "w", 30.0)
    assert [r["id"] for r in claimed] == [due[1], due[3], due[0], due[2]]  # priority, then age
    await db.execute("DELETE FROM stoker.jobs WHERE worker = 'w'")
    earliest = await db.fetchval(
        "SELECT min(run_at) FROM stoker.jobs WHERE queue = 'q' AND state = 'queued'"
    )
    assert await db.fetchval(queries.NEXT_DUE, "q") == earliest  # across every priority


async def test_metrics_sample_reads_only_failed_jobs_from_history(db: asyncpg.Connection) -> None:
    # Every daemon samples queue depth every few seconds: it must not scan the whole history.
    await db.execute(
        """INSERT INTO stoker.job_history (id, queue, kind, payload, meta, priority, state,
               run_at, attempts, errors, created_at, started_at, finished_at)
           SELECT -i, 'q', 'noop', '{}', '{}', 0,
                  CASE WHEN i % 1000 = 0 THEN 'failed' ELSE 'succeeded' END::stoker.job_state,
                  now(), 1, '[]', now(), now(), now()
             FROM generate_series(1, 100000) AS i"""
    )
    await db.execute("VACUUM ANALYZE stoker.job_history")
    plan = "\n".join(r[0] for r in await db.fetch("EXPLAIN " + queries.QUEUE_DEPTH))
    # Either partial index of failed history (by queue, or by finish time) reads only those.
    assert "job_history_failed_idx" in plan or "job_history_failed_finished_idx" in plan, plan
    assert "Seq Scan on job_history" not in plan, plan
    depth = {(r["queue"], r["state"]): r["jobs"] for r in await db.fetch(queries.QUEUE_DEPTH)}
    assert depth == {("q", "failed"): 100}


async def test_stale_outcome_of_a_rescued_attempt_is_fenced_out(db: asyncpg.Connection) -> None:
    job_id = await daemon.enqueue(db, queue="default", kind="noop")
    [first] = await db.fetch(queries.CLAIM, "default", 10, "worker-a", 30.0)
    assert first["attempts"] == 1
    # worker-a freezes; its lease runs out and maintenance hands the job to worker-b.
    await db.execute("UPDATE stoker.jobs SET lease_expires_at = now() - interval '1 s'")
    assert [r["id"] for r in await db.fetch(queries.RESCUE)] == [job_id]
    [second] = await db.fetch(queries.CLAIM, "default", 10, "worker-b", 30.0)
    assert second["attempts"] == 2
    # worker-a wakes up and reports failure for attempt 1: it must not touch attempt 2.
    written = await write_outcome(
        db, job_id, attempt=1, outcome="failed", worker="worker-a", error="late"
    )
    assert written == []
    row = await db.fetchrow("SELECT state, worker, attempts FROM stoker.jobs WHERE id = $1", job_id)
    assert row is not None
    assert (row["state"], row["worker"], row["attempts"]) == ("active", "worker-b", 2)


async def test_outcome_write_looks_rows_up_by_primary_key(db: asyncpg.Connection) -> None:
    # The statistics of a fresh queue say `worker` is always NULL; a plan trusting them once
    # scanned the whole table for every outcome. The write must stay an index lookup.
    await db.execute(
        "INSERT INTO stoker.jobs (queue, kind) SELECT 'q', 'noop' FROM generate_series(1, 20000)"
    )
    await db.execute("ANALYZE stoker.jobs")
    claimed = await db.fetch(queries.CLAIM, "q", 500, "w", 30.0)
    ids = [r["id"] for r in claimed]
    n = len(ids)
    await db.execute("SET plan_cache_mode = force_generic_plan")
    statement = await db.prepare("EXPLAIN " + queries.COMPLETE)
    plan = "\n".join(
        r[0]
        for r in await statement.fetch(
            ids,
            [1] * n,
            ["succeeded"] * n,
            [None] * n,
            [None] * n,
            [None] * n,
            [],
            [],
            [],
            [],
            [],
            [],
            "w",
        )
    )
    assert "Seq Scan on jobs" not in plan, plan
    assert "Index Scan using jobs_pkey on jobs" in plan, plan
    # The same for the statement that writes a batch of successes only.
    lean = await db.prepare("EXPLAIN " + queries.COMPLETE_SUCCEEDED)
    plan = "\n".join(r[0] for r in await lean.fetch(ids, [1] * n, [None] * n, "w"))
    assert "Seq Scan on jobs" not in plan, plan
    assert "Index Scan using jobs_pkey on jobs" in plan, plan


async def test_heartbeat_never_waits_for_a_locked_row(db: asyncpg.Connection, dsn: str) -> None:
    job_id = await daemon.enqueue(db, queue="default", kind="noop")
    await db.fetch(queries.CLAIM, "default", 1, "w", 30.0)
    other = await asyncpg.connect(dsn)
    try:
        tx = other.transaction()
        await tx.start()
        await other.execute("SELECT 1 FROM stoker.jobs WHERE id = $1 FOR UPDATE", job_id)
        # While another transaction (an outcome write, say) holds the row, the heartbeat
        # passes it by at once instead of waiting (which deadlocked with outcome writes).
        await db.execute("SET statement_timeout = '2s'")
        lease = "SELECT lease_expires_at FROM stoker.jobs WHERE id = $1"
        before = await db.fetchval(lease, job_id)
        assert await db.fetch(queries.HEARTBEAT, [job_id], "w", 30.0) == []
        assert await db.fetchval(lease, job_id) == before
        await tx.rollback()
        assert await db.fetch(queries.HEARTBEAT, [job_id], "w", 30.0) == []
        renewed = await db.fetchval(lease, job_id)
        assert renewed > before
        # A renewed job with a cancel request is named: the poll behind the NOTIFY.
        assert await db.fetchval("SELECT stoker.cancel($1)", job_id) == "requested"
        rows = await db.fetch(queries.HEARTBEAT, [job_id], "w", 30.0)
        assert [r["id"] for r in rows] == [job_id]
        assert await db.fetchval(lease, job_id) > renewed
    finally:
        await other.close()
