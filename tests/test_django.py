"""daemon.contrib.django: the test project (tests/django_project) enqueues through Django's
django.tasks inside its transactions, and a real daemon, configured with django_settings,
runs the tasks. Django 6 needs Python >= 3.12: `make test` runs this file in .venv-django."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import pytest

from daemon.config import Settings
from tests.conftest import DaemonFactory, finished, run_sync, scratch_database, stoker_cli

try:
    import django
    from django.db import connections, transaction
    from django.tasks import TaskResultStatus
    from django.tasks.exceptions import TaskResultDoesNotExist
    from django.utils import timezone

    HAVE_DJANGO = True
except ImportError:
    HAVE_DJANGO = False

needs_django = pytest.mark.skipif(
    not HAVE_DJANGO,
    reason="needs Django >= 6.0 (Python >= 3.12): `make test-django` runs it in .venv-django",
)


T = TypeVar("T")

CONFIG = """
django_settings = "tests.django_project.settings"
[queues.default]
[queues.django]
max_attempts = 1
"""


@pytest.fixture(scope="module")
def django_dsn(server_dsn: str, template_db: str) -> Iterator[str]:
    """One database for the module: Django reads DATABASES once, at django.setup()."""
    with scratch_database(server_dsn, template_db) as database:

        async def create_table() -> None:
            conn = await asyncpg.connect(database)
            try:
                await conn.execute("CREATE TABLE django_effects (id serial, label text)")
            finally:
                await conn.close()

        run_sync(create_table())
        os.environ["DJANGO_DATABASE_URL"] = database
        os.environ["DJANGO_SETTINGS_MODULE"] = "tests.django_project.settings"
        django.setup()
        try:
            yield database
        finally:
            connections.close_all()


@pytest.fixture
async def daemon(django_dsn: str, tmp_path: Path) -> Any:
    factory = DaemonFactory(django_dsn, tmp_path)
    try:
        yield await factory.start(CONFIG)
    finally:
        factory.stop_all()


@pytest.fixture
async def pg(django_dsn: str) -> Any:
    conn = await asyncpg.connect(django_dsn)
    try:
        yield conn
    finally:
        await conn.close()


async def in_django(work: Callable[[], T]) -> T:
    """Django's ORM refuses to run on an event loop's thread: its calls go to a thread."""

    def run() -> T:
        try:
            return work()
        finally:
            connections.close_all()  # this thread's only

    return await asyncio.to_thread(run)


async def effects(pg: asyncpg.Connection, label: str) -> int:
    count: int = await pg.fetchval("SELECT count(*) FROM django_effects WHERE label = $1", label)
    return count


@needs_django
async def test_a_task_enqueued_in_a_committed_transaction_runs_once(
    daemon: Any, pg: asyncpg.Connection
) -> None:
    from tests.django_project.tasksapp.tasks import record

    def enqueue() -> str:
        with transaction.atomic():
            result = record.enqueue("committed", times=1)
            assert result.status == TaskResultStatus.READY
            return str(result.id)

    job_id = int(await in_django(enqueue))
    row = await finished(pg, job_id)
    assert row["state"] == "succeeded", row["last_error"]
    assert (row["kind"], row["queue"], row["attempts"]) == ("django.task", "default", 1)
    assert json.loads(row["payload"]) == {
        "task": "tests.django_project.tasksapp.tasks.record",
        "args": ["committed"],
        "kwargs": {"times": 1},
    }
    assert json.loads(row["result"]) == {"label": "committed", "times": 1}
    assert await effects(pg, "committed") == 1

    result = await in_django(lambda: record.get_result(str(job_id)))
    assert result.status == TaskResultStatus.SUCCESSFUL
    assert result.return_value == {"label": "committed", "times": 1}
    assert (result.args, result.kwargs, result.attempts) == (["committed"], {"times": 1}, 1)
    assert result.finished_at is not None


@needs_django
async def test_a_task_enqueued_in_a_rolled_back_transaction_never_runs(
    daemon: Any, pg: asyncpg.Connection
) -> None:
    from tests.django_project.tasksapp.tasks import record

    class Abandon(Exception):
        pass

    def enqueue_then_roll_back() -> str:
        try:
            with transaction.atomic():
                job = record.enqueue("rolled back")
                raise Abandon
        except Abandon:
            return str(job.id)

    gone = int(await in_django(enqueue_then_roll_back))
    # A job committed after it has run: the daemon was at work, and found nothing else.
    after = int(await in_django(lambda: str(record.enqueue("after the rollback").id)))
    assert after > gone
    assert (await finished(pg, after))["state"] == "succeeded"
    assert await pg.fetchval("SELECT count(*) FROM stoker.all_jobs WHERE id = $1", gone) == 0
    assert await effects(pg, "rolled back") == 0
    with pytest.raises(TaskResultDoesNotExist):
        await in_django(lambda: record.get_result(str(gone)))


@needs_django
async def test_async_task_with_context_on_its_queue_with_its_priority(
    daemon: Any, pg: asyncpg.Connection
) -> None:
    from tests.django_project.tasksapp.tasks import record, shout

    job_id = int((await shout.aenqueue("hello")).id)
    row = await finished(pg, job_id)
    assert row["state"] == "succeeded", row["last_error"]
    assert (row["queue"], row["priority"]) == ("django", 50)
    assert json.loads(row["result"]) == f"HELLO (attempt 1, job {job_id})"
    result = await shout.aget_result(str(job_id))
    assert result.return_value == f"HELLO (attempt 1, job {job_id})"

    # run_after is the job's run_at: enqueued now, due in an hour, not run.
    later = timezone.now() + timedelta(hours=1)
    deferred = int(await in_django(lambda: str(record.using(run_after=later).enqueue("x").id)))
    run_at = await pg.fetchval("SELECT run_at FROM stoker.jobs WHERE id = $1", deferred)
    assert run_at == later
    assert (await in_django(lambda: record.get_result(str(deferred)))).status == "READY"


@needs_django
async def test_a_failing_task_fails_with_its_exception(daemon: Any, pg: asyncpg.Connection) -> None:
    from tests.django_project.tasksapp.tasks import explode

    task = explode.using(queue_name="django")  # max_attempts = 1 there
    job_id = int(await in_django(lambda: str(task.enqueue("no such order").id)))
    row = await finished(pg, job_id)
    assert row["state"] == "failed"
    assert row["last_error"].startswith("LookupError: no such order")
    result = await in_django(lambda: explode.get_result(str(job_id)))
    assert result.status == TaskResultStatus.FAILED
    assert [e.exception_class for e in result.errors] == [LookupError]
    assert "raise LookupError(message)" in result.errors[0].traceback


@needs_django
@pytest.mark.parametrize(
    ("path", "why"),
    [
        ("tests.django_project.tasksapp.tasks.not_a_task", "is not a django.tasks Task"),
        ("os.system", "is not in an installed app's package"),
        ("tests.job_handlers.record", "is not in an installed app's package"),
    ],
)
async def test_a_payload_naming_anything_but_a_task_fails_permanently(
    daemon: Any, pg: asyncpg.Connection, path: str, why: str
) -> None:
    payload = json.dumps({"task": path, "args": ["forged"]})
    job_id = await pg.fetchval(
        "SELECT stoker.enqueue('default', 'django.task', $1::jsonb)", payload
    )
    row = await finished(pg, job_id)
    assert row["state"] == "failed"
    assert row["attempts"] == 1  # permanent: not retried
    assert row["last_error"].startswith(f"PermanentJobError: {path!r} {why}")
    assert await effects(pg, "forged") == 0


def test_django_settings_must_be_a_module_path() -> None:
    assert Settings(django_settings="mysite.settings").django_settings == "mysite.settings"
    with pytest.raises(ValueError, match=r"is not a Python module path like 'mysite\.settings'"):
        Settings(django_settings="mysite/settings.py")


@pytest.mark.skipif(HAVE_DJANGO, reason="Django is installed here: the message is for without")
def test_django_settings_without_django_stops_the_daemon_saying_what_to_install(
    dsn: str, tmp_path: Path
) -> None:
    config = tmp_path / "stoker.toml"
    config.write_text('django_settings = "mysite.settings"\n', encoding="utf-8")
    out = stoker_cli(dsn, "run", config=config)
    assert out.returncode == 1
    assert "django_settings is set but Django is not installed" in out.stderr
    assert "pip install 'stoker[django]'" in out.stderr
    assert "Traceback" not in out.stderr


@needs_django
def test_django_settings_naming_no_module_stops_the_daemon(dsn: str, tmp_path: Path) -> None:
    config = tmp_path / "stoker.toml"
    config.write_text('django_settings = "no_such_project.settings"\n', encoding="utf-8")
    out = stoker_cli(dsn, "run", config=config)
    assert out.returncode == 1
    assert "cannot set up Django with 'no_such_project.settings'" in out.stderr
    assert "Traceback" not in out.stderr


@pytest.fixture
def side_effect_module(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A module in the installed test app's package that is not a task module and does
    something when imported (as a script, a test module or a settings variant would)."""
    app = Path(__file__).parent / "django_project" / "tasksapp"
    module = app / "review18_script.py"
    marker = tmp_path / "imported"
    module.write_text(f"open({str(marker)!r}, 'w').close()\n")
    try:
        yield "tests.django_project.tasksapp.review18_script", marker
    finally:
        module.unlink()


# Review of #18: resolve() imported the module a payload names (any module under an installed
# app's package) before checking that the attribute is a Task, so a forged job ran that
# module's top-level code.
@needs_django
def test_the_handler_never_imports_a_payload_named_module_that_is_no_task(
    side_effect_module: tuple[str, Path], django_dsn: str
) -> None:
    from daemon import PermanentJobError
    from daemon.contrib.django.handler import resolve

    module, marker = side_effect_module
    with pytest.raises(PermanentJobError, match="was not imported at start"):
        resolve(f"{module}.main")
    assert not marker.exists(), "the payload-named module was imported (its code ran)"
