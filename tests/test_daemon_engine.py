"""The queue engine seen from outside: real `stoker run` processes against real PostgreSQL."""

from __future__ import annotations

import asyncio
import signal
from typing import Any

import asyncpg

from tests.conftest import DaemonFactory, eventually, stoker_cli

QUIET = """
lease_seconds = 30
[queues.default]
concurrency = 4
poll_interval = 60
backoff = { base = 0.3, cap = 10, jitter = 0 }
"""


async def job(db: asyncpg.Connection, job_id: int) -> asyncpg.Record | None:
    row: asyncpg.Record | None = await db.fetchrow(
        "SELECT * FROM stoker.all_jobs WHERE id = $1", job_id
    )
    return row


async def finished(db: asyncpg.Connection, job_id: int, timeout: float = 15) -> asyncpg.Record:
    async def check() -> asyncpg.Record | None:
        row = await job(db, job_id)
        return row if row is not None and row["state"] in ("succeeded", "failed") else None

    return await eventually(check, timeout)


async def insert(
    db: asyncpg.Connection, kind: str, payload: Any = None, queue: str = "default", **cols: Any
) -> int:
    """A plain SQL INSERT, as any application in any language would do it."""
    names = ["queue", "kind", "payload", *cols]
    placeholders = ", ".join(f"${i + 1}" for i in range(len(names)))
    job_id: int = await db.fetchval(
        f"INSERT INTO stoker.jobs ({', '.join(names)}) VALUES ({placeholders}) RETURNING id",
        queue,
        kind,
        payload or {},
        *cols.values(),
    )
    return job_id


async def test_notify_wakes_daemon_without_polling(
    daemons: DaemonFactory, db: asyncpg.Connection
) -> None:
    # With a 60 s poll interval only NOTIFY can start a job inserted while the daemon idles.
    await daemons.start(QUIET)
    first = await insert(db, "noop")
    assert (await finished(db, first))["state"] == "succeeded"
    second = await insert(db, "noop")
    row = await finished(db, second, timeout=10)
    assert row["state"] == "succeeded"
    latency = (row["started_at"] - row["created_at"]).total_seconds()
    assert latency < 5, f"started {latency:.3f}s after insert: woken by poll, not NOTIFY"


async def test_listener_reconnects_after_its_backend_is_killed(
    daemons: DaemonFactory, db: asyncpg.Connection
) -> None:
    daemon = await daemons.start(QUIET)
    killed = await db.fetchval(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
        "WHERE application_name = 'stoker-listener' AND datname = current_database()"
    )
    assert killed is True
    await daemon.wait_log("listener reconnected")
    job_id = await insert(db, "noop")
    row = await finished(db, job_id, timeout=10)
    assert row["state"] == "succeeded"
    assert (row["started_at"] - row["created_at"]).total_seconds() < 5


async def test_failing_twice_then_succeeding_backs_off_longer_each_time(
    daemons: DaemonFactory, db: asyncpg.Connection
) -> None:
    await daemons.start(QUIET)
    job_id = await insert(db, "test.flaky", {"succeed_on": 3})
    row = await finished(db, job_id)
    assert row["state"] == "succeeded"
    assert row["attempts"] == 3
    assert row["result"] == {"attempt": 3}
    errors = row["errors"]
    assert [e["attempt"] for e in errors] == [1, 2]
    assert all("transient failure" in e["error"] for e in errors)
    failed_at = [asyncpg_time(e["at"]) for e in errors]
    first_gap = (failed_at[1] - failed_at[0]).total_seconds()  # backoff 0.3 s + run
    second_gap = (row["started_at"] - failed_at[1]).total_seconds()  # backoff 0.6 s
    assert first_gap >= 0.3
    assert second_gap >= 0.6
    assert second_gap > first_gap


def asyncpg_time(text: str) -> Any:
    from datetime import datetime

    return datetime.fromisoformat(text)


async def test_always_failing_job_ends_failed_with_error_and_traceback(
    daemons: DaemonFactory, db: asyncpg.Connection, dsn: str
) -> None:
    await daemons.start(QUIET)
    job_id = await insert(db, "test.fail", max_attempts=2)
    row = await finished(db, job_id)
    assert row["state"] == "failed"
    assert row["attempts"] == 2
    assert "ValueError: boom on attempt 2" in row["last_error"]
    shown = stoker_cli(dsn, "jobs", "show", str(job_id))
    assert shown.returncode == 0, shown.stderr
    assert "state: failed" in shown.stdout
    assert "boom on attempt 1" in shown.stdout
    assert "boom on attempt 2" in shown.stdout
    assert "Traceback (most recent call last)" in shown.stdout
    assert 'raise ValueError(f"boom on attempt {ctx.attempt}")' in shown.stdout


async def test_permanent_error_fails_at_once(
    daemons: DaemonFactory, db: asyncpg.Connection
) -> None:
    await daemons.start(QUIET)
    job_id = await insert(db, "test.permanent")
    row = await finished(db, job_id)
    assert row["state"] == "failed"
    assert row["attempts"] == 1
    assert row["last_error"] == "PermanentJobError: the order does not exist"


async def test_retry_job_waits_the_requested_delay(
    daemons: DaemonFactory, db: asyncpg.Connection
) -> None:
    await daemons.start(QUIET)
    job_id = await insert(db, "test.retry_later", {"delay": 1.0})
    row = await finished(db, job_id)
    assert row["state"] == "succeeded"
    assert row["attempts"] == 2
    retried_at = asyncpg_time(row["errors"][0]["at"])
    assert (row["started_at"] - retried_at).total_seconds() >= 1.0
    assert "retry requested: not ready yet" in row["errors"][0]["error"]


async def test_handler_exceeding_timeout_is_failed_for_that_attempt_and_retried(
    daemons: DaemonFactory, db: asyncpg.Connection
) -> None:
    await daemons.start(
        """
        [queues.default]
        timeout = 0.5
        max_attempts = 2
        poll_interval = 60
        backoff = { base = 0.1, jitter = 0 }
        """
    )
    job_id = await insert(db, "test.sleep", {"seconds": 30, "first_attempt_only": True})
    row = await finished(db, job_id)
    assert row["state"] == "succeeded"
    assert row["attempts"] == 2
    assert row["errors"][0]["error"] == (
        "timed out: the handler ran longer than its timeout of 0.5s"
    )


async def test_jobs_claimed_together_each_keep_their_own_timeout(
    daemons: DaemonFactory, db: asyncpg.Connection
) -> None:
    # One claim, one statement: the quick jobs end first, and the slow one must still be cut
    # off at its timeout, not run on because its neighbours finished.
    await daemons.start(
        """
        [queues.default]
        timeout = 0.5
        max_attempts = 1
        poll_interval = 60
        """
    )
    ids = [
        r["id"]
        for r in await db.fetch(
            """INSERT INTO stoker.jobs (queue, kind, payload)
               SELECT 'default', 'test.sleep', jsonb_build_object('seconds', s)
                 FROM unnest(ARRAY[0.01, 30, 0.02]::float8[]) AS s
               RETURNING id"""
        )
    ]
    quick1, slow, quick2 = [await finished(db, i) for i in ids]
    assert (quick1["state"], quick2["state"]) == ("succeeded", "succeeded")
    assert slow["state"] == "failed"
    assert slow["last_error"].startswith(
        "timed out: the handler ran longer than its timeout of 0.5s"
    )


async def test_kill_9_loses_nothing(daemons: DaemonFactory, db: asyncpg.Connection) -> None:
    config = """
    lease_seconds = 2
    rescue_interval = 0.5
    [queues.default]
    poll_interval = 60
    """
    first = await daemons.start(config)
    job_id = await insert(db, "test.sleep", {"seconds": 300, "first_attempt_only": True})

    async def active() -> bool:
        row = await job(db, job_id)
        return row is not None and row["state"] == "active"

    await eventually(active)
    first.proc.send_signal(signal.SIGKILL)
    assert await first.wait_exit() == -signal.SIGKILL

    await daemons.start(config)
    row = await finished(db, job_id, timeout=20)
    assert row["state"] == "succeeded"
    assert row["attempts"] == 2
    assert "lease expired" in row["errors"][0]["error"]
    assert await db.fetchval("SELECT count(*) FROM stoker.jobs") == 0


async def test_sigterm_lets_running_jobs_finish_and_claims_nothing_more(
    daemons: DaemonFactory, db: asyncpg.Connection
) -> None:
    daemon = await daemons.start(
        """
        shutdown_timeout = 20
        [queues.default]
        concurrency = 2
        poll_interval = 60
        """
    )
    running = [await insert(db, "test.sleep", {"seconds": 1.5}) for _ in range(2)]

    async def both_active() -> bool:
        rows = await db.fetch("SELECT state FROM stoker.jobs WHERE id = ANY($1)", running)
        return len(rows) == 2 and all(r["state"] == "active" for r in rows)

    await eventually(both_active)
    waiting = [await insert(db, "noop") for _ in range(3)]
    daemon.proc.send_signal(signal.SIGTERM)
    assert await daemon.wait_exit() == 0
    for job_id in running:
        row = await job(db, job_id)
        assert row is not None and row["state"] == "succeeded"
    for job_id in waiting:
        row = await job(db, job_id)
        assert row is not None
        assert (row["state"], row["attempts"]) == ("queued", 0)


async def test_sigterm_hands_back_a_job_still_running_at_the_deadline(
    daemons: DaemonFactory, db: asyncpg.Connection
) -> None:
    daemon = await daemons.start(
        """
        shutdown_timeout = 1
        [queues.default]
        poll_interval = 60
        """
    )
    job_id = await insert(db, "test.sleep", {"seconds": 300})

    async def active() -> bool:
        row = await job(db, job_id)
        return row is not None and row["state"] == "active"

    await eventually(active)
    daemon.proc.send_signal(signal.SIGTERM)
    assert await daemon.wait_exit() == 0
    row = await job(db, job_id)
    assert row is not None
    assert row["state"] == "queued"
    assert row["attempts"] == 0  # an interrupted attempt is not counted
    assert row["worker"] is None
    assert "handed back" in daemon.log()


async def test_concurrency_limits_hold_and_every_job_runs_exactly_once(
    daemons: DaemonFactory, db: asyncpg.Connection
) -> None:
    daemon = await daemons.start(
        """
        [queues.three]
        concurrency = 3
        batch_size = 10
        [queues.five]
        concurrency = 5
        batch_size = 10
        """
    )
    ids = await db.fetch(
        """INSERT INTO stoker.jobs (queue, kind, payload)
           SELECT CASE WHEN i % 2 = 0 THEN 'three' ELSE 'five' END, 'test.record',
                  '{"seconds": 0.02}'
             FROM generate_series(1, 200) AS i RETURNING id"""
    )
    assert len(ids) == 200

    async def all_done() -> bool:
        done: int = await db.fetchval(
            "SELECT count(*) FROM stoker.job_history WHERE state = 'succeeded'"
        )
        return done == 200

    await eventually(all_done, timeout=60)
    assert await db.fetchval("SELECT count(*) FROM stoker.jobs") == 0
    assert await db.fetchval("SELECT max(attempts) FROM stoker.job_history") == 1
    events = daemon.events()
    assert sorted(e["id"] for e in events) == sorted(r["id"] for r in ids)
    for queue, limit in (("three", 3), ("five", 5)):
        peak = max_overlap([e for e in events if e["queue"] == queue])
        assert peak <= limit, f"{queue}: {peak} handlers ran at once, limit {limit}"
        assert peak == limit, f"{queue}: never reached its limit ({peak} < {limit})"


def max_overlap(events: list[dict[str, Any]]) -> int:
    points = sorted(
        [(e["start"], 1) for e in events] + [(e["end"], -1) for e in events],
        key=lambda p: (p[0], p[1]),
    )
    running = peak = 0
    for _, delta in points:
        running += delta
        peak = max(peak, running)
    return peak


async def test_priority_order(daemons: DaemonFactory, db: asyncpg.Connection) -> None:
    for label, priority in (("low", 0), ("high", 10), ("mid", 5), ("low2", 0), ("top", 20)):
        await insert(db, "test.record", {"label": label}, priority=priority)
    daemon = await daemons.start(
        """
        [queues.default]
        concurrency = 1
        batch_size = 1
        """
    )

    async def five() -> bool:
        return len(daemon.events()) == 5

    await eventually(five)
    assert [e["label"] for e in daemon.events()] == ["top", "high", "mid", "low", "low2"]


async def test_delayed_job_runs_at_run_at_not_before(
    daemons: DaemonFactory, db: asyncpg.Connection
) -> None:
    await daemons.start(QUIET)
    job_id = await db.fetchval(
        "SELECT stoker.enqueue('default', 'noop', '{}', now() + interval '1.5 seconds')"
    )
    row = await finished(db, job_id)
    late = (row["started_at"] - row["run_at"]).total_seconds()
    assert late >= 0, "ran before its run_at"
    assert late < 1.0, f"ran {late:.3f}s after its run_at"


async def test_a_due_job_locked_when_it_fell_due_still_runs_without_waiting_a_poll_interval(
    daemons: DaemonFactory, db: asyncpg.Connection, dsn: str
) -> None:
    # The pool wakes at run_at but its claim skips the row (locked elsewhere). With a 60 s
    # poll interval, only looking again for jobs already due gets it run once the lock goes;
    # the same path catches a job that falls due between an empty claim and the next look.
    await daemons.start(QUIET)
    job_id = await db.fetchval(
        "SELECT stoker.enqueue('default', 'noop', '{}', now() + interval '1 second')"
    )
    holder = await asyncpg.connect(dsn)
    try:
        async with holder.transaction():
            await holder.execute("SELECT 1 FROM stoker.jobs WHERE id = $1 FOR UPDATE", job_id)

            async def due_for_a_while() -> bool:
                return bool(
                    await db.fetchval(
                        "SELECT run_at < now() - interval '1 second' FROM stoker.jobs"
                        " WHERE id = $1",
                        job_id,
                    )
                )

            await eventually(due_for_a_while, timeout=10)
            held = await job(db, job_id)
            assert held is not None and held["state"] == "queued"
    finally:
        await holder.close()
    row = await finished(db, job_id, timeout=10)
    assert row["state"] == "succeeded"


async def test_bad_payload_and_unknown_kind_fail_clearly_and_daemon_keeps_running(
    daemons: DaemonFactory, db: asyncpg.Connection
) -> None:
    daemon = await daemons.start(QUIET)
    bad = await insert(db, "test.sleep", {"secs": 1})
    unknown = await insert(db, "reports.build")
    row = await finished(db, bad)
    assert row["state"] == "failed"
    assert row["attempts"] == 1
    assert "invalid payload for kind 'test.sleep'" in row["last_error"]
    assert "seconds: Field required" in row["last_error"]
    row = await finished(db, unknown)
    assert row["state"] == "failed"
    assert row["last_error"].startswith("no handler registered for kind 'reports.build' (known: ")
    assert "test.sleep" in row["last_error"]
    after = await insert(db, "noop")
    assert (await finished(db, after))["state"] == "succeeded"
    assert daemon.proc.poll() is None


async def test_heartbeats_keep_a_long_job_beyond_its_lease(
    daemons: DaemonFactory, db: asyncpg.Connection
) -> None:
    await daemons.start(
        """
        lease_seconds = 1.5
        rescue_interval = 0.2
        [queues.default]
        poll_interval = 60
        """
    )
    job_id = await insert(db, "test.sleep", {"seconds": 4})

    async def progressed() -> bool:
        row = await job(db, job_id)
        return row is not None and row["progress"] == {"percent": 10.0, "message": "sleeping"}

    await eventually(progressed)
    row = await finished(db, job_id)
    assert row["state"] == "succeeded"
    assert row["attempts"] == 1, row["errors"]
    assert row["errors"] == []


async def test_every_daemon_connection_killed_mid_job_loses_nothing(
    daemons: DaemonFactory, db: asyncpg.Connection
) -> None:
    # What a database restart or a failover looks like from the daemon: every backend gone.
    daemon = await daemons.start(QUIET)
    job_id = await insert(db, "test.sleep", {"seconds": 1})

    async def active() -> bool:
        row = await job(db, job_id)
        return row is not None and row["state"] == "active"

    await eventually(active)
    killed = await db.fetchval(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
        "WHERE datname = current_database() AND pid <> pg_backend_pid()"
    )
    assert killed >= 2  # the listener and at least one pool connection
    row = await finished(db, job_id, timeout=20)
    assert (row["state"], row["attempts"]) == ("succeeded", 1)
    await daemon.wait_log("listener reconnected")
    after = await insert(db, "noop")
    assert (await finished(db, after, timeout=10))["state"] == "succeeded"
    assert daemon.proc.poll() is None


async def test_outcomes_postgres_cannot_store_block_nothing(
    daemons: DaemonFactory, db: asyncpg.Connection
) -> None:
    daemon = await daemons.start(QUIET)
    ids = {
        mode: await insert(db, "test.poison", {"mode": mode})
        for mode in ("nan-result", "nul-in-result", "nul-in-error", "nan-delay")
    }
    plain = [await insert(db, "noop") for _ in range(5)]
    rows = {mode: await finished(db, job_id) for mode, job_id in ids.items()}
    assert rows["nan-result"]["state"] == "succeeded"
    assert "not JSON-serialisable" in rows["nan-result"]["result"]["unrecorded_result"]
    assert rows["nul-in-result"]["state"] == "succeeded"
    assert "refused" in rows["nul-in-result"]["result"]["unrecorded_result"]
    assert rows["nul-in-error"]["state"] == "failed"
    assert rows["nul-in-error"]["last_error"].startswith("ValueError: bad\\0byte")
    assert rows["nan-delay"]["state"] == "failed"
    assert "RetryJob delay must be between 0 seconds and a year" in rows["nan-delay"]["last_error"]
    for job_id in plain:
        assert (await finished(db, job_id))["state"] == "succeeded"
    assert daemon.proc.poll() is None


async def test_leases_are_renewed_while_draining_after_sigterm(
    daemons: DaemonFactory, db: asyncpg.Connection
) -> None:
    config = """
    lease_seconds = 1.5
    rescue_interval = 0.2
    shutdown_timeout = 20
    [queues.default]
    poll_interval = 60
    """
    draining = await daemons.start(config)
    job_id = await insert(db, "test.sleep", {"seconds": 4})

    async def active() -> bool:
        row = await job(db, job_id)
        return row is not None and row["state"] == "active"

    await eventually(active)
    await daemons.start(config)  # a second daemon, ready to rescue expired leases
    draining.proc.send_signal(signal.SIGTERM)
    assert await draining.wait_exit() == 0
    row = await finished(db, job_id)
    assert (row["state"], row["attempts"], row["errors"]) == ("succeeded", 1, [])


async def test_no_lost_wake_up_at_the_idle_busy_boundary(
    daemons: DaemonFactory, db: asyncpg.Connection, dsn: str
) -> None:
    # Inserts only NOTIFY a daemon that said it waits. Hammer the moment a pool goes from busy
    # to idle: with a 60 s poll interval, any lost wake-up would show as a job that waited.
    await daemons.start(
        """
        [queues.default]
        concurrency = 4
        batch_size = 4
        poll_interval = 60
        """
    )
    producer = await asyncpg.connect(dsn)
    try:
        ids = []
        for burst in range(40):
            for _ in range(1 + burst % 7):  # bursts of 1-7 jobs, 0-9 ms apart
                ids.append(await producer.fetchval("SELECT stoker.enqueue('default', 'noop')"))
            await asyncio.sleep((burst % 10) / 1000)  # vary the gap across the boundary

        async def all_done() -> bool:
            done: int = await db.fetchval(
                "SELECT count(*) FROM stoker.job_history WHERE id = ANY($1)", ids
            )
            return done == len(ids)

        await eventually(all_done, timeout=30)
    finally:
        await producer.close()
    waits = await db.fetch(
        "SELECT extract(epoch FROM started_at - created_at) AS wait FROM stoker.job_history"
    )
    slowest = max(float(r["wait"]) for r in waits)
    assert slowest < 5, f"a job waited {slowest:.2f}s: a wake-up was lost"


async def test_a_busy_daemon_is_not_notified_and_an_idle_one_is(
    daemons: DaemonFactory, db: asyncpg.Connection, dsn: str
) -> None:
    await daemons.start(QUIET)
    first = await insert(db, "noop")
    await finished(db, first)

    async def registered() -> bool:
        n: int = await db.fetchval("SELECT count(*) FROM stoker.waiting WHERE queue = 'default'")
        return n == 1

    await eventually(registered)  # idle: it said it waits, so inserts wake it
    listener = await asyncpg.connect(dsn)
    received: asyncio.Queue[str] = asyncio.Queue()
    await listener.add_listener("stoker_jobs", lambda *a: received.put_nowait(a[3]))
    try:
        await db.execute("DELETE FROM stoker.waiting")  # as if every daemon were busy
        await insert(db, "noop", queue="nobody-waits")
        await insert(db, "noop", queue="default")
        await db.execute(
            "INSERT INTO stoker.waiting VALUES ('default', 'x', now() + interval '1 minute')"
        )
        await insert(db, "noop", queue="default")
        assert await asyncio.wait_for(received.get(), timeout=10) == "default"
        assert received.empty()  # the first two inserts sent nothing
    finally:
        await listener.close()


async def test_daemon_vacuums_the_jobs_table_after_every_n_claims(
    daemons: DaemonFactory, db: asyncpg.Connection
) -> None:
    # Dead fetch-index entries of claimed jobs slow every later claim until a vacuum.
    async def vacuums() -> int:
        count: int = await db.fetchval(
            "SELECT vacuum_count FROM pg_stat_user_tables"
            " WHERE schemaname = 'stoker' AND relname = 'jobs'"
        )
        return count

    before = await vacuums()
    await daemons.start(
        QUIET.replace("lease_seconds = 30", "lease_seconds = 30\nvacuum_after_claims = 100")
    )
    await db.execute(
        "INSERT INTO stoker.jobs (queue, kind)"
        " SELECT 'default', 'noop' FROM generate_series(1, 300)"
    )

    async def vacuumed() -> bool:
        return await vacuums() > before and not await db.fetchval(
            "SELECT EXISTS (SELECT 1 FROM stoker.jobs)"
        )

    await eventually(vacuumed, timeout=20)


async def test_history_past_its_retention_is_purged_and_recent_history_kept(
    daemons: DaemonFactory, db: asyncpg.Connection
) -> None:
    await db.execute(
        """INSERT INTO stoker.job_history (id, queue, kind, payload, meta, priority, state,
               run_at, attempts, errors, created_at, finished_at)
           SELECT -i, 'default', 'noop', '{}', '{}', 0, 'succeeded', t, 1, '[]', t, t
             FROM generate_series(1, 6000) AS i,
                  LATERAL (SELECT now() - CASE WHEN i % 2 = 0 THEN interval '2 days'
                                               ELSE interval '1 hour' END) AS x(t)"""
    )
    await daemons.start("history_retention_days = 1\nrescue_interval = 0.2\n" + QUIET)

    async def purged() -> bool:
        old: int = await db.fetchval(
            "SELECT count(*) FROM stoker.job_history WHERE finished_at < now() - interval '1 day'"
        )
        return old == 0

    await eventually(purged)
    kept = await db.fetchval("SELECT count(*) FROM stoker.job_history")
    assert kept == 3000
