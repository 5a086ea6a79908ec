"""Goal 1 of issue #16, the NOTIFY tax in both regimes: eight pgbench clients insert one job per
transaction as fast as they can, through `stoker.enqueue`, against the same INSERT into a copy
of `stoker.jobs` without the trigger (same indexes and constraints) in the same database and
run. Keeping up: a daemon idle at the start that drains every job as it arrives (an insert that
finds a pool waiting pays for its NOTIFY). Busy: a daemon draining a backlog of 120,000 jobs per
second of the run (it fails if the backlog ran out first), so nobody waits. Stopped: no daemon,
so what is left is the trigger's and stoker.enqueue's own cost; keeping up minus stopped is what
running the jobs on the same cores (the daemon, its statements, their WAL) costs producers.

Where the time goes, over every window: the producers' and the daemon's backends sampled from
`pg_stat_activity` every 50 ms (CPU, client, or the wait event: `Lock:object` is the database
lock a NOTIFYing commit holds through its WAL flush, `IO:WALSync` / `LWLock:WALWrite` the flush),
commits per WAL flush (`pg_stat_wal`: group commit at work or not), and `pg_stat_statements`
with `track = all` (the trigger's own statements show as nested)."""

from __future__ import annotations

import asyncio
import sys
import time
from dataclasses import dataclass, field

import asyncpg

from bench import pgstats, stoker
from bench.common import Row, cores_busy, cpu_ticks, fresh_database, settle

# "stopped": no daemon at all (jobs pile up, nobody waits, so no NOTIFY): what the trigger and
# stoker.enqueue cost producers by themselves, apart from the work of running the jobs.
REGIMES = ("keeping up", "busy", "stopped")


@dataclass
class Window:
    """One pgbench window: its rate and where the time went."""

    tps: float
    seconds: int
    flushes: int
    waits: pgstats.Waits
    statements: list[pgstats.Statement] = field(default_factory=list)
    wal_mb: float = 0.0  # WAL the cluster wrote over the window, MB
    daemon_cores: float = 0.0  # the daemon process's CPU over the window, in cores
    machine_cores: float = 0.0  # every process's, in cores busy of the machine
    # WAL record kind -> (records, bytes) over the window (pg_waldump), None if unreadable
    wal_records: dict[str, tuple[int, int]] | None = None

    @property
    def wal_bytes_per_tx(self) -> float:
        """WAL per producer transaction: theirs, and the daemon's work for their jobs."""
        return self.wal_mb * 1e6 / max(1.0, self.tps * self.seconds)

    @property
    def commits_per_flush(self) -> float:
        return self.tps * self.seconds / max(1, self.flushes)


async def window(
    admin: asyncpg.Connection,
    dsn: str,
    dbid: int,
    script: str,
    seconds: int,
    daemon_pid: int | None,
) -> Window:
    await pgstats.reset(admin, dbid)
    flushes, _ = await pgstats.wal_syncs(admin)
    wal_before = await pgstats.wal_bytes(admin)
    lsn_before = await pgstats.wal_lsn(admin)
    stop = asyncio.Event()
    sampler = asyncio.create_task(pgstats.sample_waits(dsn, stop))

    def daemon_cpu() -> float:
        return (pgstats.cpu_seconds(daemon_pid) or 0.0) if daemon_pid is not None else 0.0

    cpu_before, machine_before, started = (
        daemon_cpu(),
        cpu_ticks(),
        time.monotonic(),
    )
    try:
        tps = await asyncio.to_thread(stoker.pgbench_tps, dsn, script, seconds)
    finally:
        stop.set()
        waits = await sampler
    daemon_cores = (daemon_cpu() - cpu_before) / (time.monotonic() - started)
    machine = cores_busy(machine_before, cpu_ticks())
    # Backends report WAL statistics at exit (pgbench's) or within a second when idle.
    await asyncio.sleep(1.0)
    after, _ = await pgstats.wal_syncs(admin)
    wal_mb = (await pgstats.wal_bytes(admin) - wal_before) / 1e6
    statements = await pgstats.statements(admin, dbid)
    records = await pgstats.wal_records(admin, lsn_before, await pgstats.wal_lsn(admin))
    return Window(
        tps, seconds, after - flushes, waits, statements, wal_mb, daemon_cores, machine, records
    )


async def keepup_once(admin_dsn: str, seconds: int, regime: str) -> tuple[Window, Window]:
    """(the trigger-less INSERT, stoker.enqueue) in one regime, in one fresh database."""
    admin = await asyncpg.connect(admin_dsn)
    try:
        await pgstats.prepare(admin)
        async with fresh_database(admin_dsn) as dsn:
            dbid = await pgstats.database_oid(admin, dsn)
            name = dsn.rsplit("/", 1)[1]
            await admin.execute(f"ALTER DATABASE \"{name}\" SET pg_stat_statements.track = 'all'")
            conn = await asyncpg.connect(dsn)
            try:
                await conn.execute("CREATE TABLE plain_jobs (LIKE stoker.jobs INCLUDING ALL)")
                if regime == "busy":
                    await stoker.fill(conn, 120_000 * seconds, queue="default")
                await settle(conn, "stoker.jobs, plain_jobs")
                if regime == "stopped":
                    plain = await window(admin, dsn, dbid, stoker.PLAIN_INSERT, seconds, None)
                    enqueue = await window(admin, dsn, dbid, stoker.ENQUEUE, seconds, None)
                    return plain, enqueue
                async with stoker.daemon(dsn, queue="default", name="keepup") as proc:
                    plain = await window(admin, dsn, dbid, stoker.PLAIN_INSERT, seconds, proc.pid)
                    enqueue = await window(admin, dsn, dbid, stoker.ENQUEUE, seconds, proc.pid)
                    if regime == "busy" and await stoker.drained(conn):
                        raise RuntimeError("the daemon ran out of backlog before the producers")
                return plain, enqueue
            finally:
                await conn.close()
    finally:
        await admin.close()


def _merged_waits(windows: list[Window]) -> pgstats.Waits:
    out = pgstats.Waits()
    for w in windows:
        out = out.merged(w.waits)
    return out


async def keepup(admin: str, runs: int, seconds: int) -> list[Row]:
    done: dict[str, list[tuple[Window, Window]]] = {regime: [] for regime in REGIMES}
    for _ in range(runs):
        for regime in REGIMES:  # interleaved: drift of the machine hits both alike
            plain, enqueue = await keepup_once(admin, seconds, regime)
            done[regime].append((plain, enqueue))
            print(
                f"  keepup, {regime}: {enqueue.tps:,.0f} of {plain.tps:,.0f} tx/s "
                f"({enqueue.tps / plain.tps:.0%}), commits per WAL flush "
                f"{enqueue.commits_per_flush:.1f} against {plain.commits_per_flush:.1f}; "
                f"WAL {enqueue.wal_bytes_per_tx:.0f} B/tx against {plain.wal_bytes_per_tx:.0f}; "
                f"daemon {enqueue.daemon_cores:.2f} cores, machine {enqueue.machine_cores:.2f} "
                f"against {plain.machine_cores:.2f} of 2",
                file=sys.stderr,
                flush=True,
            )
    for regime in REGIMES:
        for which, index in (("no trigger", 0), ("stoker.enqueue", 1)):
            windows = [pair[index] for pair in done[regime]]
            title = f"keepup, daemon {regime}, {which}"
            pgstats.print_waits(title, _merged_waits(windows))
            pgstats.print_statements(
                title + ", by total time",
                pgstats.merge(w.statements for w in windows),
                sum(w.seconds for w in windows),
                by="time",
            )
            pgstats.print_wal_records(
                title + ", WAL",
                [w.wal_records for w in windows if w.wal_records is not None],
                sum(w.tps * w.seconds for w in windows if w.wal_records is not None),
            )
    rows = []
    for regime in REGIMES:
        pairs = done[regime]
        setting = f"8 clients, daemon {regime}"
        goal = {
            "keeping up": "goal >= 80%; idle at the start",
            "busy": "goal >= 80%",
            "stopped": "no daemon: the trigger's and stoker.enqueue's own cost",
        }[regime]
        rows += [
            Row("keepup", "no trigger", setting, "tx/s", [p.tps for p, _ in pairs]),
            Row("keepup", "stoker", setting, "tx/s", [e.tps for _, e in pairs]),
            Row(
                "keepup",
                "stoker",
                f"share of no-trigger, {regime}",
                "%",
                [100 * e.tps / p.tps for p, e in pairs],
                note=goal,
            ),
            Row(
                "keepup",
                "no trigger",
                f"commits per WAL flush, {regime}",
                "",
                [p.commits_per_flush for p, _ in pairs],
                note="producers' commits / every WAL flush of the cluster (pg_stat_wal)",
            ),
            Row(
                "keepup",
                "stoker",
                f"commits per WAL flush, {regime}",
                "",
                [e.commits_per_flush for _, e in pairs],
            ),
            Row(
                "keepup",
                "no trigger",
                f"WAL per transaction, {regime}",
                "bytes",
                [p.wal_bytes_per_tx for p, _ in pairs],
                note="pg_stat_wal.wal_bytes of the cluster / producers' transactions",
            ),
            Row(
                "keepup",
                "stoker",
                f"WAL per transaction, {regime}",
                "bytes",
                [e.wal_bytes_per_tx for _, e in pairs],
            ),
            Row(
                "keepup",
                "stoker",
                f"daemon's CPU, {regime}",
                "cores",
                [e.daemon_cores for _, e in pairs],
                note="utime+stime of the daemon process over the stoker.enqueue window",
            ),
            Row(
                "keepup",
                "no trigger",
                f"machine's cores busy, {regime}",
                "of 2",
                [p.machine_cores for p, _ in pairs],
            ),
            Row(
                "keepup",
                "stoker",
                f"machine's cores busy, {regime}",
                "of 2",
                [e.machine_cores for _, e in pairs],
            ),
        ]
    return rows
