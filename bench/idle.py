"""Goal 4 of issue #16, the idle cost: one `stoker run` serving 50 queues with nothing to do.
Over a window, the statements a second it sends to PostgreSQL (`pg_stat_statements` of its
database, reset when the window opens), which ones, and the CPU of the daemon and of the
PostgreSQL backends serving it (/proc, utime + stime); then that it still wakes any of those
queues quickly: single jobs enqueued into random ones, commit to handler start."""

from __future__ import annotations

import asyncio
import random
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import asyncpg

from bench import pgstats
from bench.common import Row, fresh_database, pct, settle, stoker_process, wait_for
from daemon.store.db import init_connection

QUEUES = 50
# Every queue with the defaults a user gets (poll_interval 2 s among them).
CONFIG = 'handler_modules = ["bench.handlers"]\nlog_level = "WARNING"\n' + "".join(
    f"[queues.idle-{i:02d}]\n" for i in range(QUEUES)
)
# Start-up done (first claims, the leader's first try, the metrics sampler's first pass)
# before the window opens.
SETTLE = 5.0


@asynccontextmanager
async def idle_daemon(dsn: str) -> AsyncIterator[int]:
    """A `stoker run` of the 50 queues, yielded (its PID) once it listens for jobs."""
    async with stoker_process("idle", CONFIG, dsn) as proc:
        yield proc.pid


@dataclass
class IdleRun:
    statements_per_s: float
    daemon_cpu: float  # % of a core
    backends_cpu: float  # % of a core, the PostgreSQL backends of the daemon's connections
    wake_ms: list[float]
    seconds: float
    statements: list[pgstats.Statement] = field(default_factory=list)


async def wake_samples(dsn: str, samples: int) -> list[float]:
    """Single jobs into random idle queues, a random 0.3-2.5 s apart (so that pools are caught
    anywhere in their sleep between polls): ms from the client seeing its commit to the
    handler's start."""
    conn = await asyncpg.connect(dsn)
    await init_connection(conn)
    try:
        out = []
        rng = random.Random(16)
        for _ in range(samples + 2):
            await asyncio.sleep(rng.uniform(0.3, 2.5))
            queue = f"idle-{rng.randrange(QUEUES):02d}"
            job_id = await conn.fetchval("SELECT stoker.enqueue($1, 'bench.stamp')", queue)
            committed = time.time()

            async def stamped(job_id: int = job_id) -> bool:
                return bool(
                    await conn.fetchval(
                        "SELECT result FROM stoker.job_history WHERE id = $1", job_id
                    )
                )

            await wait_for("wake sample", stamped, timeout=30, interval=0.002)
            result = await conn.fetchval(
                "SELECT result FROM stoker.job_history WHERE id = $1", job_id
            )
            out.append((result["started"] - committed) * 1000)
        return out[2:]  # the first ones warm up caches
    finally:
        await conn.close()


async def idle_once(admin_dsn: str, seconds: float, samples: int) -> IdleRun:
    admin = await asyncpg.connect(admin_dsn)
    try:
        await pgstats.prepare(admin)
        async with fresh_database(admin_dsn) as dsn:
            dbid = await pgstats.database_oid(admin, dsn)
            conn = await asyncpg.connect(dsn)
            try:
                await settle(conn, "stoker.jobs")
            finally:
                await conn.close()
            async with idle_daemon(dsn) as pid:
                await asyncio.sleep(SETTLE)  # a bench's settling time, not a test's wait
                backends = await admin.fetch(
                    "SELECT pid FROM pg_stat_activity WHERE datname = $1",
                    dsn.rsplit("/", 1)[1],
                )
                daemon_cpu = pgstats.CpuWindow([pid])
                backends_cpu = pgstats.CpuWindow([r["pid"] for r in backends])
                await pgstats.reset(admin, dbid)
                started = time.monotonic()
                daemon_cpu.start()
                backends_cpu.start()
                await asyncio.sleep(seconds)
                used, served = daemon_cpu.stop(), backends_cpu.stop()
                stmts = await pgstats.statements(admin, dbid)
                window = time.monotonic() - started
                wake = await wake_samples(dsn, samples)
        calls = sum(s.calls for s in stmts if s.toplevel)
        return IdleRun(calls / window, used, served, wake, window, stmts)
    finally:
        await admin.close()


async def idle(admin: str, runs: int, seconds: float, samples: int) -> list[Row]:
    done: list[IdleRun] = []
    for _ in range(runs):
        done.append(await idle_once(admin, seconds, samples))
        r = done[-1]
        print(
            f"  idle: {r.statements_per_s:.1f} statements/s, daemon {r.daemon_cpu:.2f}% "
            f"of a core, wake p50 {pct(r.wake_ms, 50):.2f} ms",
            file=sys.stderr,
            flush=True,
        )
    window = sum(r.seconds for r in done)
    pgstats.print_statements(
        f"idle: the daemon's statements, {QUEUES} idle queues, {runs} runs",
        pgstats.merge(r.statements for r in done),
        window,
    )
    setting = f"{QUEUES} idle queues"
    wake = f"wake 1 of {QUEUES}, commit->start"
    over = f"over {seconds:.0f} s; "
    return [
        Row(
            "idle",
            "stoker",
            f"{setting}: statements",
            "stmt/s",
            [r.statements_per_s for r in done],
            note=over + "goal <= 5 (pg_stat_statements of its database)",
        ),
        Row(
            "idle",
            "stoker",
            f"{setting}: daemon CPU",
            "% core",
            [r.daemon_cpu for r in done],
            note=over + "goal < 1% (utime+stime of the process)",
        ),
        Row(
            "idle",
            "stoker",
            f"{setting}: backends' CPU",
            "% core",
            [r.backends_cpu for r in done],
            note=over + "the PostgreSQL processes of its connections",
        ),
        Row(
            "idle",
            "stoker",
            f"{wake} p50",
            "ms",
            [pct(r.wake_ms, 50) for r in done],
            note=f"{samples} jobs a run; goal <= 1.0 ms (#16 goal 2)",
        ),
        Row(
            "idle",
            "stoker",
            f"{wake} max",
            "ms",
            [max(r.wake_ms) for r in done],
            note=f"{samples} jobs a run; goal p99 <= 2.0 ms (#16 goal 2)",
        ),
    ]
