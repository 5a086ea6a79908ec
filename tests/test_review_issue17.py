"""Review of issue 17 (limits across daemons, commit 661c5b9): regression tests for bugs found.
Each was seen failing (xfail, strict) on the code as reviewed, and passes since its fix."""

from __future__ import annotations

import contextlib
import time

import asyncpg

from tests.conftest import DaemonFactory, eventually

CLAIM = "SELECT * FROM stoker.claim_limited($1, $2, $3, 30, false, $4, $5, $6, $7, $8, NULL)"


async def active(db: asyncpg.Connection, queue: str) -> int:
    n: int = await db.fetchval(
        "SELECT count(*) FROM stoker.jobs WHERE queue = $1 AND state = 'active'", queue
    )
    return n


# The bug: claim_limited counts the running jobs with the caller's snapshot: under REPEATABLE
# READ (an explicit transaction, or default_transaction_isolation set on the database or role)
# that snapshot predates the advisory lock, so claims committed meanwhile are not counted and
# global_concurrency is exceeded
async def test_global_limit_holds_for_a_repeatable_read_caller(
    db: asyncpg.Connection, dsn: str
) -> None:
    await db.execute(
        "INSERT INTO stoker.jobs (queue, kind, run_at) VALUES ('rr', 'test.record', now())"
    )
    other = await asyncpg.connect(dsn)
    try:
        async with other.transaction(isolation="repeatable_read"):
            # The caller's snapshot: one queued job, none active.
            await other.fetchval("SELECT count(*) FROM stoker.jobs")
            # Meanwhile another daemon (READ COMMITTED, autocommit) claims a job that the
            # caller's snapshot does not see, up to the limit of 1.
            await db.execute(
                "INSERT INTO stoker.jobs (queue, kind, priority, run_at)"
                " VALUES ('rr', 'test.record', 5, now())"
            )
            got = await db.fetch(CLAIM, "rr", 10, "w-a", 1, None, None, None, False)
            assert [r["id"] for r in got if r["id"] is not None], got
            assert await active(db, "rr") == 1
            # The RR caller claims under the same limit after the other claim committed.
            with contextlib.suppress(asyncpg.PostgresError):  # refusing it is a fix too
                await other.fetch(CLAIM, "rr", 10, "w-b", 1, None, None, None, False)
        assert await active(db, "rr") <= 1
    finally:
        await other.close()


# The bug: in a key-limited queue the claim's search for jobs without a key (the second arm of
# `candidates`) has no index that skips keyed jobs: PostgreSQL scans stoker.jobs, so every claim
# reads a saturated key's whole backlog, under the queue's lock
async def test_key_limited_claim_does_not_read_a_saturated_keys_backlog(
    db: asyncpg.Connection,
) -> None:
    backlog = 20_000
    await db.execute(
        """
        INSERT INTO stoker.jobs (queue, kind, concurrency_key, run_at)
        SELECT 'orgs', 'test.record', 'big', now() - interval '1 minute'
          FROM generate_series(1, $1)
        """,
        backlog,
    )
    await db.execute("ANALYZE stoker.jobs")
    # One of the big key's jobs runs: the key is saturated (key_concurrency = 1).
    first = await db.fetch(CLAIM, "orgs", 10, "w-a", None, 1, None, None, False)
    assert len([r for r in first if r["id"] is not None]) == 1
    async with db.transaction():
        again = await db.fetch(CLAIM, "orgs", 10, "w-a", None, 1, None, None, False)
        assert [r["blocked"] for r in again] == ["key"]
        row = await db.fetchrow(
            "SELECT coalesce(seq_tup_read, 0) + coalesce(idx_tup_fetch, 0) AS tuples"
            "  FROM pg_stat_xact_user_tables WHERE relid = 'stoker.jobs'::regclass"
        )
    # A claim that finds nothing to start should read a few rows, not the whole backlog.
    assert row["tuples"] < 1_000, f"one claim read {row['tuples']} of {backlog} jobs"


# The bug: a claim held back by rate_limit_by_key reports blocked='key' with retry_at, but
# QueuePool.run only waits for retry_at when held back by 'global' or 'rate': a key held back by
# its rate window is looked for again only by the idle back-off (up to MAX_IDLE_FLOOR = 1 s), so
# a short window is used a fraction of its limit
async def test_rate_limit_by_key_claims_again_when_the_window_frees(
    daemons: DaemonFactory, db: asyncpg.Connection
) -> None:
    await daemons.start(
        """
        [queues.api]
        concurrency = 20
        rate_limit = "5/200ms"
        rate_limit_by_key = true
        """
    )
    total = 60
    t0 = time.monotonic()
    await db.execute(
        """
        INSERT INTO stoker.jobs (queue, kind, payload, concurrency_key)
        SELECT 'api', 'test.record', jsonb_build_object('seconds', 0, 'label', 'x'), 'acct'
          FROM generate_series(1, $1)
        """,
        total,
    )

    async def done() -> bool:
        n: int = await db.fetchval(
            "SELECT count(*) FROM stoker.job_history WHERE queue = 'api' AND state = 'succeeded'"
        )
        return n >= total

    # 60 starts at 5 per 200 ms take 2.4 s at the limit; 12 s at one window a second.
    await eventually(done, 20, interval=0.05)
    elapsed = time.monotonic() - t0
    assert elapsed < 6, f"{total} starts took {elapsed:.1f} s (ideal 2.4 s)"
