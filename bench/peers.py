"""The peers under test: PgQueuer and Procrastinate, run the way their docs run them.

They are bench tools only, never dependencies of Stoker: `make bench-peers` installs them into
the bench environment, and they are imported here with importlib, so that type checking does
not need them. Each worker runs as `bench.peers worker-KIND DSN SETTING` in a process of its
own (not `-m`: Procrastinate warns about an App made in module __main__).

Rates are read from each system's own tables, on the database clock:

    pgqueuer       pgqueuer_log: min(created) of 'picked' .. max(created) of 'successful'
    procrastinate  procrastinate_events: min(at) of 'started' .. max(at) of 'succeeded'
"""

from __future__ import annotations

import asyncio
import importlib
import signal
import sys
import time
from typing import Any

import asyncpg

from bench.common import fresh_database, log_text, settle, wait_for, worker_process

QUEUE = "bench"
ENQUEUE_CHUNK = 5000
WORKER_MAIN = "from bench.peers import worker_main; worker_main()"


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

        @qm.entrypoint("stamp")  # type: ignore[untyped-decorator,unused-ignore]
        async def stamp(job: Any) -> None:
            # The instant the handler started, written on a connection of its own after the
            # fact, so the write is not part of the latency measured.
            stamps.put_nowait((int(job.id), time.time()))

        async def write_stamps() -> None:
            writer = await asyncpg.connect(dsn)
            try:
                while True:
                    job_id, started = await stamps.get()
                    await writer.execute(
                        "INSERT INTO bench_stamps VALUES ($1, $2)", job_id, started
                    )
            finally:
                await writer.close()

        stamps: asyncio.Queue[tuple[int, float]] = asyncio.Queue()
        stamp_writer = asyncio.create_task(write_stamps())

        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, qm.shutdown.set)
        print("consuming", flush=True)
        # Defaults otherwise: continuous mode, unlimited concurrent tasks, as `pgq run` does.
        await qm.run(batch_size=batch_size)
        stamp_writer.cancel()
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


def worker_argv(kind: str, dsn: str, setting: int) -> list[str]:
    return [sys.executable, "-c", WORKER_MAIN, f"worker-{kind}", dsn, str(setting)]


async def pgqueuer_queries(conn: asyncpg.Connection) -> Any:
    adapters = importlib.import_module("pgqueuer.db")
    queries_module = importlib.import_module("pgqueuer.queries")
    queries = queries_module.Queries(adapters.AsyncpgDriver(conn))
    await queries.install()
    return queries


async def pgqueuer_drain_once(admin_dsn: str, jobs: int, batch_size: int) -> float:
    async with fresh_database(admin_dsn, stoker_schema=False) as dsn:
        conn = await asyncpg.connect(dsn)
        try:
            queries = await pgqueuer_queries(conn)
            for start in range(0, jobs, ENQUEUE_CHUNK):
                count = min(ENQUEUE_CHUNK, jobs - start)
                await queries.enqueue(["noop"] * count, [None] * count, [0] * count)
            await settle(conn, "pgqueuer, pgqueuer_log")

            async def drained() -> bool:
                return not await conn.fetchval("SELECT EXISTS (SELECT 1 FROM pgqueuer)")

            with worker_process("pgqueuer", worker_argv("pgqueuer", dsn, batch_size)) as proc:
                await wait_for("pgqueuer drain", drained, proc=proc, log_name="pgqueuer")
            done = await conn.fetchval(
                "SELECT count(*) FROM pgqueuer_log WHERE status = 'successful'"
            )
            assert done == jobs, f"pgqueuer: {done} of {jobs} jobs succeeded"
            span = await conn.fetchval(
                "SELECT extract(epoch FROM max(created) FILTER (WHERE status = 'successful')"
                " - min(created) FILTER (WHERE status = 'picked')) FROM pgqueuer_log"
            )
            return jobs / float(span)
        finally:
            await conn.close()


async def pgqueuer_latency_once(admin_dsn: str, samples: int) -> tuple[list[float], list[float]]:
    """As bench.stoker.latency_once: jobs enqueued one at a time into an idle worker."""
    async with fresh_database(admin_dsn, stoker_schema=False) as dsn:
        conn = await asyncpg.connect(dsn)
        try:
            queries = await pgqueuer_queries(conn)
            await conn.execute("CREATE TABLE bench_stamps (id bigint PRIMARY KEY, started float8)")
            with worker_process("pgqueuer", worker_argv("pgqueuer", dsn, 10)) as proc:

                async def consuming() -> bool:
                    # Printed just before QueueManager.run: the first (discarded) samples
                    # cover its LISTEN.
                    return "consuming" in log_text("pgqueuer")

                await wait_for("pgqueuer start", consuming, proc=proc, log_name="pgqueuer")
                from_commit, from_send = [], []
                for _ in range(samples + 5):
                    sent = time.time()
                    [job_id] = await queries.enqueue("stamp", None)
                    committed = time.time()

                    async def stamped(job_id: int = job_id) -> bool:
                        return bool(
                            await conn.fetchval(
                                "SELECT started FROM bench_stamps WHERE id = $1", int(job_id)
                            )
                        )

                    await wait_for("pgqueuer latency sample", stamped, timeout=30, interval=0.002)
                    started = await conn.fetchval(
                        "SELECT started FROM bench_stamps WHERE id = $1", int(job_id)
                    )
                    from_commit.append((started - committed) * 1000)
                    from_send.append((started - sent) * 1000)
                    await asyncio.sleep(0.02)  # one job every 20 ms (#16 goal 2)
                return from_commit[5:], from_send[5:]
        finally:
            await conn.close()


async def procrastinate_drain_once(admin_dsn: str, jobs: int, concurrency: int) -> float:
    async with fresh_database(admin_dsn, stoker_schema=False) as dsn:
        app = procrastinate_app(dsn, concurrency)
        async with app.open_async():
            await app.schema_manager.apply_schema_async()
            task = app.tasks["noop"]
            for start in range(0, jobs, ENQUEUE_CHUNK):
                await task.batch_defer_async(*([{}] * min(ENQUEUE_CHUNK, jobs - start)))
        conn = await asyncpg.connect(dsn)
        try:
            await settle(conn, "procrastinate_jobs, procrastinate_events")

            async def drained() -> bool:
                return not await conn.fetchval(
                    "SELECT EXISTS (SELECT 1 FROM procrastinate_jobs"
                    " WHERE status IN ('todo', 'doing'))"
                )

            argv = worker_argv("procrastinate", dsn, concurrency)
            with worker_process("procrastinate", argv) as proc:
                await wait_for("procrastinate drain", drained, proc=proc, log_name="procrastinate")
            done = await conn.fetchval(
                "SELECT count(*) FROM procrastinate_jobs WHERE status = 'succeeded'"
            )
            assert done == jobs, f"procrastinate: {done} of {jobs} jobs succeeded"
            span = await conn.fetchval(
                "SELECT extract(epoch FROM max(at) FILTER (WHERE type = 'succeeded')"
                " - min(at) FILTER (WHERE type = 'started')) FROM procrastinate_events"
            )
            return jobs / float(span)
        finally:
            await conn.close()


def installed() -> bool:
    try:
        importlib.import_module("pgqueuer")
        importlib.import_module("procrastinate")
    except ImportError:
        return False
    return True


def worker_main() -> None:
    kind, dsn, setting = sys.argv[1].removeprefix("worker-"), sys.argv[2], int(sys.argv[3])
    worker = {"pgqueuer": pgqueuer_worker, "procrastinate": procrastinate_worker}[kind]
    asyncio.run(worker(dsn, setting))
