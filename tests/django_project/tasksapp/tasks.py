"""The test project's tasks: each leaves a row in django_effects, written through Django's
own connection in the daemon's process."""

from __future__ import annotations

from typing import Any

from django.db import connection
from django.tasks import TaskContext, task


@task
def record(label: str, *, times: int = 1) -> dict[str, Any]:
    with connection.cursor() as cursor:
        for _ in range(times):
            cursor.execute("INSERT INTO django_effects (label) VALUES (%s)", [label])
    return {"label": label, "times": times}


@task(queue_name="django", priority=50, takes_context=True)
async def shout(context: TaskContext, text: str) -> str:
    return f"{text.upper()} (attempt {context.attempt}, job {context.task_result.id})"


@task
def explode(message: str) -> None:
    raise LookupError(message)


# Not a task: a payload naming it must never run it.
def not_a_task(label: str) -> None:
    with connection.cursor() as cursor:
        cursor.execute("INSERT INTO django_effects (label) VALUES (%s)", [label])
