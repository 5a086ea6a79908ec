"""Cron cursors under leader changes, edits, re-enabling, poll-only mode and clock steps
(issue 11, points 6-9). The scheduler's passes are driven with an explicit `now`, so that a
tick at 02:00 can be tested without waiting for one."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest

from daemon.config import ScheduleConfig
from daemon.cron import timer as scheduler_module
from daemon.cron.leader import Leader
from daemon.cron.schedules import load_schedules
from daemon.cron.timer import Scheduler
from daemon.store import migrations
from daemon.store.clock import DbClock
from tests.conftest import DaemonFactory, eventually, scratch_database


def utc(day: int, hour: int, minute: int = 0, second: int = 0) -> datetime:
    return datetime(2026, 11, day, hour, minute, second, tzinfo=UTC)


def scheduler(**configured: ScheduleConfig) -> Scheduler:
    """A scheduler that believes it leads, as a fresh leader (or a restarted lead loop) does."""
    stopping = asyncio.Event()
    leader = Leader("postgresql://unused", worker_id="test", retry=1, stopping=stopping)
    leader.is_leader = True
    return Scheduler(
        configured,
        leader=leader,
        clock=DbClock(),
        stopping=stopping,
        served_queues={"default"},
    )


async def ticks(db: asyncpg.Connection, name: str) -> list[tuple[datetime, str]]:
    rows = await db.fetch(
        "SELECT tick, outcome FROM stoker.schedule_ticks WHERE schedule = $1 ORDER BY tick", name
    )
    return [(r["tick"], r["outcome"]) for r in rows]


async def jobs(db: asyncpg.Connection, name: str) -> list[dict[str, Any]]:
    rows = await db.fetch(
        "SELECT meta->>'tick' AS tick, payload FROM stoker.all_jobs "
        "WHERE meta->>'schedule' = $1 ORDER BY id",
        name,
    )
    return [dict(r) for r in rows]


async def set_cursor(db: asyncpg.Connection, name: str, last_tick: datetime) -> None:
    await db.execute(
        "INSERT INTO stoker.schedule_state (name, last_tick) VALUES ($1, $2)", name, last_tick
    )


NIGHTLY = ScheduleConfig(cron="0 2 * * *", kind="noop", catch_up="skip")


# -- 6: catch_up = "skip" keeps its cursor and records what it skips ----------------------------


async def test_skip_fires_the_tick_due_just_before_a_new_leader_took_over(
    db: asyncpg.Connection,
) -> None:
    # The old leader fired last night's tick and was restarted at 01:59:58; the new one leads
    # from 02:00:03. The README's nightly_cleanup must not lose its night to a rolling restart.
    await set_cursor(db, "nightly_cleanup", utc(22, 2))
    await scheduler(nightly_cleanup=NIGHTLY).run_pass(db, utc(23, 2, 0, 3))
    assert await ticks(db, "nightly_cleanup") == [(utc(23, 2), "fired")]
    assert len(await jobs(db, "nightly_cleanup")) == 1


async def test_skip_records_a_tick_older_than_the_grace_and_never_fires_it(
    db: asyncpg.Connection,
) -> None:
    await set_cursor(db, "nightly_cleanup", utc(22, 2))
    first = scheduler(nightly_cleanup=NIGHTLY)
    await first.run_pass(db, utc(23, 2, 5))  # five minutes late: past the 60 s grace
    assert await ticks(db, "nightly_cleanup") == [(utc(23, 2), "skipped_catch_up")]
    assert await jobs(db, "nightly_cleanup") == []
    assert first.stats["nightly_cleanup"][:2] == (0, 1)  # (fired, skipped), as /metrics shows
    skipped = await db.fetchval(
        "SELECT skipped FROM stoker.schedule_state WHERE name = 'nightly_cleanup'"
    )
    assert skipped == 1
    # The skip is persisted: another leader a moment later neither fires nor counts it again.
    second = scheduler(nightly_cleanup=NIGHTLY)
    await second.run_pass(db, utc(23, 2, 5, 30))
    assert await jobs(db, "nightly_cleanup") == []
    assert second.stats.get("nightly_cleanup", (0, 0, None))[:2] == (0, 0)


async def test_skip_grace_is_a_schedule_option(db: asyncpg.Connection) -> None:
    lenient = ScheduleConfig(cron="0 2 * * *", kind="noop", catch_up="skip", skip_grace=600)
    await set_cursor(db, "nightly_cleanup", utc(22, 2))
    await scheduler(nightly_cleanup=lenient).run_pass(db, utc(23, 2, 5))
    assert await ticks(db, "nightly_cleanup") == [(utc(23, 2), "fired")]


async def test_every_tick_passed_over_by_catch_up_leaves_a_record(db: asyncpg.Connection) -> None:
    every_minute = ScheduleConfig(cron="* * * * *", kind="noop", catch_up="latest")
    await set_cursor(db, "minutely", utc(23, 12))
    await scheduler(minutely=every_minute).run_pass(db, utc(23, 12, 3, 30))
    assert await ticks(db, "minutely") == [
        (utc(23, 12, 1), "skipped_catch_up"),
        (utc(23, 12, 2), "skipped_catch_up"),
        (utc(23, 12, 3), "fired"),
    ]


# -- 7: poll-only mode still sees changes to stoker.schedules -----------------------------------


async def test_a_leader_without_notifications_reloads_changed_schedules_on_a_timer(
    db: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(scheduler_module, "CHANGE_CHECK", 0.0, raising=False)
    wheel = scheduler()
    await wheel.run_pass(db, utc(23, 12))
    assert wheel.schedules == {}
    await db.execute(
        "INSERT INTO stoker.schedules (name, cron, kind) VALUES ('report.org-9', '* * * * *', 'k')"
    )
    await wheel.run_pass(db, utc(23, 12, 0, 30))  # no NOTIFY reached this scheduler
    assert list(wheel.schedules) == ["report.org-9"]
    await db.execute("DELETE FROM stoker.schedules")
    await wheel.run_pass(db, utc(23, 12, 1, 30))
    assert wheel.schedules == {}
    assert await jobs(db, "report.org-9") == []


async def test_poll_only_daemon_picks_up_created_and_deleted_schedules(
    daemons: DaemonFactory, db: asyncpg.Connection
) -> None:
    daemon = await daemons.start("poll_only = true\nleader_retry = 1\n", wait_ready=False)
    await daemon.wait_log("leading 0 schedules")
    await db.execute(
        "INSERT INTO stoker.schedules (name, cron, kind, overlap) "
        "VALUES ('report.org-9', '* * * * * *', 'noop', 'allow')"
    )

    async def fired(name: str, n: int) -> bool:
        return sum(o == "fired" for _, o in await ticks(db, name)) >= n

    await eventually(lambda: fired("report.org-9", 2), timeout=10)
    await db.execute("DELETE FROM stoker.schedules")
    await daemon.wait_log("leading 0 schedules (0 enabled)", timeout=10)
    gone_at = len(await ticks(db, "report.org-9"))
    await db.execute(
        "INSERT INTO stoker.schedules (name, cron, kind, overlap) "
        "VALUES ('control', '* * * * * *', 'noop', 'allow')"
    )
    await eventually(lambda: fired("control", 3), timeout=10)
    assert len(await ticks(db, "report.org-9")) <= gone_at + 1
    assert daemon.proc.poll() is None


# -- 8: cursor gaps ------------------------------------------------------------------------------


async def test_reenabling_a_config_schedule_does_not_fire_ticks_missed_while_disabled(
    db: asyncpg.Connection,
) -> None:
    # STOKER_SCHEDULES__REPORT__ENABLED=false for half an hour, then the override is removed.
    off = ScheduleConfig(cron="*/5 * * * *", kind="noop", enabled=False)
    on = ScheduleConfig(cron="*/5 * * * *", kind="noop")
    await set_cursor(db, "report", utc(23, 12))
    await scheduler(report=off).run_pass(db, utc(23, 12, 1))
    wheel = scheduler(report=on)
    await wheel.run_pass(db, utc(23, 12, 31))
    assert await jobs(db, "report") == []
    await wheel.run_pass(db, utc(23, 12, 35))
    assert await ticks(db, "report") == [(utc(23, 12, 35), "fired")]


async def test_an_update_maintains_updated_at(db: asyncpg.Connection) -> None:
    await db.execute(
        "INSERT INTO stoker.schedules (name, cron, kind) VALUES ('report', '* * * * *', 'k')"
    )
    before = await db.fetchval("SELECT updated_at FROM stoker.schedules")
    await db.execute("UPDATE stoker.schedules SET payload = '{\"org\": 1}'")
    after = await db.fetchval("SELECT updated_at FROM stoker.schedules")
    assert after > before


async def test_catch_up_all_with_overlap_skip_does_not_fire_the_skipped_ticks_later(
    db: asyncpg.Connection,
) -> None:
    config = ScheduleConfig(cron="* * * * *", kind="noop", catch_up="all", overlap="skip")
    running = await db.fetchval("SELECT stoker.enqueue('default', 'noop')")
    await db.execute(
        "INSERT INTO stoker.schedule_state (name, last_tick, last_job_id) VALUES ($1, $2, $3)",
        "batch",
        utc(23, 12),
        running,
    )
    await scheduler(batch=config).run_pass(db, utc(23, 12, 5, 30))
    await db.execute("DELETE FROM stoker.jobs WHERE id = $1", running)  # the run ends
    wheel = scheduler(batch=config)  # a new leader, or a reload
    await wheel.run_pass(db, utc(23, 12, 5, 40))
    assert await jobs(db, "batch") == []
    await wheel.run_pass(db, utc(23, 12, 6))
    assert [j["tick"] for j in await jobs(db, "batch")] == [utc(23, 12, 6).isoformat()]
    assert [o for _, o in await ticks(db, "batch")] == ["skipped_overlap"] * 5 + ["fired"]


async def test_an_edit_landing_at_tick_time_does_not_drop_the_tick(
    db: asyncpg.Connection,
) -> None:
    async def early_in_a_minute() -> bool:
        second = float(await db.fetchval("SELECT extract(second FROM now())"))
        return 2 <= second <= 50

    await eventually(early_in_a_minute, timeout=30, interval=0.2)
    tick = (await db.fetchval("SELECT now()")).replace(second=0, microsecond=0)
    long_ago = tick - timedelta(hours=1)
    await db.execute(
        "INSERT INTO stoker.schedules (name, cron, kind, payload, created_at, updated_at) "
        "VALUES ('report', '* * * * *', 'noop', '{\"v\": 1}', $1, $1)",
        long_ago,
    )
    await set_cursor(db, "report", tick - timedelta(minutes=1))
    wheel = scheduler()
    await wheel.run_pass(db, tick - timedelta(seconds=1))
    # The tick is due; the leader has not fired it yet when the edit lands.
    await db.execute("UPDATE stoker.schedules SET payload = '{\"v\": 2}', updated_at = now()")
    wheel.schedules_changed()  # as the NOTIFY does
    await wheel.run_pass(db, await db.fetchval("SELECT now()"))
    assert [(j["tick"], j["payload"]) for j in await jobs(db, "report")] == [
        (tick.astimezone(UTC).isoformat(), {"v": 2})
    ]


@pytest.mark.parametrize("column", ["payload", "meta"])
async def test_a_schedule_row_that_is_not_a_json_object_is_refused(
    db: asyncpg.Connection, column: str
) -> None:
    with pytest.raises(asyncpg.CheckViolationError, match=f"{column}_must_be_a_json_object"):
        await db.execute(
            f"INSERT INTO stoker.schedules (name, cron, kind, {column}) "
            "VALUES ('report', '* * * * *', 'k', '[1, 2]')"
        )


async def test_a_row_written_before_the_check_is_refused_by_the_leader_not_emptied(
    db: asyncpg.Connection, caplog: pytest.LogCaptureFixture
) -> None:
    await db.execute(
        "ALTER TABLE stoker.schedules DROP CONSTRAINT schedules_payload_must_be_a_json_object"
    )
    await db.execute(
        "INSERT INTO stoker.schedules (name, cron, kind, payload) "
        "VALUES ('report', '* * * * *', 'k', '[1, 2]')"
    )
    with caplog.at_level(logging.ERROR, logger="stoker.schedules"):
        assert await load_schedules(db, {}) == {}
    assert (
        "schedule report in stoker.schedules is ignored: payload must be a JSON object, "
        "not an array" in caplog.text
    )


@pytest.fixture
def empty_dsn(server_dsn: str) -> Iterator[str]:
    with scratch_database(server_dsn) as database:
        yield database


async def test_migration_009_keeps_existing_rows_and_lets_the_leader_refuse_bad_ones(
    empty_dsn: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    before_009 = [m for m in migrations.load_migrations() if m.name < "009"]
    conn = await asyncpg.connect(empty_dsn)
    try:
        monkeypatch.setattr(migrations, "load_migrations", lambda: before_009)
        await migrations.migrate(conn)
        await conn.execute(
            """INSERT INTO stoker.schedules (name, cron, kind, payload, updated_at)
               VALUES ('good', '* * * * *', 'k', '{"a": 1}', now()),
                      ('edited', '* * * * *', 'k', '{}', now() + interval '1 hour'),
                      ('bad', '* * * * *', 'k', '"text"', now())"""
        )
        monkeypatch.undo()
        await migrations.migrate(conn)
        rows = await conn.fetch(
            "SELECT name, skip_grace, timetable_changed_at IS NOT NULL AS moved "
            "FROM stoker.schedules ORDER BY name"
        )
        assert [tuple(r) for r in rows] == [
            ("bad", 60, False),
            ("edited", 60, True),  # its last edit still marks where it starts again
            ("good", 60, False),
        ]
        with caplog.at_level(logging.ERROR, logger="stoker.schedules"):
            assert sorted(await load_schedules(conn, {})) == ["edited", "good"]
        assert "schedule bad in stoker.schedules is ignored: payload must be a JSON " in (
            caplog.text
        )
        with pytest.raises(asyncpg.CheckViolationError):
            await conn.execute("UPDATE stoker.schedules SET meta = '[]' WHERE name = 'good'")
    finally:
        await conn.close()


# -- 9: the scheduler's clock does not follow host clock steps ------------------------------------


async def test_db_clock_ignores_a_host_clock_step(
    db: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = DbClock()
    assert abs(clock.now() - time.time()) < 1  # epoch seconds even before the first sync
    await clock.sync(db)
    db_now = float(await db.fetchval("SELECT extract(epoch FROM clock_timestamp())"))
    assert abs(clock.now() - db_now) < 1
    before = clock.now()
    real_time = time.time
    monkeypatch.setattr(time, "time", lambda: real_time() + 3600)  # an NTP step, a VM resume
    stepped = clock.now()
    monkeypatch.undo()
    assert stepped - before < 1, f"the clock jumped {stepped - before:.0f}s with the host's"
