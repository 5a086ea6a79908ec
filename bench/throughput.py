"""First benchmark: drain throughput and enqueue-to-start latency of one `stoker run` process.

    make bench                     # its own throwaway PostgreSQL under .stoker/bench-pg
    STOKER_BENCH_DSN=postgresql://... make bench   # an existing server (creates databases)

Drain: 20,000 no-op jobs enqueued with enqueue_many, then a daemon started; the rate is jobs
divided by the span from the first job's claim to the last job's completion (database clock).
Latency: jobs inserted one at a time into an idle daemon; from just before the client sends the
autocommit INSERT to the instant the handler starts (so it includes the INSERT and COMMIT).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
import asyncpg

from daemon import Job, enqueue_many
from daemon.db import init_connection
from daemon.migrations import migrate
from daemon.pgcluster import Cluster, find_bindir, free_port

REPO = Path(__file__).resolve().parent.parent
CONFIG = """
handler_modules = ["bench.handlers"]
log_level = "WARNING"
[queues.bench]
concurrency = {concurrency}
batch_size = {batch_size}
poll_interval = 2.0
"""


def server_dsn() -> tuple[str, Cluster | None]:
    given = os.environ.get("STOKER_BENCH_DSN")
    if given:
        return given, None
    # Durable (fsync on), but with room for the WAL of a whole run, so that a checkpoint
    # forced by max_wal_size does not land in the middle of one run and not another.
    cluster = Cluster(
        REPO / ".stoker" / "bench-pg",
        settings=("max_wal_size=8GB", "checkpoint_timeout=30min"),
    )
    return cluster.start(), cluster


@asynccontextmanager
async def fresh_database(admin_dsn: str) -> AsyncIterator[str]:
    name = f"bench_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(admin_dsn)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        dsn = admin_dsn.rsplit("/", 1)[0] + f"/{name}"
        conn = await asyncpg.connect(dsn)
        try:
            await migrate(conn)
        finally:
            await conn.close()
        yield dsn
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


@asynccontextmanager
async def daemon(
    dsn: str, concurrency: int, batch_size: int, http_port: int = 0
) -> AsyncIterator[None]:
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "stoker.toml"
        config.write_text(CONFIG.format(concurrency=concurrency, batch_size=batch_size))
        env = {k: v for k, v in os.environ.items() if not k.startswith("STOKER_")}
        env.update(DATABASE_URL=dsn, PYTHONPATH=str(REPO), STOKER_HTTP__PORT=str(http_port))
        log = REPO / ".stoker" / "bench-daemon.log"  # kept: warnings explain odd runs
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "daemon",
                    "--config",
                    str(config),
                    "run",
                    "--log-format",
                    "text",
                    "--log-level",
                    "INFO",
                ],
                cwd=REPO,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        try:
            deadline = time.monotonic() + 30
            while "listening on channel" not in log.read_text(errors="replace"):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"daemon did not start:\n{log.read_text()}")
                await asyncio.sleep(0.02)
            yield
        finally:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.kill(proc.pid, signal.SIGKILL)
                    proc.wait()


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
    admin_dsn: str, jobs: int, concurrency: int, batch_size: int, load: str = "none"
) -> float:
    async with fresh_database(admin_dsn) as dsn:
        conn = await asyncpg.connect(dsn)
        try:
            for start in range(0, jobs, 5000):
                count = min(5000, jobs - start)
                await enqueue_many(conn, [Job("bench", "noop")] * count)
            await conn.execute("VACUUM ANALYZE stoker.jobs")
            await conn.execute("CHECKPOINT")  # every run starts with the same I/O debt
            port = free_port()
            async with daemon(dsn, concurrency, batch_size, port):
                stop = asyncio.Event()
                scraper = None
                if load == "50/s":
                    scraper = asyncio.create_task(scrape(port, stop, 5, 50.0))
                elif load == "50 clients":
                    scraper = asyncio.create_task(scrape(port, stop, 50, None))
                while await conn.fetchval("SELECT count(*) FROM stoker.jobs") > 0:
                    await asyncio.sleep(0.05)
                stop.set()
                if scraper is not None:
                    await scraper
            span = await conn.fetchval(
                "SELECT extract(epoch FROM max(finished_at) - min(started_at)) "
                "FROM stoker.job_history WHERE state = 'succeeded'"
            )
            done = await conn.fetchval("SELECT count(*) FROM stoker.job_history")
            assert done == jobs, f"{done} of {jobs} jobs finished"
            return jobs / float(span)
        finally:
            await conn.close()


async def latency_once(admin_dsn: str, samples: int) -> list[float]:
    async with fresh_database(admin_dsn) as dsn:
        conn = await asyncpg.connect(dsn)
        await init_connection(conn)
        try:
            async with daemon(dsn, 10, 10):
                out = []
                for _ in range(samples + 5):
                    sent = time.time()
                    job_id = await conn.fetchval("SELECT stoker.enqueue('bench', 'bench.stamp')")
                    while True:
                        result = await conn.fetchval(
                            "SELECT result FROM stoker.job_history WHERE id = $1", job_id
                        )
                        if result is not None:
                            break
                        await asyncio.sleep(0.002)
                    out.append((result["started"] - sent) * 1000)
                    await asyncio.sleep(0.02)  # let the daemon go idle again
                return out[5:]  # the first few warm up connections and caches
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
                "-n",
                "-c",
                str(clients),
                "-j",
                "2",
                "-T",
                str(seconds),
                "-f",
                fh.name,
                "-h",
                parts.hostname or "127.0.0.1",
                "-p",
                str(parts.port or 5432),
                "-U",
                parts.username or "postgres",
                parts.path.lstrip("/"),
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


async def producers_once(admin_dsn: str, seconds: int) -> tuple[float, float]:
    """The NOTIFY tax: eight producers inserting one job per transaction into a table without
    a trigger, then through stoker.enqueue while a daemon is busy draining a backlog."""
    async with fresh_database(admin_dsn) as dsn:
        conn = await asyncpg.connect(dsn)
        try:
            # The same table, indexes and constraints, only without the trigger.
            await conn.execute("CREATE TABLE plain_jobs (LIKE stoker.jobs INCLUDING ALL)")
            await conn.execute("CHECKPOINT")
            plain = await asyncio.to_thread(pgbench_tps, dsn, PLAIN_INSERT, seconds)
            for _ in range(40):  # a backlog the daemon is still draining when producers stop
                await enqueue_many(conn, [Job("default", "noop")] * 5000)
            await conn.execute("VACUUM ANALYZE stoker.jobs")
            await conn.execute("CHECKPOINT")
            async with daemon(dsn, 200, 100, free_port()):
                busy = await asyncio.to_thread(pgbench_tps, dsn, ENQUEUE, seconds)
                left = await conn.fetchval("SELECT count(*) FROM stoker.jobs")
                if not left:
                    print("warning: the daemon ran out of backlog before the producers stopped")
            return plain, busy
        finally:
            await conn.close()


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


async def main_async(args: argparse.Namespace) -> None:
    admin_dsn, cluster = server_dsn()
    loads = ["none", "50/s", "50 clients"] if args.http_load else ["none"]
    rates: dict[str, list[float]] = {load: [] for load in loads}
    try:
        for _ in range(args.runs):  # interleaved, so drift in the machine hits all alike
            for load in loads:
                rates[load].append(
                    await drain_once(admin_dsn, args.jobs, args.concurrency, args.batch_size, load)
                )
        latencies = await latency_once(admin_dsn, args.samples)
        producers = (
            [await producers_once(admin_dsn, args.producer_seconds) for _ in range(args.runs)]
            if args.producers
            else []
        )
    finally:
        if cluster is not None:
            cluster.stop()
    print()
    print(f"{'scenario':<10} {'system':<8} {'result':<36} {'runs'}")
    base = statistics.median(rates["none"])
    for load, values in rates.items():
        median = statistics.median(values)
        ratio = "" if load == "none" else f", {median / base:.2f}x of no HTTP load"
        print(
            f"{'drain' if load == 'none' else 'drain+http':<10} {'stoker':<8} "
            f"{f'{median:,.0f} jobs/s (median)':<36} "
            f"{args.runs} runs, min {min(values):,.0f}, max {max(values):,.0f}; "
            f"{args.jobs:,} no-op jobs, concurrency {args.concurrency}, batch {args.batch_size}"
            f"{'' if load == 'none' else f'; /metrics+/ready at {load}'}{ratio}"
        )
    print(
        f"{'latency':<10} {'stoker':<8} "
        f"{f'p50 {pct(latencies, 50):.2f} ms  p95 {pct(latencies, 95):.2f} ms':<36} "
        f"p99 {pct(latencies, 99):.2f} ms over {len(latencies)} jobs inserted one at a time"
    )
    if producers:
        plain = statistics.median(p for p, _ in producers)
        busy = statistics.median(b for _, b in producers)
        print(
            f"{'producers':<10} {'stoker':<8} "
            f"{f'{busy:,.0f} tx/s vs {plain:,.0f} plain ({busy / plain:.0%})':<36} "
            f"{args.runs} runs; 8 pgbench clients, one enqueue per transaction, daemon busy, "
            "vs the same INSERT into a table with no trigger"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--jobs", type=int, default=20_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument(
        "--http-load",
        action="store_true",
        help="also drain while /metrics and /ready are scraped (50/s, and 50 clients flat out)",
    )
    parser.add_argument(
        "--producers",
        action="store_true",
        help="also measure the NOTIFY tax on producers (pgbench) while a daemon is busy",
    )
    parser.add_argument("--producer-seconds", type=int, default=8)
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
