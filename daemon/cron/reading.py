"""Reading stoker.schedules at scale, for the leader: every row in pages (taking the lead), or
only the rows changed and the names deleted since the last read (each look for changes).

A read keeps the snapshot of its first statement; the next asks for the rows written by
transactions that snapshot did not see (changed_xid, migration 016), so a transaction that
commits late is still caught, and 1,000 rows changed out of 100,000 are 1,000 rows read. When
nothing changed, a look is one statement. Each statement takes the leader's connection lock for
itself only, so that the leader's probe is never held up by a long read, and the event loop
turns between pages."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import asyncpg

from daemon.config import ScheduleConfig
from daemon.cron import queries
from daemon.cron.schedules import SavedCursor, Schedule

log = logging.getLogger("stoker.schedules")

PAGE = 5000


@dataclass
class Read:
    """What one read found."""

    snapshot: str
    schedules: dict[str, Schedule] = field(default_factory=dict)  # parsed rows read
    refused: set[str] = field(default_factory=set)  # rows read that could not be parsed
    deleted: set[str] = field(default_factory=set)  # names gone since the last read
    truncated: bool = False  # stoker.schedules was truncated since: read everything again
    paused: dict[str, datetime] = field(default_factory=dict)  # every paused schedule
    saved: dict[str, SavedCursor] = field(default_factory=dict)  # cursors asked for
    rows: int = 0  # rows of stoker.schedules read


async def _pages(
    conn: asyncpg.Connection, lock: asyncio.Lock, query: str, *args: Any
) -> AsyncIterator[list[asyncpg.Record]]:
    after: str | None = None
    while True:
        async with lock:
            rows: list[asyncpg.Record] = await conn.fetch(query, *args, after, PAGE)
        if rows:
            yield rows
        if len(rows) < PAGE:
            return
        after = rows[-1]["name"]


def _parse(found: Read, rows: list[asyncpg.Record], configured: dict[str, ScheduleConfig]) -> None:
    for row in rows:
        found.rows += 1
        name = row["name"]
        if name in configured:
            continue  # the configuration wins (said once, by the full read)
        try:
            found.schedules[name] = Schedule.from_row(row)
        except ValueError as exc:
            found.refused.add(name)
            log.error("schedule %s in stoker.schedules is ignored: %s", name, exc)


async def read_everything(
    conn: asyncpg.Connection, lock: asyncio.Lock, configured: dict[str, ScheduleConfig]
) -> Read:
    """Every schedule (a configured one wins a name), every saved cursor, the paused ones."""
    async with lock:
        found = Read(await conn.fetchval(queries.SNAPSHOT))
    for name, cfg in configured.items():
        found.schedules[name] = Schedule.from_config(name, cfg)
    async for rows in _pages(conn, lock, queries.SCHEDULES_PAGE):
        for row in rows:
            if row["name"] in configured:
                log.warning(
                    "schedule %s exists in the configuration and in stoker.schedules; "
                    "the configuration wins",
                    row["name"],
                )
        _parse(found, rows, configured)
    async for rows in _pages(conn, lock, queries.CURSORS_PAGE):
        for r in rows:
            found.saved[r["name"]] = SavedCursor(r["last_tick"], r["timetable"], r["paused_at"])
            if r["paused_at"] is not None:
                found.paused[r["name"]] = r["paused_at"]
    return found


async def read_changes(
    conn: asyncpg.Connection,
    lock: asyncio.Lock,
    since: str,
    configured: dict[str, ScheduleConfig],
    paused: dict[str, datetime],
) -> Read:
    """The rows changed and the names deleted since snapshot `since`, the paused schedules,
    and the saved cursors of those changed or whose pause differs from `paused`."""
    async with lock:
        look = await conn.fetchrow(queries.CHANGES, since)
    found = Read(look["snapshot"])
    # Deleted, then made again (or renamed back): changed since, so among look["changed"].
    found.deleted = {n for n in look["deleted"] if n is not None} - set(look["changed"])
    found.truncated = None in look["deleted"]
    found.paused = dict(zip(look["paused"], look["paused_at"], strict=True))
    if found.truncated:
        return found
    changed = sorted(look["changed"])
    for start in range(0, len(changed), PAGE):
        async with lock:
            rows = await conn.fetch(queries.SCHEDULES_NAMED, changed[start : start + PAGE])
        _parse(found, rows, configured)
    wanted = set(found.schedules) | {
        n for n in set(paused) | set(found.paused) if paused.get(n) != found.paused.get(n)
    }
    if wanted:
        async with lock:
            rows = await conn.fetch(queries.CURSORS_OF, sorted(wanted))
        found.saved = {
            r["name"]: SavedCursor(r["last_tick"], r["timetable"], r["paused_at"]) for r in rows
        }
    return found


async def save_cursors(
    conn: asyncpg.Connection,
    lock: asyncio.Lock,
    cursors: list[tuple[str, datetime, str | None]],
) -> None:
    """Where each schedule carries on (name, last tick, timetable), PAGE rows a statement."""
    for start in range(0, len(cursors), PAGE):
        chunk = cursors[start : start + PAGE]
        async with lock:
            await conn.execute(
                queries.SAVE_CURSORS,
                [c[0] for c in chunk],
                [c[1] for c in chunk],
                [c[2] for c in chunk],
            )


async def prune_deletions(conn: asyncpg.Connection, lock: asyncio.Lock) -> None:
    async with lock:
        await conn.execute(queries.PRUNE_DELETIONS)
