"""What the dashboard shows of the queues without counting at request time: the latest queue
depth sample this process took (the metrics sampler's), and jobs finished per minute and
queue, which the leader records once a minute in stoker.throughput from a bounded range of
job_history's BRIN-indexed finished_at."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg

from daemon.events import wait_any
from daemon.operate.limits import QueueLimits
from daemon.store.db import DB_ERRORS

log = logging.getLogger("stoker.throughput")

CATCH_UP_MINUTES = 15  # the most closed minutes one pass reads: minutes missed while no leader
KEEP_DAYS = 8
RATE_MINUTES = 5  # rates per minute are averaged over the last closed minutes

# The last recorded minute again (jobs whose outcome committed late) and every closed minute
# since, at most CATCH_UP_MINUTES back: a range scan of the BRIN index, idempotent.
RECORD = f"""
WITH span AS (
    SELECT greatest((SELECT max(minute) FROM stoker.throughput),
                    date_trunc('minute', now()) - interval '{CATCH_UP_MINUTES} minutes') AS since,
           date_trunc('minute', now()) AS until
)
INSERT INTO stoker.throughput (minute, queue, completed, failed)
SELECT date_trunc('minute', h.finished_at), h.queue,
       count(*) FILTER (WHERE h.state = 'succeeded'), count(*) FILTER (WHERE h.state = 'failed')
  FROM stoker.job_history h, span
 WHERE h.finished_at >= span.since AND h.finished_at < span.until
 GROUP BY 1, 2
ON CONFLICT (minute, queue) DO UPDATE
   SET completed = excluded.completed, failed = excluded.failed
"""

PRUNE = f"DELETE FROM stoker.throughput WHERE minute < now() - interval '{KEEP_DAYS} days'"

SERIES = """
SELECT date_bin($1::interval, minute, '2000-01-01 00:00+00') AS bucket,
       sum(completed)::bigint AS completed, sum(failed)::bigint AS failed
  FROM stoker.throughput
 WHERE minute >= date_bin($1::interval, now() - $2::interval, '2000-01-01 00:00+00')
 GROUP BY 1 ORDER BY 1
"""

RATES = f"""
SELECT queue, sum(completed)::float8 / {RATE_MINUTES} AS completed,
       sum(failed)::float8 / {RATE_MINUTES} AS failed
  FROM stoker.throughput
 WHERE minute >= date_trunc('minute', now()) - interval '{RATE_MINUTES} minutes'
 GROUP BY queue
"""

NOW = "SELECT now()"
PAUSED = "SELECT name, paused FROM stoker.queues"


@dataclass(frozen=True)
class QueueSample:
    """Jobs per queue and state (live jobs, and failed ones kept in history) and the age of
    each queue's oldest due job, as of `at`."""

    at: datetime
    counts: Mapping[str, Mapping[str, int]] = field(default_factory=dict)
    oldest_due_s: Mapping[str, float] = field(default_factory=dict)
    limits: Mapping[str, QueueLimits] = field(default_factory=dict)  # limited queues only

    @classmethod
    def from_rows(cls, rows: Iterable[Mapping[str, Any]]) -> QueueSample:
        counts: dict[str, dict[str, int]] = {}
        oldest: dict[str, float] = {}
        for r in rows:
            by_state = counts.setdefault(r["queue"], {})
            by_state[r["state"]] = by_state.get(r["state"], 0) + int(r["jobs"])
            if r["oldest_due_s"] is not None:
                oldest[r["queue"]] = max(oldest.get(r["queue"], 0.0), float(r["oldest_due_s"]))
        return cls(datetime.now(UTC), counts, oldest)


async def record(db: asyncpg.Pool | asyncpg.Connection) -> None:
    """Count the closed minutes not yet recorded (and the last one again); drop old minutes."""
    await db.execute(RECORD)
    await db.execute(PRUNE)


async def record_loop(
    db: asyncpg.Pool, *, is_leader: Callable[[], bool], stopping: asyncio.Event, first: float = 2.0
) -> None:
    """On the leader, a pass just after every minute starts (and one soon after start)."""
    delay = first
    while True:
        await wait_any(stopping, seconds=delay)
        if stopping.is_set():
            return
        delay = 61.0 - time.time() % 60  # a second into the next minute
        if not is_leader():
            continue
        try:
            await record(db)
        except DB_ERRORS as exc:
            log.warning("recording throughput failed: %s", exc)


@dataclass(frozen=True)
class Series:
    """Jobs finished per bucket, oldest first, every bucket present."""

    step: timedelta
    buckets: list[tuple[datetime, int, int]]  # (start, completed, failed)


async def series(conn: asyncpg.Connection, step: timedelta, span: timedelta) -> Series:
    rows = await conn.fetch(SERIES, step, span)
    now: datetime = await conn.fetchval(NOW)
    found = {r["bucket"]: (int(r["completed"]), int(r["failed"])) for r in rows}
    epoch = datetime(2000, 1, 1, tzinfo=UTC)
    last = epoch + ((now - epoch) // step) * step
    count = int(span / step)
    buckets = []
    for i in range(count - 1, -1, -1):
        start = last - i * step
        completed, failed = found.get(start, (0, 0))
        buckets.append((start, completed, failed))
    return Series(step, buckets)


async def rates(conn: asyncpg.Connection) -> dict[str, tuple[float, float]]:
    """Per queue: (completed, failed) per minute over the last closed minutes."""
    return {
        r["queue"]: (float(r["completed"]), float(r["failed"])) for r in await conn.fetch(RATES)
    }


async def paused(conn: asyncpg.Connection) -> dict[str, bool]:
    """Every queue with a row in stoker.queues: paused or not (a small table)."""
    return {r["name"]: bool(r["paused"]) for r in await conn.fetch(PAUSED)}
