"""Review of the two outcome lanes of a queue held back by its global limit (issue 17, commit
457e1ab): a second completer writes half the limit's jobs, each lane claiming along with its
own writes. Real daemons and a real PostgreSQL."""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

import asyncpg

from tests.conftest import DaemonFactory, eventually


async def insert(
    db: asyncpg.Connection,
    queue: str,
    seconds: float,
    label: str,
    *,
    priority: int = 0,
    kind: str = "test.record",
    max_attempts: int = 5,
) -> int:
    job_id: int = await db.fetchval(
        "INSERT INTO stoker.jobs (queue, kind, payload, priority, max_attempts)"
        " VALUES ($1, $2, jsonb_build_object('seconds', $3::float8, 'label', $4::text), $5, $6)"
        " RETURNING id",
        queue,
        kind,
        seconds,
        label,
        priority,
        max_attempts,
    )
    return job_id


async def state(db: asyncpg.Connection, job_id: int) -> str | None:
    value: str | None = await db.fetchval(
        "SELECT state::text FROM stoker.all_jobs WHERE id = $1", job_id
    )
    return value


def runs(tmp: Path) -> list[dict[str, Any]]:
    path = tmp / "events.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def most_at_once(spans: list[tuple[float, float]]) -> int:
    edges = sorted([(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans])
    at_once = most = 0
    for _, step in edges:
        at_once += step
        most = max(most, at_once)
    return most


async def a_claim_along_waits_for_a_lock(db: asyncpg.Connection) -> bool:
    n: int = await db.fetchval(
        """SELECT count(*) FROM pg_stat_activity
            WHERE datname = current_database() AND wait_event_type = 'Lock'
              AND query LIKE '%finish_and_claim%'"""
    )
    return n > 0


# Review finding (fixed): QueuePool.released() ignored every release while any
# lane's claim along is in flight ("that claim saw the slots free"). With one completer that
# held: the only write in flight was the claim's own. With two lanes the other lane writes
# outcomes alone (a batch that is not all 'succeeded' never rides, outcomes.py:413-414) while
# the first lane's statement is in flight; when that statement counted the limit before the
# other lane committed, it claims too little and reports 'global', claimed_along
# (pool.py:372) sets no _fetch_needed, and the pool sits in _wait_for_limit until
# _counted_at + poll_interval (or the next claim along) with a global slot free.
# Fixed: such a release is noted, and the pool claims once the claims along are over.
async def test_a_slot_freed_by_one_lane_while_the_other_lane_claims_along_is_used(
    daemons: DaemonFactory, db: asyncpg.Connection, dsn: str
) -> None:
    """Two lanes of a global limit of 2. Lane X's job succeeds: its outcome is written with a
    claim along, which counts the limit (lane Y's job still active: room for one) and is then
    held (a test session holds an expired rate_starts row the claim deletes after counting).
    Meanwhile lane Y's job is cancelled: its outcome is written alone and frees a slot. The
    claim along then answers with one job and 'global'. The freed slot must be used well
    before the 30 s poll: the queue has a due job, and only one job of the limit's two runs."""
    # Inserted before the daemon starts, so that its first claim takes x and y together
    # (the limit is full: one job to each lane).
    x = await insert(db, "capped", 4, "x", priority=10)
    y = await insert(db, "capped", 60, "y", priority=9)
    # Claimed along with x's outcome; runs long enough to outlast the test.
    along = await insert(db, "capped", 25, "along", priority=5)
    due = await insert(db, "capped", 0, "due", priority=1)

    await daemons.start(
        """
        [queues.capped]
        concurrency = 4
        global_concurrency = 2
        poll_interval = 30
        cancel_grace = 0.1
        # Generous: never what holds the claims back. Its window's expired starts are what
        # the claim deletes after counting the global limit (stoker.claim_limited).
        rate_limit = "1000/1s"
        """
    )

    async def both_run() -> bool:
        return await state(db, x) == "active" and await state(db, y) == "active"

    await eventually(both_run, 10)
    # One claim took both (the same claim time): the pool split them into the two lanes.
    starts = await db.fetch("SELECT started_at FROM stoker.jobs WHERE id = ANY($1)", [x, y])
    assert len({r["started_at"] for r in starts}) == 1
    await db.execute(
        "INSERT INTO stoker.rate_starts (queue, key, at, starts)"
        " VALUES ('capped', '', now() - interval '1 hour', 1)"
    )
    locker = await asyncpg.connect(dsn)
    try:
        tx = locker.transaction()
        await tx.start()
        held = await locker.fetch(
            "SELECT 1 FROM stoker.rate_starts WHERE queue = 'capped'"
            " AND at < now() - interval '10 minutes' FOR UPDATE"
        )
        assert len(held) == 1
        # x ends: its claim along counts the limit (y active), then waits for our row.
        await eventually(lambda: a_claim_along_waits_for_a_lock(db), 10)
        assert await state(db, x) == "active"  # its statement is in flight
        assert await db.fetchval("SELECT stoker.cancel($1)", y) == "requested"

        async def y_written() -> bool:
            return await state(db, y) == "cancelled"

        await eventually(y_written, 10)  # lane Y's outcome is written, its slot free
        await tx.rollback()
    finally:
        await locker.close()

    async def along_runs() -> bool:
        return await state(db, x) == "succeeded" and await state(db, along) == "active"

    await eventually(along_runs, 10)
    # The claim along took one job (`along`) for the limit's two slots, and `due` is due: it
    # must start in the slot y's write freed, not wait for the poll (it may have already).

    async def due_started() -> bool:
        return await state(db, due) != "queued"

    await eventually(due_started, 5)


async def test_a_shutdown_during_a_two_lane_drain_leaves_nothing_active_or_run_twice(
    daemons: DaemonFactory, db: asyncpg.Connection, tmp_path: Path
) -> None:
    """SIGTERM in the middle of a drain whose outcomes go in two lanes (each claiming along):
    no job is left 'active', none runs twice, and the limit held; a second daemon drains the
    rest, and every job has run exactly once."""
    config = """
        shutdown_timeout = 10
        [queues.capped]
        concurrency = 8
        global_concurrency = 4
        poll_interval = 60
        """
    first = await daemons.start(config)
    total = 160
    await db.execute(
        """
        INSERT INTO stoker.jobs (queue, kind, payload)
        SELECT 'capped', 'test.record', jsonb_build_object('seconds', 0.03, 'label', i::text)
          FROM generate_series(1, $1) AS i
        """,
        total,
    )

    async def some_ran() -> bool:
        return len(runs(tmp_path)) >= 30

    await eventually(some_ran, 15)
    first.proc.send_signal(signal.SIGTERM)
    assert await first.wait_exit(30) == 0
    left_active = await db.fetch("SELECT id, worker FROM stoker.jobs WHERE state = 'active'")
    assert left_active == [], first.log()[-3000:]
    done = runs(tmp_path)
    ids = [r["id"] for r in done]
    assert len(ids) == len(set(ids)), "a job ran twice"
    succeeded = {
        r["id"]
        for r in await db.fetch(
            "SELECT id FROM stoker.job_history WHERE queue = 'capped' AND state = 'succeeded'"
        )
    }
    assert succeeded == set(ids)  # every run recorded, and nothing recorded without a run
    assert len(succeeded) < total  # the shutdown did interrupt the drain

    await daemons.start(config)

    async def drained() -> bool:
        n: int = await db.fetchval(
            "SELECT count(*) FROM stoker.job_history WHERE queue = 'capped' AND state = 'succeeded'"
        )
        return n == total

    await eventually(drained, 20, interval=0.1)
    done = runs(tmp_path)
    assert sorted(r["id"] for r in done) == sorted(set(r["id"] for r in done))
    assert len(done) == total
    assert most_at_once([(r["start"], r["end"]) for r in done]) <= 4


async def test_two_lanes_with_failures_among_successes_drain_within_the_limit(
    daemons: DaemonFactory, db: asyncpg.Connection, tmp_path: Path
) -> None:
    """Outcomes that are not all successes are written without a claim along, beside the other
    lane's claims along: the drain still ends well before the 60 s poll, each job once, and
    never more than the limit at once."""
    ok = [await insert(db, "capped", 0.04, f"ok{i}") for i in range(45)]
    bad = [
        await insert(db, "capped", 0, f"bad{i}", kind="test.fail", max_attempts=1)
        for i in range(15)
    ]
    await daemons.start(
        """
        [queues.capped]
        concurrency = 6
        global_concurrency = 3
        poll_interval = 60
        """
    )

    async def drained() -> bool:
        rows = await db.fetch(
            "SELECT state::text AS s, count(*) AS n FROM stoker.job_history"
            " WHERE queue = 'capped' GROUP BY 1"
        )
        by = {r["s"]: r["n"] for r in rows}
        return by.get("succeeded") == len(ok) and by.get("failed") == len(bad)

    await eventually(drained, 25, interval=0.1)
    done = runs(tmp_path)
    assert sorted(r["id"] for r in done) == sorted(ok)
    assert most_at_once([(r["start"], r["end"]) for r in done]) <= 3
