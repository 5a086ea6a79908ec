"""sql.batch: run a maintenance statement from the configuration in batches until it is done
(expired locks, old notifications, audit log retention, anonymisation).

The statement is only ever taken from `[sql_tasks.NAME]`, never from a payload; its `:name`
placeholders become `$n` parameters bound as values. A batch that touches fewer rows than
`batch_size` is the last one. Each job runs on a connection of its own with a statement and a
lock timeout, so a maintenance task can neither hang nor hold locks on the application's
tables for long."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import asyncpg
from pydantic import BaseModel, ConfigDict, Field

from daemon import JobContext, PermanentJobError, Settings, handler, resource
from daemon.config import SqlTaskConfig
from handlers.entries import configured_entry, with_declared_params

# `:name` but not the `::type` of a cast, nor inside what is not SQL code (see bind).
PLACEHOLDER = re.compile(r"(?<![:\w]):([a-z_][a-z0-9_]*)")
NOT_CODE = re.compile(
    r"--[^\n]*"  # line comment
    r"|/\*.*?\*/"  # block comment
    r"|\$([A-Za-z_]\w*|)\$.*?\$\1\$"  # dollar-quoted string
    r"|[Ee]'(?:[^'\\]|\\.|'')*'"  # E'' string with backslash escapes
    r"|'(?:[^']|'')*'"  # string
    r"|\"(?:[^\"]|\"\")*\"",  # quoted identifier
    re.DOTALL,
)


@dataclass(frozen=True)
class SqlTasks:
    """The configured [sql_tasks], and the database they run in unless they name their own."""

    tasks: dict[str, SqlTaskConfig]
    database_url: str


class RunTask(BaseModel):
    model_config = ConfigDict(extra="forbid")
    task: str = Field(min_length=1)
    params: dict[str, str | int | float | bool | None] = Field(default_factory=dict)


def bind(statement: str, values: dict[str, Any]) -> tuple[str, list[Any]]:
    """Turn `:name` placeholders into `$n` and the matching list of values."""
    order: list[str] = []

    def number(match: re.Match[str]) -> str:
        name = match[1]
        if name not in values:
            raise PermanentJobError(
                f"the statement uses :{name}, which is not a declared parameter "
                f"(declare it under params, or use one of: {', '.join(sorted(values))})"
            )
        if name not in order:
            order.append(name)
        return f"${order.index(name) + 1}"

    parts: list[str] = []
    last = 0
    for quoted in NOT_CODE.finditer(statement):  # leave strings and comments alone
        parts.append(PLACEHOLDER.sub(number, statement[last : quoted.start()]))
        parts.append(quoted[0])
        last = quoted.end()
    parts.append(PLACEHOLDER.sub(number, statement[last:]))
    return "".join(parts), [values[name] for name in order]


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
        types = prepared.get_parameters()
        if len(types) != len(args):
            raise PermanentJobError(
                f"task {name!r}: the statement has {len(types)} parameters but {len(args)} "
                "placeholders were bound; write parameters only as :name"
            )
        args = [_coerce(name, v, t.name) for v, t in zip(args, types, strict=True)]
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


INTEGERS = {"int2", "int4", "int8", "oid"}
FLOATS = {"float4", "float8"}


def _coerce(task: str, value: Any, type_name: str) -> Any:
    """Values from the environment arrive as text: give PostgreSQL the type it asked for."""
    if not isinstance(value, str):
        return value
    try:
        if type_name in INTEGERS:
            return int(value)
        if type_name in FLOATS or type_name == "numeric":
            return float(value) if type_name in FLOATS else Decimal(value)
        if type_name == "bool":
            return value.strip().lower() in ("1", "true", "yes", "on")
    except (ValueError, ArithmeticError) as exc:
        raise PermanentJobError(
            f"task {task!r}: parameter value {value!r} is not a valid {type_name}"
        ) from exc
    return value
