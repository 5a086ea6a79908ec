"""Enqueue and look up jobs on the caller's connection, inside the caller's transaction.

Nothing here begins, commits or rolls back: a job enqueued in a transaction that rolls back
never existed, and one in a transaction that commits runs once."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from daemon.client import statements
from daemon.client.drivers import Row, async_runner, sync_runner

FINISHED_STATES = frozenset({"succeeded", "failed", "cancelled"})


@dataclass(frozen=True)
class Job:
    """One job to enqueue with enqueue_many."""

    queue: str
    kind: str
    payload: Any = field(default_factory=dict)
    run_at: datetime | None = None
    priority: int = 0
    unique_key: str | None = None
    max_attempts: int | None = None
    meta: Mapping[str, Any] = field(default_factory=dict)
    concurrency_key: str | None = None


@dataclass(frozen=True)
class JobStatus:
    """A job as it stands: `result` and `progress` decoded from JSON, `error` its last one."""

    id: int
    queue: str
    kind: str
    state: str
    attempts: int
    result: Any
    error: str | None
    progress: Any
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None  # None while live, and for an outcome not yet in history

    @property
    def finished(self) -> bool:
        return self.state in FINISHED_STATES


def _aware(at: datetime | None) -> datetime | None:
    # As asyncpg reads a naive datetime for a timestamptz: UTC, whatever the driver (psycopg
    # would read it in the session's TimeZone).
    if at is None or at.tzinfo is not None:
        return at
    return at.replace(tzinfo=UTC)


def _json(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


def _enqueue_args(
    queue: str,
    kind: str,
    payload: Any,
    run_at: datetime | None,
    priority: int,
    unique_key: str | None,
    max_attempts: int | None,
    meta: Mapping[str, Any] | None,
    concurrency_key: str | None,
) -> list[Any]:
    return [
        queue,
        kind,
        _json({} if payload is None else payload),
        _aware(run_at),
        priority,
        unique_key,
        max_attempts,
        _json(dict(meta or {})),
        concurrency_key,
    ]


def _many_arg(jobs: Sequence[Job]) -> list[Any]:
    docs = []
    for j in jobs:
        at = _aware(j.run_at)
        docs.append(
            {
                "queue": j.queue,
                "kind": j.kind,
                "payload": {} if j.payload is None else j.payload,
                "run_at": at.isoformat() if at else None,
                "priority": j.priority,
                "unique_key": j.unique_key,
                "max_attempts": j.max_attempts,
                "meta": dict(j.meta),
                "concurrency_key": j.concurrency_key,
            }
        )
    return [_json(docs)]


def status_of(row: Row) -> JobStatus:
    (job_id, queue, kind, state, attempts, result, error, progress, created, started, ended) = row
    return JobStatus(
        id=job_id,
        queue=queue,
        kind=kind,
        state=state,
        attempts=attempts,
        result=None if result is None else json.loads(result),
        error=error,
        progress=None if progress is None else json.loads(progress),
        created_at=created,
        started_at=started,
        finished_at=ended,
    )


async def enqueue(
    conn: Any,
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
    """Enqueue one job on `conn` (asyncpg Connection or Pool, psycopg AsyncConnection,
    SQLAlchemy AsyncConnection or AsyncSession); return its id, or with `unique_key` the id of
    the live job that already holds the key. It runs once the caller's transaction commits."""
    args = _enqueue_args(
        queue, kind, payload, run_at, priority, unique_key, max_attempts, meta, concurrency_key
    )
    rows = await async_runner(conn).rows(statements.ENQUEUE, args)
    return int(rows[0][0])


def enqueue_sync(
    conn: Any,
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
    """enqueue on a psycopg Connection or a SQLAlchemy Connection or Session."""
    args = _enqueue_args(
        queue, kind, payload, run_at, priority, unique_key, max_attempts, meta, concurrency_key
    )
    rows = sync_runner(conn).rows(statements.ENQUEUE, args)
    return int(rows[0][0])


async def enqueue_many(conn: Any, jobs: Sequence[Job]) -> list[int]:
    """Many jobs in one statement; the ids of those inserted (a job whose unique_key a live
    job holds is skipped)."""
    if not jobs:
        return []
    rows = await async_runner(conn).rows(statements.ENQUEUE_MANY, _many_arg(jobs))
    return [int(r[0]) for r in rows]


def enqueue_many_sync(conn: Any, jobs: Sequence[Job]) -> list[int]:
    """enqueue_many on a sync connection."""
    if not jobs:
        return []
    rows = sync_runner(conn).rows(statements.ENQUEUE_MANY, _many_arg(jobs))
    return [int(r[0]) for r in rows]


async def get_job(conn: Any, job_id: int) -> JobStatus | None:
    """The job's state, result, progress and last error, live or finished; None if no such
    job (or it is not yet visible to `conn`'s transaction)."""
    rows = await async_runner(conn).rows(statements.GET_JOB, [job_id])
    return status_of(rows[0]) if rows else None


def get_job_sync(conn: Any, job_id: int) -> JobStatus | None:
    """get_job on a sync connection."""
    rows = sync_runner(conn).rows(statements.GET_JOB, [job_id])
    return status_of(rows[0]) if rows else None
