"""What each `stoker` command does. Every command but `run` works on one database
connection; output is a plain table, or JSON lines with --json."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from typing import Any

import asyncpg
from pydantic import ValidationError

from daemon.cli.args import STATES, Offset, UsageError
from daemon.config import Settings
from daemon.cron import queries as cron_queries
from daemon.cron.leader import APPLICATION_PREFIX
from daemon.cron.schedules import delete_schedule, load_schedules, save_schedule, trigger
from daemon.cron.schedules import status as schedule_status
from daemon.enqueue import enqueue
from daemon.errors import StokerError
from daemon.store import queries
from daemon.store.db import CONNECT_ERRORS, connect, describe_failure
from daemon.store.migrations import migrate


def cmd_run(settings: Settings, args: argparse.Namespace) -> int:
    import uvloop

    from daemon.engine.registry import import_handler_modules
    from daemon.observe.logs import setup_logging
    from daemon.runtime import Runtime

    setup_logging(settings.log_level, settings.log_format)
    import_handler_modules(settings.handler_modules)
    result: int = uvloop.run(Runtime(settings).run())
    return result


async def with_connection(
    settings: Settings, work: Callable[[asyncpg.Connection], Awaitable[int]]
) -> int:
    try:
        conn = await connect(settings.database_url, application_name="stoker-cli")
    except CONNECT_ERRORS as exc:
        raise StokerError(
            f"cannot connect to the database at {describe_failure(settings.database_url, exc)}"
        ) from exc
    try:
        return await work(conn)
    except asyncpg.UndefinedTableError as exc:
        raise StokerError(
            f"{exc}: the database has no Stoker schema yet; run `stoker migrate`"
        ) from exc
    finally:
        await conn.close()


async def cmd_migrate(conn: asyncpg.Connection) -> int:
    applied = await migrate(conn)
    print(f"applied {', '.join(applied)}" if applied else "schema is up to date")
    return 0


async def _due(conn: asyncpg.Connection, run_at: datetime | Offset | None) -> datetime | None:
    if not isinstance(run_at, Offset):
        return run_at
    try:
        due: datetime = await conn.fetchval("SELECT now() + $1::interval", run_at.delta)
    except asyncpg.DataError:  # beyond PostgreSQL's last timestamp
        raise UsageError(f"argument --run-at: {run_at.text!r} is too far in the future") from None
    return due


def cmd_enqueue(args: argparse.Namespace) -> Callable[[asyncpg.Connection], Awaitable[int]]:
    async def work(conn: asyncpg.Connection) -> int:
        if not isinstance(args.meta, dict):
            raise UsageError("--meta must be a JSON object, e.g. '{\"org\": 42}'")
        new_id = await enqueue(
            conn,
            queue=args.queue,
            kind=args.kind,
            payload=args.payload,
            run_at=await _due(conn, args.run_at),
            priority=args.priority,
            unique_key=args.unique_key,
            max_attempts=args.max_attempts,
            meta=args.meta,
        )
        print(new_id)
        return 0

    return work


def _age(value: datetime | None) -> str:
    if value is None:
        return "-"
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(c) for c in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells
    )


def _jsonable(record: asyncpg.Record) -> dict[str, Any]:
    return {k: (v.isoformat() if isinstance(v, datetime) else v) for k, v in record.items()}


def cmd_jobs_list(args: argparse.Namespace) -> Callable[[asyncpg.Connection], Awaitable[int]]:
    async def work(conn: asyncpg.Connection) -> int:
        rows = await conn.fetch(
            queries.LIST_JOBS, args.state, args.queue, None, args.before, args.limit
        )
        if args.json:
            for row in rows:
                print(json.dumps(_jsonable(row), default=str))
            return 0
        print(
            _table(
                ["ID", "QUEUE", "KIND", "STATE", "ATTEMPTS", "RUN AT (UTC)", "LAST ERROR"],
                [
                    [
                        r["id"],
                        r["queue"],
                        r["kind"],
                        r["state"],
                        r["attempts"],
                        _age(r["run_at"]),
                        (r["last_error"] or "")[:60],
                    ]
                    for r in rows
                ],
            )
        )
        return 0

    return work


def cmd_jobs_show(args: argparse.Namespace) -> Callable[[asyncpg.Connection], Awaitable[int]]:
    async def work(conn: asyncpg.Connection) -> int:
        row = await conn.fetchrow(queries.GET_JOB, args.id)
        if row is None:
            raise StokerError(f"no job with id {args.id}")
        if args.json:
            print(json.dumps(_jsonable(row), default=str, indent=2))
            return 0
        for key, value in row.items():
            if key == "errors":
                continue
            shown = json.dumps(value) if isinstance(value, dict | list) else value
            print(f"{key:>16}: {'-' if shown is None else shown}")
        for err in row["errors"]:
            print(f"\n--- attempt {err.get('attempt')} at {err.get('at')}: {err.get('error')}")
            if err.get("traceback"):
                print(err["traceback"].rstrip())
        return 0

    return work


def cmd_jobs_retry(args: argparse.Namespace) -> Callable[[asyncpg.Connection], Awaitable[int]]:
    async def work(conn: asyncpg.Connection) -> int:
        if not args.ids and not args.all_failed:
            raise UsageError("jobs retry: give job ids, or --all-failed")
        if args.queue and not args.all_failed:
            raise UsageError("jobs retry: --queue goes with --all-failed")
        async with conn.transaction():
            rows = await conn.fetch(queries.RETRY_JOBS, args.ids, args.all_failed, args.queue)
            await conn.execute(queries.NOTIFY_QUEUES, sorted({r["queue"] for r in rows}))
        done = {r["id"] for r in rows}
        missing = [i for i in args.ids if i not in done]
        print(f"retried {len(done)} job(s)")
        if missing:
            print(
                "not retried (no such job; already queued to run now or running; or a live "
                "job holds its unique_key): " + ", ".join(map(str, missing)),
                file=sys.stderr,
            )
            return 1
        return 0

    return work


def cmd_jobs_cancel(args: argparse.Namespace) -> Callable[[asyncpg.Connection], Awaitable[int]]:
    async def work(conn: asyncpg.Connection) -> int:
        cancelled = await conn.fetchval(queries.CANCEL_JOB, args.id, None)
        if cancelled is not None:
            print(f"cancelled job {args.id}")
            return 0
        row = await conn.fetchrow(queries.GET_JOB, args.id)
        if row is None:
            raise StokerError(f"no job with id {args.id}")
        if row["state"] == "active":
            raise StokerError(
                f"job {args.id} is running on {row['worker']}; a running job cannot be cancelled"
            )
        raise StokerError(f"job {args.id} is already {row['state']}")

    return work


def cmd_pause(queue: str, *, paused: bool) -> Callable[[asyncpg.Connection], Awaitable[int]]:
    async def work(conn: asyncpg.Connection) -> int:
        await conn.execute(queries.SET_PAUSED, queue, paused)
        print(f"queue {queue} {'paused: no daemon claims from it' if paused else 'resumed'}")
        return 0

    return work


async def cmd_status(conn: asyncpg.Connection) -> int:
    paused = {r["name"] for r in await conn.fetch(queries.PAUSED_QUEUES)}
    rows = await conn.fetch(queries.QUEUE_STATUS)
    queues: dict[str, dict[str, Any]] = {}
    for r in rows:
        entry = queues.setdefault(r["queue"], {s: 0 for s in STATES} | {"oldest": None})
        entry[r["state"]] += r["jobs"]  # parked jobs add to history's of the same state
        if r["oldest_due_s"] is not None:
            entry["oldest"] = float(r["oldest_due_s"])
    for name in paused:
        queues.setdefault(name, {s: 0 for s in STATES} | {"oldest": None})
    table = [
        [
            f"{q} (paused)" if q in paused else q,
            *(v[s] for s in STATES),
            "-" if v["oldest"] is None else f"{v['oldest']:.1f}s",
        ]
        for q, v in sorted(queues.items())
    ]
    print(_table(["QUEUE", *(s.upper() for s in STATES), "OLDEST DUE"], table))
    return 0


def _when(value: datetime | None) -> str:
    return "-" if value is None else value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")


def cmd_schedules(
    settings: Settings, args: argparse.Namespace
) -> Callable[[asyncpg.Connection], Awaitable[int]]:
    async def work(conn: asyncpg.Connection) -> int:
        if args.schedules_command == "add":
            return await schedules_add(conn, args)
        if args.schedules_command == "remove":
            if not await delete_schedule(conn, args.name):
                raise StokerError(f"no schedule named {args.name!r} in stoker.schedules")
            print(f"removed schedule {args.name}")
            return 0
        now = await conn.fetchval("SELECT now()")
        rows = await schedule_status(conn, settings.schedules, now)
        if args.json:
            for row in rows:
                print(json.dumps(row, default=str))
            return 0
        holder = await conn.fetchval(cron_queries.LEADER, APPLICATION_PREFIX)
        print(f"leader: {holder.removeprefix(APPLICATION_PREFIX) if holder else 'none'}")
        table = [
            [
                r["name"],
                r["source"],
                "yes" if r["enabled"] else "no",
                r["cron"],
                r["timezone"],
                _when(r["last_tick"]),
                f"{r['last_job_id']} {r['last_job_state']}" if r["last_job_id"] else "-",
                "-" if r["last_duration_s"] is None else f"{r['last_duration_s']:.1f}s",
                r["fired"],
                r["skipped"],
                _when(r["next_tick"]),
            ]
            for r in rows
        ]
        print(
            _table(
                [
                    "NAME",
                    "SOURCE",
                    "ENABLED",
                    "CRON",
                    "TIMEZONE",
                    "LAST TICK (UTC)",
                    "LAST JOB",
                    "TOOK",
                    "FIRED",
                    "SKIPPED",
                    "NEXT TICK (UTC)",
                ],
                table,
            )
        )
        return 0

    return work


async def schedules_add(conn: asyncpg.Connection, args: argparse.Namespace) -> int:
    if not isinstance(args.payload, dict) or not isinstance(args.meta, dict):
        raise UsageError("--payload and --meta must be JSON objects, e.g. '{\"org\": 42}'")
    try:
        await save_schedule(
            conn,
            name=args.name,
            cron=args.cron,
            kind=args.kind,
            timezone=args.timezone,
            queue=args.queue,
            payload=args.payload,
            meta=args.meta,
            enabled=not args.disabled,
            catch_up=args.catch_up,
            max_catch_up=args.max_catch_up,
            overlap=args.overlap,
            description=args.description,
        )
    except ValidationError as exc:
        reasons = "; ".join(str(e.get("msg")) for e in exc.errors())
        raise UsageError(f"schedule {args.name!r}: {reasons}") from None
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    print(f"saved schedule {args.name}")
    return 0


def cmd_trigger(
    settings: Settings, args: argparse.Namespace
) -> Callable[[asyncpg.Connection], Awaitable[int]]:
    async def work(conn: asyncpg.Connection) -> int:
        schedules = await load_schedules(conn, settings.schedules)
        schedule = schedules.get(args.name)
        if schedule is None:
            known = ", ".join(sorted(schedules)) or "none"
            raise StokerError(f"no schedule named {args.name!r} (known: {known})")
        job_id = await trigger(conn, schedule)
        print(job_id)
        return 0

    return work
