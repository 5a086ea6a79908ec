"""The cron timer wheel: while this process leads, fire each schedule's ticks as jobs.

Ticks are derived from each schedule's persisted cursor (the last tick handled), never from a
look-back over the wall clock, so a new leader carries on where the old one stopped and applies
the schedule's catch-up policy to what nobody fired meanwhile."""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import UTC, datetime, timedelta

import asyncpg

from daemon.config import ScheduleConfig
from daemon.cron.leader import Leader
from daemon.cron.schedules import (
    MAX_RECORDED_SKIPS,
    SavedCursor,
    Schedule,
    SkipReason,
    fire,
    load_cursors,
    load_schedules,
    save_cursor,
    schedules_fingerprint,
    skip_ticks,
)
from daemon.events import wait_any
from daemon.store.clock import DbClock
from daemon.store.db import DB_ERRORS

log = logging.getLogger("stoker.scheduler")

MAX_SLEEP = 60.0
# Seconds between looks at stoker.schedules for changes whose NOTIFY did not arrive (poll-only
# daemons behind a pooler); a NOTIFY on the leader's session is seen at once.
CHANGE_CHECK = 2.0
SCHEDULES_CHANNEL = "stoker_schedules"
SKIP_REASONS: dict[SkipReason, str] = {
    "skipped_overlap": "the previous run is still queued or running",
    "skipped_catch_up": "missed while no leader fired them; the catch_up policy passes them over",
}


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
        self._fingerprint: tuple[object, ...] | None = None  # of the rows last loaded
        self._next_check = 0.0  # monotonic time of the next look for changes
        self.fired = 0
        self.skipped = 0
        self.skipped_by_reason: dict[str, int] = {}
        self.duplicates = 0  # ticks another process fired first: counted, not an error
        # metric label -> (fired, skipped, last tick epoch); db schedules share one label.
        self.stats: dict[str, tuple[int, int, float | None]] = {}
        self.schedules: dict[str, Schedule] = {}
        self.broken: dict[str, str] = {}  # name -> why it is set aside
        self.paused: dict[str, datetime] = {}  # name -> paused by an operator since then

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
        conn = self._leader.conn
        if conn is not None:
            await self._lead_on(conn)

    async def _lead_on(self, conn: asyncpg.Connection) -> None:
        self.cursors = {}
        self._fingerprint = None
        self._changed.set()  # load everything on taking the lead
        # On the leader's own session, so that poll-only daemons (no listener) hear about
        # changes too; the timer in _check_for_changes covers a NOTIFY that cannot arrive.
        # Never removed: the leader closes this connection when it stops leading, and adding
        # the same callback again (lead loop restarted on it) is a no-op.
        async with self._leader.lock:
            await conn.add_listener(SCHEDULES_CHANNEL, self._on_notify)
        while self._leader.is_leader and not self._stopping.is_set():
            if self._leader.conn is not conn:
                return  # leading again on a new connection: start over on it
            await self.run_pass(conn, self._now())
            if not self._leader.is_leader:
                return
            await self._sleep_until_next(conn)

    def _on_notify(self, *_args: object) -> None:
        self._changed.set()

    async def run_pass(self, conn: asyncpg.Connection, now: datetime) -> None:
        """Reload the schedules if they changed, then fire every tick due at `now`."""
        await self._check_for_changes(conn)
        if self._changed.is_set():
            self._changed.clear()
            async with self._leader.lock:
                await self._reload(conn, now)
        for name, schedule in self.schedules.items():
            if not schedule.enabled or name in self.broken or name in self.paused:
                continue
            try:
                await self._fire_due(conn, schedule, now)
            except (ValueError, asyncpg.DataError) as exc:
                # One bad schedule must not stop the others, nor the daemon: set it aside
                # until it is changed (a reload clears the mark).
                self.broken[name] = str(exc)
                log.error("schedule %s is set aside until it is changed: %s", name, exc)
            if not self._leader.is_leader:
                return

    async def _check_for_changes(self, conn: asyncpg.Connection) -> None:
        """At most every CHANGE_CHECK seconds, compare stoker.schedules with what was loaded."""
        if self._changed.is_set() or time.monotonic() < self._next_check:
            return
        self._next_check = time.monotonic() + CHANGE_CHECK
        async with self._leader.lock:
            fingerprint = await schedules_fingerprint(conn)
        if fingerprint != self._fingerprint:
            self._changed.set()

    async def _fire_due(self, conn: asyncpg.Connection, schedule: Schedule, now: datetime) -> None:
        name = schedule.name
        due, passed = schedule.plan(self.cursors[name], now)
        if passed:
            reasons = [schedule.missed_reason(t, now, due) for t in passed]
            await self._skip(conn, schedule, passed, "skipped_catch_up", reasons)
        # More than one tick due at once: nobody fired them in time, this pass catches up.
        catching_up = len(due) + len(passed) > 1
        for i, tick in enumerate(due):
            if not self._leader.is_leader:
                return
            async with self._leader.lock:
                result = await fire(
                    conn,
                    schedule,
                    tick,
                    first_of_batch=i == 0,
                    now=now,
                    catching_up=catching_up,
                )
            if result == "paused":
                # Paused since the last reload: the cursor stays (a resume moves it on), and
                # the next pass reloads to learn it.
                self.paused[name] = now
                self._changed.set()
                log.info("schedule %s is paused: tick %s not fired", name, tick.isoformat())
                return
            self._count(schedule, tick, result)
            self.cursors[name] = tick
            if result == "skipped":
                # The previous run still goes: the rest of the batch is skipped too, and
                # recorded, or a reload would find those ticks due again.
                if due[i + 1 :]:
                    await self._skip(conn, schedule, due[i + 1 :], "skipped_overlap")
                return

    async def _skip(
        self,
        conn: asyncpg.Connection,
        schedule: Schedule,
        ticks: list[datetime],
        reason: SkipReason,
        reasons: list[str] | None = None,
    ) -> None:
        async with self._leader.lock:
            recorded = await skip_ticks(conn, schedule, ticks, reason, reasons)
        self.cursors[schedule.name] = ticks[-1]
        if not recorded:
            return  # another leader recorded them already
        self.skipped += recorded
        self.skipped_by_reason[reason] = self.skipped_by_reason.get(reason, 0) + recorded
        label = self._label(schedule)
        fired, skipped, _ = self.stats.get(label, (0, 0, None))
        self.stats[label] = (fired, skipped + recorded, ticks[-1].timestamp())
        log.warning(
            "schedule %s: %d tick(s) from %s to %s will not fire (%s)%s",
            schedule.name,
            recorded,
            ticks[0].isoformat(),
            ticks[-1].isoformat(),
            SKIP_REASONS[reason],
            "; older ones were not recorded" if len(ticks) >= MAX_RECORDED_SKIPS else "",
        )

    async def _reload(self, conn: asyncpg.Connection, now: datetime) -> None:
        # Read before the rows: a change in between is then seen by the next check.
        fingerprint = await schedules_fingerprint(conn)
        schedules = await load_schedules(conn, self._configured)
        saved = await load_cursors(conn)
        paused = {n: c.paused_at for n, c in saved.items() if c.paused_at is not None}
        for name, schedule in schedules.items():
            if (
                name in self.cursors
                and schedule == self.schedules.get(name)
                and paused.get(name) == self.paused.get(name)
            ):
                continue
            # New, changed, paused or resumed: a resume moved the saved cursor to its moment.
            self.cursors[name] = await self._start_cursor(conn, schedule, saved.get(name), now)
            if schedule.queue not in self._served:
                log.info(
                    "schedule %s enqueues on queue %s, which this daemon does not serve",
                    name,
                    schedule.queue,
                )
        for name in set(self.cursors) - set(schedules):
            del self.cursors[name]
        for name in list(self.broken):
            if schedules.get(name) != self.schedules.get(name):
                del self.broken[name]  # changed: give it another chance
        for name in set(paused) - set(self.paused):
            log.info("schedule %s is paused: it fires nothing until resumed", name)
        for name in set(self.paused) - set(paused):
            if name in schedules:
                log.info("schedule %s resumed: it fires from %s", name, self.cursors[name])
        self.schedules = schedules
        self.paused = {n: at for n, at in paused.items() if n in schedules}
        self._fingerprint = fingerprint
        log.info(
            "leading %d schedules (%d enabled), %d paused",
            len(schedules),
            sum(s.enabled for s in schedules.values()),
            len(self.paused),
        )

    async def _start_cursor(
        self,
        conn: asyncpg.Connection,
        schedule: Schedule,
        saved: SavedCursor | None,
        now: datetime,
    ) -> datetime:
        """Where a schedule carries on: the last tick handled (persisted, so a new leader
        continues from it), but never from before its timetable last changed, so that
        re-enabling it, or editing its expression, fires no tick it was not meant to."""
        known = [c for c in (self.cursors.get(schedule.name), saved and saved.last_tick) if c]
        cursor = max(known) if known else now  # a new schedule starts with its next tick
        if schedule.timetable_changed_at is not None:
            cursor = max(cursor, schedule.timetable_changed_at)
        elif saved is not None and saved.timetable not in (None, schedule.timetable):
            # A configured schedule has no row to say when it changed: it changed at start-up.
            cursor = max(cursor, now)
        if saved is None or saved.last_tick != cursor or saved.timetable != schedule.timetable:
            await save_cursor(conn, schedule.name, cursor, schedule.timetable)
        return cursor

    def _label(self, schedule: Schedule) -> str:
        return schedule.name if schedule.source == "config" else "(db)"

    def _count(self, schedule: Schedule, tick: datetime, result: str) -> None:
        label = self._label(schedule)
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
            reason = "skipped_overlap"
            self.skipped_by_reason[reason] = self.skipped_by_reason.get(reason, 0) + 1
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

    async def _sleep_until_next(self, conn: asyncpg.Connection) -> None:
        """Until the next tick is due, a change arrives, leadership changes or the daemon
        stops; looking for changes to stoker.schedules every CHANGE_CHECK seconds."""
        now = self._now()
        upcoming = [
            s.spec.next_after(max(self.cursors[n], now - timedelta(seconds=1)))
            for n, s in self.schedules.items()
            if s.enabled and n not in self.broken and n not in self.paused
        ]
        delay = MAX_SLEEP
        if upcoming:
            delay = min(delay, max(0.0, (min(upcoming) - now).total_seconds()))
        # On the database clock: when a sync moves it (after a VM resume), the wait follows.
        wake_at = now.timestamp() + delay
        while (left := wake_at - self._clock.now()) > 0 and self._leader.is_leader:
            events = (self._changed, self._stopping, self._leader.changed)
            await wait_any(*events, seconds=min(left, CHANGE_CHECK))
            if any(e.is_set() for e in events):
                break
            await self._check_for_changes(conn)
        self._leader.changed.clear()
