"""Schedules as an operator sees them: their state and health, who leads, a run now, and the
run ledger (every tick and run by hand, newest first)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import asyncpg

from daemon.config import SCHEDULE_NAME, ScheduleConfig
from daemon.cron import queries as cron_queries
from daemon.cron import schedules
from daemon.cron.leader import APPLICATION_PREFIX
from daemon.operate.errors import NotFound


async def schedule_status(
    conn: asyncpg.Connection, configured: dict[str, ScheduleConfig]
) -> list[dict[str, Any]]:
    """One row per schedule, next ticks counted from the database's clock; with its health:
    last_success, consecutive_failures, late and missed."""
    now = await conn.fetchval(cron_queries.NOW)
    return await schedules.status(conn, configured, now)


async def leader(conn: asyncpg.Connection) -> str | None:
    """The worker id of the daemon that fires the schedules, if one does."""
    holder: str | None = await conn.fetchval(cron_queries.LEADER, APPLICATION_PREFIX)
    return holder.removeprefix(APPLICATION_PREFIX) if holder else None


async def trigger_schedule(
    conn: asyncpg.Connection, configured: dict[str, ScheduleConfig], name: str, by: str = "cli"
) -> int:
    """Enqueue the schedule's job now, outside its timetable; the new job's id. The ledger
    records the run as 'manual', "by hand: <by>" (cli, api, ...)."""
    found = await _known(conn, configured, name)
    return await schedules.trigger(conn, found[name], by)


async def _known(
    conn: asyncpg.Connection, configured: dict[str, ScheduleConfig], name: str
) -> dict[str, schedules.Schedule]:
    found = await schedules.load_schedules(conn, configured)
    if name not in found:
        raise NotFound(f"no schedule named {name!r}", name=name, known=sorted(found))
    return found


async def pause_schedule(
    conn: asyncpg.Connection, configured: dict[str, ScheduleConfig], name: str, by: str
) -> datetime:
    """Pause a schedule (config or db alike) for every daemon: no tick of it fires until it is
    resumed; runs by hand still can. Stored in stoker.schedule_state with `by` (who); the
    moment it was paused since (unchanged when it already was)."""
    await _known(conn, configured, name)
    return await schedules.pause(conn, name, by)


async def resume_schedule(
    conn: asyncpg.Connection, configured: dict[str, ScheduleConfig], name: str
) -> bool:
    """Resume a paused schedule: it starts afresh from now, firing no tick from while it was
    paused. False if it was not paused."""
    await _known(conn, configured, name)
    return await schedules.resume(conn, name)


async def recent_runs(
    conn: asyncpg.Connection, names: list[str], per: int = 30
) -> dict[str, list[dict[str, Any]]]:
    """The newest `per` ledger entries of each named schedule, newest first (the dashboard's
    strips), in one statement bounded by `per` rows a schedule."""
    return await schedules.recent_runs(conn, names, per)


async def schedule_history(
    conn: asyncpg.Connection,
    configured: dict[str, ScheduleConfig],
    name: str,
    limit: int,
    before_tick: datetime | None = None,
) -> list[dict[str, Any]]:
    """The schedule's run ledger, newest first, at most `limit` entries with a tick before
    `before_tick` (the next page): tick, status (fired, caught_up, skipped, missed, manual),
    reason, job_id, state, started_at, finished_at, duration_s, error. A schedule removed
    since keeps its ledger until it is pruned, so its name is still known here."""
    found = await schedules.load_schedules(conn, configured)
    known = name in found or (
        bool(SCHEDULE_NAME.match(name)) and await schedules.has_ledger(conn, name)
    )
    if not known:
        raise NotFound(f"no schedule named {name!r}", name=name, known=sorted(found))
    return await schedules.ledger(conn, name, limit=limit, before=before_tick)


async def schedule_health(
    db: asyncpg.Pool | asyncpg.Connection, configured: dict[str, schedules.Schedule]
) -> list[schedules.Sampled]:
    """Every schedule's health (configured ones, and every row of stoker.schedules), in one
    statement: what the metrics sampler reads every few seconds."""
    return await schedules.sample_health(db, configured)


def health_sampler(configured: dict[str, schedules.Schedule]) -> schedules.HealthSampler:
    """What the metrics sampler reads every few seconds: the configured schedules' health each
    time, the rows of stoker.schedules a slice at a time (HealthSampler)."""
    return schedules.HealthSampler(configured)
