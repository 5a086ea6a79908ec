"""The daemons registry (stoker.workers): each daemon writes its row at start, refreshes it with
its heartbeat, and deletes it at a clean stop. A row not seen for a while belongs to a daemon
that died: shown as gone, pruned after a day. Each row carries the daemon's queue limits as
configured, so that daemons disagreeing on a queue's limits are found (023_worker_limits.sql)."""

from __future__ import annotations

import importlib.metadata
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import asyncpg

PRUNE_AFTER = "1 day"
GONE_AFTER_BEATS = 10  # a daemon not seen for this many heartbeats is gone

# Both statements answer with the other live daemons ($7: seconds after which one is gone)
# that serve any of this daemon's queues, with their limits: the check for daemons configured
# apart rides on statements the daemon runs anyway, and adds none to an idle database. The
# SELECT reads the snapshot from before the write, which only this daemon's own row changes.
_PEERS = """
SELECT worker, host, pid, limits FROM stoker.workers
 WHERE worker <> $1 AND limits ?| $4::text[]
   AND seen_at >= now() - make_interval(secs => $7::float8)
 ORDER BY started_at, worker
"""

REGISTER = (
    """
WITH me AS (
    INSERT INTO stoker.workers (worker, host, pid, queues, version, limits, started_at, seen_at)
    VALUES ($1, $2, $3, $4, $5, $6, now(), now())
    ON CONFLICT (worker) DO UPDATE
       SET host = excluded.host, pid = excluded.pid, queues = excluded.queues,
           version = excluded.version, limits = excluded.limits, started_at = now(),
           seen_at = now()
)"""
    + _PEERS
)

# One small statement a heartbeat; a row pruned meanwhile (a daemon suspended for a day) is
# written again, limits included. A row that is there keeps the limits REGISTER wrote: they
# are this process's configuration, which does not change while it runs.
SEEN = (
    """
WITH me AS (
    INSERT INTO stoker.workers (worker, host, pid, queues, version, limits)
    VALUES ($1, $2, $3, $4, $5, $6)
    ON CONFLICT (worker) DO UPDATE SET seen_at = now()
)"""
    + _PEERS
)

GONE = "DELETE FROM stoker.workers WHERE worker = $1"

PRUNE = f"DELETE FROM stoker.workers WHERE seen_at < now() - interval '{PRUNE_AFTER}'"

ALL = """
SELECT worker, host, pid, queues, version, started_at, seen_at,
       extract(epoch FROM now() - seen_at)::float8 AS silent_s
  FROM stoker.workers ORDER BY started_at, worker
"""


def gone_after(lease_seconds: float) -> float:
    """Seconds without a heartbeat after which a daemon counts as gone (a beat is a third of
    the lease)."""
    return GONE_AFTER_BEATS * lease_seconds / 3


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
    # queue -> its limits as configured here (operate.limits.served_limits), every queue served
    limits: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    gone_after_s: float = gone_after(30.0)  # the default lease's; the runtime passes its own

    def args(self) -> tuple[str, str, int, list[str], str, dict[str, Any], float]:
        limits = {q: dict(v) for q, v in self.limits.items()}
        queues = sorted(self.queues)
        return (self.worker, self.host, self.pid, queues, self.version, limits, self.gone_after_s)


async def register(db: asyncpg.Pool | asyncpg.Connection, me: Worker) -> list[asyncpg.Record]:
    """Writes this daemon's row; answers with the other live daemons serving its queues."""
    peers: list[asyncpg.Record] = await db.fetch(REGISTER, *me.args())
    return peers


async def seen(db: asyncpg.Pool | asyncpg.Connection, me: Worker) -> list[asyncpg.Record]:
    """The heartbeat's "still here"; answers as register() does."""
    peers: list[asyncpg.Record] = await db.fetch(SEEN, *me.args())
    return peers


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
