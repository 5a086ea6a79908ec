"""StokerBackend: Django's task backend that enqueues into stoker.jobs."""

from __future__ import annotations

import json
from typing import Any

from django.core import checks
from django.db import DEFAULT_DB_ALIAS, connections
from django.tasks import Task, TaskResult, TaskResultStatus
from django.tasks.backends.base import BaseTaskBackend
from django.tasks.base import TaskError
from django.tasks.exceptions import TaskResultDoesNotExist
from django.utils.json import normalize_json
from django.utils.module_loading import import_string

# The job kind the daemon's handler (daemon.contrib.django.handler) runs.
KIND = "django.task"

STATUS = {
    "queued": TaskResultStatus.READY,
    "active": TaskResultStatus.RUNNING,
    "succeeded": TaskResultStatus.SUCCESSFUL,
    "failed": TaskResultStatus.FAILED,
    "cancelled": TaskResultStatus.FAILED,
}


class StokerBackend(BaseTaskBackend):
    """OPTIONS: {"DATABASE": alias} names the Django database holding Stoker's schema
    (default: "default"); the job is inserted on that connection, in its transaction."""

    supports_defer = True  # run_after is the job's run_at
    supports_async_task = True  # the daemon awaits coroutine functions on its loop
    supports_get_result = True  # from stoker.all_jobs, in any process
    # Django's -100..100 fits Stoker's smallint, and both run higher numbers first.
    supports_priority = True

    def __init__(self, alias: str, params: dict[str, Any]) -> None:
        super().__init__(alias, params)
        self.database: str = self.options.get("DATABASE", DEFAULT_DB_ALIAS)

    def enqueue(self, task: Task, args: Any, kwargs: Any) -> TaskResult:
        self.validate_task(task)
        # Before the INSERT, so that what cannot be JSON never reaches the database.
        args = normalize_json(list(args))
        kwargs = normalize_json(dict(kwargs))
        payload = json.dumps({"task": task.module_path, "args": args, "kwargs": kwargs})
        with connections[self.database].cursor() as cursor:
            cursor.execute(
                "SELECT stoker.enqueue(%s, %s, %s::jsonb, %s, %s, NULL, NULL, %s::jsonb), now()",
                [
                    task.queue_name,
                    KIND,
                    payload,
                    task.run_after,
                    task.priority,
                    json.dumps({"django_backend": self.alias}),
                ],
            )
            job_id, enqueued_at = cursor.fetchone()
        return TaskResult(
            task=task,
            id=str(job_id),
            status=TaskResultStatus.READY,
            enqueued_at=enqueued_at,
            started_at=None,
            finished_at=None,
            last_attempted_at=None,
            args=args,
            kwargs=kwargs,
            backend=self.alias,
            errors=[],
            worker_ids=[],
        )

    def get_result(self, result_id: str) -> TaskResult:
        try:
            job_id = int(result_id)
        except (TypeError, ValueError):
            raise TaskResultDoesNotExist(result_id) from None
        with connections[self.database].cursor() as cursor:
            cursor.execute(
                "SELECT payload::text, queue, priority, state, created_at, started_at,"
                " finished_at, attempts, worker, errors::text, result::text"
                " FROM stoker.all_jobs WHERE id = %s AND kind = %s",
                [job_id, KIND],
            )
            row = cursor.fetchone()
        if row is None:
            raise TaskResultDoesNotExist(result_id)
        (payload, queue, priority, state, created, started, finished, attempts, worker) = row[:9]
        errors, result = row[9:]
        body = json.loads(payload)
        try:
            task = import_string(body["task"])
        except ImportError:
            raise TaskResultDoesNotExist(
                f"job {job_id}: its task {body['task']!r} cannot be imported here"
            ) from None
        if not isinstance(task, Task):
            raise TaskResultDoesNotExist(f"job {job_id}: {body['task']!r} is not a Task")
        if (task.queue_name, task.priority) != (queue, priority):
            task = task.using(queue_name=queue, priority=priority)
        task_result = TaskResult(
            task=task,
            id=str(job_id),
            status=STATUS[state],
            enqueued_at=created,
            started_at=started,
            finished_at=finished,
            last_attempted_at=started,
            args=body.get("args", []),
            kwargs=body.get("kwargs", {}),
            backend=self.alias,
            errors=[task_error(e) for e in json.loads(errors)],
            # Stoker keeps the last worker and the number of attempts, not one per attempt;
            # Django counts attempts as len(worker_ids).
            worker_ids=[worker] * attempts if worker else [],
        )
        if result is not None:
            object.__setattr__(task_result, "_return_value", json.loads(result))
        return task_result

    def check(self, **kwargs: Any) -> list[checks.CheckMessage]:
        messages: list[checks.CheckMessage] = list(super().check(**kwargs))
        vendor = connections[self.database].vendor
        if vendor != "postgresql":
            messages.append(
                checks.Error(
                    f"StokerBackend enqueues with SQL on PostgreSQL; database "
                    f"{self.database!r} is {vendor}",
                    hint='set TASKS[...]["OPTIONS"]["DATABASE"] to a PostgreSQL alias',
                    obj=self.alias,
                    id="stoker.E001",
                )
            )
        return messages


def task_error(entry: dict[str, Any]) -> TaskError:
    """One of Stoker's errors as Django's TaskError. Python's traceback ends with the
    exception's importable path ("pkg.mod.Error: message", builtins bare); an error with no
    traceback (a timeout, a lost lease) is the daemon's, not an exception's."""
    trace = entry.get("traceback") or ""
    last = trace.rstrip().rpartition("\n")[2]
    name = last.partition(":")[0].strip() if trace else ""
    if not name or " " in name:
        return TaskError(exception_class_path="builtins.Exception", traceback=entry["error"])
    path = name if "." in name else f"builtins.{name}"
    return TaskError(exception_class_path=path, traceback=trace)
