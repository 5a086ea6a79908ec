"""The client's SQL, written once with $n placeholders and CAST() (never `::`, which
SQLAlchemy's text() would read as a bind) and rewritten for each driver's paramstyle.

JSON goes in as text and comes out as text: the caller's connection may have a jsonb codec of
its own (asyncpg, SQLAlchemy's asyncpg dialect), and text means the same to every driver."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

ENQUEUE = """
SELECT stoker.enqueue(CAST($1 AS text), CAST($2 AS text), CAST(CAST($3 AS text) AS jsonb),
                      CAST($4 AS timestamptz), CAST($5 AS integer), CAST($6 AS text),
                      CAST($7 AS integer), CAST(CAST($8 AS text) AS jsonb), CAST($9 AS text))
"""

# One parameter, a JSON array of jobs, whatever the driver: no driver's array typing to trip on
# (a column of NULLs, ints that fit a smallint). As daemon.enqueue.enqueue_many: a job whose
# unique_key a live job holds is skipped, and only the ids inserted come back.
ENQUEUE_MANY = """
INSERT INTO stoker.jobs (queue, kind, payload, run_at, priority, unique_key, max_attempts, meta,
                         concurrency_key)
SELECT j.queue, j.kind, coalesce(j.payload, '{}'), coalesce(j.run_at, now()),
       coalesce(j.priority, 0), j.unique_key, j.max_attempts, coalesce(j.meta, '{}'),
       j.concurrency_key
  FROM jsonb_to_recordset(CAST(CAST($1 AS text) AS jsonb)) AS j(
       queue text, kind text, payload jsonb, run_at timestamptz, priority smallint,
       unique_key text, max_attempts integer, meta jsonb, concurrency_key text)
ON CONFLICT (unique_key) WHERE unique_key IS NOT NULL DO NOTHING
RETURNING id
"""

# As daemon.cron.queries.SAVE_SCHEDULE.
SAVE_SCHEDULE = """
INSERT INTO stoker.schedules (name, cron, timezone, kind, queue, payload, meta,
                              enabled, catch_up, max_catch_up, overlap, description,
                              skip_grace, ping_url)
VALUES (CAST($1 AS text), CAST($2 AS text), CAST($3 AS text), CAST($4 AS text),
        CAST($5 AS text), CAST(CAST($6 AS text) AS jsonb), CAST(CAST($7 AS text) AS jsonb),
        CAST($8 AS boolean), CAST($9 AS text), CAST($10 AS integer), CAST($11 AS text),
        CAST($12 AS text), CAST($13 AS float8), CAST($14 AS text))
ON CONFLICT (name) DO UPDATE SET cron = excluded.cron, timezone = excluded.timezone,
    kind = excluded.kind, queue = excluded.queue, payload = excluded.payload,
    meta = excluded.meta, enabled = excluded.enabled, catch_up = excluded.catch_up,
    max_catch_up = excluded.max_catch_up, overlap = excluded.overlap,
    description = excluded.description, skip_grace = excluded.skip_grace,
    ping_url = excluded.ping_url
"""

GET_JOB = """
SELECT id, queue, kind, CAST(state AS text), attempts, CAST(result AS text), last_error,
       CAST(progress AS text), created_at, started_at, finished_at
  FROM stoker.all_jobs WHERE id = CAST($1 AS bigint)
"""

# -- wait_for (see waiting.py) ---------------------------------------------------------------

LISTEN = "LISTEN stoker_done"
UNLISTEN = "UNLISTEN stoker_done"
CHANNEL = "stoker_done"

# Held while waiting: a transaction that ends a job under REPEATABLE READ or SERIALIZABLE
# cannot see waiters' rows registered after its snapshot, so it tries this lock instead (see
# sql/migrations/021_waiters_any_isolation.sql): held, it wakes every waiter ('*'); free, it
# keeps it until it commits, and a waiter arriving meanwhile waits here until then.
HOLD = "SELECT pg_advisory_lock_shared(8319396919015205236)"
RELEASE = "SELECT pg_advisory_unlock_shared(8319396919015205236)"
ANY_JOB = "*"  # a NOTIFY payload: look again, whatever job you wait for

# The waiter's row, and the rows of waiters whose sessions ended without removing theirs.
REGISTER = """
WITH stale AS (
    DELETE FROM stoker.job_waiters w
     WHERE NOT EXISTS (SELECT 1 FROM pg_stat_activity a WHERE a.pid = w.backend_pid)
)
INSERT INTO stoker.job_waiters (job_id) VALUES (CAST($1 AS bigint))
"""

UNREGISTER = """
DELETE FROM stoker.job_waiters
 WHERE job_id = CAST($1 AS bigint) AND backend_pid = pg_backend_pid()
"""

# The live row, locked for a moment: a transaction that is moving the job to history holds
# its row (it deleted it) and, if it began before our REGISTER, will not announce the end; so
# this waits for that transaction to commit, and then finds no row. Only then is history
# read, in a statement of its own (a new snapshot, which sees that commit).
LIVE_STATE = """
SELECT CAST(state AS text) FROM stoker.jobs WHERE id = CAST($1 AS bigint) FOR KEY SHARE
"""

_PLACEHOLDER = re.compile(r"\$(\d+)")


def for_format(sql: str, args: Sequence[Any]) -> tuple[str, list[Any]]:
    """psycopg's %s: each $n in order of appearance; literal % doubled."""
    order: list[int] = []

    def one(m: re.Match[str]) -> str:
        order.append(int(m.group(1)))
        return "%s"

    text = _PLACEHOLDER.sub(one, sql.replace("%", "%%"))
    return text, [args[i - 1] for i in order]


def for_named(sql: str, args: Sequence[Any]) -> tuple[str, dict[str, Any]]:
    """SQLAlchemy text()'s :name binds."""
    text = _PLACEHOLDER.sub(lambda m: f":p{m.group(1)}", sql)
    return text, {f"p{i}": value for i, value in enumerate(args, start=1)}
