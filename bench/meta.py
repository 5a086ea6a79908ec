"""#18 (seed team B): jobs by meta, an organisation's jobs among millions.

- the filter (`stoker jobs list --meta org=...`, `GET /api/v1/jobs?meta.org=...`: the same
  operate.jobs calls) with --meta-history finished jobs and 100,000 live ones, 10,000
  organisations of about 110 jobs each and one large one holding a tenth of all jobs: a page of
  50 for a usual organisation (goal <= 50 ms), for the large one, two keys, and a count;
- what migration 020 costs the drain (its trigger on stoker.job_history, which announces
  finished jobs to wait_for, and the partial meta indexes): a drain without them, with them
  and jobs without meta (most producers), and with them and every job carrying an org, paired
  by round."""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Awaitable, Callable

import asyncpg

from bench import stoker
from bench.common import Row, fresh_database, settle, wait_for
from daemon.operate import jobs
from daemon.store import queries

ORGS = 10_000
LIVE = 100_000
QUERIES = 50  # per figure and run

WITHOUT_020 = """
DROP TRIGGER job_history_announce ON stoker.job_history;
DROP INDEX stoker.jobs_meta_idx, stoker.job_history_meta_idx;
"""

_ORG = "CASE WHEN i % 10 = 0 THEN 'org_big' ELSE 'org_' || (i % $2) END"


async def _fill(conn: asyncpg.Connection, history: int) -> None:
    for start in range(0, history, 1_000_000):
        await conn.execute(
            f"""INSERT INTO stoker.job_history (id, queue, kind, payload, meta, priority, state,
                    run_at, attempts, errors, created_at, started_at, finished_at)
                SELECT -i, 'old', 'report', '{{}}',
                       jsonb_build_object('org', {_ORG}, 'user', 'u_' || (i % 97)), 0,
                       'succeeded', now(), 1, '[]', now(), now(), now()
                  FROM generate_series($1::bigint, $3::bigint) AS i""",
            start + 1,
            ORGS,
            min(history, start + 1_000_000),
        )
    await conn.execute(
        f"""INSERT INTO stoker.jobs (queue, kind, meta, run_at)
            SELECT 'later', 'report', jsonb_build_object('org', {_ORG}, 'user', 'u_' || (i % 97)),
                   now() + interval '1 day'
              FROM generate_series(1, $1) AS i""",
        LIVE,
        ORGS,
    )
    await settle(conn, "stoker.jobs, stoker.job_history")


async def _median_ms(call: Callable[[], Awaitable[object]]) -> float:
    times = []
    for _ in range(QUERIES):
        start = time.perf_counter()
        await call()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


async def filter_rows(admin: str, runs: int, history: int) -> list[Row]:
    among = f"{history:,} finished and {LIVE:,} live jobs"
    usual = Row("meta", "stoker", "one org, page of 50", "ms", higher_is_better=False)
    big = Row("meta", "stoker", "org of 10% of jobs, page of 50", "ms", higher_is_better=False)
    two = Row("meta", "stoker", "org and user, page of 50", "ms", higher_is_better=False)
    count = Row("meta", "stoker", "one org, count", "ms", higher_is_better=False)
    pick = random.Random(18)

    def org() -> dict[str, str]:
        return {"org": f"org_{pick.randrange(1, ORGS)}"}

    async with fresh_database(admin) as dsn:
        conn = await asyncpg.connect(dsn)
        try:
            await _fill(conn, history)
            for _ in range(runs):
                usual.values.append(
                    await _median_ms(lambda: jobs.list_jobs(conn, limit=51, meta=org()))
                )
                big.values.append(
                    await _median_ms(
                        lambda: jobs.list_jobs(conn, limit=51, meta={"org": "org_big"})
                    )
                )
                two.values.append(
                    await _median_ms(
                        lambda: jobs.list_jobs(conn, limit=51, meta={**org(), "user": "u_3"})
                    )
                )
                count.values.append(await _median_ms(lambda: jobs.count_jobs(conn, org())))
        finally:
            await conn.close()
    usual.note = f"among {among}; median of {QUERIES} queries a run; goal <= 50 ms"
    return [usual, big, two, count]


async def _drain(admin: str, n: int, conc: int, batch: int, *, setup: str, org: bool) -> float:
    async with fresh_database(admin) as dsn:
        conn = await asyncpg.connect(dsn)
        try:
            if setup:
                await conn.execute(setup)
            await conn.execute(
                "INSERT INTO stoker.jobs (queue, kind, meta)"
                " SELECT $1, 'noop',"
                "        CASE WHEN $3 THEN jsonb_build_object('org', 'org_' || (i % 1000))"
                "             ELSE '{}' END"
                "   FROM generate_series(1, $2) AS i",
                stoker.QUEUE,
                n,
                org,
            )
            # Paused until the daemon listens, as bench drain: the drain starts at once.
            await conn.execute(queries.SET_PAUSED, stoker.QUEUE, True)
            await settle(conn, "stoker.jobs")
            async with stoker.daemon(dsn, concurrency=conc, batch_size=batch):
                await conn.execute(queries.SET_PAUSED, stoker.QUEUE, False)  # NOTIFYs it
                await wait_for(
                    f"drain of {n:,}", lambda: stoker.drained(conn), timeout=900, interval=0.05
                )
            return await stoker.drain_rate(conn, n)
        finally:
            await conn.close()


async def drain_rows(admin: str, runs: int, n: int, conc: int, batch: int) -> list[Row]:
    variants = [
        ("drain, no 020 trigger/indexes", WITHOUT_020, False),
        ("drain, 020, jobs without meta", "", False),
        ("drain, 020, every job with meta", "", True),
    ]
    rows = [Row("meta", "stoker", label, "jobs/s") for label, _, _ in variants]
    for _ in range(runs):
        for row, (_, setup, org) in zip(rows, variants, strict=True):
            row.values.append(await _drain(admin, n, conc, batch, setup=setup, org=org))
    for row in rows[1:]:
        ratio = statistics.median(v / b for v, b in zip(row.values, rows[0].values, strict=True))
        row.note = f"{ratio:.0%} of no 020, paired by round ({n:,} jobs, conc {conc})"
    return rows


async def meta(admin: str, runs: int, history: int, n: int, conc: int, batch: int) -> list[Row]:
    return await filter_rows(admin, runs, history) + await drain_rows(admin, runs, n, conc, batch)
