"""A queue's limits (issue 17) as an operator sees them: what the configuration sets and, read
from the database, how the queue stands against them. The limits themselves live only in the
daemons' configuration, so the reader passes them in."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping
from typing import Any, TypedDict

import asyncpg

from daemon.config import QueueConfig

log = logging.getLogger("stoker.limits")

# One queue's standing, counted as stoker.claim_limited counts it (019_job_limits.sql): running
# jobs from the active rows (jobs_active_idx), starts from stoker.rate_starts on the database
# clock. $1 queue, $2 global_concurrency, $3 key_concurrency, $4 rate count, $5 rate window
# (seconds), $6 rate_limit_by_key. Jobs held back are the due queued ones a claim would skip
# for a limit: all of them once a queue-wide limit is reached, else those of the keys (and,
# per key, of the keyless jobs' shared window) at theirs. Every read is bounded by an index:
# jobs_active_idx for the running, rate_starts_idx for the window, jobs_fetch_idx and
# jobs_key_fetch_idx for the due jobs.
LIMIT_STANDING = """
WITH clock AS MATERIALIZED (SELECT clock_timestamp() AS t),
running AS (
    SELECT count(*)::int AS n FROM stoker.jobs WHERE queue = $1 AND state = 'active'
),
full_keys AS (
    SELECT concurrency_key AS k FROM stoker.jobs
     WHERE $3::int IS NOT NULL AND queue = $1 AND state = 'active'
       AND concurrency_key IS NOT NULL
     GROUP BY concurrency_key HAVING count(*) >= $3::int
),
recent AS (
    SELECT s.key AS k, sum(s.starts)::int AS n FROM stoker.rate_starts s, clock
     WHERE $4::int IS NOT NULL AND s.queue = $1
       AND s.at >= clock.t - make_interval(secs => $5::float8)
     GROUP BY s.key
),
full_windows AS (
    SELECT k FROM recent WHERE $6::boolean AND n >= $4::int
),
queue_wide AS (
    SELECT ($2::int IS NOT NULL AND (SELECT n FROM running) >= $2::int)
        OR ($4::int IS NOT NULL AND NOT $6::boolean
            AND coalesce((SELECT n FROM recent WHERE k = ''), 0) >= $4::int) AS reached
)
SELECT (SELECT n FROM running) AS running,
       (SELECT count(*) FROM full_keys)::int AS keys_at_limit,
       coalesce(CASE WHEN $6::boolean THEN (SELECT max(n) FROM recent)
                     ELSE (SELECT n FROM recent WHERE k = '') END, 0) AS rate_window_starts,
       CASE WHEN (SELECT reached FROM queue_wide) THEN
           (SELECT count(*) FROM stoker.jobs j, clock
             WHERE j.queue = $1 AND j.state = 'queued' AND j.run_at <= clock.t)
       ELSE
           (SELECT count(*) FROM stoker.jobs j, clock
             WHERE j.queue = $1 AND j.state = 'queued' AND j.run_at <= clock.t
               AND (j.concurrency_key IN (SELECT k FROM full_keys
                                          UNION SELECT k FROM full_windows WHERE k <> '')
                    OR (j.concurrency_key IS NULL
                        AND EXISTS (SELECT 1 FROM full_windows WHERE k = ''))))
       END::int AS held_back
"""


class QueueLimits(TypedDict):
    """A limited queue's limits (None: not set) and its standing against them."""

    global_concurrency: int | None
    key_concurrency: int | None
    rate_limit: str | None  # "50/1s"
    rate_limit_by_key: bool
    running: int  # jobs of the queue active now, all daemons
    keys_at_limit: int  # concurrency keys with key_concurrency jobs active
    # Starts in the current rate window; with rate_limit_by_key, the busiest key's window.
    rate_window_starts: int
    held_back: int  # due jobs waiting because a limit is reached


async def limit_standing(
    db: asyncpg.Pool | asyncpg.Connection,
    configured: Mapping[str, QueueConfig],
) -> dict[str, QueueLimits]:
    """Every limited queue of `configured`, by name; queues without limits are left out."""
    found: dict[str, QueueLimits] = {}
    for name in sorted(configured):
        c = configured[name]
        if not c.limited:
            continue
        rate = c.rate_limit
        row = await db.fetchrow(
            LIMIT_STANDING,
            name,
            c.global_concurrency,
            c.key_concurrency,
            rate.count if rate is not None else None,
            rate.window if rate is not None else None,
            c.rate_limit_by_key,
        )
        assert row is not None  # an aggregate: always one row
        found[name] = QueueLimits(
            global_concurrency=c.global_concurrency,
            key_concurrency=c.key_concurrency,
            rate_limit=None if rate is None else str(rate),
            rate_limit_by_key=c.rate_limit_by_key,
            running=row["running"],
            keys_at_limit=row["keys_at_limit"],
            rate_window_starts=row["rate_window_starts"],
            held_back=row["held_back"],
        )
    return found


def describe(limits: QueueLimits, sep: str = ", ") -> str:
    """One line for people: "running 4/4 (global), keys at limit 3 (key_concurrency 1),
    rate 50/50 in 1s, held back 120"."""
    parts = []
    g = limits["global_concurrency"]
    if g is not None:
        full = " (global)" if limits["running"] >= g else ""
        parts.append(f"running {limits['running']}/{g}{full}")
    else:
        parts.append(f"running {limits['running']}")
    k = limits["key_concurrency"]
    if k is not None:
        parts.append(f"keys at limit {limits['keys_at_limit']} (key_concurrency {k})")
    rate = limits["rate_limit"]
    if rate is not None:
        count, window = rate.split("/", 1)
        per = " per key" if limits["rate_limit_by_key"] else ""
        parts.append(f"rate {limits['rate_window_starts']}/{count} in {window}{per}")
    parts.append(f"held back {limits['held_back']}")
    return sep.join(parts)


def configured_limits(configured: Mapping[str, QueueConfig]) -> dict[str, dict[str, int]]:
    """Per limited queue, the limits set: "global", "key" and "rate" (starts per window)."""
    found: dict[str, dict[str, int]] = {}
    for name, c in configured.items():
        limits = {
            "global": c.global_concurrency,
            "key": c.key_concurrency,
            "rate": c.rate_limit.count if c.rate_limit is not None else None,
        }
        if chosen := {k: v for k, v in limits.items() if v is not None}:
            found[name] = chosen
    return found


# -- daemons configured apart ------------------------------------------------------------------

# The limits a claim carries, in the order people read them.
LIMIT_FIELDS = ("global_concurrency", "key_concurrency", "rate_limit", "rate_limit_by_key")


class ConfiguredLimits(TypedDict):
    """One queue's limits as one daemon is configured (stoker.workers.limits, per queue)."""

    global_concurrency: int | None
    key_concurrency: int | None
    rate_limit: str | None  # as RateLimit prints it ("100/60s"), so "100/1m" compares equal
    rate_limit_by_key: bool


class DaemonRef(TypedDict):
    worker: str
    host: str
    pid: int


class LimitsVariant(TypedDict):
    """One of the configurations a mismatched queue is served with, and who has it."""

    limits: dict[str, object]
    workers: list[DaemonRef]


def served_limits(configured: Mapping[str, QueueConfig]) -> dict[str, ConfiguredLimits]:
    """Every queue of `configured` with its limits, unlimited ones too: a daemon claiming a
    queue without limits disagrees with one that limits it."""
    return {
        name: ConfiguredLimits(
            global_concurrency=c.global_concurrency,
            key_concurrency=c.key_concurrency,
            rate_limit=None if c.rate_limit is None else str(c.rate_limit),
            rate_limit_by_key=c.rate_limit_by_key,
        )
        for name, c in sorted(configured.items())
    }


# Each live daemon's limits, a row per queue it serves. A row written before 023 has '{}' and
# yields nothing: unknown limits are not taken for different ones. $1: seconds after which a
# daemon not seen is gone.
LIVE_LIMITS = """
SELECT q.key AS queue, q.value AS limits, w.worker, w.host, w.pid
  FROM stoker.workers w, jsonb_each(w.limits) q
 WHERE w.seen_at >= now() - make_interval(secs => $1::float8)
 ORDER BY q.key, w.started_at, w.worker
"""


async def limit_mismatches(
    db: asyncpg.Pool | asyncpg.Connection, gone_after: float
) -> dict[str, list[LimitsVariant]]:
    """Queues that live daemons serve with different limits: per queue, each configuration and
    the daemons that have it, in the order they started. Consistent queues are left out."""
    found: dict[str, list[LimitsVariant]] = {}
    for r in await db.fetch(LIVE_LIMITS, gone_after):
        variants = found.setdefault(r["queue"], [])
        daemon = DaemonRef(worker=r["worker"], host=r["host"], pid=r["pid"])
        for v in variants:
            if not differing([v["limits"], r["limits"]]):
                v["workers"].append(daemon)
                break
        else:
            variants.append(LimitsVariant(limits=dict(r["limits"]), workers=[daemon]))
    return {q: v for q, v in found.items() if len(v) > 1}


def differing(configurations: list[Mapping[str, object]]) -> list[str]:
    """The limits whose values differ between `configurations`, in LIMIT_FIELDS order (then
    any a newer daemon writes that this one does not know)."""
    keys = {k for c in configurations for k in c}
    ordered = [*LIMIT_FIELDS, *sorted(keys - set(LIMIT_FIELDS))]
    return [k for k in ordered if len({repr(c.get(k)) for c in configurations}) > 1]


def _value(value: object) -> str:
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def daemon_text(d: Mapping[str, object]) -> str:
    return f"{d['worker']} (host {d['host']}, pid {d['pid']})"


def limits_text(limits: Mapping[str, object], fields: list[str]) -> str:
    """ "global_concurrency 4, rate_limit unset" """
    return ", ".join(f"{k} {_value(limits.get(k))}" for k in fields)


def describe_mismatch(variants: list[LimitsVariant]) -> str:
    """One line for people: "limits differ across daemons: global_concurrency 4 on w1 (host a,
    pid 1); global_concurrency 10 on w2 (host b, pid 2)"."""
    fields = differing([v["limits"] for v in variants])
    each = [
        f"{limits_text(v['limits'], fields)} on {', '.join(daemon_text(d) for d in v['workers'])}"
        for v in variants
    ]
    return "limits differ across daemons: " + "; ".join(each)


def mismatch_fix(queue: str) -> str:
    return f"configure every daemon serving queue {queue} with the same limits"


class MismatchWatch:
    """This daemon's look at the other live daemons serving its queues (the rows its REGISTER
    and heartbeat answer with): one warning when a daemon configured apart appears, not one a
    heartbeat; a line when the queue's daemons agree again."""

    def __init__(self, me: str, mine: Mapping[str, ConfiguredLimits]) -> None:
        self._me = me
        self._mine = mine
        # queue -> (worker, its limits) of the daemons differing from this one, as last seen
        self._apart: dict[str, set[tuple[str, str]]] = {}

    def note(self, peers: Iterable[Mapping[str, Any]]) -> None:
        found: dict[str, list[Mapping[str, Any]]] = {}
        for p in peers:
            for queue, limits in p["limits"].items():
                mine = self._mine.get(queue)
                # Compared field by field: a field a newer daemon adds, unset, differs in nothing.
                if mine is not None and differing([mine, limits]):
                    found.setdefault(queue, []).append(p)
        for queue in self._mine:
            apart = found.get(queue, [])
            seen = {(p["worker"], json.dumps(p["limits"][queue], sort_keys=True)) for p in apart}
            before = self._apart.get(queue, set())
            if seen - before:
                self._warn(queue, apart)
            elif before and not seen:
                log.info("queue %s: the live daemons serving it agree on its limits again", queue)
            self._apart[queue] = seen

    def _warn(self, queue: str, apart: list[Mapping[str, Any]]) -> None:
        mine = self._mine[queue]
        fields = differing([mine, *(p["limits"][queue] for p in apart)])
        others = "; ".join(
            f"{daemon_text(p)} has {limits_text(p['limits'][queue], fields)}" for p in apart
        )
        log.warning(
            "queue %s: limits differ across daemons: this daemon, %s, has %s; %s. The limit that "
            "holds depends on which daemon claims: %s",
            queue,
            self._me,
            limits_text(mine, fields),
            others,
            mismatch_fix(queue),
        )

    def mismatched(self) -> dict[str, int]:
        """Per limited queue served here, and any served queue a daemon limits otherwise: 1
        while a live daemon serving it has other limits."""
        return {
            q: int(bool(self._apart.get(q)))
            for q, limits in self._mine.items()
            if self._apart.get(q)
            or limits["global_concurrency"] is not None
            or limits["key_concurrency"] is not None
            or limits["rate_limit"] is not None
        }
