"""Jobs as an operator sees them: listed, shown, retried, cancelled."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import asyncpg

from daemon.operate.errors import Conflict, NotFound
from daemon.store import queries

State = Literal["queued", "active", "succeeded", "failed", "cancelled"]
STATES: tuple[State, ...] = ("queued", "active", "succeeded", "failed", "cancelled")


async def list_jobs(
    conn: asyncpg.Connection,
    *,
    state: str | None = None,
    queue: str | None = None,
    kind: str | None = None,
    before: int | None = None,
    limit: int,
) -> list[asyncpg.Record]:
    """Newest first; `before` an id, for the next page."""
    rows: list[asyncpg.Record] = await conn.fetch(
        queries.LIST_JOBS, state, queue, kind, before, limit
    )
    return rows


async def get_job(conn: asyncpg.Connection, job_id: int) -> asyncpg.Record:
    row: asyncpg.Record | None = await conn.fetchrow(queries.GET_JOB, job_id)
    if row is None:
        raise NotFound(f"no job with id {job_id}", id=job_id)
    return row


async def retry_jobs(
    conn: asyncpg.Connection,
    ids: Sequence[int],
    *,
    all_failed: bool = False,
    queue: str | None = None,
) -> list[asyncpg.Record]:
    """Failed or cancelled jobs (`ids`, or every failed one, of `queue` if given) run again,
    and delayed queued ones of `ids` run now; daemons are told. Returns (id, queue) of each."""
    async with conn.transaction():
        rows: list[asyncpg.Record] = await conn.fetch(
            queries.RETRY_JOBS, list(ids), all_failed, queue
        )
        queues = sorted({r["queue"] for r in rows})
        await conn.execute(queries.NOTIFY_QUEUES, queues)
    return rows


async def retry_job(conn: asyncpg.Connection, job_id: int) -> None:
    """Retry one job, or say why it cannot be."""
    if await retry_jobs(conn, [job_id]):
        return
    job = await get_job(conn, job_id)
    state = job["state"]
    if state == "active":
        why = f"job {job_id} is running on {job['worker']}"
    elif state == "queued":
        why = f"job {job_id} is already queued to run now"
    elif state == "succeeded":
        why = f"job {job_id} succeeded; only failed or cancelled jobs can be retried"
    else:
        why = f"job {job_id} is {state}, but a live job holds its unique_key"
    raise Conflict(why, id=job_id, state=state)


async def cancel_job(conn: asyncpg.Connection, job_id: int) -> None:
    """Cancel a queued job, or say why it cannot be."""
    if await conn.fetchval(queries.CANCEL_JOB, job_id, None):
        return
    job = await get_job(conn, job_id)
    state = job["state"]
    if state == "active":
        why = f"job {job_id} is running on {job['worker']}; a running job cannot be cancelled"
    else:
        why = f"job {job_id} is already {state}"
    raise Conflict(why, id=job_id, state=state)
