"""Review of issue 14 (alerts and the run ledger): bugs found, each pinned by a test that fails
on the code as it landed (marked xfail(strict=True) so that a fix turns it green and the marker
must then go).

The rules are evaluated exactly as the leader's Evaluator does (RuleRun.load, the event's
evaluator, digest, save_cursor in one transaction), with an explicit `now` for each pass, so that
the passes of a minute are replayed without waiting a minute."""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta
from typing import Any, cast

import asyncpg
import pytest
from pydantic import SecretStr

from daemon.alerts import evaluator as evaluator_module
from daemon.alerts.incidents import RuleRun
from daemon.alerts.rules import EVALUATORS, Context, ScheduleInfo
from daemon.config import ScheduleConfig
from daemon.config.alerts import AlertDestination, AlertRule, AlertsConfig
from daemon.cron.cronspec import CronSpec
from daemon.cron.leader import Leader
from daemon.cron.schedules import Schedule, fire, save_schedule
from daemon.operate.jobs import retry_jobs
from daemon.store import queries as store
from daemon.store.db import init_connection
from tests.conftest import write_outcome
from tests.test_admin_api import Api, api, clean_env, settings  # noqa: F401 (fixtures)

WORKER = "w1"


def alerts_config(**rules: AlertRule) -> AlertsConfig:
    hook = AlertDestination(type="webhook", url=SecretStr("http://127.0.0.1:9/hook/SECRET"))
    return AlertsConfig(destinations={"hook": hook}, rules=rules)


async def evaluate(
    db: asyncpg.Connection, config: AlertsConfig, name: str, now: datetime, ctx: Context
) -> RuleRun:
    """One evaluation of rule `name` at `now`, as Evaluator._evaluate does it."""
    rule = config.rules[name]
    async with db.transaction():
        run = await RuleRun.load(db, now, name, rule, config)
        await EVALUATORS[rule.event](run, ctx)
        await run.digest("occurrences")
        await run.save_cursor()
    return run


async def db_now(db: asyncpg.Connection) -> datetime:
    now: datetime = await db.fetchval("SELECT now()")
    return now


async def enqueue(db: asyncpg.Connection, kind: str, queue: str = "default") -> int:
    job_id: int = await db.fetchval("SELECT stoker.enqueue($1, $2)", queue, kind)
    return job_id


async def claim(db: asyncpg.Connection, queue: str = "default") -> asyncpg.Record:
    [row] = await db.fetch(store.CLAIM, queue, 1, WORKER, 30.0)
    return row


async def run_job(db: asyncpg.Connection, kind: str, outcome: str, queue: str = "default") -> int:
    """Enqueue, claim and finish one job for good (into history), as a daemon would."""
    job_id = await enqueue(db, kind, queue)
    claimed = await claim(db, queue)
    assert claimed["id"] == job_id
    error = "PermanentJobError: boom" if outcome == "failed" else None
    await write_outcome(db, job_id, attempt=1, outcome=outcome, worker=WORKER, error=error)
    return job_id


async def incidents(db: asyncpg.Connection) -> list[asyncpg.Record]:
    rows: list[asyncpg.Record] = await db.fetch("SELECT * FROM stoker.alert_incidents ORDER BY id")
    return rows


async def messages(db: asyncpg.Connection) -> list[dict[str, Any]]:
    """The alert.deliver jobs enqueued: one per message (one destination here)."""
    rows = await db.fetch(
        "SELECT payload FROM stoker.jobs WHERE kind = 'alert.deliver' ORDER BY id"
    )
    return [r["payload"]["message"] for r in rows]


NO_SCHEDULES = Context({}, ["default"], datetime.fromtimestamp(0).astimezone())


# -- job_failed: a parked failure is counted again and again -------------------------------------


async def test_a_parked_failure_is_counted_once(db: asyncpg.Connection) -> None:
    config = alerts_config(failures=AlertRule(event="job_failed", destinations=["hook"]))
    d = await db_now(db)
    await evaluate(db, config, "failures", d - timedelta(seconds=120), NO_SCHEDULES)

    # History refuses the outcome: the completer parks the failed job in stoker.jobs (a minute
    # ago, when the leader's passes below saw it).
    job_id = await enqueue(db, "report.build")
    claimed = await claim(db)
    assert await db.fetch(store.PARK, job_id, claimed["attempts"], WORKER, "failed", "refused")
    await db.execute(
        "UPDATE stoker.jobs SET updated_at = $2 WHERE id = $1", job_id, d - timedelta(seconds=60)
    )
    await evaluate(db, config, "failures", d - timedelta(seconds=59), NO_SCHEDULES)
    [incident] = await incidents(db)
    assert incident["count"] == 1
    await evaluate(db, config, "failures", d - timedelta(seconds=30), NO_SCHEDULES)

    # The maintenance tries to move it on every purge pass (every 60 s, in every daemon);
    # history still refuses: PARKED_REFUSED, exactly as move_parked runs it.
    await db.execute(store.PARKED_REFUSED, job_id)
    await evaluate(db, config, "failures", await db_now(db), NO_SCHEDULES)
    [incident] = await incidents(db)
    assert incident["count"] == 1, f"one job failed once, counted {incident['count']} times"


async def test_a_parked_failure_moved_on_to_history_is_not_counted_again(
    db: asyncpg.Connection,
) -> None:
    config = alerts_config(failures=AlertRule(event="job_failed", destinations=["hook"]))
    d = await db_now(db)
    await evaluate(db, config, "failures", d - timedelta(seconds=120), NO_SCHEDULES)
    job_id = await enqueue(db, "report.build")
    claimed = await claim(db)
    assert await db.fetch(store.PARK, job_id, claimed["attempts"], WORKER, "failed", "refused")
    await db.execute(
        "UPDATE stoker.jobs SET updated_at = $2 WHERE id = $1", job_id, d - timedelta(seconds=60)
    )
    await evaluate(db, config, "failures", d - timedelta(seconds=59), NO_SCHEDULES)
    await evaluate(db, config, "failures", d - timedelta(seconds=30), NO_SCHEDULES)
    # Whatever refused it is fixed: the maintenance moves it on (MOVE_PARKED, as move_parked).
    assert await db.fetch(store.MOVE_PARKED, job_id)
    await evaluate(db, config, "failures", await db_now(db), NO_SCHEDULES)
    [incident] = await incidents(db)
    assert incident["count"] == 1, f"one job failed once, counted {incident['count']} times"


# -- job_failed: a success in the same pass as the failure is forgotten ---------------------------


async def test_a_kind_that_succeeds_after_its_failure_recovers(db: asyncpg.Connection) -> None:
    config = alerts_config(failures=AlertRule(event="job_failed", destinations=["hook"]))
    d = await db_now(db)
    await evaluate(db, config, "failures", d - timedelta(seconds=30), NO_SCHEDULES)
    await run_job(db, "report.build", "failed")
    ok = await run_job(db, "report.build", "succeeded")  # it works again
    # evaluate_interval = 30: the next passes come 20 s and 50 s after the two jobs.
    await evaluate(db, config, "failures", d + timedelta(seconds=20), NO_SCHEDULES)
    [incident] = await incidents(db)
    assert incident["closed_at"] is None  # opened, and told
    await evaluate(db, config, "failures", d + timedelta(seconds=50), NO_SCHEDULES)
    [incident] = await incidents(db)
    assert incident["closed_at"] is not None, (
        f"job {ok} of report.build succeeded after the failure; the incident is still open"
    )


# -- job_failed: recovery ignores the rule's queue filter ---------------------------------------


async def test_recovery_counts_only_successes_the_rule_watches(db: asyncpg.Connection) -> None:
    rule = AlertRule(event="job_failed", destinations=["hook"], queues=["billing"])
    config = alerts_config(billing=rule)
    d = await db_now(db)
    await evaluate(db, config, "billing", d - timedelta(seconds=30), NO_SCHEDULES)
    await run_job(db, "email.send", "failed", queue="billing")
    await evaluate(db, config, "billing", d + timedelta(seconds=1), NO_SCHEDULES)
    [incident] = await incidents(db)
    assert incident["closed_at"] is None
    # email.send works on the default queue, not on billing (nothing ran there since).
    await run_job(db, "email.send", "succeeded", queue="default")
    await evaluate(db, config, "billing", d + timedelta(seconds=3), NO_SCHEDULES)
    [incident] = await incidents(db)
    assert incident["closed_at"] is None, "closed by a success on a queue the rule does not watch"


# -- schedule_late: `stoker jobs retry` of an old tick's run is "late" at once -------------------


async def fire_hourly_two_hours_ago(db: asyncpg.Connection) -> tuple[Context, int]:
    now = await db_now(db)
    tick = now.replace(minute=0, second=0, microsecond=0) - timedelta(hours=2)
    cfg = ScheduleConfig(cron="0 * * * *", kind="report.build")
    assert await fire(db, Schedule.from_config("hourly", cfg), tick) == "fired"
    job_id: int = await db.fetchval("SELECT job_id FROM stoker.schedule_ticks")
    info = ScheduleInfo("hourly", CronSpec(cfg.cron, cfg.timezone), "default", True, None, None)
    return Context({"hourly": info}, ["default"], now), job_id


async def test_a_run_retried_by_hand_is_not_late(db: asyncpg.Connection) -> None:
    config = alerts_config(late=AlertRule(event="schedule_late", destinations=["hook"], grace=60))
    ctx, job_id = await fire_hourly_two_hours_ago(db)
    assert (await claim(db))["id"] == job_id  # it ran on time, and failed
    await write_outcome(db, job_id, attempt=1, outcome="failed", worker=WORKER, error="boom")
    assert await retry_jobs(db, [job_id])  # the operator runs it again, now
    await evaluate(db, config, "late", await db_now(db), ctx)
    assert [m["text"] for m in await messages(db)] == []


# -- schedule_failing: a retried run that succeeds does not recover the incident ----------------


async def test_a_failed_run_retried_to_success_recovers_the_schedule(
    db: asyncpg.Connection,
) -> None:
    config = alerts_config(
        failing=AlertRule(event="schedule_failing", destinations=["hook"], schedules=["hourly"])
    )
    ctx, job_id = await fire_hourly_two_hours_ago(db)
    assert (await claim(db))["id"] == job_id
    await write_outcome(db, job_id, attempt=1, outcome="failed", worker=WORKER, error="boom")
    now = await db_now(db)
    await evaluate(db, config, "failing", now, ctx)
    [incident] = await incidents(db)
    assert incident["event"] == "schedule_failing"
    assert await retry_jobs(db, [job_id])
    assert (await claim(db))["id"] == job_id
    await write_outcome(db, job_id, attempt=1, outcome="succeeded", worker=WORKER)
    state = await db.fetchval("SELECT state FROM stoker.schedule_ticks WHERE job_id = $1", job_id)
    assert state == "succeeded"  # the ledger says the run succeeded
    await evaluate(db, config, "failing", await db_now(db), ctx)
    [incident] = await incidents(db)
    assert incident["closed_at"] is not None, "the schedule's run succeeded; still open"


# -- a ping URL (a credential) in the error of save_schedule ------------------------------------


async def test_a_bad_ping_url_is_not_repeated_in_the_error(db: asyncpg.Connection) -> None:
    with pytest.raises(ValueError) as caught:
        await save_schedule(
            db,
            name="nightly",
            cron="0 2 * * *",
            kind="report.build",
            ping_url="hc-ping.com/0f3c-SECRET-TOKEN",
        )
    assert "ping_url" in str(caught.value)
    assert "SECRET-TOKEN" not in str(caught.value)


# -- the leader's event loop: every pass parses every db schedule's cron expression --------------


class _Leading:
    is_leader = True


async def test_passes_over_unchanged_schedules_do_not_parse_them_again(
    dsn: str, db: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    await db.execute(
        "INSERT INTO stoker.schedules (name, cron, timezone, kind) "
        "SELECT 'org_' || i || '.daily', (i % 60) || ' ' || (i % 24) || ' * * *', "
        "'Europe/Paris', 'report.build' FROM generate_series(1, 500) AS i"
    )
    parsed = 0

    def counting(expr: str, timezone: str = "UTC") -> CronSpec:
        nonlocal parsed
        parsed += 1
        return CronSpec(expr, timezone)  # the class evaluator.py imports

    monkeypatch.setattr(evaluator_module, "CronSpec", counting)
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=2, init=init_connection)
    try:
        evaluator = evaluator_module.Evaluator(
            AlertsConfig(),  # not one rule, not one ping_url
            db=pool,
            leader=cast(Leader, _Leading()),
            stopping=asyncio.Event(),
            configured={},
            queues=["default"],
        )
        await evaluator.run_pass()
        first = parsed
        await evaluator.run_pass()
    finally:
        await pool.close()
    assert first <= 500
    assert parsed == first, f"the second pass parsed {parsed - first} unchanged schedules again"


# -- the runs API: a `before` the database cannot take ------------------------------------------


async def test_a_before_out_of_range_is_a_422_naming_the_field(
    api: Api,  # noqa: F811
) -> None:
    reply = await api.call("GET", "/schedules/nightly/runs?before=0001-01-01T00:00:00%2B01:00")
    assert reply.status in (200, 422), reply.body
    if reply.status == 422:
        assert [f["loc"] for f in reply.body["fields"]] == ["query.before"]
