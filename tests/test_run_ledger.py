"""The run ledger (issue 14): one row per tick of every schedule — fired, caught up, skipped,
missed (and why), run by hand (and by whom) — with its job's state, start, finish, duration and
error, kept independently of job history; `stoker schedules history`, the runs API, the health
of each schedule (last success, failures in a row, late, missed) and its gauges on /metrics."""

from __future__ import annotations

import json
import os
import re
import signal
from dataclasses import replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
from prometheus_client.parser import text_string_to_metric_families

import daemon
from daemon.config import ScheduleConfig, Settings
from daemon.cron.schedules import Health, Sampled, Schedule, fire, trigger
from daemon.operate import schedules as operate
from daemon.store import queries
from daemon.web.server import schedule_gauges
from tests.conftest import DaemonFactory, DaemonProcess, eventually, stoker_cli, write_outcome
from tests.test_admin_api import Api, api, clean_env, settings  # noqa: F401 (fixtures)
from tests.test_cron_correctness import scheduler, set_cursor, utc
from tests.test_cron_daemons import leader_lines
from tests.test_http import http_port

KEYS = {
    "tick",
    "status",
    "reason",
    "job_id",
    "state",
    "started_at",
    "finished_at",
    "duration_s",
    "error",
}


def history(dsn: str, name: str, config: Path) -> list[dict[str, Any]]:
    out = stoker_cli(dsn, "schedules", "history", name, "--json", "--limit", "1000", config=config)
    assert out.returncode == 0, out.stderr
    runs = [json.loads(line) for line in out.stdout.splitlines()]
    for run in runs:
        assert set(run) == KEYS, run
    return runs


async def ledger(db: asyncpg.Connection, name: str) -> list[tuple[datetime, str, str | None]]:
    rows = await db.fetch(
        "SELECT tick, outcome, reason, caught_up FROM stoker.schedule_ticks "
        "WHERE schedule = $1 ORDER BY tick",
        name,
    )
    return [(r["tick"], "caught_up" if r["caught_up"] else r["outcome"], r["reason"]) for r in rows]


# -- the ledger over a leader kill ----------------------------------------------------------------

# catch_up = "all" with max_catch_up = 2: after a gap of several seconds the new leader fires the
# newest two missed ticks late (caught up) and records the older ones as missed, with why.
EVERY_SECOND = """
leader_retry = 1
[schedules.tick]
cron = "* * * * * *"
kind = "noop"
overlap = "allow"
catch_up = "all"
max_catch_up = 2
"""
GAP = 3.5  # seconds with no daemon able to lead


async def test_the_ledger_shows_every_tick_over_a_leader_kill_and_survives_the_purge(
    daemons: DaemonFactory, db: asyncpg.Connection, dsn: str
) -> None:
    procs = [await daemons.start(EVERY_SECOND) for _ in range(3)]
    config = daemons.tmp / "stoker-0.toml"

    async def a_leader() -> DaemonProcess | None:
        leading = [p for p in procs if leader_lines(p)]
        return leading[0] if leading else None

    leader = await eventually(a_leader)

    async def fired(after: datetime | None = None) -> int:
        n: int = await db.fetchval(
            "SELECT count(*) FROM stoker.schedule_ticks WHERE outcome = 'fired' "
            "AND ($1::timestamptz IS NULL OR tick > $1)",
            after,
        )
        return n

    await eventually(lambda: _at_least(fired(), 3))
    survivors = [p for p in procs if p is not leader]
    # The survivors are frozen before the leader dies, so that nobody leads for GAP seconds.
    for p in survivors:
        os.kill(p.pid, signal.SIGSTOP)
    try:
        os.kill(leader.pid, signal.SIGKILL)
        assert await leader.wait_exit() == -signal.SIGKILL
        killed_at: datetime = await db.fetchval("SELECT now()")

        async def gap_over() -> bool:
            over: bool = await db.fetchval(
                "SELECT clock_timestamp() > $1::timestamptz + make_interval(secs => $2)",
                killed_at,
                GAP,
            )
            return over

        await eventually(gap_over, timeout=GAP + 5, interval=0.05)
    finally:
        for p in survivors:
            os.kill(p.pid, signal.SIGCONT)
    resumed_at: datetime = await db.fetchval("SELECT now()")

    async def new_leader() -> DaemonProcess | None:
        leading = [p for p in survivors if leader_lines(p)]
        return leading[0] if leading else None

    await eventually(new_leader, timeout=10)
    await eventually(lambda: _at_least(fired(resumed_at), 3), timeout=15)

    runs = sorted(history(dsn, "tick", config), key=lambda r: r["tick"])
    ticks = [datetime.fromisoformat(r["tick"]) for r in runs]
    # No gap: every second from the first tick to the last has exactly one row.
    assert ticks == [ticks[0] + timedelta(seconds=n) for n in range(len(ticks))], ticks
    by_status: dict[str, list[dict[str, Any]]] = {}
    for run in runs:
        by_status.setdefault(run["status"], []).append(run)
    assert set(by_status) <= {"fired", "caught_up", "missed"}, set(by_status)
    missed, caught = by_status.get("missed", []), by_status.get("caught_up", [])
    assert missed, "the gap left no missed tick"
    assert len(caught) >= 2, "the new leader caught up on no tick"
    for run in missed:
        assert run["reason"].startswith("missed: no leader fired it in time ("), run
        assert "catch_up = all fires only the newest max_catch_up = 2 missed ticks" in run["reason"]
        assert (run["job_id"], run["state"], run["started_at"]) == (None, None, None)
        assert killed_at - timedelta(seconds=2) < datetime.fromisoformat(run["tick"]) < resumed_at
    for run in caught:
        assert re.fullmatch(r"caught up: fired \d+\.\ds late", run["reason"]), run
        assert run["job_id"] is not None
    for run in by_status["fired"]:
        assert (run["reason"], run["status"]) == (None, "fired")
        assert run["job_id"] is not None
    # The gap reads: fired ticks, then the missed ones, then the two the catch-up fired.
    statuses = [r["status"] for r in runs]
    first_missed = statuses.index("missed")
    streak = len(missed)
    assert statuses[first_missed : first_missed + streak] == ["missed"] * streak
    assert statuses[first_missed + streak : first_missed + streak + 2] == ["caught_up"] * 2
    assert "fired" in statuses[:first_missed]
    assert "fired" in statuses[first_missed + streak + 2 :]
    print(f"ledger over the kill: {statuses}")  # shown with -s

    # Every run the surviving daemons ran succeeds; its row then has its start, end and length.
    after_gap = [r for r in runs if r["status"] != "missed" and r["tick"] > missed[-1]["tick"]]
    want = {r["job_id"] for r in after_gap}

    async def all_ran() -> list[dict[str, Any]]:
        done = {r["job_id"]: r for r in history(dsn, "tick", config) if r["state"] == "succeeded"}
        return [done[i] for i in sorted(want)] if want <= set(done) else []

    ran = await eventually(all_ran, timeout=20, interval=0.2)
    for run in ran:
        assert run["started_at"] and run["finished_at"] and run["duration_s"] is not None
        assert run["duration_s"] >= 0 and run["error"] is None

    # The purge of job history takes none of it away.
    purged = await db.execute("DELETE FROM stoker.job_history")
    assert int(purged.split()[-1]) >= len(want)
    kept = {r["job_id"]: r for r in history(dsn, "tick", config) if r["job_id"] in want}
    assert [kept[i] for i in sorted(want)] == ran


async def _at_least(count: Any, n: int) -> bool:
    return bool(await count >= n)


# -- failures, success, a run by hand and the gauges, from a real daemon --------------------------

FAILING = """
[http]
depth_sample_interval = 0.2
[schedules.boom]
cron = "* * * * * *"
kind = "test.permanent"
[schedules.fine]
cron = "* * * * * *"
kind = "noop"
"""


def gauges(text: str) -> dict[tuple[str, str], float]:
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.startswith("stoker_schedule_") and "schedule" in sample.labels:
                found[(sample.name, sample.labels["schedule"])] = sample.value
    return found


async def test_a_failing_schedule_its_error_a_run_by_hand_and_the_gauges(
    daemons: DaemonFactory, db: asyncpg.Connection, dsn: str
) -> None:
    proc = await daemons.start(FAILING)
    config = daemons.tmp / "stoker-0.toml"

    async def failures() -> bool:
        n: int = await db.fetchval(
            "SELECT count(*) FROM stoker.schedule_ticks WHERE schedule = 'boom' "
            "AND state = 'failed'"
        )
        return n >= 3

    await eventually(failures, timeout=20)
    out = stoker_cli(dsn, "schedules", "--json", config=config)
    assert out.returncode == 0, out.stderr
    status = {r["name"]: r for r in map(json.loads, out.stdout.splitlines())}
    boom, fine = status["boom"], status["fine"]
    assert boom["consecutive_failures"] >= 3
    assert (boom["last_success"], boom["late"], boom["missed"]) == (None, False, False)
    assert fine["consecutive_failures"] == 0
    assert fine["last_success"] is not None
    assert (fine["late"], fine["missed"]) == (False, False)

    failed = [r for r in history(dsn, "boom", config) if r["state"] == "failed"]
    assert len(failed) >= 3
    for run in failed:
        assert run["status"] == "fired"
        assert "the order does not exist" in run["error"]
        assert run["duration_s"] is not None

    table = stoker_cli(dsn, "schedules", config=config)
    assert table.returncode == 0, table.stderr
    header = table.stdout.splitlines()[1]
    assert "LAST OK (UTC)" in header and "FAILS" in header and "FLAGS" in header

    # A run by hand, from the command line: in the ledger as "manual", by whom.
    out = stoker_cli(dsn, "trigger", "fine", config=config)
    assert out.returncode == 0, out.stderr
    job_id = int(out.stdout)
    manual = [r for r in history(dsn, "fine", config) if r["job_id"] == job_id]
    assert [(r["status"], r["reason"]) for r in manual] == [("manual", "by hand: cli")]
    assert datetime.fromisoformat(manual[0]["tick"]).microsecond != 0  # never a tick's fence

    out = stoker_cli(dsn, "schedules", "history", "fine", "--limit", "3", config=config)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].split()[:4] == ["TICK", "(UTC)", "STATUS", "JOB"]
    assert len(lines) == 4

    # The gauges, sampled by the daemon.
    port = await http_port(proc)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as client:

        async def sampled() -> dict[tuple[str, str], float] | None:
            async with client.get(f"http://127.0.0.1:{port}/metrics") as resp:
                found = gauges(await resp.text())
            failing = found.get(("stoker_schedule_consecutive_failures", "boom"), 0)
            ok = ("stoker_schedule_last_success_timestamp_seconds", "fine") in found
            return found if failing >= 3 and ok else None

        found = await eventually(sampled, timeout=10, interval=0.2)
    now = (await db.fetchval("SELECT now()")).timestamp()
    assert now - 30 < found[("stoker_schedule_last_success_timestamp_seconds", "fine")] <= now
    assert ("stoker_schedule_last_success_timestamp_seconds", "boom") not in found
    assert found[("stoker_schedule_consecutive_failures", "fine")] == 0
    assert found[("stoker_schedule_late", "boom")] == 0
    assert found[("stoker_schedule_late", "fine")] == 0

    # Unknown names are refused naming the known ones, bad counts like everywhere else.
    out = stoker_cli(dsn, "schedules", "history", "nope", config=config)
    assert out.returncode == 1
    assert "no schedule named 'nope' (known: boom, fine)" in out.stderr
    out = stoker_cli(dsn, "schedules", "history", "fine", "--limit", "0", config=config)
    assert out.returncode == 2
    assert "--limit" in out.stderr and "must be at least 1" in out.stderr


# -- what each row says, driven with an explicit `now` ----------------------------------------


async def test_each_row_says_why(db: asyncpg.Connection) -> None:
    # on time: no reason
    every_minute = ScheduleConfig(cron="* * * * *", kind="noop")
    await set_cursor(db, "on_time", utc(23, 12))
    await scheduler(on_time=every_minute).run_pass(db, utc(23, 12, 1) + timedelta(seconds=0.2))
    assert await ledger(db, "on_time") == [(utc(23, 12, 1), "fired", None)]

    # latest: the newest fires, caught up; the others are missed, naming it
    await set_cursor(db, "latest", utc(23, 12))
    await scheduler(latest=every_minute).run_pass(db, utc(23, 12, 3, 30))
    why = "catch_up = latest fires only the newest missed tick (2026-11-23T12:03:00+00:00)"
    assert await ledger(db, "latest") == [
        (
            utc(23, 12, 1),
            "skipped_catch_up",
            f"missed: no leader fired it in time (150.0s late); {why}",
        ),
        (
            utc(23, 12, 2),
            "skipped_catch_up",
            f"missed: no leader fired it in time (90.0s late); {why}",
        ),
        (utc(23, 12, 3), "caught_up", "caught up: fired 30.0s late"),
    ]

    # all: the newest max_catch_up fire, the older ones are missed
    every = ScheduleConfig(cron="* * * * *", kind="noop", catch_up="all", max_catch_up=2)
    await set_cursor(db, "all", utc(23, 12))
    await scheduler(all=every).run_pass(db, utc(23, 12, 4, 30))
    rows = await ledger(db, "all")
    assert [(t, o) for t, o, _ in rows] == [
        (utc(23, 12, 1), "skipped_catch_up"),
        (utc(23, 12, 2), "skipped_catch_up"),
        (utc(23, 12, 3), "caught_up"),
        (utc(23, 12, 4), "caught_up"),
    ]
    assert rows[0][2] == (
        "missed: no leader fired it in time (210.0s late); "
        "catch_up = all fires only the newest max_catch_up = 2 missed ticks"
    )
    assert [r for _, _, r in rows[2:]] == [
        "caught up: fired 90.0s late",
        "caught up: fired 30.0s late",
    ]

    # skip: a tick later than skip_grace is missed, saying so
    nightly = ScheduleConfig(cron="0 2 * * *", kind="noop", catch_up="skip")
    await set_cursor(db, "nightly", utc(22, 2))
    await scheduler(nightly=nightly).run_pass(db, utc(23, 2, 5))
    assert await ledger(db, "nightly") == [
        (
            utc(23, 2),
            "skipped_catch_up",
            "missed: no leader fired it in time (300.0s late); "
            "catch_up = skip fires no tick more than skip_grace = 60s late",
        )
    ]
    status = {
        r["name"]: r
        for r in await operate.schedule_status(db, {"nightly": nightly, "latest": every_minute})
    }
    assert (status["nightly"]["missed"], status["latest"]["missed"]) == (True, False)

    # overlap: the reason names the job still running
    running = await daemon.enqueue(db, queue="default", kind="noop")
    await db.execute(
        "INSERT INTO stoker.schedule_state (name, last_tick, last_job_id) VALUES ($1, $2, $3)",
        "busy",
        utc(23, 12),
        running,
    )
    await scheduler(busy=every_minute).run_pass(db, utc(23, 12, 1))
    assert await ledger(db, "busy") == [
        (
            utc(23, 12, 1),
            "skipped_overlap",
            f"skipped: the previous run, job {running}, was still queued (overlap = skip)",
        )
    ]
    [skipped] = await operate.schedule_history(db, {"busy": every_minute}, "busy", 10)
    assert (skipped["status"], skipped["job_id"], skipped["state"]) == ("skipped", None, None)


async def test_runs_by_hand_never_take_a_ticks_place(db: asyncpg.Connection) -> None:
    nightly = Schedule.from_config("nightly", ScheduleConfig(cron="0 2 * * *", kind="noop"))
    async with db.transaction():  # the same now(): the second moves a microsecond on
        first = await trigger(db, nightly, "cli")
        second = await trigger(db, nightly, "api (admin token)")
    rows = await db.fetch(
        "SELECT tick, job_id, reason FROM stoker.schedule_ticks WHERE outcome = 'manual' "
        "ORDER BY tick"
    )
    assert [(r["job_id"], r["reason"]) for r in rows] == [
        (first, "by hand: cli"),
        (second, "by hand: api (admin token)"),
    ]
    assert rows[1]["tick"] - rows[0]["tick"] == timedelta(microseconds=1)
    assert all(r["tick"].microsecond for r in rows)
    # A run by hand is no tick: the schedule's last tick and its place are unchanged.
    [status] = await operate.schedule_status(
        db, {"nightly": ScheduleConfig(cron="0 2 * * *", kind="noop")}
    )
    assert status["last_tick"] is None
    assert await db.fetchval("SELECT last_tick FROM stoker.schedule_state") is None


async def test_failures_in_a_row_until_a_success(db: asyncpg.Connection) -> None:
    config = ScheduleConfig(cron="0 2 * * *", kind="noop", overlap="allow")
    nightly = Schedule.from_config("nightly", config)
    outcomes = ["failed", "succeeded", "failed", "failed"]
    for day, outcome in enumerate(outcomes, start=1):
        assert await fire(db, nightly, utc(day, 2)) == "fired"
        [claimed] = await db.fetch(queries.CLAIM, "default", 1, "w", 30.0)
        error = "disk full" if outcome == "failed" else None
        await write_outcome(db, claimed["id"], attempt=1, outcome=outcome, worker="w", error=error)
    [status] = await operate.schedule_status(db, {"nightly": config})
    success_end = await db.fetchval(
        "SELECT finished_at FROM stoker.job_history WHERE state = 'succeeded'"
    )
    assert (status["consecutive_failures"], status["last_success"]) == (2, success_end)
    runs = await operate.schedule_history(db, {"nightly": config}, "nightly", 10)
    assert [(r["state"], r["error"]) for r in runs] == [
        ("failed", "disk full"),
        ("failed", "disk full"),
        ("succeeded", None),
        ("failed", "disk full"),
    ]
    # A missed tick neither counts nor breaks the streak; a run still queued neither.
    await fire(db, nightly, utc(5, 2))
    await db.execute(
        "INSERT INTO stoker.schedule_ticks (schedule, tick, outcome) "
        "VALUES ('nightly', $1, 'skipped_catch_up')",
        utc(6, 2),
    )
    [status] = await operate.schedule_status(db, {"nightly": config})
    assert (status["consecutive_failures"], status["missed"]) == (2, True)


async def test_late_when_a_job_waits_or_a_tick_is_overdue(db: asyncpg.Connection) -> None:
    now: datetime = await db.fetchval("SELECT now()")
    # Hourly, at the minute two minutes ago: its newest tick was 2-3 minutes ago, the next is
    # most of an hour away.
    tick = now.replace(second=0, microsecond=0) - timedelta(minutes=2)
    cron = f"{tick.minute} * * * *"
    config = ScheduleConfig(cron=cron, kind="noop", queue="nobody")
    configured = {"slow": config}

    async def late() -> bool:
        [status] = await operate.schedule_status(db, configured)
        return bool(status["late"])

    # The tick fired; its job still waits, minutes later, never started.
    await set_cursor(db, "slow", tick - timedelta(hours=1))
    assert await fire(db, Schedule.from_config("slow", config), tick) == "fired"
    assert await late()
    await db.execute("UPDATE stoker.jobs SET state = 'active', started_at = now()")
    assert not await late()

    # Nobody has handled the tick due minutes ago: overdue, unless the schedule is off.
    await db.execute("UPDATE stoker.schedule_state SET last_tick = $1", tick - timedelta(hours=1))
    await db.execute("DELETE FROM stoker.schedule_ticks")
    assert await late()
    configured["slow"] = ScheduleConfig(cron=cron, kind="noop", enabled=False)
    assert not await late()


# -- the runs API ---------------------------------------------------------------------------------


async def test_the_runs_api_pages_like_the_jobs_list(
    api: Api,  # noqa: F811
    db: asyncpg.Connection,
    settings: Settings,  # noqa: F811
) -> None:
    nightly = replace(
        Schedule.from_config("nightly", settings.schedules["nightly"]), overlap="allow"
    )
    today: datetime = (await db.fetchval("SELECT now()")).replace(
        hour=2, minute=0, second=0, microsecond=0
    ) - timedelta(days=1)
    for days in range(5):
        await fire(db, nightly, today - timedelta(days=days))
    for _ in range(2):
        assert (await api.call("POST", "/schedules/nightly/trigger")).status == 201

    seen: list[dict[str, Any]] = []
    path = "/schedules/nightly/runs?limit=3"
    for _ in range(5):
        reply = await api.call("GET", path)
        assert reply.status == 200, reply.body
        assert len(reply.body["runs"]) <= 3
        seen += reply.body["runs"]
        if reply.body["next_before"] is None:
            break
        path = f"/schedules/nightly/runs?limit=3&before={reply.body['next_before']}"
    assert len(seen) == 7
    ticks = [datetime.fromisoformat(r["tick"]) for r in seen]
    assert ticks == sorted(ticks, reverse=True)
    assert [r["status"] for r in seen] == ["manual"] * 2 + ["fired"] * 5
    assert {r["reason"] for r in seen[:2]} == {"by hand: api (admin token)"}
    assert all(set(r) == KEYS for r in seen)
    assert all(r["state"] == "queued" for r in seen)

    # "+00:00" pasted unescaped into the query string reads as a space: still understood
    before = ticks[2].isoformat()
    reply = await api.call("GET", f"/schedules/nightly/runs?before={before}")
    assert reply.status == 200, reply.body
    assert [r["tick"] for r in reply.body["runs"]] == [t.isoformat() for t in ticks[3:]]

    missing = await api.call("GET", "/schedules/weekly/runs")
    assert missing.status == 404
    assert missing.body["known"] == ["nightly"]
    for query, field in (
        ("limit=0", "query.limit"),
        ("limit=many", "query.limit"),
        ("before=yesterday", "query.before"),
        ("before=2026-01-01T00:00:00", "query.before"),
        ("colour=red", "query.colour"),
        ("limit=1&limit=2", "query.limit"),
    ):
        reply = await api.call("GET", f"/schedules/nightly/runs?{query}")
        assert reply.status == 422, (query, reply.body)
        assert [f["loc"] for f in reply.body["fields"]] == [field], (query, reply.body)
    for path in ("/schedules/a%00b/runs", "/schedules/%F0%9F%92%A9/runs"):
        assert (await api.call("GET", path)).status == 404, path
    spec = (await api.call("GET", "/openapi.json")).body
    assert "/schedules/{name}/runs" in spec["paths"]


def test_db_schedules_share_one_label_holding_the_worst_of_them() -> None:
    at = datetime.fromisoformat("2026-11-23T02:00:05+00:00")
    sampled = [
        Sampled("nightly", "config", True, Health(at, 0, False, False)),
        Sampled("broken", "config", True, Health(None, 4, True, False)),
        Sampled("off", "config", False, Health(None, 9, True, True)),
        Sampled("org_1.daily", "db", True, Health(at, 2, False, False)),
        Sampled("org_2.daily", "db", True, Health(None, 5, False, True)),
        Sampled("org_3.daily", "db", True, Health(at, 0, True, False)),
        Sampled("org_4.daily", "db", False, Health(None, 50, True, False)),
    ]
    assert schedule_gauges(sampled) == {
        "nightly": (at.timestamp(), 0, False),
        "broken": (None, 4, True),
        "(db)": (None, 5, True),
    }
