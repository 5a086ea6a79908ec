"""The cron timer wheel: while this process leads, fire each schedule's ticks as jobs.

Ticks are derived from each schedule's persisted cursor (the last tick handled), never from a
look-back over the wall clock, so a new leader carries on where the old one stopped and applies
the schedule's catch-up policy to what nobody fired meanwhile.

The wheel is a heap of each schedule's next tick: a pass looks only at the schedules due, and
fires their ticks FIRE_BATCH at a time, each batch one transaction (firing.py). Changes to
stoker.schedules are read as they come (reading.py): the rows changed, not every row."""

from __future__ import annotations

import asyncio
import heapq
import logging
import time
from collections import Counter
from datetime import UTC, datetime

import asyncpg

from daemon.config import ScheduleConfig
from daemon.cron.firing import Due, Fired, fire_many
from daemon.cron.leader import Leader
from daemon.cron.reading import Read, prune_deletions, read_changes, read_everything, save_cursors
from daemon.cron.schedules import (
    MAX_RECORDED_SKIPS,
    SavedCursor,
    Schedule,
    SkipReason,
    next_tick,
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
# Ticks fired in one transaction: a minute of 10,000 schedules is ten commits, not 10,000.
FIRE_BATCH = 1000
# Schedules taken in between two turns of the event loop when a read is applied.
YIELD_EVERY = 5000
# Seconds between prunings of stoker.schedule_deletions (rows older than a day).
PRUNE_EVERY = 3600.0


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
        self._snapshot: str | None = None  # of the last read of stoker.schedules; None: read all
        self._next_check = 0.0  # monotonic time of the next look for changes
        self._next_prune = 0.0
        # The wheel: (next tick, name), the earliest first; an entry is current while _due
        # holds its tick for that name (a changed schedule leaves a stale entry behind).
        self._wheel: list[tuple[datetime, str]] = []
        self._due: dict[str, datetime] = {}
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
        self._wheel, self._due = [], {}
        self._snapshot = None  # read everything on taking the lead
        self._changed.set()
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
        """Read what changed in the schedules (everything, the first time), then fire every
        tick due at `now`."""
        await self._check_for_changes(conn, now)
        names = self._take_due(now)
        for start in range(0, len(names), FIRE_BATCH):
            if not self._leader.is_leader:
                return
            # Planned a batch at a time: the loop turns between batches, even for 100,000.
            dues = self._plan(names[start : start + FIRE_BATCH], now)
            if dues:
                await self._fire(conn, dues, now)

    # -- the wheel ----------------------------------------------------------------------------

    def _schedule(self, name: str) -> None:
        """Put a schedule on the wheel at its next tick after its cursor, or take it off (not
        enabled, set aside, paused, removed)."""
        schedule = self.schedules.get(name)
        if (
            schedule is None
            or not schedule.enabled
            or name in self.broken
            or name in self.paused
            or name not in self.cursors
        ):
            self._due.pop(name, None)
            return
        try:
            due = next_tick(schedule.spec, self.cursors[name])
        except ValueError as exc:
            self._set_aside(name, exc)
            return
        if self._due.get(name) != due:
            self._due[name] = due
            heapq.heappush(self._wheel, (due, name))

    def _take_due(self, now: datetime) -> list[str]:
        """The schedules on the wheel whose next tick has come, taken off it."""
        names: list[str] = []
        while self._wheel and self._wheel[0][0] <= now:
            at, name = heapq.heappop(self._wheel)
            if self._due.get(name) == at:
                del self._due[name]
                names.append(name)
        return names

    def _plan(self, names: list[str], now: datetime) -> list[Due]:
        """The ticks of `names` due at `now`, as each one's catch-up policy says."""
        dues = []
        for name in names:
            schedule = self.schedules[name]
            try:
                ticks, passed = schedule.plan(self.cursors[name], now)
                due = Due(
                    schedule,
                    ticks,
                    passed,
                    [schedule.missed_reason(t, now, ticks) for t in passed],
                    now=now,
                    # More than one tick due at once: nobody fired them in time.
                    catching_up=len(ticks) + len(passed) > 1,
                )
            except ValueError as exc:
                self._set_aside(name, exc)
                continue
            if ticks or passed:
                dues.append(due)
            else:
                self._schedule(name)
        return dues

    def _next_wake(self) -> datetime | None:
        while self._wheel and self._due.get(self._wheel[0][1]) != self._wheel[0][0]:
            heapq.heappop(self._wheel)  # stale
        return self._wheel[0][0] if self._wheel else None

    def _set_aside(self, name: str, exc: Exception) -> None:
        # One bad schedule must not stop the others, nor the daemon: set it aside until it
        # is changed (a reload clears the mark).
        self.broken[name] = str(exc)
        self._due.pop(name, None)
        log.error("schedule %s is set aside until it is changed: %s", name, exc)

    # -- firing -------------------------------------------------------------------------------

    async def _fire(self, conn: asyncpg.Connection, dues: list[Due], now: datetime) -> None:
        try:
            async with self._leader.lock:
                results = await fire_many(conn, dues)
        except asyncpg.DataError as exc:
            if len(dues) == 1:
                self._set_aside(dues[0].schedule.name, exc)
                return
            # A value PostgreSQL refuses fails the whole batch: one at a time, to find it.
            for due in dues:
                if self._leader.is_leader:
                    await self._fire(conn, [due], now)
            return
        fired = skipped = duplicate = 0
        for due, result in zip(dues, results, strict=True):
            self._handled(due, result, now)
            fired += result.fired
            skipped += result.skipped
            duplicate += result.results.count("duplicate")
        if fired or skipped or duplicate:
            ticks = sorted({t for d in dues for t in d.ticks})
            log.info(
                "fired %d tick(s) of %d schedule(s) due %s%s%s%s",
                fired,
                len(dues),
                ticks[0].isoformat() if ticks else "-",
                f" to {ticks[-1].isoformat()}" if len(ticks) > 1 else "",
                f"; {skipped} skipped (previous run still going)" if skipped else "",
                f"; {duplicate} already handled by another process" if duplicate else "",
            )

    def _handled(self, due: Due, result: Fired, now: datetime) -> None:
        schedule, name = due.schedule, due.schedule.name
        if result.paused:
            # Paused since the last read: the cursor stays (a resume moves it on), and the
            # next pass reads the pause.
            self.paused[name] = now
            self._changed.set()
            first = (due.ticks or due.passed)[0]
            log.info("schedule %s is paused: tick %s not fired", name, first.isoformat())
            return
        if due.passed:
            self.cursors[name] = due.passed[-1]
            self._count_skipped(schedule, due.passed, "skipped_catch_up", result.recorded_passed)
        for tick, outcome in zip(due.ticks, result.results, strict=True):
            self.cursors[name] = tick
            if outcome == "fired":
                self.fired += 1
                self._count(schedule, tick, fired=1)
                log.debug("schedule %s fired tick %s", name, tick.isoformat())
            elif outcome == "duplicate":
                self.duplicates += 1
                log.debug("schedule %s tick %s was already handled elsewhere", name, tick)
        if result.skipped:
            self._count_skipped(schedule, due.ticks, "skipped_overlap", result.skipped)
        self._schedule(name)

    def _count_skipped(
        self, schedule: Schedule, ticks: list[datetime], reason: SkipReason, recorded: int
    ) -> None:
        if not recorded:
            return  # another leader recorded them already
        self.skipped += recorded
        self.skipped_by_reason[reason] = self.skipped_by_reason.get(reason, 0) + recorded
        self._count(schedule, ticks[-1], skipped=recorded)
        level = logging.WARNING if reason == "skipped_catch_up" else logging.INFO
        log.log(
            level,
            "schedule %s: %d tick(s) from %s to %s will not fire (%s)%s",
            schedule.name,
            recorded,
            ticks[0].isoformat(),
            ticks[-1].isoformat(),
            SKIP_REASONS[reason],
            "; older ones were not recorded" if len(ticks) >= MAX_RECORDED_SKIPS else "",
        )

    def _label(self, schedule: Schedule) -> str:
        return schedule.name if schedule.source == "config" else "(db)"

    def _count(
        self, schedule: Schedule, tick: datetime, *, fired: int = 0, skipped: int = 0
    ) -> None:
        label = self._label(schedule)
        was_fired, was_skipped, _ = self.stats.get(label, (0, 0, None))
        self.stats[label] = (was_fired + fired, was_skipped + skipped, tick.timestamp())

    # -- reading the schedules ----------------------------------------------------------------

    async def _check_for_changes(self, conn: asyncpg.Connection, now: datetime) -> bool:
        """On a NOTIFY, and at most every CHANGE_CHECK seconds without one, read what changed
        in stoker.schedules and the pauses; True if anything did."""
        if not self._changed.is_set() and time.monotonic() < self._next_check:
            return False
        self._changed.clear()
        self._next_check = time.monotonic() + CHANGE_CHECK
        lock = self._leader.lock
        if self._snapshot is not None:
            read = await read_changes(conn, lock, self._snapshot, self._configured, self.paused)
            if not read.truncated:
                return await self._apply(conn, read, now, full=False)
        read = await read_everything(conn, lock, self._configured)
        changed = await self._apply(conn, read, now, full=True)
        if time.monotonic() >= self._next_prune:
            self._next_prune = time.monotonic() + PRUNE_EVERY
            await prune_deletions(conn, lock)
        return changed

    async def _apply(self, conn: asyncpg.Connection, read: Read, now: datetime, full: bool) -> bool:
        """Take in what a read found: new, changed, removed, paused and resumed schedules."""
        if full:
            schedules = read.schedules
            removed = set(self.schedules) - set(schedules)
        else:
            schedules = dict(self.schedules)
            removed = (read.deleted | read.refused) & set(schedules)
            for name in removed:
                del schedules[name]
            schedules.update(read.schedules)
        paused = {n: at for n, at in read.paused.items() if n in schedules}
        look_at = set(schedules) if full else set(read.schedules)
        look_at |= {
            n for n in set(paused) | set(self.paused) if paused.get(n) != self.paused.get(n)
        }
        look_at &= set(schedules)
        saves: list[tuple[str, datetime, str | None]] = []
        elsewhere: Counter[str] = Counter()
        moved = []
        for i, name in enumerate(sorted(look_at)):
            if i % YIELD_EVERY == YIELD_EVERY - 1:
                await asyncio.sleep(0)  # 100,000 schedules: let the loop turn meanwhile
            schedule = schedules[name]
            if (
                name in self.cursors
                and schedule == self.schedules.get(name)
                and paused.get(name) == self.paused.get(name)
            ):
                continue
            # New, changed, paused or resumed: a resume moved the saved cursor to its moment.
            cursor, save = self._start_cursor(schedule, read.saved.get(name), now)
            self.cursors[name] = cursor
            if save:
                saves.append((name, cursor, schedule.timetable))
            if schedule.queue not in self._served:
                elsewhere[schedule.queue] += 1
            if name in self.broken and schedule != self.schedules.get(name):
                del self.broken[name]  # changed: give it another chance
            moved.append(name)
        await save_cursors(conn, self._leader.lock, saves)
        for name in removed:
            self.cursors.pop(name, None)
            self.broken.pop(name, None)
            self._due.pop(name, None)
        for name in set(paused) - set(self.paused):
            log.info("schedule %s is paused: it fires nothing until resumed", name)
        for name in set(self.paused) - set(paused):
            if name in schedules:
                log.info("schedule %s resumed: it fires from %s", name, self.cursors[name])
        for queue, n in sorted(elsewhere.items()):
            log.info(
                "%d schedule(s) enqueue on queue %s, which this daemon does not serve", n, queue
            )
        self.schedules = schedules
        self.paused = paused
        self._snapshot = read.snapshot
        for name in moved:
            self._schedule(name)
        changed = full or bool(moved or removed)
        if changed:
            log.info(
                "leading %d schedules (%d enabled), %d paused%s",
                len(schedules),
                sum(s.enabled for s in schedules.values()),
                len(self.paused),
                "" if full else f"; read {read.rows} changed, {len(removed)} removed",
            )
        return changed

    def _start_cursor(
        self, schedule: Schedule, saved: SavedCursor | None, now: datetime
    ) -> tuple[datetime, bool]:
        """Where a schedule carries on (the last tick handled: persisted, so a new leader
        continues from it), but never from before its timetable last changed, so that
        re-enabling it, or editing its expression, fires no tick it was not meant to; and
        whether that must be saved."""
        known = [c for c in (self.cursors.get(schedule.name), saved and saved.last_tick) if c]
        cursor = max(known) if known else now  # a new schedule starts with its next tick
        if schedule.timetable_changed_at is not None:
            cursor = max(cursor, schedule.timetable_changed_at)
        elif saved is not None and saved.timetable not in (None, schedule.timetable):
            # A configured schedule has no row to say when it changed: it changed at start-up.
            cursor = max(cursor, now)
        save = saved is None or saved.last_tick != cursor or saved.timetable != schedule.timetable
        return cursor, save

    async def _sleep_until_next(self, conn: asyncpg.Connection) -> None:
        """Until the next tick is due, a change arrives, leadership changes or the daemon
        stops; looking for changes to stoker.schedules every CHANGE_CHECK seconds."""
        now = self._now()
        delay = MAX_SLEEP
        upcoming = self._next_wake()
        if upcoming is not None:
            delay = min(delay, max(0.0, (upcoming - now).total_seconds()))
        # On the database clock: when a sync moves it (after a VM resume), the wait follows.
        wake_at = now.timestamp() + delay
        while (left := wake_at - self._clock.now()) > 0 and self._leader.is_leader:
            events = (self._changed, self._stopping, self._leader.changed)
            await wait_any(*events, seconds=min(left, CHANGE_CHECK))
            if any(e.is_set() for e in events):
                break
            if await self._check_for_changes(conn, self._now()):
                break
        self._leader.changed.clear()
