"""Cron with real daemon processes: exactly-once ticks, fail-over, catch-up, overlap,
schedules created at run time, environment overrides, and the CLI."""

from __future__ import annotations

import itertools
import json
import os
import signal
import time
from datetime import UTC, datetime, timedelta

import asyncpg

from tests.conftest import DaemonFactory, DaemonProcess, eventually, stoker_cli

# overlap = "allow": a killed leader may also have been running the last tick's job, which
# (rightly) holds back overlap = "skip" ticks until its lease expires; that is not under test.
EVERY_SECOND = """
leader_retry = 1
[schedules.tick]
cron = "* * * * * *"
kind = "noop"
overlap = "allow"
"""


async def fired_ticks(db: asyncpg.Connection, name: str = "tick") -> list[datetime]:
    rows = await db.fetch(
        "SELECT tick FROM stoker.schedule_ticks WHERE schedule = $1 AND outcome = 'fired' "
        "ORDER BY tick",
        name,
    )
    return [r["tick"] for r in rows]


async def skipped_ticks(db: asyncpg.Connection, name: str) -> list[datetime]:
    rows = await db.fetch(
        "SELECT tick FROM stoker.schedule_ticks WHERE schedule = $1 "
        "AND outcome = 'skipped_catch_up' ORDER BY tick",
        name,
    )
    return [r["tick"] for r in rows]


async def jobs_per_tick(db: asyncpg.Connection, name: str = "tick") -> dict[str, int]:
    rows = await db.fetch(
        "SELECT meta->>'tick' AS tick, count(*) AS n FROM stoker.all_jobs "
        "WHERE meta->>'schedule' = $1 AND meta ? 'tick' GROUP BY 1",
        name,
    )
    return {r["tick"]: r["n"] for r in rows}


def leader_lines(daemon: DaemonProcess) -> list[dict[str, object]]:
    return [r for r in daemon.log_records() if str(r["message"]).startswith("became leader")]


async def test_three_daemons_fire_every_tick_exactly_once(
    daemons: DaemonFactory, db: asyncpg.Connection
) -> None:
    procs = [await daemons.start(EVERY_SECOND) for _ in range(3)]

    async def ten_ticks() -> bool:
        return len(await fired_ticks(db)) >= 10

    await eventually(ten_ticks, timeout=30)
    ticks = await fired_ticks(db)
    per_tick = await jobs_per_tick(db)
    assert set(per_tick.values()) == {1}, per_tick
    assert len(per_tick) >= len(ticks)  # every fired tick has its one job
    # Consecutive seconds, none missing between the first and the last.
    assert (ticks[-1] - ticks[0]).total_seconds() == len(ticks) - 1
    leaders = [p for p in procs if leader_lines(p)]
    assert len(leaders) == 1
    assert len(leader_lines(leaders[0])) == 1


async def test_kill_9_of_the_leader_hands_over_within_leader_retry(
    daemons: DaemonFactory, db: asyncpg.Connection
) -> None:
    procs = [await daemons.start(EVERY_SECOND) for _ in range(3)]

    async def a_leader() -> DaemonProcess | None:
        leading = [p for p in procs if leader_lines(p)]
        return leading[0] if leading else None

    leader = await eventually(a_leader)

    async def three_ticks() -> bool:
        return len(await fired_ticks(db)) >= 3

    await eventually(three_ticks)
    killed_at = time.time()
    os.kill(leader.pid, signal.SIGKILL)
    assert await leader.wait_exit() == -signal.SIGKILL
    survivors = [p for p in procs if p is not leader]

    async def new_leader() -> DaemonProcess | None:
        leading = [p for p in survivors if leader_lines(p)]
        return leading[0] if leading else None

    successor = await eventually(new_leader, timeout=10)
    took_over = datetime.fromisoformat(str(leader_lines(successor)[0]["time"])).timestamp()
    assert took_over - killed_at <= 1 + 1, f"took {took_over - killed_at:.2f}s"

    before = len(await fired_ticks(db))

    async def ticks_continue() -> bool:
        return len(await fired_ticks(db)) >= before + 3

    await eventually(ticks_continue, timeout=15)
    per_tick = await jobs_per_tick(db)
    assert set(per_tick.values()) == {1}, "a tick was enqueued twice"
    # Catch-up "latest": of the ticks missed during the hand-over, the new leader fires only
    # the newest one.
    caught_up = await db.fetchval(
        "SELECT count(*) FROM stoker.schedule_ticks WHERE tick < to_timestamp($1) "
        "AND created_at >= to_timestamp($1) AND outcome = 'fired'",
        took_over,
    )
    assert caught_up <= 1
    # The others are not lost without a word: every second has its record.
    recorded = [r["tick"] for r in await db.fetch("SELECT tick FROM stoker.schedule_ticks")]
    assert sorted(recorded) == [
        min(recorded) + timedelta(seconds=n) for n in range(len(recorded))
    ], "a tick left no record"


CATCH_UP = """
leader_retry = 1
[schedules.skip_it]
cron = "* * * * *"
kind = "noop"
catch_up = "skip"
skip_grace = 1                            # the newest missed tick is 2-45 s late
[schedules.latest_only]
cron = "* * * * *"
kind = "noop"
catch_up = "latest"
[schedules.all_of_them]
cron = "* * * * *"
kind = "noop"
catch_up = "all"
max_catch_up = 10
[schedules.all_capped]
cron = "* * * * *"
kind = "noop"
catch_up = "all"
max_catch_up = 3
"""


async def test_catch_up_after_five_missed_ticks(
    daemons: DaemonFactory, db: asyncpg.Connection
) -> None:
    async def not_near_a_minute_boundary() -> bool:
        second = float(await db.fetchval("SELECT extract(second FROM now())"))
        return 2 <= second <= 45

    await eventually(not_near_a_minute_boundary, timeout=30, interval=0.2)
    # The last tick handled was six minutes ago: five minutely ticks since were missed.
    cursor = await db.fetchval("SELECT date_trunc('minute', now()) - interval '5 minutes'")
    for name in ("skip_it", "latest_only", "all_of_them", "all_capped"):
        await db.execute(
            "INSERT INTO stoker.schedule_state (name, last_tick) VALUES ($1, $2)", name, cursor
        )
    daemon = await daemons.start(CATCH_UP)
    await daemon.wait_log("leading 4 schedules")

    async def settled() -> dict[str, int] | None:
        counts = {
            name: len(await fired_ticks(db, name))
            for name in ("skip_it", "latest_only", "all_of_them", "all_capped")
        }
        return counts if counts["all_of_them"] == 5 and counts["all_capped"] == 3 else None

    counts = await eventually(settled)
    assert counts == {"skip_it": 0, "latest_only": 1, "all_of_them": 5, "all_capped": 3}
    latest = await fired_ticks(db, "latest_only")
    assert latest == [cursor + timedelta(minutes=5)]
    capped = await fired_ticks(db, "all_capped")
    assert capped == [cursor + timedelta(minutes=m) for m in (3, 4, 5)]
    # Every tick passed over leaves a record saying why.
    missed = [cursor + timedelta(minutes=m) for m in range(1, 6)]
    assert await skipped_ticks(db, "skip_it") == missed
    assert await skipped_ticks(db, "latest_only") == missed[:4]
    assert await skipped_ticks(db, "all_capped") == missed[:2]
    assert await skipped_ticks(db, "all_of_them") == []


async def test_overlap_skip_does_not_stack_runs_and_shows_skipped_ticks(
    daemons: DaemonFactory, db: asyncpg.Connection, dsn: str
) -> None:
    daemon = await daemons.start(
        """
        leader_retry = 1
        [schedules.slow]
        cron = "* * * * * *"
        kind = "test.sleep"
        payload = { seconds = 2.5 }
        """
    )

    async def two_runs_done() -> bool:
        done: int = await db.fetchval(
            "SELECT count(*) FROM stoker.job_history WHERE meta->>'schedule' = 'slow'"
        )
        return done >= 2

    await eventually(two_runs_done, timeout=30)
    runs = await db.fetch(
        "SELECT started_at, finished_at FROM stoker.job_history "
        "WHERE meta->>'schedule' = 'slow' ORDER BY started_at"
    )
    for earlier, later in itertools.pairwise(runs):
        assert later["started_at"] >= earlier["finished_at"], "runs overlapped"
    skipped = await db.fetchval("SELECT skipped FROM stoker.schedule_state WHERE name = 'slow'")
    assert skipped >= 2
    config = daemons.tmp / "stoker-0.toml"
    shown = stoker_cli(dsn, "schedules", "--json", config=config)
    assert shown.returncode == 0, shown.stderr
    row = json.loads(shown.stdout.splitlines()[0])
    assert row["name"] == "slow"
    assert row["skipped"] >= 2
    assert daemon.proc.poll() is None


async def test_schedule_created_at_run_time_fires_then_stops_when_disabled_or_deleted(
    daemons: DaemonFactory, db: asyncpg.Connection
) -> None:
    daemon = await daemons.start("leader_retry = 1\n")
    await daemon.wait_log("leading 0 schedules")
    await db.execute(
        "INSERT INTO stoker.schedules (name, cron, kind, meta) "
        "VALUES ('report.org-7', '* * * * * *', 'noop', '{\"org\": 7}')"
    )

    async def fired(n: int) -> bool:
        return len(await fired_ticks(db, "report.org-7")) >= n

    await eventually(lambda: fired(2), timeout=10)
    meta = await db.fetchval(
        "SELECT meta FROM stoker.all_jobs WHERE meta->>'schedule' = 'report.org-7' LIMIT 1"
    )
    assert meta["org"] == 7

    await db.execute("UPDATE stoker.schedules SET enabled = false, updated_at = now()")
    await daemon.wait_log("leading 1 schedules (0 enabled)")
    stopped_at = len(await fired_ticks(db, "report.org-7"))
    await db.execute("UPDATE stoker.schedules SET enabled = true, updated_at = now()")
    await daemon.wait_log("leading 1 schedules (1 enabled)")
    await eventually(lambda: fired(stopped_at + 2), timeout=10)

    await db.execute("DELETE FROM stoker.schedules")
    await daemon.wait_log("leading 0 schedules")
    gone_at = len(await fired_ticks(db, "report.org-7"))
    # A control schedule proves the wheel keeps turning while the deleted one stays silent.
    await db.execute(
        "INSERT INTO stoker.schedules (name, cron, kind) VALUES ('control', '* * * * * *', 'noop')"
    )
    await eventually(lambda: fired_control(db), timeout=10)
    assert len(await fired_ticks(db, "report.org-7")) <= gone_at + 1


async def fired_control(db: asyncpg.Connection) -> bool:
    return len(await fired_ticks(db, "control")) >= 3


async def test_environment_disables_a_config_schedule(
    daemons: DaemonFactory, db: asyncpg.Connection, dsn: str
) -> None:
    config = """
    leader_retry = 1
    [schedules.wishlist_sale_check]
    cron = "* * * * * *"
    kind = "noop"
    [schedules.control]
    cron = "* * * * * *"
    kind = "noop"
    """
    daemon = await daemons.start(config, STOKER_SCHEDULES__WISHLIST_SALE_CHECK__ENABLED="false")
    await eventually(lambda: fired_control(db), timeout=15)
    assert await fired_ticks(db, "wishlist_sale_check") == []
    assert daemon.proc.poll() is None


async def test_trigger_enqueues_now_without_moving_the_schedule(
    daemons: DaemonFactory, db: asyncpg.Connection, dsn: str
) -> None:
    config = daemons.write_config(
        """
        [schedules.nightly_cleanup]
        cron = "0 2 * * *"
        kind = "noop"
        description = "delete expired locks"
        """
    )
    out = stoker_cli(dsn, "trigger", "nightly_cleanup", config=config)
    assert out.returncode == 0, out.stderr
    job_id = int(out.stdout)
    row = await db.fetchrow("SELECT kind, meta FROM stoker.jobs WHERE id = $1", job_id)
    assert row is not None
    assert (row["kind"], row["meta"]) == (
        "noop",
        {"schedule": "nightly_cleanup", "trigger": "manual"},
    )
    # Not a tick: its one ledger row is a run by hand, which holds no tick's fence.
    manual = await db.fetch("SELECT outcome, job_id, reason, tick FROM stoker.schedule_ticks")
    assert [(r["outcome"], r["job_id"], r["reason"]) for r in manual] == [
        ("manual", job_id, "by hand: cli")
    ]
    assert manual[0]["tick"].microsecond != 0

    listed = stoker_cli(dsn, "schedules", config=config)
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    assert lines[0] == "leader: none"
    assert lines[1].split()[:5] == ["NAME", "SOURCE", "ENABLED", "CRON", "TIMEZONE"]
    fields = lines[2].split()
    assert fields[:3] == ["nightly_cleanup", "config", "yes"]
    assert f"{job_id} queued" in lines[2]
    tomorrow_2am = (datetime.now(UTC) + timedelta(days=1)).strftime("%Y-%m-%d") + " 02:00:00"
    today_2am = datetime.now(UTC).strftime("%Y-%m-%d") + " 02:00:00"
    assert lines[2].endswith(tomorrow_2am) or lines[2].endswith(today_2am)

    missing = stoker_cli(dsn, "trigger", "nope", config=config)
    assert missing.returncode == 1
    assert missing.stderr.strip() == (
        "stoker: error: no schedule named 'nope' (known: nightly_cleanup)"
    )


def test_invalid_cron_fails_start_naming_schedule_and_expression(
    daemons: DaemonFactory, dsn: str
) -> None:
    config = daemons.write_config(
        """
        [schedules.stock_check]
        cron = "*/30 25 * * *"
        kind = "noop"
        """
    )
    out = stoker_cli(dsn, "run", config=config)
    assert out.returncode == 1
    assert "schedules.stock_check: Value error, invalid cron expression '*/30 25 * * *'" in (
        out.stderr
    )
    assert "Traceback" not in out.stderr


async def test_schedules_add_and_remove_from_the_command_line(
    db: asyncpg.Connection, dsn: str
) -> None:
    out = stoker_cli(
        dsn,
        "schedules",
        "add",
        "stock-check",
        "--cron",
        "*/30 * * * *",
        "--timezone",
        "America/New_York",
        "--kind",
        "inventory.check",
        "--queue",
        "default",
        "--payload",
        '{"warehouse": 3}',
        "--description",
        "stock levels",
    )
    assert out.returncode == 0, out.stderr
    row = await db.fetchrow("SELECT * FROM stoker.schedules WHERE name = 'stock-check'")
    assert row is not None
    assert (row["cron"], row["timezone"], row["kind"]) == (
        "*/30 * * * *",
        "America/New_York",
        "inventory.check",
    )
    assert row["payload"] == {"warehouse": 3}

    bad = stoker_cli(dsn, "schedules", "add", "x", "--cron", "*/30 25 * * *", "--kind", "k")
    assert bad.returncode == 2
    assert "invalid cron expression '*/30 25 * * *'" in bad.stderr

    gone = stoker_cli(dsn, "schedules", "remove", "stock-check")
    assert gone.returncode == 0, gone.stderr
    assert await db.fetchval("SELECT count(*) FROM stoker.schedules") == 0


async def test_a_schedule_postgres_refuses_is_set_aside_and_the_others_fire(
    daemons: DaemonFactory, db: asyncpg.Connection
) -> None:
    daemon = await daemons.start(
        """
        leader_retry = 1
        [schedules.bad]
        cron = "* * * * * *"
        kind = "noop"
        payload = { text = "nul \\u0000 byte" }
        [schedules.control]
        cron = "* * * * * *"
        kind = "noop"
        overlap = "allow"
        """
    )
    await eventually(lambda: fired_control(db), timeout=15)
    assert await fired_ticks(db, "bad") == []
    assert "schedule bad is set aside until it is changed" in daemon.log()
    assert daemon.proc.poll() is None


async def test_a_daemon_waiting_to_lead_does_not_keep_vacuum_from_cleaning_up(
    daemons: DaemonFactory, db: asyncpg.Connection
) -> None:
    # A non-leader that waited for the lock inside a statement held a snapshot the whole time:
    # no dead row of any table in the database could be removed (and claims crawled over the
    # dead index entries of their own queue).
    procs = [await daemons.start("leader_retry = 30\n") for _ in range(2)]

    async def one_leads() -> bool:
        return sum(1 for p in procs if leader_lines(p)) == 1

    await eventually(one_leads)
    await db.execute("CREATE TABLE app_orders (id int)")
    await db.execute("INSERT INTO app_orders SELECT generate_series(1, 1000)")
    await db.execute("DELETE FROM app_orders")
    reports: list[str] = []
    db.add_log_listener(lambda _conn, message: reports.append(str(message)))
    last = ""

    async def all_removed() -> bool:
        nonlocal last
        reports.clear()
        await db.execute("VACUUM (VERBOSE) app_orders")
        last = next((r for r in reports if "are dead but not yet removable" in r), "")
        return "1000 removed" in last

    try:
        await eventually(all_removed, timeout=5, interval=0.5)
    except AssertionError:
        raise AssertionError(f"VACUUM could not remove the deleted rows:\n{last}") from None
    assert "0 are dead but not yet removable" in last, last
