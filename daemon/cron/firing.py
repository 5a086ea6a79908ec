"""Firing many schedules' ticks in one transaction: what a leader does every minute for
thousands of schedules, in a handful of statements instead of a transaction per tick.

Each tick keeps every guarantee a tick fired alone has:
- the fence: one stoker.schedule_ticks row per (schedule, tick) ever, inserted with ON
  CONFLICT DO NOTHING, so that of two processes that both believe they lead only one enqueues;
- a pause is checked under the lock of the schedule's state row, taken first, in name order
  (two leaders firing overlapping batches wait for each other instead of deadlocking);
- overlap = skip: a schedule whose previous run is still queued or active records its ticks as
  skipped, naming that run;
- the ledger row of each tick (fired, caught up, skipped, missed), the job (its unique key and
  meta name the schedule and tick), and the schedule's counters and cursor in schedule_state,
  all in the transaction that claims the tick."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Literal

import asyncpg

from daemon.cron import queries
from daemon.store import queries as store_queries
from daemon.store.db import as_json_text

if TYPE_CHECKING:
    from daemon.cron.schedules import Schedule

TickResult = Literal["fired", "skipped", "duplicate"]

# A tick fired more than this many seconds after it was due is recorded as caught up (as is
# every tick fired by a pass that found more than one tick of its schedule due): the leader
# wakes for a tick within milliseconds, so later than this means nobody fired it in time.
CAUGHT_UP_AFTER = 1.0


def tick_key(name: str, tick: datetime) -> str:
    return f"cron:{name}:{tick.astimezone(UTC).isoformat()}"


def overlap_reason(running: Mapping[str, Any] | None) -> str:
    if running is None:
        return "skipped: the previous run was still going when its catch-up batch began"
    return (
        f"skipped: the previous run, job {running['id']}, was still {running['state']} "
        "(overlap = skip)"
    )


@dataclass
class Due:
    """One schedule's ticks that one pass handles, oldest first: `ticks` to fire (or to skip,
    while the previous run still goes) and `passed`, passed over for good by the catch-up
    policy, each with its reason."""

    schedule: Schedule
    ticks: list[datetime]
    passed: list[datetime] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)
    now: datetime | None = None  # the pass's time: a tick fired late is recorded as caught up
    catching_up: bool = False  # the pass found several ticks due: all are caught up
    check_overlap: bool = True  # False: the caller knows this is not a batch's first tick
    # JSON of each tick's job, made before the transaction: a value JSON cannot hold raises
    # ValueError here, for this schedule alone.
    jobs: list[tuple[str, str, str]] = field(default_factory=list, init=False)

    def __post_init__(self) -> None:
        payload = as_json_text(self.schedule.payload)
        name = self.schedule.name
        for tick in self.ticks:
            meta = {**self.schedule.meta, "schedule": name, "tick": tick.isoformat()}
            self.jobs.append((payload, tick_key(name, tick), as_json_text(meta)))

    def caught_up(self, tick: datetime) -> tuple[bool, str | None]:
        if self.now is None:
            return False, None
        late = max(0.0, (self.now - tick).total_seconds())
        if self.catching_up or late > CAUGHT_UP_AFTER:
            return True, f"caught up: fired {late:.1f}s late"
        return False, None


@dataclass
class Fired:
    """What became of a Due: paused (nothing recorded, the cursor stays), else each of its
    ticks' result in order, and how many of its passed ticks this transaction recorded (a tick
    another leader recorded first keeps that record)."""

    paused: bool = False
    results: list[TickResult] = field(default_factory=list)
    recorded_passed: int = 0
    running: dict[str, Any] | None = None  # the run that made its ticks skipped

    @property
    def fired(self) -> int:
        return self.results.count("fired")

    @property
    def skipped(self) -> int:
        return self.results.count("skipped")


async def fire_many(conn: asyncpg.Connection, dues: Sequence[Due]) -> list[Fired]:
    """Handle the ticks of `dues` (one per schedule) in one transaction; what became of each,
    in the same order."""
    by_name = {d.schedule.name: d for d in dues}
    if len(by_name) != len(dues):
        raise ValueError("fire_many: one Due per schedule")
    found = {name: Fired() for name in by_name}
    names = sorted(by_name)
    async with conn.transaction():
        locked = {r["name"]: r for r in await conn.fetch(queries.LOCK_FOR_FIRE, names)}
        ticks: list[Any] = [[] for _ in range(6)]  # schedule, tick, outcome, caught_up, reason, job
        jobs: list[Any] = [[] for _ in range(7)]  # schedule, tick, queue, kind, payload, key, meta
        for name in names:
            due, state = by_name[name], locked.get(name)
            if state is not None and state["paused"]:
                found[name].paused = True
                continue
            for tick, why in zip(due.passed, due.reasons, strict=True):
                _add(ticks, name, tick, "skipped_catch_up", False, why, None)
            if (
                due.check_overlap
                and due.schedule.overlap == "skip"
                and state is not None
                and state["running_id"] is not None
            ):
                running = {"id": state["running_id"], "state": state["running_state"]}
                found[name].running = running
                skip_why = overlap_reason(running)
                for i, tick in enumerate(due.ticks):
                    job = None if i else running["id"]  # the first names the run in job_id
                    _add(ticks, name, tick, "skipped_overlap", False, skip_why, job)
                continue
            for tick, (payload, key, meta) in zip(due.ticks, due.jobs, strict=True):
                caught_up, late_why = due.caught_up(tick)
                _add(ticks, name, tick, "fired", caught_up, late_why, None)
                for column, value in zip(
                    jobs,
                    (name, tick, due.schedule.queue, due.schedule.kind, payload, key, meta),
                    strict=True,
                ):
                    column.append(value)
        rows = await conn.fetch(queries.FIRE_MANY, *ticks, *jobs) if ticks[0] else []
        won = {(r["schedule"], r["tick"]): r for r in rows}
        for r in rows:
            if r["outcome"] == "fired" and not r["enqueued"]:
                await _enqueue_held(conn, by_name[r["schedule"]], r["tick"], r["job_id"])
    for name, due in by_name.items():
        fired = found[name]
        if fired.paused:
            continue
        fired.recorded_passed = sum((name, t) in won for t in due.passed)
        for tick in due.ticks:
            row = won.get((name, tick))
            if row is None:
                fired.results.append("duplicate")
            else:
                fired.results.append("fired" if row["outcome"] == "fired" else "skipped")
    return [found[d.schedule.name] for d in dues]


def _add(columns: list[Any], *values: Any) -> None:
    for column, value in zip(columns, values, strict=True):
        column.append(value)


async def _enqueue_held(conn: asyncpg.Connection, due: Due, tick: datetime, planned: int) -> None:
    """A tick whose unique key a job holds already (enqueued by hand under the tick's key): as
    stoker.enqueue does, the tick's job is that one; its ledger row and the schedule's last job
    say so instead of the id the batch had planned."""
    payload, key, meta = due.jobs[due.ticks.index(tick)]
    schedule = due.schedule
    job_id = await conn.fetchval(
        store_queries.ENQUEUE,
        schedule.queue,
        schedule.kind,
        payload,
        None,
        0,
        key,
        None,
        meta,
        None,
    )
    await conn.execute(queries.TICK_JOB, schedule.name, tick, job_id)
    await conn.execute(queries.REPLACE_LAST_JOB, schedule.name, planned, job_id)
