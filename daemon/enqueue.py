"""Enqueue from Python on the caller's own asyncpg connection, inside its transaction.

The daemon's own path (its admin API and CLI, handlers): asyncpg only, on the daemon's
prepared statements. Apps on other drivers (psycopg 3, SQLAlchemy) use daemon.client."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import asyncpg

# One Job for both: daemon.client.enqueue_many takes the same objects on any driver.
from daemon.client.jobs import Job
from daemon.store import queries
from daemon.store.db import as_json_text

__all__ = ["Job", "enqueue", "enqueue_many"]


async def enqueue(
    conn: asyncpg.Connection | asyncpg.Pool,
    *,
    queue: str,
    kind: str,
    payload: Any = None,
    run_at: datetime | None = None,
    priority: int = 0,
    unique_key: str | None = None,
    max_attempts: int | None = None,
    meta: Mapping[str, Any] | None = None,
    concurrency_key: str | None = None,
) -> int:
    """Enqueue one job; return its id (or, with `unique_key`, the id of the live job that
    already holds that key). Nothing runs until the caller's transaction commits.
    `concurrency_key` (an organisation, a customer) is what the queue's key_concurrency and a
    rate_limit_by_key count apart."""
    job_id: int = await conn.fetchval(
        queries.ENQUEUE,
        queue,
        kind,
        as_json_text({} if payload is None else payload),
        run_at,
        priority,
        unique_key,
        max_attempts,
        as_json_text(dict(meta or {})),
        concurrency_key,
    )
    return job_id


async def enqueue_many(conn: asyncpg.Connection | asyncpg.Pool, jobs: Sequence[Job]) -> list[int]:
    """Enqueue many jobs in one statement; return the ids of the jobs inserted (a job whose
    unique_key is already held by a live job is skipped)."""
    if not jobs:
        return []
    rows = await conn.fetch(
        queries.ENQUEUE_MANY,
        [j.queue for j in jobs],
        [j.kind for j in jobs],
        [as_json_text(j.payload) for j in jobs],
        [j.run_at for j in jobs],
        [j.priority for j in jobs],
        [j.unique_key for j in jobs],
        [j.max_attempts for j in jobs],
        [as_json_text(dict(j.meta)) for j in jobs],
        [j.concurrency_key for j in jobs],
    )
    return [row["id"] for row in rows]
