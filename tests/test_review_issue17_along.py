"""Review of the claim along (issue 17, commit 24b8c29): a queue held back by its global limit
claims in the statement that writes its outcomes (stoker.finish_and_claim since 025,
complete_and_claim before). Real daemons and a real PostgreSQL. Two tests show a bug the
review found (jobs claimed along as the daemon stops were left active), fixed since."""

from __future__ import annotations

import itertools
import json
import signal
from pathlib import Path
from typing import Any

import asyncpg

from tests.conftest import DaemonFactory, eventually

# stoker.claim_limited's lock of a queue (019): pg_advisory_xact_lock(1819112563,
# hashtext(queue)). A session holding it makes the claim of a finish_and_claim wait, which
# holds the statement (and so the claim along) in flight for as long as a test needs.
LIMITS_LOCK = "SELECT pg_advisory_lock(1819112563, hashtext($1))"
LIMITS_UNLOCK = "SELECT pg_advisory_unlock(1819112563, hashtext($1))"


async def insert(db: asyncpg.Connection, queue: str, seconds: float, label: str) -> int:
    job_id: int = await db.fetchval(
        "INSERT INTO stoker.jobs (queue, kind, payload)"
        " VALUES ($1, 'test.record', jsonb_build_object('seconds', $2::float8, 'label', $3::text))"
        " RETURNING id",
        queue,
        seconds,
        label,
    )
    return job_id


async def state(db: asyncpg.Connection, job_id: int) -> str | None:
    value: str | None = await db.fetchval(
        "SELECT state::text FROM stoker.all_jobs WHERE id = $1", job_id
    )
    return value


async def a_claim_waits_for_the_limits_lock(db: asyncpg.Connection) -> bool:
    n: int = await db.fetchval(
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
    )
    return n > 0


async def count_function_calls(db: asyncpg.Connection) -> None:
    """Sessions opened from now on count calls of plpgsql functions (pg_stat_user_functions),
    so that a test can tell that claims along were made at all."""
    name = await db.fetchval("SELECT current_database()")
    await db.execute(f"ALTER DATABASE \"{name}\" SET track_functions = 'pl'")


async def claims_along(db: asyncpg.Connection) -> int:
    await db.execute("SELECT pg_stat_clear_snapshot()")
    calls: int | None = await db.fetchval(
        "SELECT calls FROM pg_stat_user_functions WHERE funcname = 'finish_and_claim'"
    )
    return calls or 0


def runs(tmp: Path) -> list[dict[str, Any]]:
    path = tmp / "events.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line]


# Review finding (fixed): jobs claimed along once the daemon stops were left active.
async def test_jobs_claimed_along_while_shutting_down_are_run_or_handed_back(
    daemons: DaemonFactory, db: asyncpg.Connection, dsn: str
) -> None:
    """A claim along is made before `stopping` and answers after the capped pool's drain has
    returned (its pool ran nothing then; another queue's job keeps the shutdown going). The
    jobs it claimed must still end the shutdown run to an outcome or handed back: a job left
    'active' waits for its lease to expire and then runs again (a succeeded run included)."""
    daemon = await daemons.start(
        """
        shutdown_timeout = 30
        [queues.capped]
        concurrency = 5
        global_concurrency = 1
        poll_interval = 60
        [queues.other]
        concurrency = 1
        """
    )
    # `other` keeps the shutdown's drain going for a while after capped's pool has drained.
    slow_other = await insert(db, "other", 8, "other")
    first = await insert(db, "capped", 2, "first")
    # Claimed along with first's outcome, long enough to still run when the daemon exits.
    second = await insert(db, "capped", 30, "second")
    await insert(db, "capped", 0, "third")  # keeps the limit holding the pool back

    async def first_runs() -> bool:
        return await state(db, first) == "active" and await state(db, slow_other) == "active"

    await eventually(first_runs, 10)
    locker = await asyncpg.connect(dsn)
    try:
        await locker.execute(LIMITS_LOCK, "capped")
        # first ends: its outcome is written with a claim along, which waits for the lock.
        await eventually(lambda: a_claim_waits_for_the_limits_lock(db), 10)
        assert await state(db, first) == "active"  # the outcome's statement is in flight
        daemon.proc.send_signal(signal.SIGTERM)
        await daemon.wait_log("shutdown requested")
        await locker.execute(LIMITS_UNLOCK, "capped")
    finally:
        await locker.close()

    # The claim along answers now, its pool already drained.
    async def second_claimed() -> bool:
        return await state(db, second) != "queued"

    await eventually(second_claimed, 10)
    await daemon.wait_exit(60)
    assert await state(db, first) == "succeeded"
    assert await state(db, slow_other) == "succeeded"
    # Run to its end (succeeded) or handed back (queued): never left active by a daemon gone.
    assert await state(db, second) in ("succeeded", "queued"), (
        await db.fetchrow("SELECT state, worker, attempts FROM stoker.jobs WHERE id = $1", second),
        daemon.log()[-3000:],
    )


async def test_a_claim_along_cut_off_mid_statement_leaves_the_pool_claiming(
    daemons: DaemonFactory, db: asyncpg.Connection, dsn: str, tmp_path: Path
) -> None:
    """The connection of an outcome write that claims along is killed while the statement
    waits (a transient error, the database gone mid-statement): nothing was written or
    claimed, the pool must not wait for that claim forever, and the queue still drains with
    each job run once and the limit held."""
    await daemons.start(
        """
        [queues.capped]
        concurrency = 5
        global_concurrency = 1
        poll_interval = 60
        """
    )
    first = await insert(db, "capped", 1, "first")
    rest = [await insert(db, "capped", 0.05, f"j{i}") for i in range(8)]

    async def first_runs() -> bool:
        return await state(db, first) == "active"

    await eventually(first_runs, 10)
    locker = await asyncpg.connect(dsn)
    try:
        await locker.execute(LIMITS_LOCK, "capped")
        await eventually(lambda: a_claim_waits_for_the_limits_lock(db), 10)
        killed = await db.fetchval(
            """SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
                WHERE datname = current_database() AND query LIKE '%finish_and_claim%'
                  AND pid <> pg_backend_pid()"""
        )
        assert killed == 1
    finally:
        await locker.execute(LIMITS_UNLOCK, "capped")
        await locker.close()

    async def drained() -> bool:
        states = [await state(db, j) for j in [first, *rest]]
        return all(s == "succeeded" for s in states)

    # Well within the 60 s poll: a pool waiting for a claim that is over would miss this.
    await eventually(drained, 20)
    done = runs(tmp_path)
    assert sorted(r["id"] for r in done) == sorted([first, *rest])  # each run once
    edges = sorted([(r["start"], 1) for r in done] + [(r["end"], -1) for r in done])
    at_once = most = 0
    for _, step in edges:
        at_once += step
        most = max(most, at_once)
    assert most <= 1


async def test_a_rate_and_key_limit_beside_the_global_one_still_wake_the_pool(
    daemons: DaemonFactory, db: asyncpg.Connection, tmp_path: Path
) -> None:
    """Claims along set the rate limit's retry_at and the key cursor: the pool must wake at the
    rate window's end (not its 60 s poll), serve every key, and no window or key run over."""
    await count_function_calls(db)
    await daemons.start(
        """
        [queues.capped]
        concurrency = 5
        global_concurrency = 2
        key_concurrency = 1
        rate_limit = "4/1s"
        poll_interval = 60
        """
    )
    await db.execute(
        """
        INSERT INTO stoker.jobs (queue, kind, payload, concurrency_key)
        SELECT 'capped', 'test.record', jsonb_build_object('seconds', 0.05, 'label', i::text),
               'k' || (i % 3) FROM generate_series(1, 16) AS i
        """
    )

    async def drained() -> bool:
        n: int = await db.fetchval(
            "SELECT count(*) FROM stoker.job_history WHERE queue = 'capped' AND state = 'succeeded'"
        )
        return n == 16

    await eventually(drained, 20, interval=0.1)  # 16 starts at 4 a second: about 4 s
    done = runs(tmp_path)
    assert len(done) == 16
    starts = sorted(r["start"] for r in done)
    assert all(b - a >= 0.95 for a, b in zip(starts, starts[4:], strict=False)), starts
    for key in range(3):  # never two runs of one key at once
        spans = sorted((r["start"], r["end"]) for r in done if int(r["label"]) % 3 == key)
        assert all(a[1] <= b[0] for a, b in itertools.pairwise(spans)), spans
    await eventually(lambda: claims_along(db), 10)  # the case under test did happen


async def test_a_job_rescued_while_its_outcome_is_written_along_is_not_claimed_again(
    daemons: DaemonFactory, db: asyncpg.Connection, dsn: str, tmp_path: Path
) -> None:
    """The lease of a job that succeeded lapses and it is rescued (queued again, same attempt
    and worker) while its outcome's write waits for the row. The write still matches it (the
    fence is the attempt and worker), and the claim along, a statement after it, must not see
    it queued: the job runs once, its outcome is that of attempt 1."""
    await daemons.start(
        """
        [queues.capped]
        concurrency = 5
        global_concurrency = 1
        poll_interval = 60
        """
    )
    first = await insert(db, "capped", 1, "first")
    other = await insert(db, "capped", 0, "other")  # the limit holds the pool back

    async def first_runs() -> bool:
        return await state(db, first) == "active"

    await eventually(first_runs, 10)
    rescuer = await asyncpg.connect(dsn)
    try:
        tx = rescuer.transaction()
        await tx.start()
        # Holding the row: the outcome's DELETE waits for it, then sees the rescue below.
        await rescuer.execute("SELECT 1 FROM stoker.jobs WHERE id = $1 FOR UPDATE", first)

        async def write_waits() -> bool:
            n: int = await db.fetchval(
                """SELECT count(*) FROM pg_stat_activity
                    WHERE datname = current_database() AND wait_event_type = 'Lock'
                      AND query LIKE '%finish_and_claim%'"""
            )
            return n > 0

        await eventually(write_waits, 10)
        # What RESCUE does to a lapsed lease; run_at in the past so the claim takes it first.
        await rescuer.execute(
            """UPDATE stoker.jobs SET state = 'queued', lease_expires_at = NULL,
                      run_at = now() - interval '1 hour', last_error = 'lease expired'
                WHERE id = $1""",
            first,
        )
        await tx.commit()
    finally:
        await rescuer.close()

    async def drained() -> bool:
        return await state(db, first) == "succeeded" and await state(db, other) == "succeeded"

    await eventually(drained, 20)
    assert [r["id"] for r in runs(tmp_path)].count(first) == 1
    attempts = await db.fetchval("SELECT attempts FROM stoker.job_history WHERE id = $1", first)
    assert attempts == 1


# Review finding (fixed): jobs claimed along once the daemon stops were left active.
async def test_a_job_claimed_along_as_the_completer_closes_is_not_left_active(
    daemons: DaemonFactory, db: asyncpg.Connection, dsn: str, tmp_path: Path
) -> None:
    """As above with nothing else to drain: the claim along answers once the completer was told
    to close, and the completer ends right after it (its buffer is empty). The job it claimed
    is cancelled at exit without a hand-back (or, had it ended first, its outcome added to a
    buffer nobody writes: a succeeded job that runs again once its lease expires)."""
    daemon = await daemons.start(
        """
        [queues.capped]
        concurrency = 5
        global_concurrency = 1
        poll_interval = 60
        """
    )
    first = await insert(db, "capped", 1, "first")
    # Ends after the completer has stopped (its outcome added to a buffer nobody writes).
    second = await insert(db, "capped", 0.2, "second")
    await insert(db, "capped", 0, "third")  # keeps the limit holding the pool back

    async def first_runs() -> bool:
        return await state(db, first) == "active"

    await eventually(first_runs, 10)
    locker = await asyncpg.connect(dsn)
    try:
        await locker.execute(LIMITS_LOCK, "capped")
        await eventually(lambda: a_claim_waits_for_the_limits_lock(db), 10)
        daemon.proc.send_signal(signal.SIGTERM)
        # The pool ran nothing: its drain ends at once, and the completer is told to close
        # while its statement still waits for the lock.
        await daemon.wait_log("shutdown requested")
        await locker.execute(LIMITS_UNLOCK, "capped")
    finally:
        await locker.close()
    await daemon.wait_exit(30)
    assert await state(db, first) == "succeeded"
    ran = second in [r["id"] for r in runs(tmp_path)]
    final = await state(db, second)
    assert final == ("succeeded" if ran else "queued"), (ran, final)
