"""The cron timer wheel: while this process leads, fire each schedule's ticks as jobs.

Ticks are derived from each schedule's persisted cursor (the last tick handled), never from a
look-back over the wall clock, so a new leader carries on where the old one stopped and applies
the schedule's catch-up policy to what nobody fired meanwhile."""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime, timedelta

import asyncpg

from daemon.config import ScheduleConfig
from daemon.db import DB_ERRORS
from daemon.dbclock import DbClock
from daemon.leader import Leader
from daemon.schedules import Schedule, fire, load_cursors, load_schedules, save_cursor
from daemon.waiting import wait_any

log = logging.getLogger("stoker.scheduler")

MAX_SLEEP = 60.0


class Scheduler:
    def __init__(
        self,
        configured: dict[str, ScheduleConfig],
        *,
        leader: Leader,
        clock: DbClock,
        stopping: asyncio.Event,
        served_queues: set[str],
    ) -> None:
        self._configured = configured
        self._leader = leader
        self._clock = clock
        self._stopping = stopping
        self._served = served_queues
        self._changed = asyncio.Event()
        self._changed.set()  # the first pass loads everything
        self.cursors: dict[str, datetime] = {}  # per schedule: the last tick handled
        self.fired = 0
        self.skipped = 0
        self.duplicates = 0  # ticks another process fired first: counted, not an error
        # metric label -> (fired, skipped, last tick epoch); db schedules share one label.
        self.stats: dict[str, tuple[int, int, float | None]] = {}
        self.schedules: dict[str, Schedule] = {}
        self.broken: dict[str, str] = {}  # name -> why it is set aside

    def schedules_changed(self) -> None:
        self._changed.set()

    def _now(self) -> datetime:
        return datetime.fromtimestamp(self._clock.now(), UTC)

    async def run(self) -> None:
        while not self._stopping.is_set():
            if not self._leader.is_leader:
                self._leader.changed.clear()
                if not self._leader.is_leader:
                    await wait_any(self._leader.changed, self._stopping)
                continue
            try:
                await self._lead()
            except DB_ERRORS as exc:
                if self._leader.is_leader:
                    log.warning("scheduler: database error (%s); retrying", exc)
                    await wait_any(self._stopping, seconds=1.0)

    async def _lead(self) -> None:
        self.cursors = {}
        self._changed.set()  # load everything on taking the lead
        while self._leader.is_leader and not self._stopping.is_set():
            conn = self._leader.conn
            if conn is None:
                return
            await self.run_pass(conn, self._now())
            if not self._leader.is_leader:
                return
            await self._sleep_until_next(self.cursors)

    async def run_pass(self, conn: asyncpg.Connection, now: datetime) -> None:
        """Reload the schedules if they changed, then fire every tick due at `now`."""
        cursors = self.cursors
        if self._changed.is_set():
            self._changed.clear()
            async with self._leader.lock:
                await self._reload(conn, cursors, now)
        for name, schedule in self.schedules.items():
            if not schedule.enabled or name in self.broken:
                continue
            try:
                await self._fire_due(conn, schedule, cursors, now)
            except (ValueError, asyncpg.DataError) as exc:
                # One bad schedule must not stop the others, nor the daemon: set it aside
                # until it is changed (a reload clears the mark).
                self.broken[name] = str(exc)
                log.error("schedule %s is set aside until it is changed: %s", name, exc)
            if not self._leader.is_leader:
                return

    async def _fire_due(
        self,
        conn: asyncpg.Connection,
        schedule: Schedule,
        cursors: dict[str, datetime],
        now: datetime,
    ) -> None:
        name = schedule.name
        due = schedule.due_ticks(cursors[name], now)
        for i, tick in enumerate(due):
            if not self._leader.is_leader:
                return
            async with self._leader.lock:
                result = await fire(conn, schedule, tick, first_of_batch=i == 0)
            self._count(schedule, tick, result)
            if result == "skipped":
                cursors[name] = due[-1]  # the previous run still goes: skip the batch
                return
            # Older missed ticks than those due_ticks chose are passed over for good.
            cursors[name] = tick

    async def _reload(
        self, conn: asyncpg.Connection, cursors: dict[str, datetime], now: datetime
    ) -> None:
        schedules = await load_schedules(conn, self._configured)
        saved = await load_cursors(conn)
        for name, schedule in schedules.items():
            if name in cursors and schedule == self.schedules.get(name):
                continue
            cursor = saved.get(name)
            if cursor is None:
                cursor = now  # a new schedule starts with its next tick
                await save_cursor(conn, name, cursor)
            if schedule.updated_at is not None and schedule.updated_at > cursor:
                cursor = schedule.updated_at  # edited or re-enabled: no catch-up from before
            if schedule.catch_up == "skip" and cursor < now:
                cursor = now
            cursors[name] = cursor
            if schedule.queue not in self._served:
                log.info(
                    "schedule %s enqueues on queue %s, which this daemon does not serve",
                    name,
                    schedule.queue,
                )
        for name in set(cursors) - set(schedules):
            del cursors[name]
        for name in list(self.broken):
            if schedules.get(name) != self.schedules.get(name):
                del self.broken[name]  # changed: give it another chance
        self.schedules = schedules
        log.info(
            "leading %d schedules (%d enabled)",
            len(schedules),
            sum(s.enabled for s in schedules.values()),
        )

    def _count(self, schedule: Schedule, tick: datetime, result: str) -> None:
        label = schedule.name if schedule.source == "config" else "(db)"
        fired, skipped, _ = self.stats.get(label, (0, 0, None))
        if result != "duplicate":
            self.stats[label] = (
                fired + (result == "fired"),
                skipped + (result == "skipped"),
                tick.timestamp(),
            )
        if result == "fired":
            self.fired += 1
            log.info("schedule %s fired tick %s", schedule.name, tick.isoformat())
        elif result == "skipped":
            self.skipped += 1
            log.info(
                "schedule %s skipped tick %s: its previous run is still queued or running",
                schedule.name,
                tick.isoformat(),
            )
        else:
            self.duplicates += 1
            log.debug(
                "schedule %s tick %s was already fired elsewhere", schedule.name, tick.isoformat()
            )

    async def _sleep_until_next(self, cursors: dict[str, datetime]) -> None:
        now = self._now()
        upcoming = [
            s.spec.next_after(max(cursors[n], now - timedelta(seconds=1)))
            for n, s in self.schedules.items()
            if s.enabled and n not in self.broken
        ]
        delay = MAX_SLEEP
        if upcoming:
            delay = min(delay, max(0.0, (min(upcoming) - now).total_seconds()))
        await wait_any(self._changed, self._stopping, self._leader.changed, seconds=delay)
        self._leader.changed.clear()
