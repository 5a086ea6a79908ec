"""Schedules from the configuration and from `stoker.schedules`, their state, firing a tick,
manual triggers, the run ledger and status. Used by the scheduler, daemon/operate (the CLI and
the admin API) and the metrics sampler."""

from __future__ import annotations

import contextlib
import functools
import json
import logging
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Literal, NamedTuple

import asyncpg

from daemon.config import ScheduleConfig
from daemon.config.models import checked_schedule
from daemon.cron import queries
from daemon.cron.cronspec import CronSpec
from daemon.cron.firing import CAUGHT_UP_AFTER, Due, fire_many, overlap_reason, tick_key
from daemon.store import queries as store_queries
from daemon.store.db import as_json_text

__all__ = ["CAUGHT_UP_AFTER", "overlap_reason", "tick_key"]  # kept importable from here

log = logging.getLogger("stoker.schedules")

FireResult = Literal["fired", "skipped", "duplicate", "paused"]
SkipReason = Literal["skipped_overlap", "skipped_catch_up"]

# A leader back after weeks must not write millions of rows for an every-second schedule: of the
# ticks one catch-up passes over, the newest this many are recorded (all are counted in the log).
MAX_RECORDED_SKIPS = 1000
# A schedule is late when its newest fired tick's job has not started this many seconds after
# the tick, or when its next tick is this overdue and no leader has handled it.
LATE_AFTER = 60.0


@dataclass(frozen=True, slots=True)
class Schedule:
    name: str
    source: Literal["config", "db"]
    spec: CronSpec
    kind: str
    queue: str
    payload: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    enabled: bool = True
    catch_up: str = "latest"
    max_catch_up: int = 10
    overlap: str = "skip"
    description: str = ""
    updated_at: datetime | None = None  # db schedules: any change reloads the schedule
    skip_grace: float = 60.0
    # db schedules: no tick from before this fires (cron or zone edited, or enabled again).
    timetable_changed_at: datetime | None = None
    # called after each successful run (daemon/alerts); part of equality, so an edit reloads
    ping_url: str | None = field(default=None, repr=False)

    @classmethod
    def from_config(cls, name: str, cfg: ScheduleConfig) -> Schedule:
        return cls(
            name=name,
            source="config",
            spec=spec_for(cfg.cron, cfg.timezone),
            kind=cfg.kind,
            queue=cfg.queue,
            payload=cfg.payload,
            meta=cfg.meta,
            enabled=cfg.enabled,
            catch_up=cfg.catch_up,
            max_catch_up=cfg.max_catch_up,
            overlap=cfg.overlap,
            description=cfg.description,
            skip_grace=cfg.skip_grace,
            ping_url=cfg.ping_url,
        )

    @classmethod
    def from_row(cls, row: asyncpg.Record) -> Schedule:
        return cls(
            name=row["name"],
            source="db",
            spec=spec_for(row["cron"], row["timezone"]),
            kind=row["kind"],
            queue=row["queue"],
            payload=_obj(row["payload"], "payload"),
            meta=_obj(row["meta"], "meta"),
            enabled=row["enabled"],
            catch_up=row["catch_up"],
            max_catch_up=row["max_catch_up"],
            overlap=row["overlap"],
            description=row["description"],
            updated_at=row["updated_at"],
            skip_grace=row["skip_grace"],
            timetable_changed_at=row["timetable_changed_at"] or row["created_at"],
            ping_url=row.get("ping_url"),
        )

    @property
    def timetable(self) -> str:
        """What decides which ticks are due; when it changes, the cursor starts afresh."""
        return timetable(self.spec.expr, self.spec.timezone, self.enabled)

    def plan(self, cursor: datetime, now: datetime) -> tuple[list[datetime], list[datetime]]:
        """Of the ticks after `cursor` up to `now`: those to fire, as the catch-up policy says,
        and those passed over for good (the newest MAX_RECORDED_SKIPS), both oldest first.

        "skip" fires the newest tick only if it is at most skip_grace late: a leader change
        or a restarted lead loop takes less, so it never loses a tick that was due meanwhile."""
        first = next_tick(self.spec, cursor)
        if first > now:
            return [], []
        if next_tick(self.spec, first) > now:  # one tick due, as on every tick in time
            if self.catch_up == "skip" and (now - first).total_seconds() > self.skip_grace:
                return [], [first]
            return [first], []
        if self.catch_up == "skip":
            newest = self.spec.latest_ticks(cursor, now, 1)
            due = [t for t in newest if (now - t).total_seconds() <= self.skip_grace]
        else:
            limit = self.max_catch_up if self.catch_up == "all" else 1
            due = self.spec.latest_ticks(cursor, now, limit)
        before = due[0] - timedelta(microseconds=1) if due else now
        if self.spec.next_after(cursor) > before:
            return due, []
        return due, self.spec.latest_ticks(cursor, before, MAX_RECORDED_SKIPS)

    def missed_reason(self, tick: datetime, now: datetime, due: list[datetime]) -> str:
        """Why a tick the catch-up `plan` passed over at `now` never fires (`due`: the ticks
        that pass fires), for its ledger row."""
        late = (now - tick).total_seconds()
        why = f"missed: no leader fired it in time ({late:.1f}s late); "
        if self.catch_up == "skip" and not due:
            return why + (
                f"catch_up = skip fires no tick more than skip_grace = {self.skip_grace:g}s late"
            )
        if self.catch_up == "all":
            return why + (
                f"catch_up = all fires only the newest max_catch_up = {self.max_catch_up} "
                "missed ticks"
            )
        newest = f" ({due[-1].isoformat()})" if due else ""
        return why + f"catch_up = {self.catch_up} fires only the newest missed tick{newest}"


@functools.lru_cache(maxsize=8192)
def spec_for(expr: str, timezone: str) -> CronSpec:
    """A parsed expression, shared by every schedule that has it (a CronSpec never changes):
    10,000 schedules of a few expressions are parsed a few times, not 10,000."""
    return CronSpec(expr, timezone)


@functools.lru_cache(maxsize=65536)
def next_tick(spec: CronSpec, after: datetime) -> datetime:
    """spec.next_after(after), remembered: schedules of one expression and zone handled at
    the same tick ask for the same next tick."""
    return spec.next_after(after)


def timetable(expr: str, timezone: str, enabled: bool) -> str:
    return f"{expr}|{timezone}|{'on' if enabled else 'off'}"


# bool before int: True is an int too.
_JSON_TYPES = {
    list: "an array",
    str: "a string",
    bool: "a boolean",
    int: "a number",
    float: "a number",
}


def _obj(value: Any, column: str) -> dict[str, Any]:
    if isinstance(value, str):  # a connection without our jsonb codec
        with contextlib.suppress(ValueError):  # else: a JSON string, decoded by the codec
            value = json.loads(value)
    if isinstance(value, dict):
        return dict(value)
    kind = next((n for t, n in _JSON_TYPES.items() if isinstance(value, t)), "null")
    raise ValueError(
        f"{column} must be a JSON object, not {kind}: "
        f"UPDATE stoker.schedules SET {column} = '{{...}}' (an object) to fix the row"
    )


async def load_schedules(
    conn: asyncpg.Connection, configured: dict[str, ScheduleConfig]
) -> dict[str, Schedule]:
    """Every schedule by name; a config schedule wins over a db one of the same name."""
    found = {name: Schedule.from_config(name, cfg) for name, cfg in configured.items()}
    for row in await conn.fetch(queries.SCHEDULES):
        if row["name"] in found:
            log.warning(
                "schedule %s exists in the configuration and in stoker.schedules; "
                "the configuration wins",
                row["name"],
            )
            continue
        try:
            found[row["name"]] = Schedule.from_row(row)
        except ValueError as exc:
            log.error("schedule %s in stoker.schedules is ignored: %s", row["name"], exc)
    return found


class SavedCursor(NamedTuple):
    last_tick: datetime | None  # the last tick handled: fired or skipped
    timetable: str | None  # Schedule.timetable it was kept for; None: not recorded yet
    paused_at: datetime | None = None  # paused by an operator since then: fires nothing


async def fire(
    conn: asyncpg.Connection,
    schedule: Schedule,
    tick: datetime,
    *,
    first_of_batch: bool = True,
    now: datetime | None = None,
    catching_up: bool = False,
) -> FireResult:
    """Enqueue the job of one tick, at most once ever (the tick row is the fence): fire_many
    with one tick (firing.py says what it guarantees).

    With overlap "skip" the tick is skipped while the previous run is still queued or active;
    `first_of_batch` false: not checked (a catch-up batch does not skip its own jobs).

    `now` is the pass's time: a tick fired more than CAUGHT_UP_AFTER after it was due, or by a
    pass that found several ticks due (`catching_up`), is recorded as caught up.

    A paused schedule fires nothing ("paused", nothing recorded): checked under the lock of
    its state row, so that a pause committed before this transaction is always seen, even by
    a leader that has not reloaded since."""
    due = Due(schedule, [tick], now=now, catching_up=catching_up, check_overlap=first_of_batch)
    [fired] = await fire_many(conn, [due])
    if fired.paused:
        return "paused"
    return fired.results[0]


async def _enqueue(
    conn: asyncpg.Connection, schedule: Schedule, meta: dict[str, Any], unique_key: str | None
) -> int:
    job_id: int = await conn.fetchval(
        store_queries.ENQUEUE,
        schedule.queue,
        schedule.kind,
        as_json_text(schedule.payload),
        None,
        0,
        unique_key,
        None,
        as_json_text(meta),
        None,
    )
    return job_id


async def trigger(conn: asyncpg.Connection, schedule: Schedule, by: str = "cli") -> int:
    """Enqueue a run now, outside the schedule: not a tick, so the cursor does not move. The
    ledger records it (outcome 'manual', reason "by hand: <by>") at the database's now(),
    moved off a whole second: ticks fall on whole seconds, so a run by hand never holds the
    fence of a tick."""
    async with conn.transaction():
        meta = {**schedule.meta, "schedule": schedule.name, "trigger": "manual"}
        job_id = await _enqueue(conn, schedule, meta, None)
        await conn.execute(
            queries.LAST_JOB,
            schedule.name,
            job_id,
        )
        at: datetime = await conn.fetchval(queries.NOW)
        for _ in range(1000):  # another run by hand in the same microsecond: the next one
            if at.microsecond == 0:
                at += timedelta(microseconds=1)
            why = f"by hand: {by}"
            if await conn.fetchval(queries.RECORD_MANUAL, schedule.name, at, job_id, why):
                break
            at += timedelta(microseconds=1)
    return job_id


async def prune_ticks(conn: asyncpg.Connection | asyncpg.Pool, keep_days: float = 90) -> int:
    """Drop ledger rows (and their fences) older than keep_days: ledger_retention_days."""
    status = await conn.execute(
        queries.PRUNE_TICKS,
        keep_days,
    )
    return int(status.split()[-1])


async def status(
    conn: asyncpg.Connection, configured: dict[str, ScheduleConfig], now: datetime
) -> list[dict[str, Any]]:
    """One row per schedule: what `stoker schedules` and the admin API show."""
    schedules = await load_schedules(conn, configured)
    state = {r["name"]: r for r in await conn.fetch(queries.STATUS)}
    healths = await health(conn, schedules)
    rows = []
    for name, sched in sorted(schedules.items()):
        st = state.get(name)
        well = healths[name]
        duration = None
        if st and st["started_at"] and st["finished_at"]:
            duration = (st["finished_at"] - st["started_at"]).total_seconds()
        rows.append(
            {
                "name": name,
                "source": sched.source,
                "enabled": sched.enabled,
                "cron": sched.spec.expr,
                "timezone": sched.spec.timezone,
                "kind": sched.kind,
                "queue": sched.queue,
                "last_tick": st["recorded_tick"] if st else None,
                "last_job_id": st["last_job_id"] if st else None,
                "last_job_state": st["job_state"] if st else None,
                "last_duration_s": duration,
                "fired": st["fired"] if st else 0,
                "skipped": st["skipped"] if st else 0,
                "next_tick": None if st and st["paused_at"] else _next(sched, now),
                "description": sched.description,
                "last_success": well.last_success,
                "consecutive_failures": well.consecutive_failures,
                "late": well.late,
                "missed": well.missed,
                "paused": bool(st and st["paused_at"]),
                "paused_at": st["paused_at"] if st else None,
                "paused_by": st["paused_by"] if st else None,
            }
        )
    return rows


# -- the run ledger ----------------------------------------------------------------------------

# A ledger row's outcome as a person reads it; a fired row that was caught up is "caught_up".
RUN_STATUS = {
    "fired": "fired",
    "skipped_overlap": "skipped",
    "skipped_catch_up": "missed",
    "manual": "manual",
}


async def ledger(
    conn: asyncpg.Connection, name: str, *, limit: int, before: datetime | None = None
) -> list[dict[str, Any]]:
    """A schedule's ledger, newest first: one entry per tick (and per run by hand) with its
    job's state, start, finish, duration and error; `before` a tick, for the next page."""
    rows = await conn.fetch(queries.HISTORY, name, before, limit)
    return [ledger_entry(r) for r in rows]


def ledger_entry(row: asyncpg.Record) -> dict[str, Any]:
    status = RUN_STATUS.get(row["outcome"], row["outcome"])
    if status == "fired" and row["caught_up"]:
        status = "caught_up"
    started, finished = row["started_at"], row["finished_at"]
    return {
        "tick": row["tick"],
        "status": status,
        "reason": row["reason"],
        "job_id": row["job_id"],
        "state": row["state"],
        "started_at": started,
        "finished_at": finished,
        "duration_s": (finished - started).total_seconds() if started and finished else None,
        "error": row["error"],
    }


async def recent_runs(
    conn: asyncpg.Connection, names: list[str], per: int = 30
) -> dict[str, list[dict[str, Any]]]:
    """The newest `per` ledger entries of each schedule (as `ledger` gives them), newest first,
    in one statement of one index probe per schedule."""
    found: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    for row in await conn.fetch(queries.RECENT, names, per):
        found[row["schedule"]].append(ledger_entry(row))
    return found


async def pause(conn: asyncpg.Connection, name: str, by: str) -> datetime:
    """Pause a schedule for every daemon: the leader fires none of its ticks from now on (and
    notices at once, by NOTIFY, or at its next comparison). Returns since when it is paused
    (the first pause's moment if it already was)."""
    async with conn.transaction():
        since: datetime = await conn.fetchval(queries.PAUSE, name, by)
        await conn.execute(queries.NOTIFY_SCHEDULES)
    return since


async def resume(conn: asyncpg.Connection, name: str) -> bool:
    """Resume a paused schedule: it starts afresh from now (no tick from while it was paused
    fires, whatever its catch-up policy). False if it was not paused."""
    async with conn.transaction():
        resumed = bool(await conn.fetchval(queries.RESUME, name))
        if resumed:
            await conn.execute(queries.NOTIFY_SCHEDULES)
    return resumed


async def has_ledger(conn: asyncpg.Connection, name: str) -> bool:
    found: bool = await conn.fetchval(queries.HAS_LEDGER, name)
    return found


# -- health: last success, failures in a row, late, missed ---------------------------------------


@dataclass(frozen=True, slots=True)
class Health:
    last_success: datetime | None  # when the newest succeeded run finished
    consecutive_failures: int  # runs failed for good since then, newest first
    late: bool  # a fired tick's job not started LATE_AFTER after it, or a tick that overdue
    missed: bool  # the newest ledger row is a tick the catch-up policy passed over


@dataclass(frozen=True, slots=True)
class Sampled:
    """A schedule's health as the metrics sampler reads it, for every schedule at once."""

    name: str
    source: Literal["config", "db"]
    enabled: bool
    health: Health


async def health(conn: asyncpg.Connection, schedules: dict[str, Schedule]) -> dict[str, Health]:
    """The health of each of `schedules`, in one statement."""
    rows = await _health_rows(conn, list(schedules), with_db=False)
    return {r["name"]: _judge(r, schedules[r["name"]]) for r in rows}


async def _health_rows(
    conn: asyncpg.Connection,
    names: list[str],
    *,
    with_db: bool,
    after: str | None = None,
    limit: int | None = None,
) -> list[asyncpg.Record]:
    async with conn.transaction():
        await conn.execute(queries.NO_JIT)
        rows: list[asyncpg.Record] = await conn.fetch(
            queries.HEALTH, names, with_db, after, limit, timeout=10
        )
    return rows


async def sample_health(
    conn: asyncpg.Connection | asyncpg.Pool, configured: dict[str, Schedule]
) -> list[Sampled]:
    """The health of the configured schedules and of every row of stoker.schedules (a
    configured one wins a name), in one statement."""
    rows = await _sample_rows(conn, list(configured), None, None)
    return [s for r in rows if (s := _sampled(r, configured)) is not None]


async def _sample_rows(
    conn: asyncpg.Connection | asyncpg.Pool, names: list[str], after: str | None, limit: int | None
) -> list[asyncpg.Record]:
    if isinstance(conn, asyncpg.Pool):
        async with conn.acquire() as held:
            return await _health_rows(held, names, with_db=True, after=after, limit=limit)
    return await _health_rows(conn, names, with_db=True, after=after, limit=limit)


def _sampled(r: asyncpg.Record, configured: dict[str, Schedule]) -> Sampled | None:
    sched = configured.get(r["name"])
    if sched is None:
        spec = _spec(r["cron"], r["timezone"])
        if spec is None:
            return None  # ignored by the leader too, with an error in its log
        sched = Schedule(
            name=r["name"],
            source="db",
            spec=spec,
            kind="",
            queue="",
            enabled=r["enabled"],
            timetable_changed_at=r["timetable_changed_at"],
        )
    return Sampled(sched.name, sched.source, sched.enabled, _judge(r, sched))


class HealthSampler:
    """Every schedule's health as the metrics sampler reads it every few seconds, on every
    daemon: the configured schedules each time, the rows of stoker.schedules a slice at a time
    (in name order, round and round), so that a sample reads about 1/SLICES of them and each
    row's health is at most SLICES samples old. Read whole, 10,000 rows cost PostgreSQL
    100-200 ms a sample (a walk of each one's ledger back to its last success)."""

    SLICES = 12
    MIN_SLICE = 500

    def __init__(self, configured: dict[str, Schedule]) -> None:
        self._configured = configured
        self._db: dict[str, Sampled] = {}  # the health of db schedules as last read
        self._cycle: set[str] = set()  # the db rows read since the first slice of this round
        self._after: str | None = None  # where the next slice starts (None: from the first)
        self._size = 0  # rows this round expects

    async def sample(self, conn: asyncpg.Connection | asyncpg.Pool) -> list[Sampled]:
        if self._after is None:  # a round begins: its slices from the table's size
            estimate: int = await conn.fetchval(queries.SCHEDULES_ESTIMATE)
            self._size = max(estimate, len(self._db))
        limit = max(self.MIN_SLICE, -(-self._size // self.SLICES))
        rows = await _sample_rows(conn, list(self._configured), self._after, limit)
        found, names = [], []
        for r in rows:  # in name order
            sampled = _sampled(r, self._configured)
            if r["name"] in self._configured:
                if sampled is not None:
                    found.append(sampled)
                continue
            names.append(r["name"])
            if sampled is None:
                self._db.pop(r["name"], None)
            else:
                self._db[r["name"]] = sampled
        self._cycle.update(names)
        if len(names) == limit:
            self._after = names[-1]
        else:  # the round is over: a schedule it did not read is gone
            for name in set(self._db) - self._cycle:
                del self._db[name]
            self._cycle, self._after = set(), None
        return found + list(self._db.values())


@functools.lru_cache(maxsize=4096)
def _spec(expr: str, timezone: str) -> CronSpec | None:
    try:
        return CronSpec(expr, timezone)
    except ValueError:
        return None


@functools.lru_cache(maxsize=16384)
def _due_after(spec: CronSpec, cursor: datetime) -> datetime | None:
    """The tick after a schedule's place: the same until the leader handles a tick, so the
    sampler computes it once, not every few seconds for every schedule."""
    try:
        return spec.next_after(cursor)
    except ValueError:
        return None


def _judge(row: asyncpg.Record, schedule: Schedule) -> Health:
    now: datetime = row["now"]
    late = False
    fired_tick = row["fired_tick"]
    if fired_tick is not None and row["fired_state"] == "queued" and not row["fired_started_at"]:
        late = (now - fired_tick).total_seconds() > LATE_AFTER
    cursor = row["cursor"]
    if schedule.timetable_changed_at is not None:
        cursor = max(cursor or schedule.timetable_changed_at, schedule.timetable_changed_at)
    # next_after(cursor) > cursor: a cursor less than LATE_AFTER old cannot be overdue.
    if (
        not late
        and schedule.enabled
        and row["paused_at"] is None
        and cursor is not None
        and row["saved_timetable"] in (None, schedule.timetable)
        and (now - cursor).total_seconds() > LATE_AFTER
    ):
        due = _due_after(schedule.spec, cursor)
        late = due is not None and (now - due).total_seconds() > LATE_AFTER
    return Health(
        last_success=row["last_success"],
        consecutive_failures=row["consecutive_failures"],
        late=late,
        missed=row["newest_outcome"] == "skipped_catch_up",
    )


def _next(schedule: Schedule, now: datetime) -> datetime | None:
    if not schedule.enabled:
        return None
    try:
        return schedule.spec.next_after(now)
    except ValueError:
        return None  # a schedule that never fires; the leader's log names it


async def save_schedule(
    conn: asyncpg.Connection | asyncpg.Pool,
    *,
    name: str,
    cron: str,
    kind: str,
    timezone: str = "UTC",
    queue: str = "default",
    payload: dict[str, Any] | None = None,
    meta: dict[str, Any] | None = None,
    enabled: bool = True,
    catch_up: str = "latest",
    max_catch_up: int = 10,
    overlap: str = "skip",
    description: str = "",
    skip_grace: float = 60.0,
    ping_url: str | None = None,
) -> None:
    """Create or replace a user schedule in stoker.schedules; running daemons pick it up at once.

    The expression, zone and options are validated here (raising ValueError naming the
    problem), so a bad schedule never reaches the table."""
    cfg = checked_schedule(
        name,
        {
            "cron": cron,
            "timezone": timezone,
            "kind": kind,
            "queue": queue,
            "payload": payload or {},
            "meta": meta or {},
            "enabled": enabled,
            "catch_up": catch_up,
            "max_catch_up": max_catch_up,
            "overlap": overlap,
            "description": description,
            "skip_grace": skip_grace,
            "ping_url": ping_url,
        },
    )
    await conn.execute(
        queries.SAVE_SCHEDULE,
        name,
        cfg.cron,
        cfg.timezone,
        cfg.kind,
        cfg.queue,
        as_json_text(cfg.payload),
        as_json_text(cfg.meta),
        cfg.enabled,
        cfg.catch_up,
        cfg.max_catch_up,
        cfg.overlap,
        cfg.description,
        cfg.skip_grace,
        cfg.ping_url,
    )


async def delete_schedule(conn: asyncpg.Connection | asyncpg.Pool, name: str) -> bool:
    """Remove a user schedule; True if it existed."""
    status: str = await conn.execute(queries.DELETE_SCHEDULE, name)
    return status.rsplit(maxsplit=1)[-1] != "0"
