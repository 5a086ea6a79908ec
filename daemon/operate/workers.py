"""The daemons registry (stoker.workers): each daemon writes its row at start, refreshes it with
its heartbeat, and deletes it at a clean stop. A row not seen for a while belongs to a daemon
that died: shown as gone, pruned after a day."""

from __future__ import annotations

import importlib.metadata
import os
import socket
from dataclasses import dataclass, field
from typing import Any

import asyncpg

PRUNE_AFTER = "1 day"

REGISTER = """
INSERT INTO stoker.workers (worker, host, pid, queues, version, started_at, seen_at)
VALUES ($1, $2, $3, $4, $5, now(), now())
ON CONFLICT (worker) DO UPDATE
   SET host = excluded.host, pid = excluded.pid, queues = excluded.queues,
       version = excluded.version, started_at = now(), seen_at = now()
"""

# One small statement a heartbeat; a row pruned meanwhile (a daemon suspended for a day) is
# written again.
SEEN = """
INSERT INTO stoker.workers (worker, host, pid, queues, version)
VALUES ($1, $2, $3, $4, $5)
ON CONFLICT (worker) DO UPDATE SET seen_at = now()
"""

GONE = "DELETE FROM stoker.workers WHERE worker = $1"

PRUNE = f"DELETE FROM stoker.workers WHERE seen_at < now() - interval '{PRUNE_AFTER}'"

ALL = """
SELECT worker, host, pid, queues, version, started_at, seen_at,
       extract(epoch FROM now() - seen_at)::float8 AS silent_s
  FROM stoker.workers ORDER BY started_at, worker
"""


def stoker_version() -> str:
    try:
        return importlib.metadata.version("stoker")
    except importlib.metadata.PackageNotFoundError:
        return "dev"


@dataclass(frozen=True)
class Worker:
    """This daemon, as the registry shows it."""

    worker: str
    queues: list[str]
    host: str = field(default_factory=socket.gethostname)
    pid: int = field(default_factory=os.getpid)
    version: str = field(default_factory=stoker_version)

    def args(self) -> tuple[str, str, int, list[str], str]:
        return (self.worker, self.host, self.pid, sorted(self.queues), self.version)


async def register(db: asyncpg.Pool | asyncpg.Connection, me: Worker) -> None:
    await db.execute(REGISTER, *me.args())


async def seen(db: asyncpg.Pool | asyncpg.Connection, me: Worker) -> None:
    await db.execute(SEEN, *me.args())


async def unregister(db: asyncpg.Pool | asyncpg.Connection, worker: str) -> None:
    await db.execute(GONE, worker)


async def prune(db: asyncpg.Pool | asyncpg.Connection) -> None:
    """Rows of daemons not seen for a day."""
    await db.execute(PRUNE)


async def registered(conn: asyncpg.Connection, gone_after: float) -> list[dict[str, Any]]:
    """Every daemon in the registry, oldest first; `gone` when not seen for `gone_after`
    seconds."""
    rows = await conn.fetch(ALL)
    return [{**dict(r), "gone": r["silent_s"] > gone_after} for r in rows]
