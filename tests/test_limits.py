"""Limits across daemons (issue 17), with real daemons and a real PostgreSQL: a queue's global
concurrency (never exceeded, even with a daemon kill -9'd midway), a concurrency per key (never
two of a key at once, no key held up by another's backlog) and a rate limit (no one-second
window holds more starts than the limit)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from daemon.config import QueueConfig
from daemon.dev.pgcluster import Cluster
from daemon.enqueue import Job, enqueue, enqueue_many
from daemon.store import queries
from daemon.store.migrations import migrate
from tests.conftest import DaemonFactory, eventually


def records(tmp: Path) -> list[dict[str, Any]]:
    """The runs test.record logged: id, label, start and end (monotonic, one clock for all
    the daemons of this machine)."""
    path = tmp / "events.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line]


async def insert(
    db: asyncpg.Connection, queue: str, jobs: list[tuple[str | None, float, str]]
) -> None:
    """Jobs of test.record: (concurrency_key, seconds, label) each, in one statement."""
    await db.execute(
        """
        INSERT INTO stoker.jobs (queue, kind, payload, concurrency_key)
        SELECT $1, 'test.record', jsonb_build_object('seconds', s, 'label', l), k
          FROM unnest($2::text[], $3::float8[], $4::text[]) AS t(k, s, l)
        """,
        queue,
        [k for k, _, _ in jobs],
        [s for _, s, _ in jobs],
        [label for _, _, label in jobs],
    )


async def wait_drained(db: asyncpg.Connection, queue: str, total: int, timeout: float) -> None:
    async def done() -> bool:
        n: int = await db.fetchval(
            "SELECT count(*) FROM stoker.job_history WHERE queue = $1 AND state = 'succeeded'",
            queue,
        )
        return n >= total

    await eventually(done, timeout, interval=0.1)


def most_at_once(spans: list[tuple[float, float]]) -> int:
    """The largest number of [start, end) spans that overlap at one instant."""
    edges = sorted([(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans])
    most = now = 0
    for _, step in edges:  # an end sorts before a start at the same instant
        now += step
        most = max(most, now)
    return most


async def test_global_concurrency_holds_across_three_daemons_and_a_kill(
    daemons: DaemonFactory, db: asyncpg.Connection, dsn: str, tmp_path: Path
) -> None:
    config = """
    lease_seconds = 2
    rescue_interval = 0.5
    [queues.capped]
    concurrency = 20
    global_concurrency = 4
    """
    started = [await daemons.start(config) for _ in range(3)]
    await insert(db, "capped", [(None, 0.02, f"j{i}") for i in range(2000)])

    samples: list[int] = []
    sampling = True

    async def sample() -> None:
        conn = await asyncpg.connect(dsn)
        try:
            while sampling:
                samples.append(
                    await conn.fetchval(
                        "SELECT count(*) FROM stoker.jobs"
                        " WHERE queue = 'capped' AND state = 'active'"
                    )
                )
                await asyncio.sleep(0.005)
        finally:
            await conn.close()

    sampler = asyncio.create_task(sample())
    t0 = time.monotonic()
    try:

        async def midway() -> bool:
            return len(records(tmp_path)) >= 700

        await eventually(midway, 60)
        victim = started[0]
        os.kill(victim.pid, signal.SIGKILL)
        victim.proc.wait(timeout=10)
        await wait_drained(db, "capped", 2000, 120)
    finally:
        sampling = False
        await sampler
    elapsed = time.monotonic() - t0

    # Sampled from the database every 5 ms: never more than 4 running.
    assert samples and max(samples) <= 4, max(samples)
    # The handlers' own clock says the same, across all three processes.
    runs = records(tmp_path)
    assert most_at_once([(r["start"], r["end"]) for r in runs]) <= 4
    # History too, exactly: started_at is read after the count that let the job start.
    spans = await db.fetch(
        "SELECT extract(epoch FROM started_at) AS s, extract(epoch FROM finished_at) AS e"
        "  FROM stoker.job_history WHERE queue = 'capped'"
    )
    assert most_at_once([(float(r["s"]), float(r["e"])) for r in spans]) <= 4
    # Every job ran to success once; the killed daemon's jobs came back after their lease.
    assert await db.fetchval("SELECT count(*) FROM stoker.jobs WHERE queue = 'capped'") == 0
    assert len({r["id"] for r in runs}) == 2000
    taken = sum(samples) / (4 * len(samples))
    # Handler time over the drain: the killed daemon's slots stay taken (and idle) for its
    # lease, 2 s of the drain.
    busy = sum(r["end"] - r["start"] for r in runs)
    utilisation = busy / (4 * (max(r["end"] for r in runs) - min(r["start"] for r in runs)))
    print(
        f"\nglobal_concurrency=4, 3 daemons, 2,000 jobs of 20 ms, one killed: {elapsed:.1f} s "
        f"(ideal 10.0 s); slots taken {taken:.0%} of {len(samples)} samples, "
        f"handlers busy {utilisation:.0%} of the slots"
    )
    assert utilisation >= 0.5


async def test_key_concurrency_one_per_key_and_all_keys_in_parallel(
    daemons: DaemonFactory, db: asyncpg.Connection, tmp_path: Path
) -> None:
    config = """
    [queues.orgs]
    concurrency = 20
    key_concurrency = 1
    """
    for _ in range(3):
        await daemons.start(config)
    keys = [f"org_{k}" for k in range(10)]
    # Interleaved, as requests from ten organisations arrive.
    await insert(db, "orgs", [(key, 0.005, key) for _ in range(100) for key in keys])
    await wait_drained(db, "orgs", 1000, 120)

    runs = records(tmp_path)
    assert len(runs) == 1000
    by_key: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for r in runs:
        by_key[r["label"]].append((r["start"], r["end"]))
    for key, spans in by_key.items():
        assert most_at_once(spans) == 1, key
    # Exactly, from history: a key's next job starts after its previous one finished.
    rows = await db.fetch(
        "SELECT concurrency_key AS k, started_at, finished_at FROM stoker.job_history"
        " WHERE queue = 'orgs' ORDER BY started_at"
    )
    last_end: dict[str, Any] = {}
    for row in rows:
        if row["k"] in last_end:
            assert row["started_at"] >= last_end[row["k"]], row
        last_end[row["k"]] = row["finished_at"]
    # All keys progressed in parallel: up to ten ran at once.
    assert most_at_once([span for spans in by_key.values() for span in spans]) >= 5


async def test_one_key_backlog_does_not_delay_the_others(
    daemons: DaemonFactory, db: asyncpg.Connection, tmp_path: Path
) -> None:
    config = """
    [queues.orgs]
    concurrency = 10
    key_concurrency = 1
    """
    await daemons.start(config)
    await daemons.start(config)
    # One organisation's 1,000 jobs first, in front of everyone else's.
    await insert(db, "orgs", [("big", 0.01, "big") for _ in range(1000)])
    t0 = time.monotonic()
    await insert(
        db, "orgs", [(f"small_{k}", 0.01, f"small_{k}") for k in range(9) for _ in range(10)]
    )

    async def small_done() -> bool:
        n: int = await db.fetchval(
            "SELECT count(*) FROM stoker.job_history WHERE queue = 'orgs'"
            "   AND concurrency_key LIKE 'small_%'"
        )
        return n == 90

    await eventually(small_done, 60, interval=0.05)
    small_elapsed = time.monotonic() - t0
    big_done = await db.fetchval(
        "SELECT count(*) FROM stoker.job_history WHERE queue = 'orgs' AND concurrency_key = 'big'"
    )
    print(f"\n9 keys x 10 jobs done in {small_elapsed:.2f} s; the big key had done {big_done}/1000")
    # Ten jobs of 10 ms one after another take 0.1 s of handler time per key; they did not
    # wait for the big key's 1,000 (10 s at one at a time).
    assert big_done < 500
    assert small_elapsed < 5


async def test_rate_limit_no_window_holds_more_than_the_limit(
    daemons: DaemonFactory, db: asyncpg.Connection, tmp_path: Path
) -> None:
    config = """
    [queues.api]
    concurrency = 20
    rate_limit = "50/1s"
    """
    for _ in range(3):
        await daemons.start(config)
    await insert(db, "api", [(None, 0.0, f"j{i}") for i in range(3000)])
    await wait_drained(db, "api", 3000, 120)

    starts = sorted(
        float(r[0])
        for r in await db.fetch(
            "SELECT extract(epoch FROM started_at) FROM stoker.job_history WHERE queue = 'api'"
        )
    )
    # The most starts any closed one-second window holds (two pointers over sorted starts).
    most, lo = 0, 0
    for hi, at in enumerate(starts):
        while starts[lo] < at - 1.0:
            lo += 1
        most = max(most, hi - lo + 1)
    span = starts[-1] - starts[0]
    print(f"\n3,000 starts over {span:.1f} s ({3000 / span:.1f}/s); busiest second: {most}")
    assert most <= 50
    # And the limit is used, not merely respected: 3,000 starts take about a minute.
    assert span < 70


async def test_enqueue_carries_the_concurrency_key_into_history_and_back(
    daemons: DaemonFactory, db: asyncpg.Connection
) -> None:
    sql_id = await db.fetchval(
        "SELECT stoker.enqueue('keys', 'test.fail', concurrency_key => 'org_sql')"
    )
    py_id = await enqueue(db, queue="keys", kind="test.fail", concurrency_key="org_py")
    [many_id] = await enqueue_many(db, [Job("keys", "test.fail", concurrency_key="org_many")])
    ids = [sql_id, py_id, many_id]
    await daemons.start("[queues.keys]\nmax_attempts = 1\nkey_concurrency = 1\n")

    async def failed() -> bool:
        n: int = await db.fetchval(
            "SELECT count(*) FROM stoker.job_history WHERE id = ANY($1) AND state = 'failed'", ids
        )
        return n == 3

    await eventually(failed, 30)
    keys = await db.fetch(
        "SELECT id, concurrency_key FROM stoker.all_jobs WHERE id = ANY($1) ORDER BY id", ids
    )
    assert [r["concurrency_key"] for r in keys] == ["org_sql", "org_py", "org_many"]
    # A retry brings a job back with its key.
    await db.execute(
        "INSERT INTO stoker.jobs (id, queue, kind, concurrency_key) "
        "SELECT id + 1000000, queue, kind, concurrency_key FROM stoker.job_history WHERE id = $1",
        sql_id,
    )
    assert (
        await db.fetchval("SELECT concurrency_key FROM stoker.jobs WHERE id = $1", sql_id + 1000000)
        == "org_sql"
    )


async def test_an_empty_or_overlong_key_is_refused_by_name(db: asyncpg.Connection) -> None:
    for bad in ("", "k" * 201):
        with pytest.raises(asyncpg.CheckViolationError, match="jobs_concurrency_key_check"):
            await db.execute("SELECT stoker.enqueue('keys', 'noop', concurrency_key => $1)", bad)


@pytest.mark.parametrize(
    ("value", "count", "window"),
    [("100/1m", 100, 60.0), ("10/1s", 10, 1.0), ("5 / 500ms", 5, 0.5), ("3/2h", 3, 7200.0)],
)
def test_rate_limit_is_read_as_starts_per_window(value: str, count: int, window: float) -> None:
    rate = QueueConfig.model_validate({"rate_limit": value}).rate_limit
    assert rate is not None and (rate.count, rate.window) == (count, window)


@pytest.mark.parametrize(
    ("config", "says"),
    [
        ({"rate_limit": "fast"}, "is not a rate limit"),
        ({"rate_limit": "0/1s"}, "must be 1 to 1,000,000"),
        ({"rate_limit": "10/1y"}, "is not a duration"),
        ({"rate_limit": "10/0s"}, "the window must be"),
        ({"global_concurrency": 0}, "global_concurrency"),
        ({"key_concurrency": -1}, "key_concurrency"),
        ({"rate_limit_by_key": True}, "rate_limit_by_key needs a rate_limit"),
    ],
)
def test_bad_limits_are_refused_naming_the_field(config: dict[str, Any], says: str) -> None:
    with pytest.raises(ValueError, match=says):
        QueueConfig.model_validate(config)


async def test_a_database_defaulting_to_repeatable_read_still_gets_its_limits(
    daemons: DaemonFactory, db: asyncpg.Connection, tmp_path: Path
) -> None:
    name = await db.fetchval("SELECT current_database()")
    await db.execute(
        f'ALTER DATABASE "{name}" SET default_transaction_isolation = "repeatable read"'
    )
    daemon = await daemons.start("[queues.capped]\nconcurrency = 10\nglobal_concurrency = 2\n")
    await insert(db, "capped", [(None, 0.02, f"j{i}") for i in range(40)])
    await wait_drained(db, "capped", 40, 60)
    assert most_at_once([(r["start"], r["end"]) for r in records(tmp_path)]) <= 2
    assert "limited claims set it themselves" in daemon.log()


def limited_args(queue: str, wanted: int, worker: str, global_limit: int) -> tuple[object, ...]:
    """CLAIM_LIMITED's arguments for a queue with only a global limit."""
    return (queue, wanted, worker, 30.0, False, global_limit, None, None, None, False, None)


# stoker.complete_and_claim (022) is kept for daemons older than 025: same arguments, a row
# per outcome written (done_id) before the claim's rows.
COMPLETE_AND_CLAIM_022 = (
    "SELECT * FROM stoker.complete_and_claim("
    "$1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)"
)


@pytest.mark.parametrize("function", ["finish_and_claim", "complete_and_claim"])
async def test_outcomes_written_with_a_claim_along_are_those_of_the_plain_write(
    db: asyncpg.Connection, function: str
) -> None:
    """stoker.finish_and_claim (a queue held back by its global limit claims in the write of
    its outcomes), and complete_and_claim that older daemons call, write history rows like
    COMPLETE_SUCCEEDED, fence a stale attempt out like it, and their claim counts the slots
    their own outcomes just freed."""
    await db.execute(
        """
        INSERT INTO stoker.jobs (queue, kind, payload, meta, priority, max_attempts,
                                 concurrency_key)
        SELECT 'along', 'test.record', '{"seconds": 0, "label": "x"}', '{"org": "acme"}', 3, 7,
               'k' FROM generate_series(1, 5)
        """
    )
    claimed = await db.fetch(queries.CLAIM_LIMITED, *limited_args("along", 3, "w1", 3))
    plain, along, stale = sorted(r["id"] for r in claimed if r["id"] is not None)
    assert [r["blocked"] for r in claimed if r["id"] is None] == ["global"]
    result = '{"sent": 1}'
    await db.fetch(queries.COMPLETE_SUCCEEDED, [plain], [1], [result], "w1")
    rows = await db.fetch(
        queries.FINISH_AND_CLAIM if function == "finish_and_claim" else COMPLETE_AND_CLAIM_022,
        [along, stale],
        [1, 2],  # the stale one's attempt is 1: this outcome is fenced out
        [result, result],
        *limited_args("along", 5, "w1", 3),
    )
    if function == "finish_and_claim":
        done, claim = rows[0]["done_ids"], rows[1:]
    else:
        done = [r["done_id"] for r in rows if r["done_id"] is not None]
        claim = [r for r in rows if r["done_id"] is None]
    assert done == [along]
    # Two slots were free (plain's and along's): the claim takes both of the two jobs left,
    # and says the limit holds it back.
    assert len([r for r in claim if r["id"] is not None]) == 2
    assert [r["blocked"] for r in claim if r["id"] is None] == ["global"]
    assert await db.fetchval("SELECT state::text FROM stoker.jobs WHERE id = $1", stale) == (
        "active"
    )
    history = await db.fetch(
        "SELECT * FROM stoker.job_history WHERE id = ANY($1) ORDER BY id", [plain, along]
    )
    assert len(history) == 2
    moments = {"id", "created_at", "started_at", "finished_at", "run_at", "updated_at"}
    first, second = dict(history[0]), dict(history[1])
    differ = {k for k in first if k not in moments and first[k] != second[k]}
    assert not differ, f"columns written differently: {sorted(differ)}"
    assert history[1]["state"] == "succeeded" and history[1]["result"] == {"sent": 1}


async def test_a_limited_claim_takes_due_jobs_in_claim_order_and_skips_locked_ones(
    db: asyncpg.Connection, dsn: str
) -> None:
    """A queue with a global limit claims like any other: higher priority first, then by
    run_at and id, never a job not yet due, never one another transaction holds; the same
    over many calls (its statement runs on a plan kept across calls, 024)."""
    ids = await db.fetch(
        """
        INSERT INTO stoker.jobs (queue, kind, priority, run_at)
        SELECT 'ordered', 'test.record', p, now() - make_interval(secs => 100 - i)
          FROM generate_series(1, 30) AS i, (VALUES (0), (5), (-3)) AS pr(p)
        RETURNING id, priority, run_at
        """
    )
    later = await db.fetchval(
        "INSERT INTO stoker.jobs (queue, kind, priority, run_at)"
        " VALUES ('ordered', 'test.record', 9, now() + interval '1 hour') RETURNING id"
    )
    expected = [r["id"] for r in sorted(ids, key=lambda r: (-r["priority"], r["run_at"], r["id"]))]
    holder = await asyncpg.connect(dsn)
    try:
        held = expected[7]
        lock = holder.transaction()
        await lock.start()
        await holder.execute("SELECT 1 FROM stoker.jobs WHERE id = $1 FOR UPDATE", held)
        calls: list[list[int]] = []
        for _ in range(15):  # past the plan cache's five custom plans
            rows = await db.fetch(queries.CLAIM_LIMITED, *limited_args("ordered", 3, "w1", 1000))
            calls.append(sorted(r["id"] for r in rows if r["id"] is not None))
        await lock.rollback()
    finally:
        await holder.close()
    due = [i for i in expected if i != held]
    assert calls == [sorted(due[n : n + 3]) for n in range(0, 45, 3)]
    assert all(later not in call for call in calls)
    states = await db.fetch(
        "SELECT state::text AS state, count(*) AS n FROM stoker.jobs WHERE queue = 'ordered'"
        " GROUP BY 1 ORDER BY 1"
    )
    assert [(r["state"], r["n"]) for r in states] == [("active", 45), ("queued", 46)]


async def test_a_claim_along_that_postgresql_refuses_leaves_the_outcomes_written(
    daemons: DaemonFactory, db: asyncpg.Connection, tmp_path: Path
) -> None:
    """The statement that writes outcomes and claims along is refused (here: the function is
    gone): the outcomes are written alone, the pool claims by itself, the limit holds."""
    await db.execute("ALTER FUNCTION stoker.finish_and_claim RENAME TO finish_and_claim_off")
    daemon = await daemons.start("[queues.capped]\nconcurrency = 10\nglobal_concurrency = 3\n")
    await insert(db, "capped", [(None, 0.01, f"j{i}") for i in range(60)])
    await wait_drained(db, "capped", 60, 60)
    runs = records(tmp_path)
    assert len(runs) == 60 and most_at_once([(r["start"], r["end"]) for r in runs]) <= 3
    assert "Traceback" not in daemon.log() and "ERROR" not in daemon.log()
    # Said once, and not tried again: every statement along would have failed the same way.
    assert daemon.log().count("written without their next claim") == 1


@pytest.fixture
def durable_cluster() -> Iterator[Cluster]:
    """A PostgreSQL of the test's own whose commits wait for their WAL (the tests' clusters
    otherwise run with synchronous_commit off): the outcome writes then survive a crash, as in
    production, and what is left to prove is the claim's own durability."""
    cluster = Cluster(
        Path(tempfile.mkdtemp(prefix="stoker-crash-pg-")),
        fast=True,
        settings=("synchronous_commit=on",),
    )
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


async def test_global_concurrency_holds_through_a_database_crash(
    durable_cluster: Cluster, tmp_path: Path
) -> None:
    """PostgreSQL killed (immediate shutdown: no checkpoint, WAL buffers lost) mid-drain and
    started again: the limit still holds by the handlers' own clocks, and no job runs twice (a
    limited claim commits durably; one lost in the crash would put a running job back)."""
    own_cluster = durable_cluster
    dsn = own_cluster.dsn()
    conn = await asyncpg.connect(dsn)
    try:
        await migrate(conn)
        await insert(conn, "capped", [(None, 0.03, f"j{i}") for i in range(300)])
    finally:
        await conn.close()
    factory = DaemonFactory(dsn, tmp_path)
    try:
        for _ in range(2):
            await factory.start("[queues.capped]\nconcurrency = 10\nglobal_concurrency = 3\n")

        async def a_third_done() -> bool:
            return len(records(tmp_path)) >= 100

        await eventually(a_third_done, 60)
        pid = own_cluster.pid()
        assert pid is not None
        os.kill(pid, signal.SIGQUIT)  # immediate shutdown: a crash, recovered at start

        async def gone() -> bool:
            return own_cluster.pid() is None

        await eventually(gone, 30)
        await asyncio.to_thread(own_cluster.start)
        conn = await asyncpg.connect(dsn)
        try:
            await wait_drained(conn, "capped", 300, 120)
        finally:
            await conn.close()
    finally:
        factory.stop_all()
    runs = records(tmp_path)
    assert most_at_once([(r["start"], r["end"]) for r in runs]) <= 3
    ran = [r["id"] for r in runs]
    assert len(ran) == len(set(ran)) == 300, "a job ran twice, or not at all"


async def test_starts_of_a_rate_limit_that_was_removed_are_pruned(
    daemons: DaemonFactory, db: asyncpg.Connection
) -> None:
    # A queue that once had a rate limit, and one that has it now: only day-old starts go.
    await db.execute(
        "INSERT INTO stoker.rate_starts (queue, key, at, starts) VALUES"
        " ('once_limited', '', now() - interval '2 days', 5), ('api', '', now(), 1)"
    )
    await daemons.start("[queues.default]\n")

    async def pruned() -> bool:
        left = await db.fetch("SELECT queue FROM stoker.rate_starts ORDER BY queue")
        return [r["queue"] for r in left] == ["api"]

    await eventually(pruned, 30)


async def test_a_pool_held_back_by_its_limit_keeps_claiming_along_for_the_whole_drain(
    daemons: DaemonFactory, db: asyncpg.Connection
) -> None:
    """Held back by its global limit, a pool claims in the writes of its outcomes for the
    whole drain, not only until its first poll: once the poll had it claim by itself, the
    outcomes written during that claim were written alone and freed slots it had not seen,
    so it claimed by itself again, a round trip more per turn for the rest of the drain."""
    name = await db.fetchval("SELECT current_database()")
    await db.execute(f"ALTER DATABASE \"{name}\" SET track_functions = 'pl'")
    daemon = await daemons.start(
        "[queues.capped]\nconcurrency = 40\nglobal_concurrency = 20\npoll_interval = 0.1\n"
    )
    await db.execute(
        "INSERT INTO stoker.jobs (queue, kind)"
        " SELECT 'capped', 'noop' FROM generate_series(1, 6000)"
    )
    await wait_drained(db, "capped", 6000, 120)
    daemon.proc.send_signal(signal.SIGTERM)  # its sessions end and report their counts
    assert await daemon.wait_exit() == 0
    await db.execute("SELECT pg_stat_clear_snapshot()")
    calls = {
        r["funcname"]: r["calls"]
        for r in await db.fetch(
            "SELECT funcname, calls FROM pg_stat_user_functions"
            " WHERE funcname IN ('finish_and_claim', 'claim_limited')"
        )
    }
    along = calls.get("finish_and_claim", 0)
    alone = calls.get("claim_limited", 0) - along  # claim_limited also runs inside each along
    assert along >= 6000 // 20 // 2, calls
    assert alone <= along // 10, calls
