"""The database's clock as seen from this process.

`run_at` is written by PostgreSQL's clock; a host whose clock is ahead would wake early and
spin, one that is behind would run delayed jobs late. Pools and the scheduler compare against
this instead.

The offset is anchored to the monotonic clock, not to the host's wall clock: an NTP step or a
VM resume moves `time.time()` at once, and a wall-clock anchor would carry that step into the
database time until the next sync (a tick in the future fired early, the ticks in between
skipped). Between syncs this clock only advances as real time passes."""

from __future__ import annotations

import time

import asyncpg


class DbClock:
    def __init__(self) -> None:
        # Database epoch seconds minus the monotonic clock; the host's clock until a first sync.
        self.offset = time.time() - time.monotonic()

    def now(self) -> float:
        """Epoch seconds on the database's clock."""
        return time.monotonic() + self.offset

    async def sync(self, db: asyncpg.Pool | asyncpg.Connection) -> None:
        before = time.monotonic()
        db_now = await db.fetchval("SELECT extract(epoch FROM clock_timestamp())::float8")
        after = time.monotonic()
        self.offset = float(db_now) - (before + after) / 2
