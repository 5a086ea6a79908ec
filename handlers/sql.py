"""sql.batch: run a maintenance statement from the configuration in batches until it is done
(expired locks, old notifications, audit log retention, anonymisation).

The statement is only ever taken from `[sql_tasks.NAME]`, never from a payload; its `:name`
placeholders become `$n` parameters bound as values. A batch that touches fewer rows than
`batch_size` is the last one. Each job runs on a connection of its own with a statement and a
lock timeout, so a maintenance task can neither hang nor hold locks on the application's
tables for long."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import asyncpg
from pydantic import BaseModel, ConfigDict, Field

from daemon import JobContext, PermanentJobError, Settings, handler, resource
from daemon.config import SqlTaskConfig
from handlers.entries import configured_entry, with_declared_params
from handlers.params import bind, typed_args


@dataclass(frozen=True)
class SqlTasks:
    """The configured [sql_tasks], and the database they run in unless they name their own."""

    tasks: dict[str, SqlTaskConfig]
    database_url: str


class RunTask(BaseModel):
    model_config = ConfigDict(extra="forbid")
    task: str = Field(min_length=1)
    params: dict[str, str | int | float | bool | None] = Field(default_factory=dict)


def rows_touched(status: str) -> int:
    """asyncpg's command tag, e.g. 'DELETE 1000' or 'INSERT 0 1000' or 'UPDATE 12'."""
    last = status.rsplit(" ", 1)[-1]
    return int(last) if last.isdigit() else 0


@resource(SqlTasks)
@asynccontextmanager
async def sql_tasks(settings: Settings) -> AsyncIterator[SqlTasks]:
    yield SqlTasks(dict(settings.sql_tasks), settings.database_url)


@handler("sql.batch", payload=RunTask)
async def run_batches(ctx: JobContext, run: RunTask) -> dict[str, Any]:
    configured = ctx.resource(SqlTasks)
    task = configured_entry(configured.tasks, run.task, field="task", section="sql_tasks")
    values = {
        **with_declared_params("sql task", run.task, task.params, run.params),
        "batch_size": task.batch_size,
    }
    statement, args = bind(task.statement, values)
    return await _run(ctx, run.task, task, statement, args, configured.database_url)


async def _run(
    ctx: JobContext,
    name: str,
    task: SqlTaskConfig,
    statement: str,
    args: list[Any],
    default_dsn: str,
) -> dict[str, Any]:
    conn = await asyncpg.connect(
        task.database_url or default_dsn,
        server_settings={
            "application_name": f"stoker sql.batch {name}"[:63],
            "statement_timeout": str(int(task.statement_timeout * 1000)),
            "lock_timeout": str(int(task.lock_timeout * 1000)),
        },
    )
    started = time.monotonic()
    total = batches = 0
    try:
        try:
            prepared = await conn.prepare(statement)
        except (asyncpg.SyntaxOrAccessError, asyncpg.DataError) as exc:
            raise PermanentJobError(f"task {name!r}: {type(exc).__name__}: {exc}") from exc
        args = typed_args(f"task {name!r}", prepared.get_parameters(), args)
        while task.max_batches is None or batches < task.max_batches:
            try:
                await prepared.fetch(*args)
                status = prepared.get_statusmsg()
            except asyncpg.QueryCanceledError as exc:
                raise RuntimeError(f"batch {batches + 1} of {name!r} timed out: {exc}") from exc
            except (asyncpg.SyntaxOrAccessError, asyncpg.DataError) as exc:
                raise PermanentJobError(f"task {name!r}: {type(exc).__name__}: {exc}") from exc
            touched = rows_touched(status)
            total += touched
            batches += 1
            if touched < task.batch_size:
                break
            await asyncio.sleep(task.pause)  # let the application's own queries through
    finally:
        await conn.close()
    elapsed = time.monotonic() - started
    ctx.log.info("sql task %s: %d rows in %d batches, %.1fs", name, total, batches, elapsed)
    return {"task": name, "rows": total, "batches": batches, "seconds": round(elapsed, 3)}
