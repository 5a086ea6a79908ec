"""Review of issue #13 (command.run, sql.report, files.cleanup, ${VAR} layering): each test
here shows one bug found in review; the ones not fixed yet are marked xfail(strict=True)."""

from __future__ import annotations

import asyncio
import datetime as dt
import fnmatch
import json
import os
import threading
import time
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from pydantic import ValidationError

from daemon import JobContext, PermanentJobError
from daemon.config import CommandConfig, EmailConfig, FileTaskConfig, ReportConfig
from daemon.config.files import load_settings
from daemon.config.layers import resolve_references
from daemon.errors import ConfigError
from daemon.store.db import init_connection
from handlers.command import CommandRun
from handlers.email import Mailer
from handlers.files import Cleanup, FileTasks, cleanup
from handlers.report import Reports, RunReport, run_report
from tests.conftest import REPO


async def _no_progress(job: int, attempt: int, progress: str) -> None:
    return None


def _context(
    resources: dict[type[Any], object],
    kind: str = "files.cleanup",
    db: asyncpg.Pool | None = None,
    job_id: int = 1,
) -> JobContext:
    return JobContext(
        id=job_id,
        queue="default",
        kind=kind,
        attempt=1,
        max_attempts=3,
        meta={},
        run_at=dt.datetime.now(dt.UTC),
        worker="review",
        _progress_writer=_no_progress,
        _db=db,
        _resources=resources,
    )


def _old_file(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(path.name, encoding="utf-8")
    when = time.time() - 7200
    os.utime(path, (when, when))
    return path


# -- files.cleanup -----------------------------------------------------------------------------


async def test_a_sweep_cancelled_mid_batch_lets_the_cancellation_through(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    directory = tmp_path / "scratch"
    for i in range(3):
        _old_file(directory / f"old{i}.tmp")
    entered, release = threading.Event(), threading.Event()
    real_match = fnmatch.fnmatchcase

    class Blocking:
        """fnmatch as files.cleanup sees it: the first match waits (in the worker thread,
        inside the listing generator) until the test lets it go."""

        @staticmethod
        def fnmatchcase(name: str, pattern: str) -> bool:
            entered.set()
            release.wait(30)
            return real_match(name, pattern)

    monkeypatch.setattr("handlers.files.fnmatch", Blocking)
    task = FileTaskConfig(directory=directory, older_than=60, pattern="*.tmp")
    ctx = _context({FileTasks: FileTasks({"sweep": task}, "postgresql://unused/x")})
    job = asyncio.create_task(cleanup(ctx, Cleanup(task="sweep")))
    try:
        assert await asyncio.to_thread(entered.wait, 30)  # the thread is in the generator
        job.cancel()  # the shutdown deadline, or the engine's timeout
        done, _ = await asyncio.wait({job}, timeout=30)
        assert done, "the cancelled job did not end"
    finally:
        release.set()
    # What the engine needs to hand the job back (or to record a timeout): the cancellation.
    assert job.cancelled(), f"the job raised {job.exception()!r} instead of being cancelled"


@pytest.mark.parametrize(
    "fields",
    [
        {"directory": "/tmp/..", "older_than": 60},
        {"directory": "/var/lib/../..", "older_than": 60, "recursive": True},
        {"query": "SELECT 1", "delete_statement": ":ids", "root": "/srv/.."},
    ],
)
def test_a_task_cannot_spell_the_filesystem_root_another_way(fields: dict[str, Any]) -> None:
    with pytest.raises(ValidationError, match="below the filesystem root"):
        FileTaskConfig.model_validate(fields)


async def test_a_directory_that_resolves_to_the_filesystem_root_is_refused(
    tmp_path: Path,
) -> None:
    uploads = tmp_path / "uploads"
    uploads.symlink_to("/")  # a deploy's symlink gone wrong
    # A dry run: even with the bug, nothing is deleted.
    task = FileTaskConfig(directory=uploads, older_than=0, dry_run=True)
    ctx = _context({FileTasks: FileTasks({"sweep": task}, "postgresql://unused/x")})
    try:
        result = await cleanup(ctx, Cleanup(task="sweep"))
    except PermanentJobError as exc:
        assert "filesystem root" in str(exc) or "/" in str(exc)
    else:
        pytest.fail(f"a sweep of / ran (dry run): it would delete {result['sample']}")


# -- sql.report --------------------------------------------------------------------------------


async def test_a_reports_rows_are_converted_off_the_event_loop(
    dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import handlers.report as report_module

    loop_thread = threading.get_ident()
    threads: set[int] = set()
    real_json_safe = report_module.json_safe

    def spy(value: Any, column: str) -> Any:
        threads.add(threading.get_ident())
        return real_json_safe(value, column)

    monkeypatch.setattr(report_module, "json_safe", spy)
    report = ReportConfig(
        query="SELECT g AS id, 'row ' || g AS title FROM generate_series(1, 50) AS g",
        to=["ops@example.com"],
    )
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=2, init=init_connection)
    try:
        job_id = await pool.fetchval(
            "SELECT stoker.enqueue('default', 'sql.report', '{\"report\": \"big\"}')"
        )
        resources = {
            Reports: Reports({"big": report}),
            Mailer: Mailer(EmailConfig(templates=REPO / "deploy" / "templates")),
        }
        ctx = _context(resources, kind="sql.report", db=pool, job_id=job_id)
        result = await run_report(ctx, RunReport(report="big"))
    finally:
        await pool.close()
    assert result["rows"] == 50
    assert threads, "json_safe was not called"
    assert loop_thread not in threads, "rows were converted on the event loop's thread"


# -- command.run's configuration -----------------------------------------------------------------


def test_a_commands_env_value_overridden_from_the_environment_reaches_the_program(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "stoker.toml"
    config.write_text(
        'database_url = "postgresql://u@localhost/db"\n'
        "[commands.backup]\n"
        'argv = ["true"]\n'
        'env = { PGPASSWORD = "old" }\n',
        encoding="utf-8",
    )
    monkeypatch.setenv("STOKER_COMMANDS__BACKUP__ENV__PGPASSWORD", "rotated")
    try:
        env = load_settings(config).commands["backup"].env
    except ConfigError as exc:  # refusing it, with a clear message, would do too
        assert "PGPASSWORD" in str(exc).upper()
        assert "rotated" not in str(exc) and "old" not in str(exc)
    else:
        assert env == {"PGPASSWORD": "rotated"}


def test_a_succeeded_commands_output_tail_can_be_stored_as_jsonb() -> None:
    ctx = _context({}, kind="command.run")
    run = CommandRun(ctx, "find0", CommandConfig(argv=["find", ".", "-print0"]))
    run.stdout.feed(b"./a\x00./b\x00")
    run.stdout.flush()
    result = run._outcome(0, False, 0.1)
    assert result["exit_code"] == 0
    assert "\\u0000" not in json.dumps(result), "jsonb refuses \\u0000"


# -- ${VAR} references -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "environ", [{"A": "postgresql://u@h/app"}, {"B": "postgresql://u@h/fallback"}, {}]
)
def test_a_nested_reference_in_a_default_is_an_error_not_a_changed_value(
    environ: dict[str, str],
) -> None:
    data = {"database_url": "${A:-${B}}"}
    try:
        resolved = resolve_references(data, lambda parts: "stoker.toml", environ)
    except ConfigError as exc:
        assert "database_url" in str(exc)
        for value in environ.values():
            assert value not in str(exc)  # and no environment value in the message
    else:
        pytest.fail(f"${{A:-${{B}}}} silently became {resolved['database_url']!r}")


def test_an_environment_value_holding_a_reference_is_not_expanded_again() -> None:
    # Checked fine: one pass, so a value from the environment is taken as it is.
    resolved = resolve_references(
        {"commands": {"x": {"env": {"TOKEN": "${T}"}}}},
        lambda parts: "stoker.toml",
        {"T": "${SECRET}", "SECRET": "hunter2"},
    )
    assert resolved["commands"]["x"]["env"]["TOKEN"] == "${SECRET}"
