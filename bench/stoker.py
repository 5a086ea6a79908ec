"""Stoker under test: `stoker run` processes against a fresh database per run."""

from __future__ import annotations

import asyncio
import os
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from urllib.parse import urlsplit

import aiohttp
import asyncpg

from bench.common import (
    cores_busy,
    cpu_ticks,
    fresh_database,
    rss_mb,
    settle,
    stoker_process,
    wait_for,
)
from daemon.dev.pgcluster import find_bindir, free_port
from daemon.store import queries
from daemon.store.db import init_connection

QUEUE = "bench"
CONFIG = """
handler_modules = ["bench.handlers"]
log_level = "WARNING"
[queues.{queue}]
concurrency = {concurrency}
batch_size = {batch_size}
poll_interval = 2.0
{extra}
"""


@asynccontextmanager
async def daemon(
    dsn: str,
    *,
    concurrency: int = 200,
    batch_size: int = 100,
    http_port: int = 0,
    name: str = "daemon",
    queue: str = QUEUE,
    extra: str = "",
) -> AsyncIterator[subprocess.Popen[bytes]]:
    """A `stoker run` process, yielded once it listens for jobs; `extra`: more keys of the
    queue's section (its limits)."""
    config = CONFIG.format(queue=queue, concurrency=concurrency, batch_size=batch_size, extra=extra)
    async with stoker_process(name, config, dsn, http_port=http_port) as proc:
        yield proc


async def fill(conn: asyncpg.Connection, jobs: int, queue: str = QUEUE, keys: int = 0) -> None:
    """`jobs` no-op jobs in one statement (the trigger fires once); with `keys`, spread over
    that many concurrency keys in turn."""
    await conn.execute(
        "INSERT INTO stoker.jobs (queue, kind, concurrency_key)"
        " SELECT $1, 'noop', CASE WHEN $3 > 0 THEN 'k' || (i % $3) END"
        "   FROM generate_series(1, $2) AS i",
        queue,
        jobs,
        keys,
    )


async def fill_history(conn: asyncpg.Connection, rows: int) -> None:
    """`rows` finished jobs, as a long-running installation accumulates them."""
    for start in range(0, rows, 1_000_000):
        await conn.execute(
            """INSERT INTO stoker.job_history (id, queue, kind, payload, meta, priority, state,
                   run_at, attempts, errors, created_at, started_at, finished_at)
               SELECT -i, 'old', 'noop', '{}', '{}', 0,
                      CASE WHEN i % 50 = 0 THEN 'failed' ELSE 'succeeded' END::stoker.job_state,
                      t, 1, '[]', t, t, t
                 FROM generate_series($1::bigint, $2::bigint) AS i,
                      LATERAL (SELECT now() - make_interval(secs => i::float8 / 10)) AS x(t)""",
            start + 1,
            min(rows, start + 1_000_000),
        )


async def drained(conn: asyncpg.Connection) -> bool:
    # Cheap at any depth: both probes are served by partial indexes.
    return not await conn.fetchval(
        "SELECT EXISTS (SELECT 1 FROM stoker.jobs WHERE state = 'queued')"
        " OR EXISTS (SELECT 1 FROM stoker.jobs WHERE state = 'active')"
    )


async def drain_rate(conn: asyncpg.Connection, jobs: int) -> float:
    """Jobs over the span from the first claim to the last completion, on the database clock."""
    row = await conn.fetchrow(
        "SELECT count(*) AS n, extract(epoch FROM max(finished_at) - min(started_at)) AS span"
        " FROM stoker.job_history WHERE queue = $1 AND state = 'succeeded'",
        QUEUE,
    )
    assert row["n"] == jobs, f"{row['n']} of {jobs} jobs succeeded"
    return jobs / float(row["span"])


async def scrape(port: int, stop: asyncio.Event, clients: int, rate: float | None) -> int:
    """`clients` loops hitting /metrics and /ready; `rate` caps the total requests a second."""
    sent = 0

    async def one(session: aiohttp.ClientSession, path: str) -> None:
        nonlocal sent
        while not stop.is_set():
            async with session.get(f"http://127.0.0.1:{port}{path}") as response:
                await response.read()
                if response.status != 200:
                    raise RuntimeError(f"{path} answered {response.status}")
            sent += 1
            if rate:
                await asyncio.sleep(clients / rate)

    async with aiohttp.ClientSession() as session:
        await asyncio.gather(
            *(one(session, "/metrics" if i % 2 else "/ready") for i in range(clients))
        )
    return sent


async def drain_once(
    admin_dsn: str,
    jobs: int,
    *,
    concurrency: int = 200,
    batch_size: int = 100,
    processes: int = 1,
    scrape_rate: float | None = None,
    peak_rss: list[float] | None = None,
    busy: list[float] | None = None,
    extra: str = "",
    keys: int = 0,
) -> float:
    """Jobs a second for `processes` daemons draining `jobs` queued no-op jobs; `busy` gets
    how many cores the machine kept busy meanwhile. `extra`: the queue's limits; `keys`: how
    many concurrency keys the jobs are spread over."""
    async with fresh_database(admin_dsn) as dsn:
        conn = await asyncpg.connect(dsn)
        try:
            await fill(conn, jobs, keys=keys)
            # Paused until every daemon listens: the drain starts for all of them at once, with
            # the statistics of the full table.
            await conn.execute(queries.SET_PAUSED, QUEUE, True)
            await settle(conn, "stoker.jobs")
            port = free_port()
            async with AsyncExitStack() as stack:
                procs = [
                    await stack.enter_async_context(
                        daemon(
                            dsn,
                            concurrency=concurrency,
                            batch_size=batch_size,
                            http_port=port if i == 0 else 0,
                            name="daemon" if i == 0 else f"daemon-{i + 1}",
                            extra=extra,
                        )
                    )
                    for i in range(processes)
                ]
                ticks = cpu_ticks()
                await conn.execute(queries.SET_PAUSED, QUEUE, False)  # NOTIFYs the daemons
                stop = asyncio.Event()
                scraper = (
                    asyncio.create_task(scrape(port, stop, 5, scrape_rate)) if scrape_rate else None
                )
                await wait_for(
                    f"drain of {jobs:,}", lambda: drained(conn), timeout=900, interval=0.05
                )
                if busy is not None:
                    busy.append(cores_busy(ticks, cpu_ticks()))
                stop.set()
                if scraper is not None:
                    await scraper
                if peak_rss is not None:
                    peak_rss.append(rss_mb(procs[0].pid)[1])
            return await drain_rate(conn, jobs)
        finally:
            await conn.close()


async def idle_rss_once(admin_dsn: str, seconds: float = 5.0) -> float:
    """Resident memory of a daemon that started, served a few jobs, and idled."""
    async with fresh_database(admin_dsn) as dsn:
        conn = await asyncpg.connect(dsn)
        try:
            async with daemon(dsn) as proc:
                await fill(conn, 100)
                await wait_for("100 jobs", lambda: drained(conn), timeout=60)
                await asyncio.sleep(seconds)  # a bench's settling time, not a test's wait
                return rss_mb(proc.pid)[0]
        finally:
            await conn.close()


async def claim_ms_once(dsn: str, claims: int = 100, batch: int = 100, *, later: int = 0) -> float:
    """Median round trip of the engine's claim statement (`batch` jobs) on a fresh backlog,
    with `later` jobs of the same queue scheduled for the coming days at every priority."""
    conn = await asyncpg.connect(dsn)
    try:
        await init_connection(conn)
        await conn.execute("DELETE FROM stoker.jobs")
        await conn.execute(
            """INSERT INTO stoker.jobs (queue, kind, run_at, priority)
               SELECT 'claimbench', 'noop', now() + make_interval(hours => 1, secs => i),
                      (i % 3)::smallint
                 FROM generate_series(1, $1) AS i""",
            later,
        )
        await fill(conn, claims * batch, queue="claimbench")
        await settle(conn, "stoker.jobs")
        times = []
        for _ in range(claims):
            t0 = time.perf_counter()
            rows = await conn.fetch(queries.CLAIM, "claimbench", batch, "bench", 30.0)
            times.append((time.perf_counter() - t0) * 1000)
            assert len(rows) == batch
        times.sort()
        return times[len(times) // 2]
    finally:
        await conn.close()


async def latency_once(admin_dsn: str, samples: int) -> tuple[list[float], list[float]]:
    """Jobs inserted one at a time into an idle daemon: ms from the client seeing its INSERT
    commit to the handler's start, and from just before it sent the INSERT."""
    async with fresh_database(admin_dsn) as dsn:
        conn = await asyncpg.connect(dsn)
        await init_connection(conn)
        try:
            async with daemon(dsn, concurrency=10, batch_size=10):
                from_commit, from_send = [], []
                for _ in range(samples + 5):
                    sent = time.time()
                    job_id = await conn.fetchval("SELECT stoker.enqueue($1, 'bench.stamp')", QUEUE)
                    committed = time.time()

                    async def stamped(job_id: int = job_id) -> bool:
                        return bool(
                            await conn.fetchval(
                                "SELECT result FROM stoker.job_history WHERE id = $1", job_id
                            )
                        )

                    await wait_for("latency sample", stamped, timeout=30, interval=0.002)
                    result = await conn.fetchval(
                        "SELECT result FROM stoker.job_history WHERE id = $1", job_id
                    )
                    from_commit.append((result["started"] - committed) * 1000)
                    from_send.append((result["started"] - sent) * 1000)
                    await asyncio.sleep(0.02)  # one job every 20 ms (#16 goal 2)
                return from_commit[5:], from_send[5:]  # the first few warm up caches
        finally:
            await conn.close()


PLAIN_INSERT = "INSERT INTO plain_jobs (queue, kind) VALUES ('default', 'noop');\n"
ENQUEUE = "SELECT stoker.enqueue('default', 'noop');\n"


def pgbench_tps(dsn: str, script: str, seconds: int, clients: int = 8) -> float:
    """Transactions a second of `clients` pgbench producers running `script`, one per commit."""
    parts = urlsplit(dsn)
    with tempfile.NamedTemporaryFile("w", suffix=".sql", delete=False) as fh:
        fh.write(script)
    try:
        out = subprocess.run(
            [
                str(find_bindir() / "pgbench"),
                *("-n", "-c", str(clients), "-j", "2", "-T", str(seconds), "-f", fh.name),
                *("-h", parts.hostname or "127.0.0.1", "-p", str(parts.port or 5432)),
                *("-U", parts.username or "postgres", parts.path.lstrip("/")),
            ],
            capture_output=True,
            text=True,
            check=True,
            timeout=seconds + 60,
        )
    finally:
        os.unlink(fh.name)
    for line in out.stdout.splitlines():
        if line.startswith("tps = "):
            return float(line.split()[2])
    raise RuntimeError(f"pgbench printed no tps:\n{out.stdout}\n{out.stderr}")
