"""Queues as an operator sees them: job counts by state, paused or not, limits and their
standing, and pause / resume."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TypedDict

import asyncpg

from daemon.config import QueueConfig
from daemon.operate.jobs import STATES
from daemon.operate.limits import LimitsVariant, QueueLimits, limit_mismatches, limit_standing
from daemon.store import queries


class QueueStatus(TypedDict):
    name: str
    paused: bool
    counts: dict[str, int]  # jobs by state, history included
    oldest_due_s: float | None  # age of the oldest job due and waiting
    limits: QueueLimits | None  # None: the queue has no limits (in `limits` given)
    # Each configuration live daemons serve the queue with, when they differ; None when not.
    limits_mismatch: list[LimitsVariant] | None


async def queue_status(
    conn: asyncpg.Connection,
    configured: Iterable[str] = (),
    *,
    limits: Mapping[str, QueueConfig] | None = None,
    gone_after: float,
) -> list[QueueStatus]:
    """Every queue that has jobs, a row in stoker.queues, or is in `configured`, by name; with
    the limits of `limits` (the daemons' queue configuration) and each limited queue's standing,
    and the queues live daemons (seen within `gone_after` seconds) serve with different limits.
    A limited or mismatched queue is listed even without jobs: its limits are news."""
    counts = await conn.fetch(queries.QUEUE_STATUS)
    flags = await conn.fetch(queries.QUEUE_ROWS)
    standing = await limit_standing(conn, limits or {})
    apart = await limit_mismatches(conn, gone_after)
    names = {
        *configured,
        *standing,
        *apart,
        *(r["queue"] for r in counts),
        *(r["name"] for r in flags),
    }
    paused = {r["name"] for r in flags if r["paused"]}
    tally: dict[str, dict[str, int]] = {n: dict.fromkeys(STATES, 0) for n in names}
    oldest: dict[str, float] = {}
    for r in counts:
        tally[r["queue"]][r["state"]] += r["jobs"]  # parked jobs add to history's
        if r["oldest_due_s"] is not None:
            oldest[r["queue"]] = float(r["oldest_due_s"])
    return [
        QueueStatus(
            name=n,
            paused=n in paused,
            counts=tally[n],
            oldest_due_s=oldest.get(n),
            limits=standing.get(n),
            limits_mismatch=apart.get(n),
        )
        for n in sorted(names)
    ]


async def set_paused(conn: asyncpg.Connection, name: str, paused: bool) -> None:
    """A paused queue is claimed from by no daemon until resumed."""
    await conn.execute(queries.SET_PAUSED, name, paused)
