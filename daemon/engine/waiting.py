"""The idle sweep: one statement every poll interval for all of a daemon's idle pools.

An idle pool is registered in stoker.waiting, so inserts into its queue NOTIFY it. Its row
expires (a killed daemon's rows stop costing producers anything), so it must be renewed, and
a job can become due without an insert (a delayed job, a retry, a lease rescued by another
daemon, a queue resumed): someone must look. Each pool doing both on its own cost 50 idle
queues 75 statements a second; the sweep renews every idle pool's row and reads every idle
queue's next due job in one, and wakes the pools that have work."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence

import asyncpg

from daemon.engine.pool import QueuePool
from daemon.events import wait_any
from daemon.store import queries
from daemon.store.db import DB_ERRORS

log = logging.getLogger("stoker.pool")


class IdleSweep:
    def __init__(
        self,
        pools: Sequence[QueuePool],
        *,
        db: asyncpg.Pool,
        worker_id: str,
        stopping: asyncio.Event,
    ) -> None:
        self._pools = pools
        self._db = db
        self._worker_id = worker_id
        self._stopping = stopping

    async def run(self) -> None:
        if not self._pools:
            return
        period = min(pool.config.poll_interval for pool in self._pools)
        while not self._stopping.is_set():
            await wait_any(self._stopping, seconds=period)
            if self._stopping.is_set():
                return
            try:
                await self.sweep()
            except DB_ERRORS as exc:
                log.warning("cannot renew the idle queues' waiting marks (%s)", exc)

    async def sweep(self) -> None:
        now = time.monotonic()
        idle: list[tuple[QueuePool, int]] = []
        for pool in self._pools:
            if not pool.registered:
                continue
            if pool.registration_lapsed(now):
                # Its row may have expired while producers inserted: it registers afresh and
                # looks until they have ended (QueuePool._wait_registered).
                pool.registration_lost()
                pool.wake()
                continue
            idle.append((pool, pool.registration))
        if not idle:
            return
        rows = await self._db.fetch(
            queries.SWEEP_WAITING,
            [pool.name for pool, _ in idle],
            self._worker_id,
            [pool.config.poll_interval * 3 for pool, _ in idle],
        )
        for (pool, registration), row in zip(idle, rows, strict=True):
            if pool.registration != registration:
                continue  # it claimed (and stopped waiting) or registered again meanwhile
            if row["renewed"]:
                pool.renewed(now)
            else:
                # The row is gone: stoker.waiting is unlogged, and a crash or a failover
                # empties it.
                pool.registration_lost()
                pool.wake()
                continue
            if row["next_due"] is not None:
                pool.wake(row["next_due"].timestamp())
