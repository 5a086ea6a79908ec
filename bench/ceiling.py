"""The machine's ceiling: #6's bare asyncpg loop that claims 100 jobs with `FOR UPDATE SKIP
LOCKED` and deletes them, with no job system around it, in one process and in two.

How much a second worker process can add on this machine is bounded by how much the bare loop
gains from one: no job system that claims from PostgreSQL on the same machine scales better.

    python -m bench.ceiling WORKER DSN    # one worker (the bench starts these)
"""

from __future__ import annotations

import asyncio
import sys
from contextlib import ExitStack

import asyncpg

from bench.common import cores_busy, cpu_ticks, fresh_database, settle, wait_for, worker_process

TABLE = """
CREATE TABLE bare_jobs (
    id bigserial PRIMARY KEY,
    queue text NOT NULL DEFAULT 'bench',
    kind text NOT NULL DEFAULT 'noop',
    payload jsonb NOT NULL DEFAULT '{}'
);
CREATE TABLE bare_runs (worker int, jobs bigint, started timestamptz, finished timestamptz);
CREATE TABLE bare_ready (worker int);
"""

# One statement, one round trip: the cheapest claim-and-finish there is.
CLAIM_AND_DELETE = """
DELETE FROM bare_jobs WHERE id IN (
    SELECT id FROM bare_jobs ORDER BY id LIMIT 100 FOR UPDATE SKIP LOCKED)
"""


async def work(worker: int, dsn: str) -> None:
    conn = await asyncpg.connect(dsn)
    go = asyncio.Event()
    await conn.add_listener("bare_go", lambda *_: go.set())
    await conn.execute("INSERT INTO bare_ready VALUES ($1)", worker)
    await go.wait()
    started = await conn.fetchval("SELECT clock_timestamp()")
    done = 0
    while True:
        status = await conn.execute(CLAIM_AND_DELETE)
        deleted = int(status.split()[-1])
        if not deleted:
            # Rows another worker holds right now are not ours to wait for; stop once none
            # are left at all.
            if not await conn.fetchval("SELECT EXISTS (SELECT 1 FROM bare_jobs)"):
                break
            continue
        done += deleted
    await conn.execute(
        "INSERT INTO bare_runs VALUES ($1, $2, $3, clock_timestamp())", worker, done, started
    )
    await conn.close()


async def drain_once(admin_dsn: str, jobs: int, processes: int, busy: list[float]) -> float:
    """Jobs a second for `processes` bare loops deleting `jobs` rows, from the first loop's
    start to the last one's end on the database clock."""
    async with fresh_database(admin_dsn, stoker_schema=False) as dsn:
        conn = await asyncpg.connect(dsn)
        try:
            await conn.execute(TABLE)
            await conn.execute(
                "INSERT INTO bare_jobs (queue) SELECT 'bench' FROM generate_series(1, $1)", jobs
            )
            await settle(conn, "bare_jobs")
            with ExitStack() as stack:
                procs = [
                    stack.enter_context(
                        worker_process(
                            f"ceiling-{i + 1}", [sys.executable, "-m", "bench.ceiling", str(i), dsn]
                        )
                    )
                    for i in range(processes)
                ]

                async def ready() -> bool:
                    return bool(await conn.fetchval("SELECT count(*) FROM bare_ready") == processes)

                await wait_for("bare loops ready", ready, timeout=60, proc=procs[0])
                ticks = cpu_ticks()
                await conn.execute("NOTIFY bare_go")

                async def finished() -> bool:
                    for i, proc in enumerate(procs):
                        if proc.poll() is not None and proc.returncode != 0:
                            raise RuntimeError(f"bare loop {i + 1} exited ({proc.returncode})")
                    return bool(await conn.fetchval("SELECT count(*) FROM bare_runs") == processes)

                await wait_for("bare drain", finished, timeout=600, interval=0.05)
                busy.append(cores_busy(ticks, cpu_ticks()))
            row = await conn.fetchrow(
                "SELECT sum(jobs) AS n, extract(epoch FROM max(finished) - min(started)) AS span"
                " FROM bare_runs"
            )
            assert row["n"] == jobs, f"{row['n']} of {jobs} rows deleted"
            return jobs / float(row["span"])
        finally:
            await conn.close()


if __name__ == "__main__":
    asyncio.run(work(int(sys.argv[1]), sys.argv[2]))
