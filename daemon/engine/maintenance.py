"""Lease heartbeats for running jobs, rescue of jobs whose worker died, history retention,
and the vacuum that keeps claims fast under churn."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence

import asyncpg

from daemon.events import wait_any
from daemon.store import queries
from daemon.store.clock import DbClock
from daemon.store.db import DB_ERRORS
from daemon.store.errors import is_transient

log = logging.getLogger("stoker.maintenance")

PURGE_BATCH = 5000
PURGE_EVERY = 60.0  # seconds between purge passes
PURGE_BUDGET = 5.0  # longest a pass works
PURGE_PAUSE = 1.0  # between passes while history past retention is left


async def _sleep(stopping: asyncio.Event, seconds: float) -> bool:
    """Sleep unless stopping; True when the daemon is stopping."""
    await wait_any(stopping, seconds=seconds)
    return stopping.is_set()


async def heartbeat_loop(
    db: asyncpg.Pool,
    *,
    worker_id: str,
    lease_seconds: float,
    running_ids: Callable[[], list[int]],
    stopping: asyncio.Event,
    on_beat: Callable[[], Awaitable[object]] | None = None,
    on_cancel: Callable[[int], object] | None = None,
) -> None:
    """Renew the lease of every job this process holds, at a third of the lease; each beat
    also runs `on_beat` (the daemons registry's "still here"), and passes each renewed job
    with a cancel request to `on_cancel` (the poll behind the stoker_cancel NOTIFY)."""
    interval = lease_seconds / 3
    while not await _sleep(stopping, interval):
        if on_beat is not None:
            try:
                await on_beat()
            except DB_ERRORS as exc:
                log.debug("heartbeat: %s", exc)
        ids = running_ids()
        if not ids:
            continue
        try:
            cancels = await db.fetch(queries.HEARTBEAT, ids, worker_id, lease_seconds)
        except DB_ERRORS as exc:
            log.warning("cannot renew leases of %d running jobs: %s", len(ids), exc)
            continue
        if on_cancel is not None:
            for row in cancels:
                on_cancel(row["id"])


async def rescue_expired(db: asyncpg.Pool) -> list[asyncpg.Record]:
    async with db.acquire() as conn, conn.transaction():
        rows: list[asyncpg.Record] = await conn.fetch(queries.RESCUE)
        if rows:
            await conn.execute(queries.NOTIFY_QUEUES, sorted({r["queue"] for r in rows}))
    return rows


async def purge_history(
    db: asyncpg.Pool, retention_seconds: float, *, stopping: asyncio.Event, budget: float
) -> tuple[int, bool]:
    """Delete history past its retention in batches, for at most `budget` seconds or until
    the daemon stops. Returns how many rows went, and whether none past retention is left."""
    total = 0
    deadline = time.monotonic() + budget
    while True:
        status = await db.execute(queries.PURGE_HISTORY, retention_seconds, PURGE_BATCH)
        deleted = int(status.split()[-1])
        total += deleted
        if deleted < PURGE_BATCH:
            return total, True
        if stopping.is_set() or time.monotonic() > deadline:
            return total, False


async def maintenance_loop(
    db: asyncpg.Pool,
    *,
    rescue_interval: float,
    stopping: asyncio.Event,
    clock: DbClock,
) -> None:
    """Clock sync and lease rescue, every rescue_interval. Nothing slow runs here: a rescue
    held up by a long purge left jobs of dead workers waiting for tens of seconds."""
    while not await _sleep(stopping, rescue_interval):
        try:
            await clock.sync(db)
            rescued = await rescue_expired(db)
            for row in rescued:
                fields = {"job_id": row["id"], "queue": row["queue"], "attempt": row["attempts"]}
                if row["cancelled"]:
                    log.warning(
                        "job %s: lease expired, its worker is gone; it had a cancel request: "
                        "cancelled",
                        row["id"],
                        extra=fields,
                    )
                else:
                    log.warning(
                        "job %s: lease expired, its worker is gone; back in queue %s",
                        row["id"],
                        row["queue"],
                        extra=fields,
                    )
            if any(row["cancelled"] for row in rescued):
                await move_parked(db)
        except DB_ERRORS as exc:
            log.warning("maintenance pass failed: %s", exc)


async def move_parked(db: asyncpg.Pool, limit: int = 100) -> int:
    """Move jobs the completer parked in stoker.jobs (history refused their outcome) on to
    history, once whatever refused them is fixed. One still refused stays, and says why."""
    moved = 0
    refused: dict[str, list[int]] = {}
    for job_id in [r["id"] for r in await db.fetch(queries.PARKED, limit)]:
        try:
            moved += len(await db.fetch(queries.MOVE_PARKED, job_id))
        except asyncpg.PostgresError as exc:
            if is_transient(exc):
                raise
            refused.setdefault(" ".join(str(exc).split()), []).append(job_id)
            await db.execute(queries.PARKED_REFUSED, job_id)
    for reason, ids in refused.items():
        log.warning(
            "%d jobs stay parked in stoker.jobs (ids %s%s): history still refuses them: %s",
            len(ids),
            ", ".join(map(str, ids[:10])),
            ", ..." if len(ids) > 10 else "",
            reason,
        )
    if moved:
        log.info("moved %d parked jobs on to stoker.job_history", moved)
    return moved


async def prune_rate_starts(db: asyncpg.Pool | asyncpg.Connection) -> None:
    await db.execute(queries.PRUNE_RATE_STARTS)


async def purge_loop(
    db: asyncpg.Pool,
    *,
    retention_seconds: float,
    stopping: asyncio.Event,
    every: float = PURGE_EVERY,
    budget: float = PURGE_BUDGET,
    also: Sequence[Callable[[asyncpg.Pool], Awaitable[object]]] = (),
) -> None:
    """History retention, as a task of its own: a pass works for at most `budget` seconds
    and stops when the daemon stops; a backlog (after downtime, or at high throughput) is
    worked off in passes a second apart. Each pass also runs `also` (other rooms' pruning,
    such as cron's old tick records) and moves parked jobs on to history."""
    delay = 1.0  # the first pass soon after start
    while not await _sleep(stopping, delay):
        delay = every
        try:
            purged, done = await purge_history(
                db, retention_seconds, stopping=stopping, budget=budget
            )
            if purged:
                log.info(
                    "purged %d finished jobs past their retention%s",
                    purged,
                    "" if done else "; more to purge in the next pass",
                )
            if not done:
                delay = PURGE_PAUSE
            for prune in also:
                await prune(db)
            await move_parked(db)
        except DB_ERRORS as exc:
            log.warning("history purge failed: %s", exc)


async def vacuum_loop(
    db: asyncpg.Pool,
    *,
    after_claims: int,
    claimed: Callable[[], int],
    stopping: asyncio.Event,
    check_every: float = 1.0,
) -> None:
    """VACUUM stoker.jobs after every `after_claims` jobs this daemon claimed.

    A claimed job leaves a dead entry at the front of the fetch index, and every claim steps
    over all of them until a vacuum removes them; autovacuum looks at a database once a minute
    at most. Draining 1,000,000 jobs, a 100-job claim grew from 2.2 to 5 ms over 500,000 claims
    without it, and stayed at 1.8 ms with a VACUUM (50 ms) every 10,000. SKIP_LOCKED: when
    another daemon or autovacuum is at it already, this one is not needed."""
    last = claimed()
    while not await _sleep(stopping, check_every):
        now = claimed()
        if now - last < after_claims:
            continue
        last = now
        try:
            # Without the table's ownership PostgreSQL only warns and skips it: harmless.
            # TRUNCATE false: giving empty tail pages back needs an exclusive lock, and waiting
            # for it stalled every claim and write behind the vacuum (seen as VacuumTruncate).
            await db.execute("VACUUM (SKIP_LOCKED, TRUNCATE false) stoker.jobs")
        except DB_ERRORS as exc:
            log.warning("vacuum of stoker.jobs failed: %s", exc)
