"""Fault test: a daemon drains 100,000 jobs while its database connections are killed at random
moments, some of them in the middle of outcome writes that PostgreSQL refuses and the
completer splits. Every job must end succeeded, recorded by its own outcome, and run once."""

from __future__ import annotations

import asyncio
import collections
import logging
import random

import asyncpg
import pytest

from tests.conftest import DaemonFactory, eventually

log = logging.getLogger(__name__)

JOBS = 100_000
REFUSED_EVERY = 500  # one job in 500 returns a result jsonb cannot hold: its batch is split
MIN_KILLS = 30


@pytest.mark.timeout(400)
async def test_killing_connections_through_a_100k_drain_loses_and_repeats_nothing(
    daemons: DaemonFactory, db: asyncpg.Connection, dsn: str
) -> None:
    await db.execute(
        """INSERT INTO stoker.jobs (queue, kind, payload)
           SELECT 'default', 'test.record', jsonb_build_object('nul_result', i % $2 = 0)
             FROM generate_series(1, $1) AS i""",
        JOBS,
        REFUSED_EVERY,
    )
    daemon = await daemons.start(
        """
        lease_seconds = 5
        rescue_interval = 0.5
        [queues.default]
        concurrency = 100
        batch_size = 100
        poll_interval = 1
        """
    )
    rng = random.Random(20261130)
    kills: list[tuple[int, int]] = []  # (connections killed, of which writing outcomes)

    async def kill_at_random(conn: asyncpg.Connection) -> None:
        while True:
            await asyncio.sleep(rng.uniform(0.02, 0.12))
            victims = await conn.fetch(
                """SELECT pid, state, query FROM pg_stat_activity
                    WHERE datname = current_database() AND pid <> pg_backend_pid()
                      AND application_name LIKE 'stoker%'
                    ORDER BY random() LIMIT $1""",
                rng.randint(1, 3),
            )
            await conn.execute(
                "SELECT pg_terminate_backend(pid) FROM unnest($1::int[]) AS pid",
                [v["pid"] for v in victims],
            )
            writing = sum(
                v["state"] == "active" and "stoker.job_history" in (v["query"] or "")
                for v in victims
            )
            kills.append((len(victims), writing))

    async def drained() -> bool:
        left: int = await db.fetchval("SELECT count(*) FROM stoker.jobs")
        return left == 0

    killer_conn = await asyncpg.connect(dsn)
    killer = asyncio.create_task(kill_at_random(killer_conn))
    try:
        await eventually(drained, timeout=300, interval=0.5)
    finally:
        killer.cancel()
        await asyncio.gather(killer, return_exceptions=True)
        await killer_conn.close()

    states = dict(await db.fetch("SELECT state::text, count(*) FROM stoker.job_history GROUP BY 1"))
    assert states == {"succeeded": JOBS}
    notes = await db.fetchval(
        "SELECT count(*) FROM stoker.job_history WHERE result ? 'unrecorded_result'"
    )
    assert notes == JOBS // REFUSED_EVERY

    runs = collections.Counter(e["id"] for e in daemon.events())
    never = JOBS - len(runs)
    assert never == 0, f"{never} jobs recorded succeeded were never run"
    twice = sorted(job_id for job_id, n in runs.items() if n > 1)
    # A second run is only allowed where the first worker really lost the job: its lease
    # expired and a rescue handed it on (recorded in the job's errors).
    lost = set()
    if twice:
        lost = {
            r["id"]
            for r in await db.fetch(
                """SELECT id FROM stoker.job_history
                    WHERE id = ANY($1) AND errors::text LIKE '%lease expired%'""",
                twice,
            )
        }
    assert set(twice) <= lost, f"jobs run twice without a lost lease: {sorted(set(twice) - lost)}"
    split = daemon.log().count("writing it in smaller batches")
    summary = (
        f"{len(kills)} kills of {sum(k for k, _ in kills)} connections, "
        f"{sum(w for _, w in kills)} of them mid outcome write; {split} refused batches split; "
        f"{len(twice)} jobs ran twice (leases lost: {len(lost)})"
    )
    log.warning("fault drain: %s", summary)
    print(f"fault drain: {summary}")
    assert len(kills) >= MIN_KILLS, summary
    assert split > 0, summary
    assert daemon.proc.poll() is None
