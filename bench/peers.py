"""Peers side by side: drain throughput of Stoker, PgQueuer and Procrastinate in one run.

    make bench-peers               # installs the peers into .venv (bench only), then runs this
    .venv/bin/python -m bench.peers --jobs 20000 --procrastinate-jobs 5000 --runs 3

Every system drains no-op jobs enqueued in bulk beforehand, in a fresh database of the same
PostgreSQL server (bench.throughput's own cluster, or STOKER_BENCH_DSN), with VACUUM ANALYZE
and a CHECKPOINT before each run, its worker in a process of its own. The rate is jobs divided
by the span from the first job's claim to the last job's completion, read from each system's
own tables on the database clock:

    stoker         stoker.job_history: min(started_at) .. max(finished_at)
    pgqueuer       pgqueuer_log: min(created) of 'picked' .. max(created) of 'successful'
    procrastinate  procrastinate_events: min(at) of 'started' .. max(at) of 'succeeded'

Runs are interleaved (stoker, pgqueuer batch 10, pgqueuer batch 100, procrastinate, repeat),
so drift in the machine hits all alike. The peers are never runtime dependencies of Stoker;
they are imported only here, with importlib, so that type checking does not need them.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any

import asyncpg

from bench.throughput import REPO, drain_once, fresh_database, server_dsn

QUEUE = "bench"
ENQUEUE_CHUNK = 5000
POLL = 0.05  # seconds between checks that the queue is empty (not part of the timing)
TIMEOUT = 300.0  # seconds a drain may take before the run fails
WORKER_MAIN = "from bench.peers import main; main()"


# --- workers: each runs as `bench.peers worker-KIND DSN SETTING` in a process of its own ---


async def pgqueuer_worker(dsn: str, batch_size: int) -> None:
    adapters = importlib.import_module("pgqueuer.db")
    qm_module = importlib.import_module("pgqueuer.qm")
    queries_module = importlib.import_module("pgqueuer.queries")
    conn = await asyncpg.connect(dsn)
    try:
        qm = qm_module.QueueManager(queries_module.Queries(adapters.AsyncpgDriver(conn)))

        @qm.entrypoint("noop")  # type: ignore[untyped-decorator,unused-ignore]
        async def noop(job: Any) -> None:
            return None

        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, qm.shutdown.set)
        print("consuming", flush=True)
        # Defaults otherwise: continuous mode, unlimited concurrent tasks, as `pgq run` does.
        await qm.run(batch_size=batch_size)
    finally:
        await conn.close()


def procrastinate_app(dsn: str, concurrency: int) -> Any:
    procrastinate = importlib.import_module("procrastinate")
    # Room in the pool for every concurrent job plus the worker's listener and fetcher.
    app = procrastinate.App(
        connector=procrastinate.PsycopgConnector(
            conninfo=dsn, min_size=2, max_size=max(4, concurrency + 2)
        )
    )

    @app.task(name="noop", queue=QUEUE)  # type: ignore[untyped-decorator,misc,unused-ignore]
    async def noop() -> None:
        return None

    return app


async def procrastinate_worker(dsn: str, concurrency: int) -> None:
    app = procrastinate_app(dsn, concurrency)
    async with app.open_async():
        print("consuming", flush=True)
        # wait=False: returns once the queue is empty; delete_jobs="never" (the default) keeps
        # the jobs, and so their events, for the timing.
        await app.run_worker_async(queues=[QUEUE], concurrency=concurrency, wait=False)


# --- the bench process ---------------------------------------------------------------------------


@asynccontextmanager
async def worker_process(
    kind: str, dsn: str, setting: int
) -> AsyncIterator[subprocess.Popen[bytes]]:
    """Start `worker-KIND DSN SETTING` of this module; stopped by PID however we leave."""
    log = REPO / ".stoker" / f"bench-{kind}.log"  # kept: warnings explain odd runs
    log.parent.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("STOKER_")}
    env["PYTHONPATH"] = str(REPO)
    with log.open("wb") as out:
        proc = subprocess.Popen(
            # Not `-m bench.peers`: Procrastinate warns about an App made in module __main__.
            [sys.executable, "-c", WORKER_MAIN, f"worker-{kind}", dsn, str(setting)],
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()


async def wait_until(
    conn: asyncpg.Connection, proc: subprocess.Popen[bytes], kind: str, query: str, jobs: int
) -> None:
    """Poll `query` (a count of finished jobs) every POLL seconds until it reaches `jobs`."""
    deadline = time.monotonic() + TIMEOUT
    while (done := await conn.fetchval(query)) < jobs:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{kind}: {done} of {jobs} jobs after {TIMEOUT:.0f} s")
        if proc.poll() is not None and await conn.fetchval(query) < jobs:
            log = REPO / ".stoker" / f"bench-{kind}.log"
            raise RuntimeError(
                f"{kind} worker exited ({proc.returncode}) with {done} of {jobs} jobs done:\n"
                f"{log.read_text(errors='replace')[-4000:]}"
            )
        await asyncio.sleep(POLL)


async def prepare(conn: asyncpg.Connection, tables: str) -> None:
    await conn.execute(f"VACUUM ANALYZE {tables}")
    await conn.execute("CHECKPOINT")  # every run starts with the same I/O debt


async def pgqueuer_once(admin_dsn: str, jobs: int, batch_size: int) -> float:
    adapters = importlib.import_module("pgqueuer.db")
    queries_module = importlib.import_module("pgqueuer.queries")
    async with fresh_database(admin_dsn) as dsn:
        conn = await asyncpg.connect(dsn)
        try:
            queries = queries_module.Queries(adapters.AsyncpgDriver(conn))
            await queries.install()
            for start in range(0, jobs, ENQUEUE_CHUNK):
                count = min(ENQUEUE_CHUNK, jobs - start)
                await queries.enqueue(["noop"] * count, [None] * count, [0] * count)
            await prepare(conn, "pgqueuer, pgqueuer_log")
            async with worker_process("pgqueuer", dsn, batch_size) as proc:
                await wait_until(
                    conn,
                    proc,
                    "pgqueuer",
                    "SELECT count(*) FROM pgqueuer_log WHERE status = 'successful'",
                    jobs,
                )
            span = await conn.fetchval(
                "SELECT extract(epoch FROM max(created) FILTER (WHERE status = 'successful')"
                " - min(created) FILTER (WHERE status = 'picked')) FROM pgqueuer_log"
            )
            left = await conn.fetchval("SELECT count(*) FROM pgqueuer")
            assert left == 0, f"pgqueuer: {left} jobs left in the queue"
            return jobs / float(span)
        finally:
            await conn.close()


async def procrastinate_once(admin_dsn: str, jobs: int, concurrency: int) -> float:
    async with fresh_database(admin_dsn) as dsn:
        app = procrastinate_app(dsn, concurrency)
        async with app.open_async():
            await app.schema_manager.apply_schema_async()
            task = app.tasks["noop"]
            for start in range(0, jobs, ENQUEUE_CHUNK):
                await task.batch_defer_async(*([{}] * min(ENQUEUE_CHUNK, jobs - start)))
        conn = await asyncpg.connect(dsn)
        try:
            await prepare(conn, "procrastinate_jobs, procrastinate_events")
            async with worker_process("procrastinate", dsn, concurrency) as proc:
                await wait_until(
                    conn,
                    proc,
                    "procrastinate",
                    "SELECT count(*) FROM procrastinate_jobs WHERE status = 'succeeded'",
                    jobs,
                )
            span = await conn.fetchval(
                "SELECT extract(epoch FROM max(at) FILTER (WHERE type = 'succeeded')"
                " - min(at) FILTER (WHERE type = 'started')) FROM procrastinate_events"
            )
            return jobs / float(span)
        finally:
            await conn.close()


@dataclass
class Scenario:
    system: str
    setting: str
    jobs: int
    run: Callable[[str], Awaitable[float]]
    rates: list[float]


async def main_async(args: argparse.Namespace) -> None:
    jobs, pjobs = args.jobs, args.procrastinate_jobs
    scenarios = [
        Scenario(
            "stoker",
            f"concurrency {args.concurrency}, batch {args.batch_size}",
            jobs,
            partial(
                drain_once, jobs=jobs, concurrency=args.concurrency, batch_size=args.batch_size
            ),
            [],
        ),
        *(
            Scenario(
                "pgqueuer",
                f"batch {batch}",
                jobs,
                partial(pgqueuer_once, jobs=jobs, batch_size=batch),
                [],
            )
            for batch in (10, 100)
        ),
        Scenario(
            "procrastinate",
            f"concurrency {args.procrastinate_concurrency}",
            pjobs,
            partial(procrastinate_once, jobs=pjobs, concurrency=args.procrastinate_concurrency),
            [],
        ),
    ]
    admin_dsn, cluster = server_dsn()
    try:
        for run in range(args.runs):  # interleaved, so drift in the machine hits all alike
            for s in scenarios:
                s.rates.append(await s.run(admin_dsn))
                print(
                    f"run {run + 1}/{args.runs} {s.system} {s.setting}: {s.rates[-1]:,.0f} jobs/s",
                    file=sys.stderr,
                    flush=True,
                )
    finally:
        if cluster is not None:
            cluster.stop()
    base = statistics.median(scenarios[0].rates)
    print()
    print(
        f"{'system':<14} {'setting':<28} {'jobs':>7} {'median jobs/s':>14} "
        f"{'min-max':>16} {'stoker/peer':>12}"
    )
    for s in scenarios:
        median = statistics.median(s.rates)
        ratio = "" if s.system == "stoker" else f"{base / median:.2f}x"
        print(
            f"{s.system:<14} {s.setting:<28} {s.jobs:>7,} {median:>14,.0f} "
            f"{f'{min(s.rates):,.0f}-{max(s.rates):,.0f}':>16} {ratio:>12}"
        )
    print(
        f"\n{args.runs} runs each, interleaved; no-op jobs; rate = jobs / (last completion - "
        "first claim), database clock"
    )


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1].startswith("worker-"):
        kind, dsn, setting = sys.argv[1].removeprefix("worker-"), sys.argv[2], int(sys.argv[3])
        worker = {"pgqueuer": pgqueuer_worker, "procrastinate": procrastinate_worker}[kind]
        asyncio.run(worker(dsn, setting))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--jobs", type=int, default=20_000)
    parser.add_argument(
        "--procrastinate-jobs",
        type=int,
        default=5_000,
        help="fewer: Procrastinate drains in the hundreds of jobs a second",
    )
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=200, help="Stoker's")
    parser.add_argument("--batch-size", type=int, default=100, help="Stoker's")
    parser.add_argument("--procrastinate-concurrency", type=int, default=20)
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
