"""The database's clock as seen from this process.

`run_at` is written by PostgreSQL's clock; a host whose clock is ahead would wake early and
spin, one that is behind would run delayed jobs late. Pools compare against this instead."""

from __future__ import annotations

import time

import asyncpg


class DbClock:
    def __init__(self) -> None:
        self.offset = 0.0  # database time minus local time, seconds

    def now(self) -> float:
        """Epoch seconds on the database's clock."""
        return time.time() + self.offset

    async def sync(self, db: asyncpg.Pool | asyncpg.Connection) -> None:
        before = time.time()
        db_now = await db.fetchval("SELECT extract(epoch FROM clock_timestamp())::float8")
        after = time.time()
        self.offset = float(db_now) - (before + after) / 2
