"""Pausing a schedule (issue 15): stored in stoker.schedule_state, so that every daemon obeys; a
paused schedule fires nothing, even on a leader that has not reloaded since, nor after a leader
change; a resume starts it afresh from that moment, firing no tick from while it was paused."""

from __future__ import annotations

import json
import os
import signal
import time
from datetime import datetime, timedelta
from pathlib import Path

import asyncpg
import pytest

from daemon.config import ScheduleConfig
from daemon.operate import schedules as operate
from daemon.operate.errors import NotFound
from tests.conftest import DaemonFactory, DaemonProcess, eventually, stoker_cli
from tests.test_cron_correctness import scheduler, set_cursor
from tests.test_cron_daemons import leader_lines

EVERY = ScheduleConfig(cron="* * * * * *", kind="noop", overlap="allow", catch_up="all")


async def fired_ticks(db: asyncpg.Connection, name: str) -> list[datetime]:
    rows = await db.fetch(
        "SELECT tick FROM stoker.schedule_ticks WHERE schedule = $1 AND outcome = 'fired' "
        "ORDER BY tick",
        name,
    )
    return [r["tick"] for r in rows]


async def test_a_paused_schedule_fires_nothing_and_a_resume_fires_no_tick_from_the_pause(
    db: asyncpg.Connection, tmp_path: Path, dsn: str
) -> None:
    configured = {"tick": EVERY}
    real_now: datetime = await db.fetchval("SELECT now()")
    start = real_now.replace(microsecond=0) - timedelta(seconds=60)  # passes run in the past
    await set_cursor(db, "tick", start)
    leader = scheduler(**configured)
    await leader.run_pass(db, start + timedelta(seconds=2))
    assert await fired_ticks(db, "tick") == [
        start + timedelta(seconds=1),
        start + timedelta(seconds=2),
    ]

    since = await operate.pause_schedule(db, configured, "tick", by="test (admin)")
    # The leader has not looked for changes since (no NOTIFY reaches it here, and its next
    # comparison is an hour away): the fire itself refuses.
    leader._next_check = time.monotonic() + 3600
    await leader.run_pass(db, start + timedelta(seconds=4))
    assert len(await fired_ticks(db, "tick")) == 2
    assert "tick" in leader.paused
    await leader.run_pass(db, start + timedelta(seconds=6))  # reloaded: paused
    assert len(await fired_ticks(db, "tick")) == 2
    # Pausing again keeps the first pause's moment and author.
    assert await operate.pause_schedule(db, configured, "tick", by="someone else") == since

    (status,) = await operate.schedule_status(db, configured)
    assert status["paused"] and status["paused_by"] == "test (admin)"
    assert status["paused_at"] == since and status["next_tick"] is None
    assert not status["late"]  # a paused schedule is not overdue
    config = tmp_path / "stoker.toml"
    config.write_text('[schedules.tick]\ncron = "* * * * * *"\nkind = "noop"\n')
    listing = stoker_cli(dsn, "schedules", config=config)
    assert listing.returncode == 0, listing.stderr
    assert "paused" in listing.stdout.splitlines()[-1]
    as_json = stoker_cli(dsn, "schedules", "--json", config=config)
    assert json.loads(as_json.stdout)["paused_by"] == "test (admin)"

    assert await operate.resume_schedule(db, configured, "tick")
    resumed: datetime = await db.fetchval("SELECT now()")
    assert not await operate.resume_schedule(db, configured, "tick")  # not paused any more
    leader.schedules_changed()  # the NOTIFY the leader's own session hears
    await leader.run_pass(db, start + timedelta(seconds=10))
    assert len(await fired_ticks(db, "tick")) == 2  # nothing from while it was paused
    await leader.run_pass(db, resumed + timedelta(seconds=3))
    after = (await fired_ticks(db, "tick"))[2:]
    assert after and all(t > resumed for t in after)
    gap = await db.fetchval(
        "SELECT count(*) FROM stoker.schedule_ticks WHERE schedule = 'tick' "
        "AND tick > $1 AND tick <= $2",
        start + timedelta(seconds=2),
        resumed,
    )
    assert gap == 0  # not even recorded as missed

    with pytest.raises(NotFound):
        await operate.pause_schedule(db, configured, "nope", by="test")
    with pytest.raises(NotFound):
        await operate.resume_schedule(db, configured, "nope")


EVERY_SECOND = """
leader_retry = 1
[schedules.tick]
cron = "* * * * * *"
kind = "noop"
overlap = "allow"
catch_up = "all"
"""


async def test_a_pause_holds_on_every_daemon_over_a_leader_change_and_a_resume_fires_again(
    daemons: DaemonFactory, db: asyncpg.Connection
) -> None:
    procs = [await daemons.start(EVERY_SECOND) for _ in range(2)]
    configured = {"tick": EVERY}

    async def a_leader() -> DaemonProcess | None:
        leading = [p for p in procs if leader_lines(p)]
        return leading[0] if leading else None

    leader = await eventually(a_leader)
    await eventually(lambda: _at_least(db, 2))

    since = await operate.pause_schedule(db, configured, "tick", by="test")
    await leader.wait_log("schedule tick is paused", timeout=5)  # NOTIFY: noticed at once
    other = next(p for p in procs if p is not leader)
    os.kill(leader.pid, signal.SIGKILL)
    await leader.wait_exit()
    await other.wait_log("became leader", timeout=10)
    await other.wait_log("leading 1 schedules (1 enabled), 1 paused", timeout=10)
    # Three seconds of the database's clock with nothing fired (a deadline, not a sleep).
    await eventually(
        lambda: db.fetchval(
            "SELECT clock_timestamp() > $1::timestamptz + interval '3 seconds'", since
        ),
        timeout=10,
        interval=0.1,
    )
    late = await db.fetchval(
        "SELECT count(*) FROM stoker.schedule_ticks WHERE schedule = 'tick' "
        "AND outcome <> 'manual' AND created_at >= $1",
        since,
    )
    assert late == 0, "a tick was handled after the pause"

    assert await operate.resume_schedule(db, configured, "tick")
    resumed: datetime = await db.fetchval("SELECT now()")
    await other.wait_log("schedule tick resumed", timeout=5)

    async def fired_after() -> int:
        n: int = await db.fetchval(
            "SELECT count(*) FROM stoker.schedule_ticks WHERE schedule = 'tick' "
            "AND outcome = 'fired' AND tick > $1",
            resumed,
        )
        return n

    await eventually(fired_after, timeout=10)
    in_pause = await db.fetchval(
        "SELECT count(*) FROM stoker.schedule_ticks WHERE schedule = 'tick' "
        "AND outcome <> 'manual' AND tick >= $1::timestamptz + interval '0.5 seconds' "
        "AND tick <= $2",
        since,
        resumed,
    )
    assert in_pause == 0  # nothing fired, caught up or recorded missed from the pause


async def _at_least(db: asyncpg.Connection, n: int) -> bool:
    got: int = await db.fetchval(
        "SELECT count(*) FROM stoker.schedule_ticks WHERE outcome = 'fired'"
    )
    return got >= n
