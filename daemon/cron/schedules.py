"""Schedules from the configuration and from `stoker.schedules`, their state, firing a tick,
manual triggers and status. Used by the scheduler, the CLI and (later) the HTTP API."""

from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal, NamedTuple

import asyncpg

from daemon.config import SCHEDULE_NAME, ScheduleConfig
from daemon.cron import queries
from daemon.cron.cronspec import CronSpec
from daemon.store import queries as store_queries
from daemon.store.db import as_json_text

log = logging.getLogger("stoker.schedules")

FireResult = Literal["fired", "skipped", "duplicate"]
SkipReason = Literal["skipped_overlap", "skipped_catch_up"]

# A leader back after weeks must not write millions of rows for an every-second schedule: of the
# ticks one catch-up passes over, the newest this many are recorded (all are counted in the log).
MAX_RECORDED_SKIPS = 1000


@dataclass(frozen=True)
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

    @classmethod
    def from_config(cls, name: str, cfg: ScheduleConfig) -> Schedule:
        return cls(
            name=name,
            source="config",
            spec=CronSpec(cfg.cron, cfg.timezone),
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
        )

    @classmethod
    def from_row(cls, row: asyncpg.Record) -> Schedule:
        return cls(
            name=row["name"],
            source="db",
            spec=CronSpec(row["cron"], row["timezone"]),
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
        )

    @property
    def timetable(self) -> str:
        """What decides which ticks are due; when it changes, the cursor starts afresh."""
        return f"{self.spec.expr}|{self.spec.timezone}|{'on' if self.enabled else 'off'}"

    def plan(self, cursor: datetime, now: datetime) -> tuple[list[datetime], list[datetime]]:
        """Of the ticks after `cursor` up to `now`: those to fire, as the catch-up policy says,
        and those passed over for good (the newest MAX_RECORDED_SKIPS), both oldest first.

        "skip" fires the newest tick only if it is at most skip_grace late: a leader change
        or a restarted lead loop takes less, so it never loses a tick that was due meanwhile."""
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


async def load_cursors(conn: asyncpg.Connection) -> dict[str, SavedCursor]:
    rows = await conn.fetch(queries.CURSORS)
    return {r["name"]: SavedCursor(r["last_tick"], r["timetable"]) for r in rows}


async def save_cursor(
    conn: asyncpg.Connection, name: str, cursor: datetime, timetable: str | None = None
) -> None:
    await conn.execute(
        queries.SAVE_CURSOR,
        name,
        cursor,
        timetable,
    )


async def schedules_fingerprint(conn: asyncpg.Connection) -> tuple[object, ...]:
    """Changes whenever a row of stoker.schedules is inserted, updated or deleted: xmin catches
    a transaction that commits after a newer updated_at was seen."""
    row = await conn.fetchrow(queries.FINGERPRINT)
    return tuple(row)


async def skip_ticks(
    conn: asyncpg.Connection, schedule: Schedule, ticks: list[datetime], reason: SkipReason
) -> int:
    """Record ticks that will never fire, and move the cursor past them; returns how many
    were not recorded before (a tick another leader already handled keeps its record)."""
    async with conn.transaction():
        recorded: int = await conn.fetchval(
            queries.RECORD_SKIPPED,
            schedule.name,
            ticks,
            reason,
        )
        await conn.execute(
            queries.COUNT_SKIPPED,
            schedule.name,
            max(ticks),
            recorded,
        )
    return recorded


def tick_key(name: str, tick: datetime) -> str:
    return f"cron:{name}:{tick.astimezone(UTC).isoformat()}"


async def fire(
    conn: asyncpg.Connection, schedule: Schedule, tick: datetime, *, first_of_batch: bool = True
) -> FireResult:
    """Enqueue the job of one tick, at most once ever (the tick row is the fence).

    With overlap "skip" the tick is skipped while the previous run is still queued or active.
    Catch-up fires several ticks in one batch: only the first is checked, so the batch does not
    skip its own jobs (a skipped first tick makes the caller skip the rest)."""
    async with conn.transaction():
        won = await conn.fetchval(
            queries.CLAIM_TICK,
            schedule.name,
            tick,
        )
        if not won:
            return "duplicate"
        if schedule.overlap == "skip" and first_of_batch:
            running = await conn.fetchval(
                queries.PREVIOUS_RUN_GOING,
                schedule.name,
            )
            if running is not None:
                await conn.execute(
                    queries.TICK_SKIPPED_OVERLAP,
                    schedule.name,
                    tick,
                    running,
                )
                await conn.execute(queries.COUNT_SKIPPED, schedule.name, tick, 1)
                return "skipped"
        meta = {**schedule.meta, "schedule": schedule.name, "tick": tick.isoformat()}
        job_id = await _enqueue(conn, schedule, meta, tick_key(schedule.name, tick))
        await conn.execute(
            queries.TICK_JOB,
            schedule.name,
            tick,
            job_id,
        )
        await conn.execute(
            queries.COUNT_FIRED,
            schedule.name,
            tick,
            job_id,
        )
        return "fired"


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
    )
    return job_id


async def trigger(conn: asyncpg.Connection, schedule: Schedule) -> int:
    """Enqueue a run now, outside the schedule: not a tick, so the cursor does not move."""
    async with conn.transaction():
        meta = {**schedule.meta, "schedule": schedule.name, "trigger": "manual"}
        job_id = await _enqueue(conn, schedule, meta, None)
        await conn.execute(
            queries.LAST_JOB,
            schedule.name,
            job_id,
        )
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
    rows = []
    for name, sched in sorted(schedules.items()):
        st = state.get(name)
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
                "next_tick": _next(sched, now),
                "description": sched.description,
            }
        )
    return rows


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
) -> None:
    """Create or replace a user schedule in stoker.schedules; running daemons pick it up at once.

    The expression, zone and options are validated here (raising ValueError naming the
    problem), so a bad schedule never reaches the table."""
    cfg = ScheduleConfig(
        cron=cron,
        timezone=timezone,
        kind=kind,
        queue=queue,
        payload=payload or {},
        meta=meta or {},
        enabled=enabled,
        catch_up=catch_up,
        max_catch_up=max_catch_up,
        overlap=overlap,
        description=description,
        skip_grace=skip_grace,
    )
    if not SCHEDULE_NAME.match(name):
        raise ValueError(f"schedule name {name!r} is not valid: use lowercase a-z 0-9 _ . : -")
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
    )


async def delete_schedule(conn: asyncpg.Connection | asyncpg.Pool, name: str) -> bool:
    """Remove a user schedule; True if it existed."""
    status: str = await conn.execute(queries.DELETE_SCHEDULE, name)
    return status.rsplit(maxsplit=1)[-1] != "0"
