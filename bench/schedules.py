"""Cron at scale (#16, goal 3): a real `stoker run` leading thousands of `* * * * *` schedules.

The schedules enqueue on a queue the daemon serves but which is paused, so that their jobs
accumulate and nothing but the leader's firing costs CPU; `overlap = 'allow'`, or each tick
after the first would be skipped because the previous run is still queued. For N consecutive
minutes (on the database clock) the bench reads, from the ledger and the jobs: how many schedules
fired each minute's tick once, how many did not (missed, skipped) or twice, and how long after
the minute the last job was created; and, over the whole window, the leader's CPU (utime +
stime of its process, /proc/PID/stat), the machine's, PostgreSQL's WAL syncs, and the statements
that took PostgreSQL's time (pg_stat_statements, when the server loads it). Then 1,000 of the
schedules are changed in one transaction: how long until the leader logs its reload, how many
rows that reload read, and whether the next tick's jobs carry the new payload."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

import asyncpg

from bench import stoker
from bench.common import (
    Row,
    cores_busy,
    cpu_ticks,
    fresh_database,
    log_text,
    rss_mb,
    settle,
    wait_for,
)
from daemon.store import queries

QUEUE = "cron"
LOG = "schedules"
LEADING = "leading "
# Fifty zones, all whole-minute offsets, so that `* * * * *` ticks at the same instants in all.
ZONES = (
    "UTC", "Europe/London", "Europe/Paris", "Europe/Berlin", "Europe/Madrid", "Europe/Rome",
    "Europe/Warsaw", "Europe/Athens", "Europe/Helsinki", "Europe/Istanbul", "Europe/Moscow",
    "Europe/Lisbon", "Europe/Dublin", "Africa/Cairo", "Africa/Lagos", "Africa/Nairobi",
    "Africa/Johannesburg", "Africa/Casablanca", "Asia/Dubai", "Asia/Tehran", "Asia/Karachi",
    "Asia/Kolkata", "Asia/Kathmandu", "Asia/Dhaka", "Asia/Yangon", "Asia/Bangkok",
    "Asia/Jakarta", "Asia/Shanghai", "Asia/Singapore", "Asia/Tokyo", "Asia/Seoul",
    "Asia/Manila", "Australia/Perth", "Australia/Adelaide", "Australia/Sydney",
    "Australia/Brisbane", "Pacific/Auckland", "Pacific/Honolulu", "Pacific/Fiji",
    "America/Anchorage", "America/Los_Angeles", "America/Denver", "America/Phoenix",
    "America/Chicago", "America/Mexico_City", "America/New_York", "America/Bogota",
    "America/Sao_Paulo", "America/Argentina/Buenos_Aires", "America/St_Johns",
)  # fmt: skip
assert len(set(ZONES)) == 50


@dataclass
class Minute:
    """What the ledger and the jobs say of one minute's tick, read once the window is over."""

    tick: datetime
    fired: int = 0  # ledger rows 'fired' with a job
    jobs: int = 0  # jobs of this tick (by their unique key)
    twice: int = 0  # jobs beyond one per schedule (the fences make it 0)
    not_fired: int = 0  # schedules with no 'fired' row for this tick
    skipped: int = 0  # of those, ledger rows saying skipped or missed
    last_after: float = float("nan")  # s from the tick to the newest job's created_at
    within_2s: int = 0
    within_60s: int = 0


@dataclass
class Result:
    schedules: int
    load_s: float = 0.0
    minutes: list[Minute] = field(default_factory=list)
    leader_cores: float = 0.0
    machine_cores: float = 0.0
    wal_syncs_per_minute: float = 0.0
    rss_mb: float = 0.0
    pickup_s: float = float("nan")
    reload_rows: int = 0
    reload_reads: int = 0
    new_payload_jobs: int = -1
    top: list[asyncpg.Record] = field(default_factory=list)
    top_update: list[asyncpg.Record] = field(default_factory=list)


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process so far, in seconds."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def insert_schedules(conn: asyncpg.Connection, n: int) -> None:
    await conn.execute(
        """INSERT INTO stoker.schedules (name, cron, timezone, kind, queue, payload, overlap)
           SELECT format('s%s', lpad(i::text, 6, '0')), '* * * * *',
                  ($3::text[])[1 + i % 50], 'noop', $2, '{"v": 0}', 'allow'
             FROM generate_series(1, $1) AS i""",
        n,
        QUEUE,
        list(ZONES),
    )


async def has_statements(conn: asyncpg.Connection) -> bool:
    loaded = await conn.fetchval("SHOW shared_preload_libraries")
    if "pg_stat_statements" not in loaded:
        return False
    await conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
    return True


async def reset_statements(conn: asyncpg.Connection) -> None:
    # This database only: another bench on the same server keeps its counts.
    await conn.execute(
        "SELECT pg_stat_statements_reset(0, (SELECT oid FROM pg_database"
        " WHERE datname = current_database()), 0)"
    )


async def top_statements(conn: asyncpg.Connection, limit: int = 10) -> list[asyncpg.Record]:
    return list(
        await conn.fetch(
            """SELECT calls, total_exec_time AS total_ms, mean_exec_time AS mean_ms, rows,
                      regexp_replace(query, '\\s+', ' ', 'g') AS query
                 FROM pg_stat_statements
                WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())
                  AND query NOT LIKE '%pg_stat_statements%'
                ORDER BY total_exec_time DESC LIMIT $1""",
            limit,
        )
    )


async def wal_syncs(conn: asyncpg.Connection) -> int:
    return int(await conn.fetchval("SELECT wal_sync FROM pg_stat_wal"))


async def db_now(conn: asyncpg.Connection) -> datetime:
    now: datetime = await conn.fetchval("SELECT clock_timestamp()")
    return now


async def sleep_until(conn: asyncpg.Connection, at: datetime) -> None:
    left = (at - await db_now(conn)).total_seconds()
    if left > 0:
        await asyncio.sleep(left)


def next_minute(now: datetime) -> datetime:
    return now.replace(second=0, microsecond=0) + timedelta(minutes=1)


async def handled(conn: asyncpg.Connection, tick: datetime) -> int:
    """Ledger rows (any outcome) for `tick`."""
    n: int = await conn.fetchval("SELECT count(*) FROM stoker.schedule_ticks WHERE tick = $1", tick)
    return n


async def read_minute(conn: asyncpg.Connection, tick: datetime, schedules: int) -> Minute:
    key_tail = ":" + tick.isoformat()  # tick_key: cron:NAME:<tick in UTC, isoformat>
    row = await conn.fetchrow(
        """SELECT count(*) FILTER (WHERE t.outcome = 'fired' AND t.job_id IS NOT NULL) AS fired,
                  count(*) FILTER (WHERE t.outcome <> 'fired') AS skipped
             FROM stoker.schedule_ticks t WHERE t.tick = $1""",
        tick,
    )
    jobs = await conn.fetchrow(
        """SELECT count(*) AS n, count(DISTINCT meta->>'schedule') AS distinct_schedules,
                  extract(epoch FROM max(created_at) - $2) AS last_after,
                  count(*) FILTER (WHERE created_at <= $2 + interval '2 s') AS within_2s,
                  count(*) FILTER (WHERE created_at <= $2 + interval '60 s') AS within_60s
             FROM stoker.jobs WHERE queue = $3 AND right(unique_key, length($1)) = $1""",
        key_tail,
        tick,
        QUEUE,
    )
    return Minute(
        tick=tick,
        fired=row["fired"],
        jobs=jobs["n"],
        twice=jobs["n"] - jobs["distinct_schedules"],
        not_fired=schedules - row["fired"],
        skipped=row["skipped"],
        last_after=float(jobs["last_after"]) if jobs["last_after"] is not None else float("nan"),
        within_2s=jobs["within_2s"],
        within_60s=jobs["within_60s"],
    )


def say(text: str) -> None:
    print(f"  schedules: {text}", file=sys.stderr, flush=True)


async def schedules_once(
    admin_dsn: str, n: int, minutes: int, updates: int = 1000, grace: float = 90.0
) -> Result:
    """One run: `n` schedules led by one daemon for `minutes` minutes, then `updates` changes.
    `grace`: seconds past the last minute's end to wait for its ticks to be handled."""
    result = Result(schedules=n)
    async with fresh_database(admin_dsn) as dsn:
        conn = await asyncpg.connect(dsn)
        try:
            statements = await has_statements(conn)
            await insert_schedules(conn, n)
            await conn.execute(queries.SET_PAUSED, QUEUE, True)
            await settle(conn, "stoker.schedules")
            started = time.monotonic()
            async with stoker.daemon(dsn, queue=QUEUE, name=LOG) as proc:

                async def loaded() -> bool:
                    return LEADING in log_text(LOG)

                await wait_for(
                    "leader load", loaded, timeout=1800, proc=proc, log_name=LOG, interval=0.05
                )
                result.load_s = time.monotonic() - started
                say(f"leader loaded {n:,} schedules in {result.load_s:.1f} s")
                # The first minute that starts at least 5 s after the load.
                first = next_minute(await db_now(conn) + timedelta(seconds=5))
                await sleep_until(conn, first)
                if statements:
                    await reset_statements(conn)
                cpu0, ticks0, wal0 = cpu_seconds(proc.pid), cpu_ticks(), await wal_syncs(conn)
                wall0 = time.monotonic()
                ticks = [first + timedelta(minutes=i) for i in range(minutes)]
                for tick in ticks:
                    await sleep_until(conn, tick + timedelta(minutes=1))
                    say(f"tick {tick:%H:%M}: {await handled(conn, tick):,} handled after 60 s")
                cpu1, ticks1, wal1 = cpu_seconds(proc.pid), cpu_ticks(), await wal_syncs(conn)
                wall = time.monotonic() - wall0
                result.leader_cores = (cpu1 - cpu0) / wall
                result.machine_cores = cores_busy(ticks0, ticks1)
                result.wal_syncs_per_minute = (wal1 - wal0) * 60 / wall
                if statements:
                    result.top = await top_statements(conn)
                # The last minute's ticks may still be firing: wait for them (not counted above).
                deadline = ticks[-1] + timedelta(minutes=1, seconds=grace)
                while await handled(conn, ticks[-1]) < n and await db_now(conn) < deadline:
                    await asyncio.sleep(1.0)
                result.minutes = [await read_minute(conn, t, n) for t in ticks]
                result.rss_mb = rss_mb(proc.pid)[0]
                if updates:
                    await measure_update(conn, proc.pid, n, updates, statements, result)
                result.rss_mb = max(result.rss_mb, rss_mb(proc.pid)[0])
        finally:
            await conn.close()
    return result


async def measure_update(
    conn: asyncpg.Connection, pid: int, n: int, updates: int, statements: bool, result: Result
) -> None:
    """`updates` schedules get a new payload in one transaction: how long until the leader
    logs its reload, what that reload read, and whether the next tick's jobs carry it."""
    del pid
    # While the leader has nothing to fire: 20 s into a minute whose ticks are all handled.
    now = await db_now(conn)
    at = now.replace(second=20, microsecond=0)
    if at <= now:
        at += timedelta(minutes=1)
    await sleep_until(conn, at)
    current = at.replace(second=0)
    if await handled(conn, current) < n:
        say(f"update at {at:%H:%M:%S}: the leader is still firing the ticks of {current:%H:%M}")
    if statements:
        await reset_statements(conn)
    seen = log_text(LOG).count(LEADING)
    t0 = time.monotonic()
    await conn.execute(
        """UPDATE stoker.schedules SET payload = '{"v": 1}'
            WHERE name IN (SELECT name FROM stoker.schedules ORDER BY name LIMIT $1)""",
        updates,
    )
    while log_text(LOG).count(LEADING) == seen:
        if time.monotonic() - t0 > 300:
            say("no reload logged within 300 s of the update")
            return
        await asyncio.sleep(0.01)
    result.pickup_s = time.monotonic() - t0
    say(f"{updates:,} updates picked up after {result.pickup_s:.2f} s")
    if statements:
        await asyncio.sleep(0.5)
        result.top_update = await top_statements(conn, 5)
        reread = await conn.fetchrow(
            """SELECT coalesce(sum(calls), 0) AS calls, coalesce(sum(rows), 0) AS rows
                 FROM pg_stat_statements
                WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())
                  AND query ~ '^\\s*SELECT \\* FROM stoker\\.schedules\\s'"""
        )
        result.reload_reads, result.reload_rows = int(reread["calls"]), int(reread["rows"])
    # The next tick after the update: do its jobs of the changed schedules carry the payload?
    tick = next_minute(at)
    deadline = tick + timedelta(minutes=1, seconds=30)
    while await handled(conn, tick) < n and await db_now(conn) < deadline:
        await asyncio.sleep(1.0)
    result.new_payload_jobs = await conn.fetchval(
        """SELECT count(*) FROM stoker.jobs
            WHERE queue = $1 AND right(unique_key, length($2)) = $2 AND payload->>'v' = '1'""",
        QUEUE,
        ":" + tick.isoformat(),
    )


def print_details(result: Result) -> None:
    """The per-minute figures and the statements, printed as soon as a run ends."""
    n = result.schedules
    print(f"\nschedules: {n:,} x '* * * * *' over 50 zones, one leader", flush=True)
    print(
        f"  {'minute (UTC)':<13} {'fired once':>11} {'not fired':>10} {'skipped':>8} "
        f"{'twice':>6} {'<= 2 s':>8} {'<= 60 s':>8} {'last job after':>15}"
    )
    for m in result.minutes:
        print(
            f"  {m.tick:%Y-%m-%d %H:%M} {m.fired:>8,} {m.not_fired:>10,} {m.skipped:>8,} "
            f"{m.twice:>6,} {m.within_2s:>8,} {m.within_60s:>8,} {m.last_after:>13.1f} s"
        )
    for title, rows in (
        ("during the measured minutes", result.top),
        ("from the update to its pickup", result.top_update),
    ):
        if not rows:
            continue
        print(f"  top statements by total time {title} (pg_stat_statements):")
        print(f"  {'total ms':>10} {'calls':>8} {'mean ms':>8} {'rows':>8}  query")
        for r in rows:
            print(
                f"  {r['total_ms']:>10,.0f} {r['calls']:>8,} {r['mean_ms']:>8.3f} "
                f"{r['rows']:>8,}  {r['query'][:110]}"
            )
    sys.stdout.flush()


async def schedules(admin: str, count: int, minutes: int, runs: int) -> list[Row]:
    setting = f"{count:,} schedules"
    once = Row("schedules", "stoker", f"{setting}: fired once a minute", "")
    missed = Row("schedules", "stoker", f"{setting}: not fired a minute", "", note="goal 0")
    twice = Row("schedules", "stoker", f"{setting}: fired twice a minute", "", note="goal 0")
    last = Row("schedules", "stoker", f"{setting}: last job after minute", "s", note="goal <= 2 s")
    quick = Row("schedules", "stoker", f"{setting}: jobs within 2 s", "")
    cores = Row("schedules", "stoker", f"{setting}: leader CPU", "cores", note="goal < 0.5")
    machine = Row("schedules", "stoker", f"{setting}: machine busy", "cores")
    syncs = Row("schedules", "stoker", f"{setting}: WAL syncs a minute", "")
    load = Row("schedules", "stoker", f"{setting}: leader start-up load", "s")
    pickup = Row(
        "schedules", "stoker", f"{min(1000, count):,} updates picked up", "s", note="goal <= 1 s"
    )
    memory = Row("schedules", "stoker", f"{setting}: leader RSS", "MB")
    for _ in range(runs):
        result = await schedules_once(admin, count, minutes)
        print_details(result)
        for m in result.minutes:
            once.values.append(m.fired)
            missed.values.append(m.not_fired)
            twice.values.append(m.twice)
            last.values.append(m.last_after)
            quick.values.append(m.within_2s)
        cores.values.append(result.leader_cores)
        machine.values.append(result.machine_cores)
        syncs.values.append(result.wal_syncs_per_minute)
        load.values.append(result.load_s)
        memory.values.append(result.rss_mb)
        if result.pickup_s == result.pickup_s:  # not NaN
            pickup.values.append(result.pickup_s)
        pickup.note = (
            f"goal <= 1 s; the reload read {result.reload_rows:,} rows in "
            f"{result.reload_reads} reads; next tick: {result.new_payload_jobs:,} jobs "
            "with the new payload"
        )
    per_minute = f"per minute, {minutes} minutes x {runs} runs"
    once.note = f"goal {count:,}; {per_minute}"
    quick.note = f"goal {count:,}"
    return [once, missed, twice, last, quick, cores, machine, syncs, load, pickup, memory]
