"""The daemon's side: runs the `django.task` jobs StokerBackend enqueued. Imported by the
runtime after django.setup(), only when `django_settings` is configured.

The payload names the task to run; since payloads come from the database, not from the
configuration, only a django.tasks Task defined in an installed app's package is run:
anything else fails permanently, naming the path."""

from __future__ import annotations

import asyncio
import importlib
import sys
from inspect import iscoroutinefunction
from typing import Any

from django.apps import apps
from django.db import close_old_connections
from django.tasks import Task, TaskContext, TaskResult, TaskResultStatus
from django.utils import timezone
from django.utils.json import normalize_json
from pydantic import BaseModel, ConfigDict, Field

from daemon import JobContext, PermanentJobError, handler
from daemon.contrib.django.backend import KIND


class DjangoTaskPayload(BaseModel):
    model_config = ConfigDict(extra="forbid")
    task: str = Field(min_length=1, max_length=1000)
    args: list[Any] = Field(default_factory=list)
    kwargs: dict[str, Any] = Field(default_factory=dict)


def import_tasks_modules() -> None:
    """Each installed app's `tasks` module, imported once at start: with the modules Django's
    setup imported (models, apps), these are where a Task may be looked up."""
    for config in apps.get_app_configs():
        name = f"{config.name}.tasks"
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise  # the tasks module exists and fails to import: say so at start


def resolve(path: str) -> Task:
    """The Task at `path`, looked up only in a module already imported (by Django's setup, or
    an installed app's `tasks` module at start): a payload never makes the daemon import a
    module, whose top-level code would run whatever it is."""
    module_name, _, attribute = path.rpartition(".")
    packages = [config.name for config in apps.get_app_configs()]
    if not module_name or not any(
        module_name == name or module_name.startswith(name + ".") for name in packages
    ):
        raise PermanentJobError(
            f"{path!r} is not in an installed app's package: only django.tasks Tasks of "
            "INSTALLED_APPS are run"
        )
    module = sys.modules.get(module_name)
    if module is None:
        raise PermanentJobError(
            f"{path!r}: module {module_name!r} was not imported at start; a Task is run only "
            "from an installed app's tasks module or a module Django's setup imports"
        )
    found = getattr(module, attribute, None)
    if not isinstance(found, Task):
        raise PermanentJobError(f"{path!r} is not a django.tasks Task (a @task function)")
    return found


def context_for(ctx: JobContext, task: Task, payload: DjangoTaskPayload) -> TaskContext:
    now = timezone.now()
    result = TaskResult(
        task=task,
        id=str(ctx.id),
        status=TaskResultStatus.RUNNING,
        enqueued_at=None,
        started_at=now,
        finished_at=None,
        last_attempted_at=now,
        args=payload.args,
        kwargs=payload.kwargs,
        backend=task.backend,
        errors=[],
        # TaskContext.attempt is len(worker_ids): one entry per attempt, this one included.
        worker_ids=[ctx.worker] * ctx.attempt,
    )
    return TaskContext(task_result=result)


def call_sync(task: Task, args: list[Any], kwargs: dict[str, Any]) -> Any:
    # A worker thread keeps its Django connections between jobs: drop the broken or
    # expired ones (CONN_MAX_AGE) before and after, as Django does around a request.
    close_old_connections()
    try:
        return task.func(*args, **kwargs)
    finally:
        close_old_connections()


@handler(KIND, payload=DjangoTaskPayload)
async def run_django_task(ctx: JobContext, payload: DjangoTaskPayload) -> Any:
    task = resolve(payload.task)
    args: list[Any] = list(payload.args)
    if task.takes_context:
        args.insert(0, context_for(ctx, task, payload))
    if iscoroutinefunction(task.func):
        value = await task.func(*args, **payload.kwargs)
    else:
        value = await asyncio.to_thread(call_sync, task, args, payload.kwargs)
    try:
        return normalize_json(value)
    except (TypeError, ValueError):
        # The task has run: the daemon keeps the job succeeded and logs why it has no result.
        return value
