"""Alerts (issue 14) with real daemons: a real HTTP sink on loopback stands in for Slack,
Discord and a generic webhook, aiosmtpd for email. Short thresholds throughout (evaluate every
0.5 s, digests every 3 s, grace 2 s), per-second cron where a schedule is needed."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import os
import signal
import textwrap
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any, cast

import asyncpg
import pytest
from pydantic import SecretStr

from daemon.alerts import queries as alert_queries
from daemon.alerts.evaluator import Evaluator
from daemon.alerts.incidents import RuleRun
from daemon.alerts.rules import EVALUATORS, Context
from daemon.config import ConfigError, load_settings
from daemon.config.alerts import AlertDestination, AlertRule, AlertsConfig
from daemon.cron.leader import Leader
from daemon.operate import alerts as operate_alerts
from daemon.operate.errors import NotFound
from daemon.operate.queues import set_paused
from daemon.store import queries as store_queries
from daemon.store.db import init_connection
from handlers.alerts import _hide
from tests.conftest import DaemonFactory, DaemonProcess, eventually, finished, write_outcome
from tests.mailserver import Inbox, smtp_server
from tests.test_handler_http import Hook, Reply, serve_hook

SECRET = "hook-signing-secret"
JOB_FAILED_TO_HOOK = """
    [alerts.rules.failures]
    event = "job_failed"
    destinations = ["hook"]
"""


@pytest.fixture
async def hook() -> AsyncIterator[Hook]:
    async with serve_hook() as receiver:
        yield receiver


def config(hook: Hook, rules: str, *, digest: float = 3, extra: str = "") -> str:
    return textwrap.dedent(
        f"""
            leader_retry = 0.5
            lease_seconds = 4
            rescue_interval = 1
            {extra.strip()}

            [queues.default]
            concurrency = 10
            max_attempts = 1

            [queues."stoker.alerts"]
            concurrency = 2
            max_attempts = 30
            backoff = {{ base = 0.2, cap = 0.5, jitter = 0 }}

            [alerts]
            digest_interval = {digest}
            evaluate_interval = 0.5

            [alerts.destinations.hook]
            type = "webhook"
            url = "{hook.url("/hook/T000/B000/XXXXsecretpath123")}"
            secret = "{SECRET}"

            [alerts.destinations.slack]
            type = "slack"
            url = "{hook.url("/slack/T123/B456/token789")}"

            [alerts.destinations.discord]
            type = "discord"
            url = "{hook.url("/discord/1234/abcdefgh99")}"
            """
    ) + textwrap.dedent(rules)


def docs(hook: Hook, prefix: str = "/hook/") -> list[dict[str, Any]]:
    """The alert documents the generic webhook received, once per delivery job (a delivery
    repeated after a lease expired carries the same Idempotency-Key)."""
    found: dict[str, dict[str, Any]] = {}
    for seen in hook.seen:
        if seen.path.startswith(prefix) and seen.method == "POST":
            key = seen.headers.get("Idempotency-Key", str(len(found)))
            found.setdefault(key, json.loads(seen.body))
    return list(found.values())


def events(hook: Hook, subject_field: str, subject: str) -> list[str]:
    return [d["event"] for d in docs(hook) if d.get(subject_field) == subject]


async def evaluating(daemon: DaemonProcess) -> None:
    await daemon.wait_log("alerts: evaluating", timeout=20)


async def enqueue(db: asyncpg.Connection, kind: str, payload: dict[str, Any], **kw: Any) -> int:
    job_id: int = await db.fetchval(
        "SELECT stoker.enqueue($1, $2, $3::jsonb, meta => $4::jsonb)",
        kw.get("queue", "default"),
        kind,
        payload,  # the test connection's jsonb codec encodes it
        kw.get("meta", {}),
    )
    return job_id


async def test_a_job_failing_for_good_alerts_once_then_floods_fold_and_recover(
    daemons: DaemonFactory, db: asyncpg.Connection, hook: Hook
) -> None:
    rules = """
        [alerts.rules.failures]
        event = "job_failed"
        destinations = ["hook", "slack", "discord"]
    """
    daemon = await daemons.start(config(hook, rules))
    await evaluating(daemon)
    started = time.monotonic()
    job_id = await enqueue(db, "test.permanent", {})

    async def first() -> list[dict[str, Any]]:
        return [d for d in docs(hook) if d.get("kind") == "test.permanent"]

    [doc] = await eventually(first, timeout=5)
    took = time.monotonic() - started
    assert took < 5
    assert doc["event"] == "job_failed"
    assert doc["job_id"] == job_id
    assert doc["error"] == "PermanentJobError: the order does not exist"
    assert doc["queue"] == "default" and doc["count"] == 1 and doc["attempt"] == 1
    assert str(job_id) in doc["text"] and "test.permanent" in doc["text"]
    assert set(doc) == {
        "event", "rule", "incident_id", "started_at", "schedule", "queue", "kind",
        "job_id", "attempt", "error", "count", "text",
    }  # fmt: skip
    # Signed with the destination's secret; chat destinations get their own shapes.
    seen = next(s for s in hook.seen if s.path.startswith("/hook/"))
    expected = hmac.new(SECRET.encode(), seen.body.encode(), hashlib.sha256).hexdigest()
    assert seen.headers["X-Stoker-Signature"] == f"sha256={expected}"

    async def chats() -> bool:
        paths = {s.path.split("/")[1] for s in hook.seen}
        return {"slack", "discord"} <= paths

    await eventually(chats, timeout=5)
    slack = next(s for s in hook.seen if s.path.startswith("/slack/"))
    discord = next(s for s in hook.seen if s.path.startswith("/discord/"))
    assert "the order does not exist" in json.loads(slack.body)["text"]
    assert "the order does not exist" in json.loads(discord.body)["content"]
    assert set(json.loads(slack.body)) == {"text"}
    assert set(json.loads(discord.body)) == {"content"}

    # 50 failures of one kind within a minute: one incident message, at most a digest.
    for i in range(50):
        await enqueue(db, "test.flaky", {"succeed_on": 2})
        if i == 25:
            await eventually(lambda: _has(hook, "test.flaky", "job_failed"), timeout=5)

    async def all_failed() -> bool:
        n = await db.fetchval(
            "SELECT count(*) FROM stoker.job_history WHERE kind = 'test.flaky' AND state = 'failed'"
        )
        return bool(n == 50)

    await eventually(all_failed, timeout=20)
    await eventually(lambda: _counted(hook, "test.flaky", 50), timeout=8)
    ok = await enqueue(db, "test.flaky", {"succeed_on": 1})
    await finished(db, ok)
    await eventually(lambda: _has(hook, "test.flaky", "job_failed_recovered"), timeout=5)
    flaky = events(hook, "kind", "test.flaky")
    assert flaky[0] == "job_failed" and flaky[-1] == "job_failed_recovered"
    assert flaky.count("job_failed") <= 2, flaky  # the opening message, and at most a digest
    assert flaky.count("job_failed_recovered") == 1
    recovered = [d for d in docs(hook) if d["event"] == "job_failed_recovered"]
    assert recovered[0]["count"] == 50
    folded = [d for d in docs(hook) if d.get("kind") == "test.flaky" and "more" in d["text"]]
    assert folded, "the 50 failures are told, folded"
    # test.permanent's incident stays open; nothing about it was repeated.
    assert events(hook, "kind", "test.permanent") == ["job_failed"]
    # The log names destinations, never their URLs.
    assert "secretpath123" not in daemon.log() and "token789" not in daemon.log()


async def _has(hook: Hook, kind: str, event: str) -> bool:
    return event in events(hook, "kind", kind)


async def _counted(hook: Hook, kind: str, total: int) -> bool:
    told: int = sum(d["count"] for d in docs(hook) if d.get("kind") == kind)
    return told >= total


async def test_a_schedule_failing_three_times_in_a_row_alerts_once_and_recovers_once(
    daemons: DaemonFactory, db: asyncpg.Connection, hook: Hook, tmp_path: Path
) -> None:
    flag = tmp_path / "ready"
    rules = f"""
        [schedules.nightly]
        cron = "* * * * * *"
        kind = "test.needs_file"
        payload = {{ path = "{flag}" }}

        [alerts.rules.nightly_failing]
        event = "schedule_failing"
        destinations = ["hook"]
        alert_after_failures = 3
    """
    daemon = await daemons.start(config(hook, rules, digest=600))
    await evaluating(daemon)

    async def alerted() -> list[dict[str, Any]]:
        return [d for d in docs(hook) if d["event"] == "schedule_failing"]

    [doc] = await eventually(alerted, timeout=15)
    assert doc["schedule"] == "nightly" and doc["count"] >= 3
    assert "3 times in a row" in doc["text"] or "in a row" in doc["text"]
    fails = await db.fetchval(
        "SELECT count(*) FROM stoker.schedule_ticks WHERE schedule = 'nightly' AND state = 'failed'"
    )
    assert fails >= 3
    flag.write_text("ok")

    async def recovered() -> list[dict[str, Any]]:
        return [d for d in docs(hook) if d["event"] == "schedule_failing_recovered"]

    [back] = await eventually(recovered, timeout=10)
    assert back["schedule"] == "nightly"
    await _quiet(1.5)  # more successful runs: nothing more to say
    assert events(hook, "schedule", "nightly") == ["schedule_failing", "schedule_failing_recovered"]


async def _quiet(seconds: float) -> None:
    deadline = time.monotonic() + seconds

    async def passed() -> bool:
        return time.monotonic() >= deadline

    await eventually(passed, timeout=seconds + 5)


async def test_a_paused_queue_makes_its_schedule_late_then_recovers_on_resume(
    daemons: DaemonFactory, db: asyncpg.Connection, hook: Hook
) -> None:
    rules = """
        [queues.cron]
        concurrency = 2

        [schedules.tick]
        cron = "* * * * * *"
        kind = "test.record"
        queue = "cron"

        [alerts.rules.late]
        event = "schedule_late"
        destinations = ["hook"]
        grace = 2
    """
    daemon = await daemons.start(config(hook, rules))
    await evaluating(daemon)

    async def runs() -> bool:
        n = await db.fetchval(
            "SELECT count(*) FROM stoker.schedule_ticks WHERE schedule = 'tick' "
            "AND state = 'succeeded'"
        )
        return bool(n >= 2)

    await eventually(runs, timeout=15)
    assert docs(hook) == []  # on time: nothing to say
    await set_paused(db, "cron", True)
    paused_at = time.monotonic()

    async def late() -> list[dict[str, Any]]:
        return [d for d in docs(hook) if d["event"] == "schedule_late"]

    [doc] = await eventually(late, timeout=10)
    assert time.monotonic() - paused_at >= 2  # not before grace
    assert doc["schedule"] == "tick" and doc["queue"] == "cron"
    assert "paused" in doc["text"]
    await _quiet(1.5)
    assert len(await late()) == 1  # one message while it lasts
    await set_paused(db, "cron", False)

    async def recovered() -> list[dict[str, Any]]:
        return [d for d in docs(hook) if d["event"] == "schedule_late_recovered"]

    await eventually(recovered, timeout=10)
    await _quiet(1.5)
    assert events(hook, "schedule", "tick") == ["schedule_late", "schedule_late_recovered"]


async def test_a_run_past_max_duration_alerts_once_while_it_runs(
    daemons: DaemonFactory, db: asyncpg.Connection, hook: Hook
) -> None:
    rules = """
        [schedules.export]
        cron = "0 0 1 1 *"
        kind = "test.sleep"
        payload = { seconds = 4 }

        [alerts.rules.slow]
        event = "schedule_slow"
        destinations = ["hook"]
        max_duration = "1500ms"
    """
    daemon = await daemons.start(config(hook, rules))
    await evaluating(daemon)
    # A run of the schedule (as `stoker trigger export` makes it).
    job_id = await enqueue(
        db, "test.sleep", {"seconds": 4}, meta={"schedule": "export", "trigger": "manual"}
    )

    async def slow() -> list[dict[str, Any]]:
        return [d for d in docs(hook) if d["event"] == "schedule_slow"]

    [doc] = await eventually(slow, timeout=8)
    state = await db.fetchval("SELECT state::text FROM stoker.all_jobs WHERE id = $1", job_id)
    assert state == "active", "the alert comes while the run still goes"
    assert doc["job_id"] == job_id and doc["schedule"] == "export"
    await finished(db, job_id)

    async def ended() -> list[dict[str, Any]]:
        return [d for d in docs(hook) if d["event"] == "schedule_slow_recovered"]

    await eventually(ended, timeout=5)
    assert events(hook, "schedule", "export") == ["schedule_slow", "schedule_slow_recovered"]


def leader_pid(procs: list[DaemonProcess]) -> int | None:
    for proc in procs:
        if proc.proc.poll() is None:
            lines = [r["message"] for r in proc.log_records()]
            became = [m for m in lines if str(m).startswith("became leader")]
            lost = [m for m in lines if "leadership" in str(m)]
            if len(became) > len(lost):
                return proc.pid
    return None


async def test_with_three_daemons_a_killed_leader_neither_repeats_nor_forgets_an_incident(
    daemons: DaemonFactory, db: asyncpg.Connection, hook: Hook
) -> None:
    rules = JOB_FAILED_TO_HOOK
    procs = [await daemons.start(config(hook, rules)) for _ in range(3)]
    pid = await eventually(lambda: _async(leader_pid(procs)), timeout=20)
    leader = next(p for p in procs if p.pid == pid)
    await evaluating(leader)
    for _ in range(5):
        await enqueue(db, "test.flaky", {"succeed_on": 2})
    await eventually(lambda: _has(hook, "test.flaky", "job_failed"), timeout=5)
    # Mid-incident, with failures arriving, the leader dies.
    for _ in range(10):
        await enqueue(db, "test.flaky", {"succeed_on": 2})
    os.kill(pid, signal.SIGKILL)
    leader.proc.wait(timeout=10)
    for _ in range(10):
        await enqueue(db, "test.flaky", {"succeed_on": 2})

    async def all_failed() -> bool:
        n = await db.fetchval(
            "SELECT count(*) FROM stoker.job_history WHERE kind = 'test.flaky' AND state = 'failed'"
        )
        return bool(n == 25)

    await eventually(all_failed, timeout=20)
    new = await eventually(lambda: _async(leader_pid(procs)), timeout=20)
    assert new != pid
    ok = await enqueue(db, "test.flaky", {"succeed_on": 1})
    await finished(db, ok)
    await eventually(lambda: _has(hook, "test.flaky", "job_failed_recovered"), timeout=15)
    flaky = events(hook, "kind", "test.flaky")
    assert flaky.count("job_failed_recovered") == 1
    # Opened once: one opening message, every message about the same incident.
    assert len([d for d in docs(hook) if "failed for good after" in d["text"]]) == 1, flaky
    assert len({d["incident_id"] for d in docs(hook) if d.get("kind") == "test.flaky"}) == 1
    recovered = next(d for d in docs(hook) if d["event"] == "job_failed_recovered")
    assert recovered["count"] == 25  # none forgotten across the leader change
    rows = await db.fetch("SELECT * FROM stoker.alert_incidents WHERE subject = 'test.flaky'")
    assert len(rows) == 1 and rows[0]["closed_at"] is not None and rows[0]["count"] == 25


async def _async(value: Any) -> Any:
    return value


async def test_a_destination_that_is_down_gets_the_alert_when_it_is_back_and_slows_nothing(
    daemons: DaemonFactory, db: asyncpg.Connection, hook: Hook
) -> None:
    rules = JOB_FAILED_TO_HOOK
    # Down: three slow 503s, then it answers.
    hook.replies["/hook/T000/B000/XXXXsecretpath123"] = [
        Reply(status=503, body="down", delay=1.0) for _ in range(3)
    ]
    daemon = await daemons.start(config(hook, rules))
    await evaluating(daemon)
    await enqueue(db, "test.permanent", {})

    async def attempted() -> bool:
        return len([s for s in hook.seen if s.path.startswith("/hook/")]) >= 1

    await eventually(attempted, timeout=5)
    # Meanwhile the daemon's other work goes on: all of it is done while the destination is
    # still down (it answers only after three 1 s delays and their backoffs).
    ids = [await enqueue(db, "test.record", {"label": str(i)}) for i in range(30)]
    for job_id in ids:
        await finished(db, job_id, timeout=10)
    answered = [s for s in hook.seen if s.path.startswith("/hook/")]
    assert len(answered) < 4, "the other jobs waited for the alert's delivery"
    [doc] = await eventually(lambda: _delivered(hook), timeout=20)
    assert doc["event"] == "job_failed"
    row = await db.fetchrow(
        "SELECT state::text, attempts FROM stoker.all_jobs WHERE kind = 'alert.deliver'"
    )
    assert row["attempts"] == 4
    await eventually(lambda: _job_state(db, "alert.deliver", "succeeded"), timeout=5)
    errors = await db.fetchval(
        "SELECT string_agg(e->>'error', ' | ') FROM stoker.all_jobs, jsonb_array_elements(errors) e"
        " WHERE kind = 'alert.deliver'"
    )
    assert "HTTP 503" in errors and "webhook destination hook" in errors
    assert "secretpath123" not in errors and "secretpath123" not in daemon.log()


async def _delivered(hook: Hook) -> list[dict[str, Any]]:
    ok = [s for s in hook.seen if s.path.startswith("/hook/")]
    if len(ok) < 4:
        return []
    return [json.loads(ok[-1].body)]


async def _job_state(db: asyncpg.Connection, kind: str, state: str) -> bool:
    found = await db.fetchval(
        "SELECT state::text FROM stoker.all_jobs WHERE kind = $1 ORDER BY id DESC LIMIT 1", kind
    )
    return bool(found == state)


@pytest.fixture
def smtp() -> Iterator[tuple[Inbox, int]]:
    with smtp_server() as server:
        yield server


async def test_an_email_destination_gets_the_alert_template(
    daemons: DaemonFactory, db: asyncpg.Connection, hook: Hook, smtp: tuple[Inbox, int]
) -> None:
    inbox, port = smtp
    rules = f"""
        [email.smtp]
        host = "127.0.0.1"
        port = {port}
        starttls = false

        [alerts.destinations.ops]
        type = "email"
        to = "ops@example.com, oncall@example.com"

        [alerts.rules.failures]
        event = "job_failed"
        destinations = ["ops"]
        kinds = ["test.permanent"]
    """
    daemon = await daemons.start(config(hook, rules))
    await evaluating(daemon)
    await enqueue(db, "test.fail", {})  # filtered out by kinds
    job_id = await enqueue(db, "test.permanent", {})

    async def mailed() -> bool:
        return bool(inbox.messages)

    await eventually(mailed, timeout=8)
    [message] = inbox.messages
    assert message["Subject"] == "[stoker] job_failed test.permanent"
    assert message["To"] == "ops@example.com, oncall@example.com"
    body = message.get_content()
    assert f"job {job_id}" in body and "the order does not exist" in body
    assert "stoker alerts" in body


async def test_a_schedule_ping_url_is_called_after_each_successful_run(
    daemons: DaemonFactory, db: asyncpg.Connection, hook: Hook
) -> None:
    body = f"""
        leader_retry = 0.5
        [alerts]
        evaluate_interval = 0.5

        [schedules.beat]
        cron = "* * * * * *"
        kind = "test.record"
        ping_url = "{hook.url("/ping/abcd1234efgh5678")}"
    """
    daemon = await daemons.start(body)

    async def pinged() -> bool:
        return len([s for s in hook.seen if s.path.startswith("/ping/")]) >= 2

    await eventually(pinged, timeout=15)
    seen = [s for s in hook.seen if s.path.startswith("/ping/")]
    assert {s.method for s in seen} == {"GET"}
    assert "abcd1234efgh5678" not in daemon.log()
    pings = await db.fetch("SELECT payload FROM stoker.all_jobs WHERE kind = 'schedule.ping'")
    assert pings and all("abcd1234" not in json.dumps(p["payload"]) for p in pings)


async def test_operators_list_incidents_and_send_a_test_message(
    daemons: DaemonFactory,
    db: asyncpg.Connection,
    hook: Hook,
    dsn: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rules = JOB_FAILED_TO_HOOK
    daemon = await daemons.start(config(hook, rules))
    await evaluating(daemon)
    monkeypatch.setenv("DATABASE_URL", dsn)
    settings = load_settings(daemons.write_config(config(hook, rules), "operator.toml"))
    await enqueue(db, "test.permanent", {})

    async def listed() -> list[dict[str, Any]]:
        return await operate_alerts.incidents(db)

    [incident] = await eventually(listed, timeout=5)
    assert incident["rule"] == "failures" and incident["subject"] == "test.permanent"
    assert incident["closed_at"] is None
    job_id = await operate_alerts.send_test(db, settings.alerts, "hook")
    await finished(db, job_id, timeout=10)
    test_docs = [d for d in docs(hook) if d["event"] == "test"]
    assert len(test_docs) == 1 and "destination hook works" in test_docs[0]["text"]
    with pytest.raises(NotFound):
        await operate_alerts.send_test(db, settings.alerts, "nowhere")


def test_cli_alerts_lists_and_tests(daemons: DaemonFactory, dsn: str) -> None:
    from tests.conftest import stoker_cli

    path = daemons.write_config(
        """
        [alerts.destinations.hook]
        type = "webhook"
        url = "http://127.0.0.1:9/hook"
        """
    )
    out = stoker_cli(dsn, "alerts", config=path)
    assert out.returncode == 0 and "no open incidents" in out.stdout
    out = stoker_cli(dsn, "alerts", "test", "nowhere", config=path)
    assert out.returncode == 1 and "known: hook" in out.stderr
    out = stoker_cli(dsn, "alerts", "test", "hook", "--no-wait", config=path)
    assert out.returncode == 0 and out.stdout.strip().isdigit()


# -- configuration --------------------------------------------------------------------------------


def _load(tmp_path: Path, body: str) -> Any:
    path = tmp_path / "alerts.toml"
    path.write_text('database_url = "postgresql://u@h/d"\n' + textwrap.dedent(body))
    return load_settings(path)


def test_rules_name_destinations_that_exist_and_the_thresholds_their_event_needs(
    tmp_path: Path,
) -> None:
    with pytest.raises(ConfigError) as err:
        _load(
            tmp_path,
            """
            [alerts.rules.r]
            event = "job_failed"
            destinations = ["pager"]
            """,
        )
    assert "rules.r.destinations: 'pager' is not a configured destination" in str(err.value)
    with pytest.raises(ConfigError) as err:
        _load(
            tmp_path,
            """
            [alerts.destinations.d]
            type = "slack"
            url = "https://hooks.slack.com/services/T0/B0/sekrit"
            [alerts.rules.backlog]
            event = "queue_backlog"
            destinations = ["d"]
            """,
        )
    assert "alerts.rules.backlog" in str(err.value) and "needs max_wait" in str(err.value)
    with pytest.raises(ConfigError) as err:
        _load(
            tmp_path,
            """
            [alerts.destinations.d]
            type = "slack"
            url = "ftp://hooks.slack.com/services/T0/B0/sekrit"
            """,
        )
    assert "alerts.destinations.d" in str(err.value) and "sekrit" not in str(err.value)
    with pytest.raises(ConfigError) as err:
        _load(
            tmp_path,
            """
            [alerts.destinations.d]
            type = "slack"
            url = "https://hooks.slack.com/services/T0/B0/sekrit"
            [alerts.rules.r]
            event = "job_failed"
            destinations = ["d"]
            max_wait = 3
            """,
        )
    assert "max_wait is not read by event job_failed" in str(err.value)
    settings = _load(
        tmp_path,
        """
        [alerts.destinations.d]
        type = "webhook"
        url = "https://hooks.example.com/services/T0/B0/sekrit"
        secret = "hmac-key"
        [alerts.rules.slow]
        event = "schedule_slow"
        destinations = ["d"]
        max_duration = "5m"
        """,
    )
    assert settings.alerts.rules["slow"].max_duration == 300
    assert "sekrit" not in repr(settings) and "hmac-key" not in repr(settings.alerts)
    assert "sekrit" not in str(settings.model_dump())


async def test_ticks_passed_over_by_the_catch_up_policy_are_reported_missed_once(
    daemons: DaemonFactory, db: asyncpg.Connection, hook: Hook
) -> None:
    rules = """
        [schedules.yearly]
        cron = "0 0 1 1 *"
        kind = "test.record"

        [alerts.rules.late]
        event = "schedule_late"
        destinations = ["hook"]
        grace = 2
    """
    daemon = await daemons.start(config(hook, rules, digest=600))
    await evaluating(daemon)
    await _quiet(1.0)  # a pass or two: the rule's cursor is set
    # What a leader records after an outage under catch_up = "skip": ticks it will not fire.
    await db.execute(
        "INSERT INTO stoker.schedule_ticks (schedule, tick, outcome, reason) VALUES "
        "('yearly', '2025-01-01T00:00:00Z', 'skipped_catch_up', 'test'), "
        "('yearly', '2026-01-01T00:00:00Z', 'skipped_catch_up', 'test')"
    )

    async def missed() -> list[dict[str, Any]]:
        return [d for d in docs(hook) if d["event"] == "schedule_missed"]

    [doc] = await eventually(missed, timeout=5)
    assert doc["schedule"] == "yearly" and doc["count"] == 2
    assert "missed 2 ticks" in doc["text"] and "catch-up" in doc["text"]
    await _quiet(1.5)
    assert len(await missed()) == 1


async def test_a_queue_backlog_alerts_once_and_recovers_when_the_queue_drains(
    daemons: DaemonFactory, db: asyncpg.Connection, hook: Hook
) -> None:
    rules = """
        [queues.bulk]
        concurrency = 1

        [alerts.rules.backlog]
        event = "queue_backlog"
        destinations = ["hook"]
        queues = ["bulk"]
        max_wait = "1500ms"
    """
    daemon = await daemons.start(config(hook, rules))
    await evaluating(daemon)
    await set_paused(db, "bulk", True)
    waiting = [await enqueue(db, "test.record", {"label": str(i)}, queue="bulk") for i in range(5)]

    async def backlog() -> list[dict[str, Any]]:
        return [d for d in docs(hook) if d["event"] == "queue_backlog"]

    [doc] = await eventually(backlog, timeout=10)
    assert doc["queue"] == "bulk" and "bulk" in doc["text"]
    await _quiet(1.5)
    assert len(await backlog()) == 1  # one message while it lasts
    await set_paused(db, "bulk", False)
    for job_id in waiting:
        await finished(db, job_id)

    async def recovered() -> list[dict[str, Any]]:
        return [d for d in docs(hook) if d["event"] == "queue_backlog_recovered"]

    await eventually(recovered, timeout=10)
    assert events(hook, "queue", "bulk") == ["queue_backlog", "queue_backlog_recovered"]


async def test_a_destination_refusing_the_message_fails_its_job_at_once_naming_it(
    daemons: DaemonFactory, db: asyncpg.Connection, hook: Hook
) -> None:
    rules = """
        [alerts.rules.failures]
        event = "job_failed"
        destinations = ["slack"]
    """
    hook.replies["/slack/T123/B456/token789"] = [Reply(status=404, body="no_service")]
    daemon = await daemons.start(config(hook, rules))
    await evaluating(daemon)
    await enqueue(db, "test.permanent", {})
    await eventually(lambda: _job_state(db, "alert.deliver", "failed"), timeout=15)
    row = await db.fetchrow(
        "SELECT attempts, last_error FROM stoker.all_jobs WHERE kind = 'alert.deliver'"
    )
    assert row["attempts"] == 1  # a 4xx is the destination's answer: retrying will not help
    assert "slack destination slack" in row["last_error"] and "404" in row["last_error"]
    assert "token789" not in row["last_error"] and "token789" not in daemon.log()
    # and the failed alert job raises no alert of its own: the one refused request is all
    await _quiet(2)
    assert len([seen for seen in hook.seen if seen.path.startswith("/slack/")]) == 1
    incidents = await db.fetchval("SELECT count(*) FROM stoker.alert_incidents")
    assert incidents == 1


# -- evaluated directly, one pass at a time --------------------------------------------------


def _one_hook(**rules: AlertRule) -> AlertsConfig:
    hook = AlertDestination(type="webhook", url=SecretStr("http://127.0.0.1:9/hook/SECRET"))
    return AlertsConfig(destinations={"hook": hook}, rules=rules)


async def _evaluate(db: asyncpg.Connection, cfg: AlertsConfig, name: str) -> None:
    """One evaluation of rule `name` now, as Evaluator._evaluate does it."""
    rule = cfg.rules[name]
    async with db.transaction():
        now = await db.fetchval("SELECT now()")
        run = await RuleRun.load(db, now, name, rule, cfg)
        await EVALUATORS[rule.event](run, Context({}, ["default"], now))
        await run.digest("occurrences")
        await run.save_cursor()


async def _fail_for_good(db: asyncpg.Connection, kind: str) -> None:
    job_id = await enqueue(db, kind, {})
    [claimed] = await db.fetch(store_queries.CLAIM, "default", 1, "w1", 30.0)
    assert claimed["id"] == job_id
    await write_outcome(db, job_id, attempt=1, outcome="failed", worker="w1", error="boom")


class _Leading:
    is_leader = True


async def test_a_users_own_alert_kinds_alert_but_the_alerts_own_jobs_do_not(
    db: asyncpg.Connection,
) -> None:
    cfg = _one_hook(failures=AlertRule(event="job_failed", destinations=["hook"]))
    await _evaluate(db, cfg, "failures")  # a new rule: failures from now on
    await _fail_for_good(db, "alert.sync")  # a kind of the user's own, named alert.*
    await _fail_for_good(db, "alert.deliver")  # the alerts' own kinds, on any queue
    await _fail_for_good(db, "schedule.ping")
    await _evaluate(db, cfg, "failures")
    rows = await db.fetch("SELECT subject, count FROM stoker.alert_incidents")
    assert [(r["subject"], r["count"]) for r in rows] == [("alert.sync", 1)]


async def test_incidents_of_a_rule_removed_or_renamed_are_closed_without_a_message(
    dsn: str, db: asyncpg.Connection
) -> None:
    for rule, subject in (("renamed", "report.build"), ("kept", "email.send")):
        await db.fetchrow(alert_queries.OPEN_INCIDENT, rule, "job_failed", subject, 1, "{}", "{}")
    cfg = _one_hook(kept=AlertRule(event="job_failed", destinations=["hook"]))
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=2, init=init_connection)
    try:
        evaluator = Evaluator(
            cfg,
            db=pool,
            leader=cast(Leader, _Leading()),
            stopping=asyncio.Event(),
            configured={},
            queues=["default"],
        )
        await evaluator.run_pass()
    finally:
        await pool.close()
    rows = await db.fetch("SELECT rule, closed_at FROM stoker.alert_incidents ORDER BY rule")
    assert [(r["rule"], r["closed_at"] is not None) for r in rows] == [
        ("kept", False),
        ("renamed", True),
    ]
    assert await db.fetchval("SELECT count(*) FROM stoker.jobs WHERE kind = 'alert.deliver'") == 0


def test_a_destination_url_is_hidden_in_every_form_a_server_may_echo_it() -> None:
    url = "https://hooks.example.com/services/T0%2FAB/x%20y?token=s%2Bcret%3D1"
    echoed = (
        "404 for https://hooks.example.com/services/T0/AB/x y?token=s+cret=1; "
        "path /services/T0%2FAB/x%20y, /services/T0/AB/x y; query token=s+cret=1, "
        "token=s%2Bcret%3D1"
    )
    hidden = _hide(echoed, url)
    for secret in ("T0", "AB", "x y", "x%20y", "cret", "token"):
        assert secret not in hidden, hidden
    assert "https://hooks.example.com/..." in hidden
