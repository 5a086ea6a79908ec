"""Schedules as an operator sees them: their state, who leads, and a run now."""

from __future__ import annotations

from typing import Any

import asyncpg

from daemon.config import ScheduleConfig
from daemon.cron import queries as cron_queries
from daemon.cron import schedules
from daemon.cron.leader import APPLICATION_PREFIX
from daemon.operate.errors import NotFound


async def schedule_status(
    conn: asyncpg.Connection, configured: dict[str, ScheduleConfig]
) -> list[dict[str, Any]]:
    """One row per schedule, next ticks counted from the database's clock."""
    now = await conn.fetchval("SELECT now()")
    return await schedules.status(conn, configured, now)


async def leader(conn: asyncpg.Connection) -> str | None:
    """The worker id of the daemon that fires the schedules, if one does."""
    holder: str | None = await conn.fetchval(cron_queries.LEADER, APPLICATION_PREFIX)
    return holder.removeprefix(APPLICATION_PREFIX) if holder else None


async def trigger_schedule(
    conn: asyncpg.Connection, configured: dict[str, ScheduleConfig], name: str
) -> int:
    """Enqueue the schedule's job now, outside its timetable; the new job's id."""
    found = await schedules.load_schedules(conn, configured)
    if name not in found:
        raise NotFound(f"no schedule named {name!r}", name=name, known=sorted(found))
    return await schedules.trigger(conn, found[name])
