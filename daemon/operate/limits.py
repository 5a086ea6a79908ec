"""A queue's limits (issue 17) as an operator sees them: what the configuration sets and, read
from the database, how the queue stands against them. The limits themselves live only in the
daemons' configuration, so the reader passes them in."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TypedDict

import asyncpg

from daemon.config import QueueConfig

# One queue's standing, counted as stoker.claim_limited counts it (019_job_limits.sql): running
# jobs from the active rows (jobs_active_idx), starts from stoker.rate_starts on the database
# clock. $1 queue, $2 global_concurrency, $3 key_concurrency, $4 rate count, $5 rate window
# (seconds), $6 rate_limit_by_key. Jobs held back are the due queued ones a claim would skip
# for a limit: all of them once a queue-wide limit is reached, else those of the keys (and,
# per key, of the keyless jobs' shared window) at theirs. Every read is bounded by an index:
# jobs_active_idx for the running, rate_starts_idx for the window, jobs_fetch_idx and
# jobs_key_fetch_idx for the due jobs.
LIMIT_STANDING = """
WITH clock AS MATERIALIZED (SELECT clock_timestamp() AS t),
running AS (
    SELECT count(*)::int AS n FROM stoker.jobs WHERE queue = $1 AND state = 'active'
),
full_keys AS (
    SELECT concurrency_key AS k FROM stoker.jobs
     WHERE $3::int IS NOT NULL AND queue = $1 AND state = 'active'
       AND concurrency_key IS NOT NULL
     GROUP BY concurrency_key HAVING count(*) >= $3::int
),
recent AS (
    SELECT s.key AS k, sum(s.starts)::int AS n FROM stoker.rate_starts s, clock
     WHERE $4::int IS NOT NULL AND s.queue = $1
       AND s.at >= clock.t - make_interval(secs => $5::float8)
     GROUP BY s.key
),
full_windows AS (
    SELECT k FROM recent WHERE $6::boolean AND n >= $4::int
),
queue_wide AS (
    SELECT ($2::int IS NOT NULL AND (SELECT n FROM running) >= $2::int)
        OR ($4::int IS NOT NULL AND NOT $6::boolean
            AND coalesce((SELECT n FROM recent WHERE k = ''), 0) >= $4::int) AS reached
)
SELECT (SELECT n FROM running) AS running,
       (SELECT count(*) FROM full_keys)::int AS keys_at_limit,
       coalesce(CASE WHEN $6::boolean THEN (SELECT max(n) FROM recent)
                     ELSE (SELECT n FROM recent WHERE k = '') END, 0) AS rate_window_starts,
       CASE WHEN (SELECT reached FROM queue_wide) THEN
           (SELECT count(*) FROM stoker.jobs j, clock
             WHERE j.queue = $1 AND j.state = 'queued' AND j.run_at <= clock.t)
       ELSE
           (SELECT count(*) FROM stoker.jobs j, clock
             WHERE j.queue = $1 AND j.state = 'queued' AND j.run_at <= clock.t
               AND (j.concurrency_key IN (SELECT k FROM full_keys
                                          UNION SELECT k FROM full_windows WHERE k <> '')
                    OR (j.concurrency_key IS NULL
                        AND EXISTS (SELECT 1 FROM full_windows WHERE k = ''))))
       END::int AS held_back
"""


class QueueLimits(TypedDict):
    """A limited queue's limits (None: not set) and its standing against them."""

    global_concurrency: int | None
    key_concurrency: int | None
    rate_limit: str | None  # "50/1s"
    rate_limit_by_key: bool
    running: int  # jobs of the queue active now, all daemons
    keys_at_limit: int  # concurrency keys with key_concurrency jobs active
    # Starts in the current rate window; with rate_limit_by_key, the busiest key's window.
    rate_window_starts: int
    held_back: int  # due jobs waiting because a limit is reached


async def limit_standing(
    db: asyncpg.Pool | asyncpg.Connection,
    configured: Mapping[str, QueueConfig],
) -> dict[str, QueueLimits]:
    """Every limited queue of `configured`, by name; queues without limits are left out."""
    found: dict[str, QueueLimits] = {}
    for name in sorted(configured):
        c = configured[name]
        if not c.limited:
            continue
        rate = c.rate_limit
        row = await db.fetchrow(
            LIMIT_STANDING,
            name,
            c.global_concurrency,
            c.key_concurrency,
            rate.count if rate is not None else None,
            rate.window if rate is not None else None,
            c.rate_limit_by_key,
        )
        assert row is not None  # an aggregate: always one row
        found[name] = QueueLimits(
            global_concurrency=c.global_concurrency,
            key_concurrency=c.key_concurrency,
            rate_limit=None if rate is None else str(rate),
            rate_limit_by_key=c.rate_limit_by_key,
            running=row["running"],
            keys_at_limit=row["keys_at_limit"],
            rate_window_starts=row["rate_window_starts"],
            held_back=row["held_back"],
        )
    return found


def describe(limits: QueueLimits, sep: str = ", ") -> str:
    """One line for people: "running 4/4 (global), keys at limit 3 (key_concurrency 1),
    rate 50/50 in 1s, held back 120"."""
    parts = []
    g = limits["global_concurrency"]
    if g is not None:
        full = " (global)" if limits["running"] >= g else ""
        parts.append(f"running {limits['running']}/{g}{full}")
    else:
        parts.append(f"running {limits['running']}")
    k = limits["key_concurrency"]
    if k is not None:
        parts.append(f"keys at limit {limits['keys_at_limit']} (key_concurrency {k})")
    rate = limits["rate_limit"]
    if rate is not None:
        count, window = rate.split("/", 1)
        per = " per key" if limits["rate_limit_by_key"] else ""
        parts.append(f"rate {limits['rate_window_starts']}/{count} in {window}{per}")
    parts.append(f"held back {limits['held_back']}")
    return sep.join(parts)


def configured_limits(configured: Mapping[str, QueueConfig]) -> dict[str, dict[str, int]]:
    """Per limited queue, the limits set: "global", "key" and "rate" (starts per window)."""
    found: dict[str, dict[str, int]] = {}
    for name, c in configured.items():
        limits = {
            "global": c.global_concurrency,
            "key": c.key_concurrency,
            "rate": c.rate_limit.count if c.rate_limit is not None else None,
        }
        if chosen := {k: v for k, v in limits.items() if v is not None}:
            found[name] = chosen
    return found
