"""What each `stoker` command does. Every command but `run` works on one database
connection; output is a plain table, or JSON lines with --json."""

from __future__ import annotations

import argparse
import getpass
import json
import socket
import sys
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from typing import Any

import asyncpg
from pydantic import ValidationError

from daemon.cli.args import Offset, UsageError
from daemon.config import Settings
from daemon.cron.schedules import delete_schedule, save_schedule
from daemon.enqueue import enqueue
from daemon.errors import StokerError
from daemon.operate import jobs, queues, schedules, workers
from daemon.operate.errors import NotFound
from daemon.operate.jobs import STATES
from daemon.operate.limits import describe, describe_mismatch, mismatch_fix
from daemon.store.db import CONNECT_ERRORS, connect, describe_failure
from daemon.store.migrations import migrate


def cmd_run(settings: Settings, args: argparse.Namespace) -> int:
    import uvloop

    from daemon.engine.registry import import_handler_modules
    from daemon.observe.logs import setup_logging
    from daemon.runtime import Runtime, setup_django

    setup_logging(settings.log_level, settings.log_format)
    setup_django(settings)
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
            concurrency_key=args.concurrency_key,
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
    try:
        meta = jobs.meta_filter(args.meta, field="--meta")
    except ValueError as exc:
        raise UsageError(f"argument {exc}") from None
    if args.count and not meta:
        raise UsageError("jobs list: --count goes with --meta")

    async def work(conn: asyncpg.Connection) -> int:
        if args.count:
            print(await jobs.count_jobs(conn, meta, state=args.state, queue=args.queue))
            return 0
        rows = await jobs.list_jobs(
            conn,
            state=args.state,
            queue=args.queue,
            before=args.before,
            limit=args.limit,
            meta=meta,
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


# Columns most jobs leave empty: printed only when set.
SHOWN_WHEN_SET = frozenset({"concurrency_key", "cancel_requested_at", "cancel_requested_by"})


def cmd_jobs_show(args: argparse.Namespace) -> Callable[[asyncpg.Connection], Awaitable[int]]:
    async def work(conn: asyncpg.Connection) -> int:
        row = await jobs.get_job(conn, args.id)
        if args.json:
            print(json.dumps(_jsonable(row), default=str, indent=2))
            return 0
        for key, value in row.items():
            if key == "errors" or (key in SHOWN_WHEN_SET and value is None):
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
        rows = await jobs.retry_jobs(conn, args.ids, all_failed=args.all_failed, queue=args.queue)
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
        who = f"stoker jobs cancel ({getpass.getuser()}@{socket.gethostname()})"
        answer = await jobs.cancel_job(conn, args.id, by=who)
        if answer == "requested":
            print(
                f"cancel requested for running job {args.id}: its daemon stops it, and it "
                "ends cancelled (`stoker jobs show` tells when)"
            )
        else:
            print(f"cancelled job {args.id}")
        return 0

    return work


def cmd_pause(queue: str, *, paused: bool) -> Callable[[asyncpg.Connection], Awaitable[int]]:
    async def work(conn: asyncpg.Connection) -> int:
        await queues.set_paused(conn, queue, paused)
        print(f"queue {queue} {'paused: no daemon claims from it' if paused else 'resumed'}")
        return 0

    return work


def cmd_status(settings: Settings) -> Callable[[asyncpg.Connection], Awaitable[int]]:
    async def work(conn: asyncpg.Connection) -> int:
        found = await queues.queue_status(
            conn, limits=settings.queues, gone_after=workers.gone_after(settings.lease_seconds)
        )
        table = [
            [
                f"{q['name']} (paused)" if q["paused"] else q["name"],
                *(q["counts"][s] for s in STATES),
                "-" if q["oldest_due_s"] is None else f"{q['oldest_due_s']:.1f}s",
            ]
            for q in found
        ]
        print(_table(["QUEUE", *(s.upper() for s in STATES), "OLDEST DUE"], table))
        # Limits come from this configuration: the daemons' must match it (see the README).
        lines = [f"{q['name']}: {describe(q['limits'])}" for q in found if q["limits"]]
        # Read from the live daemons' rows, whatever this configuration says.
        lines += [
            f"{q['name']}: {describe_mismatch(q['limits_mismatch'])}; {mismatch_fix(q['name'])}"
            for q in found
            if q["limits_mismatch"]
        ]
        if lines:
            print("\nLIMITS (as configured here)", *lines, sep="\n")
        return 0

    return work


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
        if args.schedules_command == "history":
            return await schedules_history(conn, settings, args)
        rows = await schedules.schedule_status(conn, settings.schedules)
        if args.json:
            for row in rows:
                print(json.dumps(row, default=str))
            return 0
        print(f"leader: {await schedules.leader(conn) or 'none'}")
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
                _when(r["last_success"]),
                r["consecutive_failures"],
                ",".join(f for f in ("paused", "late", "missed") if r[f]) or "-",
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
                    "LAST OK (UTC)",
                    "FAILS",
                    "FLAGS",
                    "NEXT TICK (UTC)",
                ],
                table,
            )
        )
        return 0

    return work


def _known(exc: NotFound) -> StokerError:
    known = ", ".join(exc.fields["known"]) or "none"
    return StokerError(f"{exc} (known: {known})")


async def schedules_history(
    conn: asyncpg.Connection, settings: Settings, args: argparse.Namespace
) -> int:
    try:
        runs = await schedules.schedule_history(conn, settings.schedules, args.name, args.limit)
    except NotFound as exc:
        raise _known(exc) from None
    if args.json:
        for run in runs:
            print(json.dumps(_iso(run), default=str))
        return 0
    table = []
    for r in runs:
        note = r["reason"] or ""
        if r["error"]:
            note = f"{note}; error: {r['error']}" if note else f"error: {r['error']}"
        table.append(
            [
                _when(r["tick"]),
                r["status"],
                r["job_id"] or "-",
                r["state"] or "-",
                _when(r["started_at"]),
                "-" if r["duration_s"] is None else f"{r['duration_s']:.1f}s",
                " ".join(note.split())[:100],
            ]
        )
    print(
        _table(
            ["TICK (UTC)", "STATUS", "JOB", "STATE", "STARTED (UTC)", "TOOK", "REASON / ERROR"],
            table,
        )
    )
    return 0


def _iso(row: dict[str, Any]) -> dict[str, Any]:
    return {k: (v.isoformat() if isinstance(v, datetime) else v) for k, v in row.items()}


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
            skip_grace=args.skip_grace,
            ping_url=args.ping_url,
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
        try:
            job_id = await schedules.trigger_schedule(conn, settings.schedules, args.name, by="cli")
        except NotFound as exc:
            raise _known(exc) from None
        print(job_id)
        return 0

    return work
