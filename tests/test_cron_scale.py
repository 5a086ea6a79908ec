"""Cron at scale (issue 16, goal 3): thousands of schedules fired a batch of ticks per
transaction, each tick still exactly once and with every policy a tick fired alone has; changes
read as they come, not by reading every row again; the event loop turning through a large load;
the metrics sampler reading a slice of the schedules at a time."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import asyncpg
import pytest

from daemon.alerts.evaluator import Evaluator
from daemon.config import ScheduleConfig
from daemon.config.alerts import AlertsConfig
from daemon.cron import schedules as schedules_module
from daemon.cron import timer as timer_module
from daemon.cron.leader import Leader
from daemon.cron.schedules import Schedule
from daemon.operate import schedules as operate
from daemon.store.db import init_connection
from tests.test_cron_correctness import scheduler, set_cursor

ZONES = ("UTC", "Europe/Paris", "Asia/Kolkata", "America/New_York", "Australia/Sydney")


def utc(day: int, hour: int, minute: int = 0, second: float = 0) -> datetime:
    return datetime(2026, 11, day, hour, minute, tzinfo=UTC) + timedelta(seconds=second)


async def many(db: asyncpg.Connection, n: int, *, overlap: str = "allow", start: int = 0) -> None:
    """`n` '* * * * *' schedules in stoker.schedules, made long ago (they may fire any tick)."""
    await db.execute(
        """INSERT INTO stoker.schedules (name, cron, timezone, kind, payload, overlap,
                                         created_at, updated_at)
           SELECT format('s%s', lpad(i::text, 6, '0')), '* * * * *', ($2::text[])[1 + i % 5],
                  'noop', '{"v": 0}', $3, '2026-01-01', '2026-01-01'
             FROM generate_series($4 + 1, $4 + $1) AS i""",
        n,
        list(ZONES),
        overlap,
        start,
    )


async def xid(db: asyncpg.Connection) -> int:
    return int(await db.fetchval("SELECT pg_current_xact_id()::text::bigint"))


async def fired_at(db: asyncpg.Connection, tick: datetime) -> asyncpg.Record:
    return await db.fetchrow(
        """SELECT count(*) FILTER (WHERE t.outcome = 'fired') AS fired,
                  count(*) AS ledger,
                  count(DISTINCT t.schedule) AS schedules,
                  (SELECT count(*) FROM stoker.jobs j WHERE j.unique_key LIKE '%:' || $2) AS jobs
             FROM stoker.schedule_ticks t WHERE t.tick = $1""",
        tick,
        tick.isoformat(),
    )


@pytest.fixture
async def other(dsn: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(dsn)
    await init_connection(conn)
    try:
        yield conn
    finally:
        await conn.close()


# -- a minute of many schedules: a few transactions, each tick once ------------------------------


async def test_a_minute_of_2000_schedules_is_fired_in_a_few_transactions(
    db: asyncpg.Connection,
) -> None:
    await many(db, 2000)
    wheel = scheduler()
    await wheel.run_pass(db, utc(23, 12, 0, 59))  # takes the lead: reads them, nothing due
    before = await xid(db)
    await wheel.run_pass(db, utc(23, 12, 1, 0.2))
    used = await xid(db) - before - 1
    # One transaction per tick made it 2,000 (and 2,000 WAL flushes on a durable server).
    assert used <= 5, f"{used} transactions for one minute of 2,000 schedules"
    found = await fired_at(db, utc(23, 12, 1))
    assert (found["fired"], found["ledger"], found["schedules"], found["jobs"]) == (2000,) * 4
    assert wheel.fired == 2000 and wheel.stats["(db)"][:2] == (2000, 0)
    job = await db.fetchrow(
        "SELECT kind, payload, meta, unique_key FROM stoker.jobs "
        "WHERE meta->>'schedule' = 's000007'"
    )
    assert dict(job) == {
        "kind": "noop",
        "payload": {"v": 0},
        "meta": {"schedule": "s000007", "tick": utc(23, 12, 1).isoformat()},
        "unique_key": f"cron:s000007:{utc(23, 12, 1).isoformat()}",
    }
    state = await db.fetchrow(
        "SELECT s.last_tick, s.fired, s.last_job_id = j.id AS same FROM stoker.schedule_state s "
        "JOIN stoker.jobs j ON j.meta->>'schedule' = s.name WHERE s.name = 's000007'"
    )
    assert (state["last_tick"], state["fired"], state["same"]) == (utc(23, 12, 1), 1, True)
    ledger = await db.fetchrow(
        "SELECT caught_up, reason, job_id FROM stoker.schedule_ticks WHERE schedule = 's000007'"
    )
    assert (ledger["caught_up"], ledger["reason"]) == (False, None)
    assert ledger["job_id"] == await db.fetchval(
        "SELECT id FROM stoker.jobs WHERE meta->>'schedule' = 's000007'"
    )


async def test_two_leaders_racing_the_same_minute_fire_each_tick_once(
    db: asyncpg.Connection, other: asyncpg.Connection
) -> None:
    # Both believe they lead (a partition, a leader change mid-minute): only the fence decides.
    await many(db, 2500)
    first, second = scheduler(), scheduler()
    await first.run_pass(db, utc(23, 12, 0, 59))
    await second.run_pass(other, utc(23, 12, 0, 59))
    for minute in (1, 2):
        await asyncio.gather(
            first.run_pass(db, utc(23, 12, minute, 0.1)),
            second.run_pass(other, utc(23, 12, minute, 0.1)),
        )
        found = await fired_at(db, utc(23, 12, minute))
        assert (found["fired"], found["schedules"], found["jobs"]) == (2500,) * 3
    assert first.fired + second.fired == 5000
    assert first.duplicates + second.duplicates == 5000
    twice = await db.fetchval(
        "SELECT count(*) FROM (SELECT meta->>'schedule', meta->>'tick' FROM stoker.jobs "
        "GROUP BY 1, 2 HAVING count(*) > 1) x"
    )
    assert twice == 0
    assert await db.fetchval("SELECT sum(fired) FROM stoker.schedule_state") == 5000


async def test_one_batch_holds_a_paused_an_overlapping_and_a_catching_up_schedule(
    db: asyncpg.Connection,
) -> None:
    every = {"cron": "* * * * *", "kind": "noop"}
    configured = {
        "plain": ScheduleConfig(**every, overlap="allow"),
        "held": ScheduleConfig(**every, overlap="allow"),
        "busy": ScheduleConfig(**every, overlap="skip", catch_up="all"),
        "behind": ScheduleConfig(**every, catch_up="latest"),
        "behind_all": ScheduleConfig(**every, catch_up="all", max_catch_up=2),
    }
    running = await db.fetchval("SELECT stoker.enqueue('default', 'noop')")
    for name in configured:  # the first three on time, the others three minutes behind
        await set_cursor(
            db, name, utc(23, 12, 2) if name in ("plain", "held", "busy") else utc(23, 12)
        )
    await db.execute(
        "UPDATE stoker.schedule_state SET last_job_id = $1 WHERE name = 'busy'", running
    )
    wheel = scheduler(**configured)
    await wheel.run_pass(db, utc(23, 12, 0, 30))
    # Paused after the leader's last look: only the fire's own check under the lock sees it.
    await operate.pause_schedule(db, configured, "held", by="test")
    wheel._next_check = time.monotonic() + 3600
    before = await xid(db)
    await wheel.run_pass(db, utc(23, 12, 3, 0.5))
    used = await xid(db) - before - 1

    rows = await db.fetch(
        "SELECT schedule, tick, outcome, caught_up, job_id, reason FROM stoker.schedule_ticks "
        "ORDER BY schedule, tick"
    )
    ledger: dict[str, list[tuple[Any, ...]]] = {}
    for r in rows:
        ledger.setdefault(r["schedule"], []).append(
            (r["tick"].minute, r["outcome"], r["caught_up"])
        )
    assert ledger == {
        "plain": [(3, "fired", False)],
        "busy": [(3, "skipped_overlap", False)],
        "behind": [
            (1, "skipped_catch_up", False),
            (2, "skipped_catch_up", False),
            (3, "fired", True),
        ],
        "behind_all": [(1, "skipped_catch_up", False), (2, "fired", True), (3, "fired", True)],
    }
    busy = next(r for r in rows if r["schedule"] == "busy")
    assert busy["job_id"] == running
    assert busy["reason"] == (
        f"skipped: the previous run, job {running}, was still queued (overlap = skip)"
    )
    behind = [r for r in rows if r["schedule"] == "behind"]
    assert behind[0]["reason"].startswith("missed: no leader fired it in time")
    assert behind[2]["reason"] == "caught up: fired 0.5s late"
    assert "held" in wheel.paused and "held" not in ledger
    state = {
        r["name"]: (r["last_tick"].minute, r["fired"], r["skipped"])
        for r in await db.fetch("SELECT name, last_tick, fired, skipped FROM stoker.schedule_state")
    }
    assert state == {
        "plain": (3, 1, 0),
        "held": (2, 0, 0),  # the cursor stays where the pause found it
        "busy": (3, 0, 1),
        "behind": (3, 1, 2),
        "behind_all": (3, 2, 1),
    }
    jobs = await db.fetch(
        "SELECT meta->>'schedule' AS name, meta->>'tick' AS tick FROM stoker.jobs "
        "WHERE meta ? 'schedule' ORDER BY 1, 2"
    )
    assert [(j["name"], datetime.fromisoformat(j["tick"]).minute) for j in jobs] == [
        ("behind", 3),
        ("behind_all", 2),
        ("behind_all", 3),
        ("plain", 3),
    ]
    assert wheel.stats["busy"][:2] == (0, 1) and wheel.stats["behind_all"][:2] == (2, 1)
    assert wheel.skipped_by_reason == {"skipped_overlap": 1, "skipped_catch_up": 3}
    assert used == 1, f"{used} transactions"  # all of it in one


# -- changes: read as they come ------------------------------------------------------------------


async def test_1000_updates_in_one_transaction_are_read_without_the_other_rows(
    db: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    await many(db, 3000)
    wheel = scheduler()
    await wheel.run_pass(db, utc(23, 12, 0, 30))
    assert len(wheel.schedules) == 3000
    parsed = []
    from_row = Schedule.from_row.__func__  # type: ignore[attr-defined]

    def counting(cls: type[Schedule], row: asyncpg.Record) -> Schedule:
        parsed.append(row["name"])
        result: Schedule = from_row(cls, row)
        return result

    monkeypatch.setattr(Schedule, "from_row", classmethod(counting))
    await db.execute(
        """UPDATE stoker.schedules SET payload = '{"v": 1}'
            WHERE name IN (SELECT name FROM stoker.schedules ORDER BY name LIMIT 1000)"""
    )
    wheel.schedules_changed()  # the NOTIFY
    await wheel.run_pass(db, utc(23, 12, 1, 0.1))
    assert len(parsed) == 1000, f"{len(parsed)} rows read again for 1,000 changed"
    new = await db.fetchval(
        "SELECT count(*) FROM stoker.jobs WHERE payload = '{\"v\": 1}' AND meta->>'tick' = $1",
        utc(23, 12, 1).isoformat(),
    )
    assert new == 1000
    assert (await fired_at(db, utc(23, 12, 1)))["fired"] == 3000

    # Deleted, renamed and added: each read on its own too.
    parsed.clear()
    await db.execute("DELETE FROM stoker.schedules WHERE name = 's000001'")
    await db.execute("UPDATE stoker.schedules SET name = 'renamed' WHERE name = 's000002'")
    await many(db, 1, start=5000)
    wheel.schedules_changed()
    await wheel.run_pass(db, utc(23, 12, 1, 30))
    assert sorted(parsed) == ["renamed", "s005001"]
    assert len(wheel.schedules) == 3000
    assert {"s000001", "s000002"}.isdisjoint(wheel.schedules)
    assert {"s000001", "s000002"}.isdisjoint(wheel.cursors)
    await wheel.run_pass(db, utc(23, 12, 2, 0.1))
    fired = {
        r["schedule"]
        for r in await db.fetch(
            "SELECT schedule FROM stoker.schedule_ticks WHERE tick = $1", utc(23, 12, 2)
        )
    }
    assert len(fired) == 3000 and "renamed" in fired and "s005001" in fired
    assert {"s000001", "s000002"}.isdisjoint(fired)


async def test_a_change_committed_after_a_later_look_is_still_read(
    db: asyncpg.Connection, other: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    # updated_at is when a transaction began: one that commits after the leader looked, with
    # an updated_at older than what the leader saw, must not be lost.
    monkeypatch.setattr(timer_module, "CHANGE_CHECK", 0.0)
    await many(db, 3)
    wheel = scheduler()
    await wheel.run_pass(db, utc(23, 12, 0, 30))
    slow = other.transaction()
    await slow.start()
    await other.execute("UPDATE stoker.schedules SET payload = '{\"v\": 9}' WHERE name = 's000001'")
    await db.execute("UPDATE stoker.schedules SET payload = '{\"v\": 5}' WHERE name = 's000002'")
    await wheel.run_pass(db, utc(23, 12, 0, 40))
    assert wheel.schedules["s000002"].payload == {"v": 5}
    assert wheel.schedules["s000001"].payload == {"v": 0}
    await slow.commit()
    await wheel.run_pass(db, utc(23, 12, 0, 50))
    assert wheel.schedules["s000001"].payload == {"v": 9}
    await db.execute("TRUNCATE stoker.schedules")
    await wheel.run_pass(db, utc(23, 12, 0, 55))
    assert wheel.schedules == {}


async def test_a_schedule_deleted_and_made_again_is_kept_with_its_new_content(
    db: asyncpg.Connection,
) -> None:
    await many(db, 3)
    wheel = scheduler()
    await wheel.run_pass(db, utc(23, 12, 0, 30))
    async with db.transaction():
        await db.execute("DELETE FROM stoker.schedules WHERE name = 's000001'")
        await db.execute(
            "INSERT INTO stoker.schedules (name, cron, kind) VALUES ('s000001', '0 * * * *', 'k')"
        )
    await db.execute("DELETE FROM stoker.schedules WHERE name = 's000002'")
    await db.execute(
        "INSERT INTO stoker.schedules (name, cron, kind) VALUES ('s000002', '5 * * * *', 'k')"
    )
    wheel.schedules_changed()
    await wheel.run_pass(db, utc(23, 12, 0, 40))
    assert sorted(wheel.schedules) == ["s000001", "s000002", "s000003"]
    assert wheel.schedules["s000001"].spec.expr == "0 * * * *"
    assert wheel.schedules["s000002"].spec.expr == "5 * * * *"


# -- a large load keeps the event loop turning ---------------------------------------------------


async def test_taking_the_lead_of_20000_schedules_never_stalls_the_event_loop(
    db: asyncpg.Connection,
) -> None:
    # The leader's session must keep answering its probe: a load that held the loop for
    # seconds lost the lead at 100,000 schedules.
    await many(db, 20_000)
    stalls = []

    async def watch() -> None:
        while True:
            at = time.monotonic()
            await asyncio.sleep(0.005)
            stalls.append(time.monotonic() - at)

    watcher = asyncio.create_task(watch())
    try:
        wheel = scheduler()
        await wheel.run_pass(db, utc(23, 12, 0, 59))
        await wheel.run_pass(db, utc(23, 12, 1, 0.1))
    finally:
        watcher.cancel()
    assert len(wheel.schedules) == 20_000
    assert (await fired_at(db, utc(23, 12, 1)))["fired"] == 20_000
    assert max(stalls) < 0.5, f"the event loop stalled {max(stalls):.2f}s"


# -- the metrics sampler reads a slice at a time -------------------------------------------------


async def test_the_health_sampler_reads_a_slice_of_the_schedules_each_time(
    db: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    await many(db, 1200)
    monkeypatch.setattr(schedules_module.HealthSampler, "MIN_SLICE", 500)
    sampler = operate.health_sampler({})
    reads: list[int] = []
    rows_of = schedules_module._health_rows

    async def counting(*args: Any, **kwargs: Any) -> list[asyncpg.Record]:
        rows = await rows_of(*args, **kwargs)
        reads.append(len(rows))
        return rows

    monkeypatch.setattr(schedules_module, "_health_rows", counting)
    seen = [len(await sampler.sample(db)) for _ in range(3)]
    assert reads == [500, 500, 200] and seen == [500, 1000, 1200]
    await db.execute("DELETE FROM stoker.schedules WHERE name IN ('s000001', 's000700')")
    seen = [len(await sampler.sample(db)) for _ in range(3)]
    assert seen == [1200, 1200, 1198]  # the deleted ones go at the end of the round
    names = {s.name for s in await sampler.sample(db)}
    assert len(names) == 1198 and {"s000001", "s000700"}.isdisjoint(names)


async def test_a_tick_whose_key_a_job_holds_already_records_that_job(
    db: asyncpg.Connection,
) -> None:
    # As stoker.enqueue answers: the tick's job is the one holding its unique key.
    await many(db, 3)
    wheel = scheduler()
    await wheel.run_pass(db, utc(23, 12, 0, 59))
    held = await db.fetchval(
        "SELECT stoker.enqueue('default', 'noop', unique_key => $1)",
        f"cron:s000002:{utc(23, 12, 1).isoformat()}",
    )
    await wheel.run_pass(db, utc(23, 12, 1, 0.1))
    rows = await db.fetch(
        "SELECT t.schedule, t.outcome, t.job_id, s.last_job_id, "
        "(SELECT count(*) FROM stoker.jobs j WHERE j.id = t.job_id) AS jobs "
        "FROM stoker.schedule_ticks t JOIN stoker.schedule_state s ON s.name = t.schedule "
        "ORDER BY 1"
    )
    assert [(r["outcome"], r["jobs"], r["job_id"] == r["last_job_id"]) for r in rows] == [
        ("fired", 1, True)
    ] * 3
    assert rows[1]["job_id"] == held
    assert await db.fetchval("SELECT count(*) FROM stoker.jobs") == 3


# -- the alert evaluator looks for changes without a scan of every schedule ----------------------


class _Leading:
    is_leader = True


async def test_the_alert_evaluator_reads_the_schedules_again_only_after_a_change(
    db: asyncpg.Connection, other: asyncpg.Connection
) -> None:
    evaluator = Evaluator(
        AlertsConfig(),
        db=cast(asyncpg.Pool, None),
        leader=cast(Leader, _Leading()),
        stopping=asyncio.Event(),
        configured={},
        queues=["default"],
    )
    await many(db, 3)
    assert await evaluator._read_schedules(db) == []
    rows = evaluator._rows
    assert len(rows) == 3
    assert await evaluator._read_schedules(db) == []
    assert evaluator._rows is rows  # nothing changed: not read again
    late = other.transaction()
    await late.start()
    await other.execute(
        "UPDATE stoker.schedules SET ping_url = 'https://hc.example/1' WHERE name = 's000001'"
    )
    await db.execute(
        "UPDATE stoker.schedules SET ping_url = 'https://hc.example/2' WHERE name = 's000002'"
    )
    assert await evaluator._read_schedules(db) == ["s000002"]
    await late.commit()  # committed after that look, by a transaction that began before it
    assert await evaluator._read_schedules(db) == ["s000001", "s000002"]
    await db.execute("DELETE FROM stoker.schedules WHERE name = 's000002'")
    assert await evaluator._read_schedules(db) == ["s000001"]
    assert len(evaluator._rows) == 2
