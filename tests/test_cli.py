"""The `stoker` command line, run as a real process against a real database."""

from __future__ import annotations

import json
from pathlib import Path

import asyncpg

import daemon
from daemon.store import queries
from tests.conftest import stoker_cli, write_outcome


async def test_enqueue_list_show_and_status(db: asyncpg.Connection, dsn: str) -> None:
    out = stoker_cli(
        dsn,
        "enqueue",
        "reports",
        "reports.build",
        "--payload",
        '{"org": 7}',
        "--priority",
        "3",
        "--unique-key",
        "org-7",
        "--run-at",
        "+1h",
    )
    assert out.returncode == 0, out.stderr
    job_id = int(out.stdout.strip())
    row = await db.fetchrow("SELECT * FROM stoker.jobs WHERE id = $1", job_id)
    assert row is not None
    assert (row["payload"], row["priority"], row["unique_key"]) == ({"org": 7}, 3, "org-7")

    listed = stoker_cli(dsn, "jobs", "list", "--queue", "reports")
    assert listed.returncode == 0, listed.stderr
    assert f"{job_id}   reports  reports.build  queued" in listed.stdout

    as_json = stoker_cli(dsn, "jobs", "list", "--json")
    assert json.loads(as_json.stdout.splitlines()[0])["id"] == job_id

    status = stoker_cli(dsn, "status")
    assert status.returncode == 0, status.stderr
    header, line = status.stdout.splitlines()
    assert header.split() == [
        "QUEUE",
        "QUEUED",
        "ACTIVE",
        "SUCCEEDED",
        "FAILED",
        "CANCELLED",
        "OLDEST",
        "DUE",
    ]
    assert line.split() == ["reports", "1", "0", "0", "0", "0", "-"]


HOST_CLOCK_AHEAD = """
import datetime as _dt
import time as _time

_SKEW = 3600.0
_Real = _dt.datetime
_real_time, _real_time_ns = _time.time, _time.time_ns
_time.time = lambda: _real_time() + _SKEW
_time.time_ns = lambda: _real_time_ns() + int(_SKEW * 1e9)


class _Ahead(_Real):
    @classmethod
    def now(cls, tz=None):
        return _Real.now(tz) + _dt.timedelta(seconds=_SKEW)

    @classmethod
    def utcnow(cls):
        return _Real.utcnow() + _dt.timedelta(seconds=_SKEW)


_dt.datetime = _Ahead
"""


async def test_run_at_offset_counts_from_the_database_clock(
    db: asyncpg.Connection, dsn: str, tmp_path: Path
) -> None:
    import os
    import subprocess
    import sys

    from tests.conftest import REPO

    # This host's clock runs an hour ahead of the database's (a VM resumed, NTP not yet
    # stepped): +10m must still mean ten minutes on the clock that decides when jobs are due.
    (tmp_path / "sitecustomize.py").write_text(HOST_CLOCK_AHEAD)
    env = {k: v for k, v in os.environ.items() if not k.startswith("STOKER_")}
    env.update(DATABASE_URL=dsn, PYTHONPATH=f"{tmp_path}{os.pathsep}{REPO}")
    out = subprocess.run(
        [sys.executable, "-m", "daemon", "enqueue", "default", "noop", "--run-at", "+10m"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    job_id = int(out.stdout)
    delay = await db.fetchval(
        "SELECT extract(epoch FROM run_at - now()) FROM stoker.jobs WHERE id = $1", job_id
    )
    assert 540 < delay <= 600, f"due in {float(delay):.0f}s by the database's clock"


async def test_run_at_offset_too_far_is_a_usage_error(db: asyncpg.Connection, dsn: str) -> None:
    for offset in ("+999999999d", "+300000000d"):
        out = stoker_cli(dsn, "enqueue", "default", "noop", "--run-at", offset)
        assert out.returncode == 2, out.stderr
        assert "Traceback" not in out.stderr
        assert f"argument --run-at: {offset!r} is too far in the future" in out.stderr
    assert await db.fetchval("SELECT count(*) FROM stoker.jobs") == 0


async def test_status_reports_oldest_due_age(db: asyncpg.Connection, dsn: str) -> None:
    await db.execute(
        "INSERT INTO stoker.jobs (queue, kind, run_at) "
        "VALUES ('q', 'noop', now() - interval '90 s')"
    )
    line = stoker_cli(dsn, "status").stdout.splitlines()[1].split()
    assert line[0] == "q"
    assert 89 <= float(line[-1].rstrip("s")) < 120


async def fail_job(db: asyncpg.Connection, queue: str = "default") -> int:
    job_id = await daemon.enqueue(db, queue=queue, kind="noop")
    await db.fetch(queries.CLAIM, queue, 1, "w", 30.0)
    await write_outcome(
        db, job_id, attempt=1, outcome="failed", worker="w", error="boom", tb="Traceback"
    )
    return job_id


async def test_retry_brings_a_failed_job_back(db: asyncpg.Connection, dsn: str) -> None:
    job_id = await fail_job(db)
    out = stoker_cli(dsn, "jobs", "retry", str(job_id))
    assert out.returncode == 0, out.stderr
    assert "retried 1 job(s)" in out.stdout
    row = await db.fetchrow("SELECT * FROM stoker.jobs WHERE id = $1", job_id)
    assert row is not None
    assert (row["state"], row["attempts"], row["last_error"]) == ("queued", 0, "boom")
    assert await db.fetchval("SELECT count(*) FROM stoker.job_history") == 0


async def test_retry_all_failed_of_one_queue(db: asyncpg.Connection, dsn: str) -> None:
    a = [await fail_job(db, "a") for _ in range(3)]
    b = await fail_job(db, "b")
    out = stoker_cli(dsn, "jobs", "retry", "--all-failed", "--queue", "a")
    assert out.returncode == 0, out.stderr
    back = {r["id"] for r in await db.fetch("SELECT id FROM stoker.jobs")}
    assert back == set(a)
    assert await db.fetchval("SELECT state::text FROM stoker.job_history WHERE id = $1", b) == (
        "failed"
    )


async def test_retry_of_unknown_job_says_so(dsn: str) -> None:
    out = stoker_cli(dsn, "jobs", "retry", "999")
    assert out.returncode == 1
    assert "not retried (no such job" in out.stderr
    assert "999" in out.stderr


async def test_cancel_queued_job_and_refuse_finished_one(db: asyncpg.Connection, dsn: str) -> None:
    job_id = await daemon.enqueue(db, queue="default", kind="noop")
    out = stoker_cli(dsn, "jobs", "cancel", str(job_id))
    assert out.returncode == 0, out.stderr
    assert (
        await db.fetchval("SELECT state::text FROM stoker.job_history WHERE id = $1", job_id)
        == "cancelled"
    )
    again = stoker_cli(dsn, "jobs", "cancel", str(job_id))
    assert again.returncode == 1
    assert again.stderr.strip() == f"stoker: error: job {job_id} is already cancelled"
    missing = stoker_cli(dsn, "jobs", "show", "12345")
    assert missing.returncode == 1
    assert missing.stderr.strip() == "stoker: error: no job with id 12345"


def test_bad_arguments_give_one_clear_line(dsn: str) -> None:
    cases = {
        ("enqueue", "default", "noop", "--payload", "{bad"): "argument --payload: not valid JSON",
        ("enqueue", "no spaces", "noop"): "is not a valid queue name",
        ("enqueue", "q", "noop", "--run-at", "2026-01-01T09:00:00"): "has no time zone",
        ("enqueue", "q", "noop", "--run-at", "tomorrow"): "is not a time",
        ("jobs", "show", "abc"): "'abc' is not a job id",
        ("jobs", "list", "--state", "done"): "invalid choice: 'done'",
        ("jobs", "retry"): "give job ids, or --all-failed",
        ("frobnicate",): "invalid choice: 'frobnicate'",
        ("enqueue", "q", "noop", "--run-at", "+3000000000d"): "is too far in the future",
        ("enqueue", "q", "noop", "--priority", "99999"): "out of range (-32768 to 32767)",
        ("enqueue", "q", ""): "a job kind is 1-200 characters",
    }
    for argv, expected in cases.items():
        out = stoker_cli(dsn, *argv)
        assert out.returncode == 2, (argv, out.stdout, out.stderr)
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1, (argv, out.stderr)
        assert expected in lines[0], (argv, lines[0])
        assert "Traceback" not in out.stderr


def test_malformed_config_names_file_and_key(dsn: str, tmp_path: Path) -> None:
    config = tmp_path / "stoker.toml"
    config.write_text("[queues.default]\nconcurency = 3\nbatch_size = 0\n")
    out = stoker_cli(dsn, "run", config=config)
    assert out.returncode == 1
    assert f"{config}: queues.default.concurency: unknown key" in out.stderr
    assert f"{config}: queues.default.batch_size: Input should be greater than or equal to 1" in (
        out.stderr
    )
    assert "Traceback" not in out.stderr

    config.write_text("[queues.default\nconcurrency = 3\n")
    out = stoker_cli(dsn, "status", config=config)
    assert out.returncode == 1
    assert out.stderr.startswith(f"stoker: error: {config}: not valid TOML:")

    out = stoker_cli(dsn, "status", config=tmp_path / "missing.toml")
    assert "configuration file not found" in out.stderr


def test_unimportable_handler_module_is_named(dsn: str, tmp_path: Path) -> None:
    config = tmp_path / "stoker.toml"
    config.write_text('handler_modules = ["myapp.nothere"]\n')
    out = stoker_cli(dsn, "run", config=config)
    assert out.returncode == 1
    assert "handler_modules: cannot import 'myapp.nothere'" in out.stderr
    assert "Traceback" not in out.stderr


def test_unreachable_database_is_one_line(tmp_path: Path) -> None:
    out = stoker_cli("postgresql://nobody@127.0.0.1:1/nothing", "status")
    assert out.returncode == 1
    assert out.stderr.startswith("stoker: error: cannot connect to the database at ")
    assert "Traceback" not in out.stderr


async def test_retry_keeps_a_job_whose_unique_key_is_taken(
    db: asyncpg.Connection, dsn: str
) -> None:
    old = await daemon.enqueue(db, queue="default", kind="noop", unique_key="invoice-7")
    await db.fetch(queries.CLAIM, "default", 1, "w", 30.0)
    await write_outcome(db, old, attempt=1, outcome="failed", worker="w", error="boom")
    new = await daemon.enqueue(db, queue="default", kind="noop", unique_key="invoice-7")
    out = stoker_cli(dsn, "jobs", "retry", str(old))
    assert out.returncode == 1
    assert "a live job holds its unique_key" in out.stderr
    assert await db.fetchval("SELECT state::text FROM stoker.all_jobs WHERE id = $1", old) == (
        "failed"
    )
    assert await db.fetchval("SELECT id FROM stoker.jobs") == new


def test_bad_environment_values_are_named_and_secrets_are_not_printed(dsn: str) -> None:
    import os
    import subprocess
    import sys

    from tests.conftest import REPO

    def run(**env: str) -> subprocess.CompletedProcess[str]:
        base = {k: v for k, v in os.environ.items() if not k.startswith("STOKER_")}
        base.update({"DATABASE_URL": dsn, "PYTHONPATH": str(REPO), **env})
        return subprocess.run(
            [sys.executable, "-m", "daemon", "status"],
            cwd=REPO,
            env=base,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    out = run(STOKER_HANDLER_MODULES="myapp.jobs")
    assert out.returncode == 1
    assert 'error parsing value for field "handler_modules"' in out.stderr
    assert "STOKER_HANDLER_MODULES='[\"myapp.jobs\"]'" in out.stderr

    out = run(DATABASE_URL="postgresql://app:hunter2@db:notaport/app")
    assert out.returncode == 1
    assert (
        "environment DATABASE_URL: database_url: Value error, has a port that is not a number"
        in (out.stderr)
    )
    assert "hunter2" not in out.stderr
    assert "Traceback" not in out.stderr


async def test_pause_and_resume_a_queue(db: asyncpg.Connection, dsn: str) -> None:
    await daemon.enqueue(db, queue="email-default", kind="noop")
    out = stoker_cli(dsn, "pause", "email-default")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "queue email-default paused: no daemon claims from it"
    assert await db.fetch(queries.CLAIM, "email-default", 10, "w", 30.0) == []
    status = stoker_cli(dsn, "status").stdout.splitlines()
    assert status[1].split()[:3] == ["email-default", "(paused)", "1"]
    assert stoker_cli(dsn, "resume", "email-default").returncode == 0
    assert len(await db.fetch(queries.CLAIM, "email-default", 10, "w", 30.0)) == 1
    bad = stoker_cli(dsn, "pause", "no spaces")
    assert bad.returncode == 2
    assert "is not a valid queue name" in bad.stderr
