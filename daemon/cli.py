"""The `stoker` command: run the daemon, migrate, and operate on jobs through the database."""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, NoReturn

import asyncpg
from pydantic import ValidationError

from daemon import queries
from daemon.config import QUEUE_NAME, Settings, default_config_path, load_settings
from daemon.db import connect, redact
from daemon.enqueue import enqueue
from daemon.errors import StokerError
from daemon.migrations import migrate
from daemon.schedules import delete_schedule, load_schedules, save_schedule, trigger
from daemon.schedules import status as schedule_status

EXIT_USAGE = 2
STATES = ("queued", "active", "succeeded", "failed", "cancelled")
RELATIVE = re.compile(r"^\+(\d+(?:\.\d+)?)([smhd])$")
UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


class UsageError(StokerError):
    """A bad command-line argument."""


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        print(f"{self.prog}: error: {message} (see `{self.prog} --help`)", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


# -- argument types ------------------------------------------------------------------------


def json_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON: {exc}") from None


def when(text: str) -> datetime:
    """An ISO 8601 time with a zone, or +N[s|m|h|d] from now."""
    match = RELATIVE.match(text)
    if match:
        try:
            return datetime.now(UTC) + timedelta(seconds=float(match[1]) * UNITS[match[2]])
        except OverflowError:
            raise argparse.ArgumentTypeError(f"{text!r} is too far in the future") from None
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a time: use ISO 8601 with a zone (2026-01-31T09:00:00Z) "
            "or a delay like +30s, +5m, +2h"
        ) from None
    if value.tzinfo is None:
        raise argparse.ArgumentTypeError(
            f"{text!r} has no time zone: add one, e.g. {text}Z or {text}+01:00"
        )
    return value


def queue_name(text: str) -> str:
    if not QUEUE_NAME.match(text):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a valid queue name (1-128 of A-Z a-z 0-9 _ . : -)"
        )
    return text


def priority(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if not -32768 <= value <= 32767:
        raise argparse.ArgumentTypeError(f"{text!r} is out of range (-32768 to 32767)")
    return value


def kind_name(text: str) -> str:
    if not text.strip() or len(text) > 200:
        raise argparse.ArgumentTypeError("a job kind is 1-200 characters, e.g. reports.build")
    return text


def job_id(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a job id (a positive integer)") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a job id (a positive integer)")
    return value


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least 1")
    return value


def build_parser() -> Parser:
    parser = Parser(prog="stoker", description="Background jobs for PostgreSQL.")
    parser.add_argument(
        "--config",
        type=Path,
        help="TOML configuration (default: $STOKER_CONFIG, /etc/stoker/stoker.toml, "
        "deploy/stoker.toml)",
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    run = sub.add_parser("run", help="run the daemon")
    run.add_argument("--no-migrate", action="store_true", help="do not migrate on start")
    run.add_argument("--log-format", choices=["auto", "json", "text"])
    run.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"])

    sub.add_parser("migrate", help="apply pending database migrations")

    enq = sub.add_parser("enqueue", help="enqueue one job")
    enq.add_argument("queue", type=queue_name)
    enq.add_argument("kind", type=kind_name)
    enq.add_argument("--payload", type=json_value, default={}, help="JSON (default {})")
    enq.add_argument("--run-at", type=when, help="ISO 8601 time with zone, or +30s/+5m/+2h")
    enq.add_argument("--priority", type=priority, default=0, help="higher runs first")
    enq.add_argument("--unique-key", help="skip if a live job holds this key")
    enq.add_argument("--max-attempts", type=positive_int)
    enq.add_argument("--meta", type=json_value, default={}, help="JSON object")

    jobs = sub.add_parser("jobs", help="list, show, retry or cancel jobs")
    jsub = jobs.add_subparsers(dest="jobs_command", required=True, parser_class=Parser)
    lst = jsub.add_parser("list", help="newest first")
    lst.add_argument("--state", choices=STATES)
    lst.add_argument("--queue", type=queue_name)
    lst.add_argument("--limit", type=positive_int, default=50)
    lst.add_argument("--before", type=job_id, help="only jobs with a smaller id (paging)")
    lst.add_argument("--json", action="store_true", help="one JSON object per line")
    show = jsub.add_parser("show", help="one job with its errors and tracebacks")
    show.add_argument("id", type=job_id)
    show.add_argument("--json", action="store_true")
    retry = jsub.add_parser("retry", help="run failed/cancelled jobs again, or delayed ones now")
    retry.add_argument("ids", type=job_id, nargs="*")
    retry.add_argument("--all-failed", action="store_true")
    retry.add_argument("--queue", type=queue_name, help="with --all-failed: only this queue")
    cancel = jsub.add_parser("cancel", help="cancel a queued job")
    cancel.add_argument("id", type=job_id)

    sub.add_parser("status", help="jobs per queue and state, oldest due job's age")

    sched = sub.add_parser("schedules", help="list cron schedules; add or remove user schedules")
    sched.add_argument("--json", action="store_true", help="one JSON object per line")
    ssub = sched.add_subparsers(dest="schedules_command", parser_class=Parser)
    add = ssub.add_parser("add", help="create or replace a schedule in stoker.schedules")
    add.add_argument("name")
    add.add_argument("--cron", required=True, help="5 fields, or 6 with seconds first")
    add.add_argument("--kind", required=True, type=kind_name)
    add.add_argument("--timezone", default="UTC")
    add.add_argument("--queue", type=queue_name, default="default")
    add.add_argument("--payload", type=json_value, default={})
    add.add_argument("--meta", type=json_value, default={})
    add.add_argument("--disabled", action="store_true")
    add.add_argument("--catch-up", choices=["skip", "latest", "all"], default="latest")
    add.add_argument("--max-catch-up", type=positive_int, default=10)
    add.add_argument("--overlap", choices=["skip", "allow"], default="skip")
    add.add_argument("--description", default="")
    rm = ssub.add_parser("remove", help="delete a schedule from stoker.schedules")
    rm.add_argument("name")
    trig = sub.add_parser("trigger", help="enqueue a schedule's job now (not counted as a tick)")
    trig.add_argument("name")
    return parser


# -- commands --------------------------------------------------------------------------------


def cmd_run(settings: Settings, args: argparse.Namespace) -> int:
    import uvloop

    from daemon.logs import setup_logging
    from daemon.registry import import_handler_modules
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
    except (
        OSError,
        ValueError,
        asyncpg.PostgresError,
        asyncpg.InterfaceError,
        TimeoutError,
    ) as exc:
        raise StokerError(
            f"cannot connect to the database at {redact(settings.database_url)}: {exc}"
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


def cmd_enqueue(args: argparse.Namespace) -> Callable[[asyncpg.Connection], Awaitable[int]]:
    async def work(conn: asyncpg.Connection) -> int:
        if not isinstance(args.meta, dict):
            raise UsageError("--meta must be a JSON object, e.g. '{\"org\": 42}'")
        new_id = await enqueue(
            conn,
            queue=args.queue,
            kind=args.kind,
            payload=args.payload,
            run_at=args.run_at,
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
        rows = await conn.fetch(queries.LIST_JOBS, args.state, args.queue, args.before, args.limit)
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


async def cmd_status(conn: asyncpg.Connection) -> int:
    rows = await conn.fetch(queries.QUEUE_STATUS)
    queues: dict[str, dict[str, Any]] = {}
    for r in rows:
        entry = queues.setdefault(r["queue"], {s: 0 for s in STATES} | {"oldest": None})
        entry[r["state"]] = r["jobs"]
        if r["oldest_due_s"] is not None:
            entry["oldest"] = float(r["oldest_due_s"])
    table = [
        [q, *(v[s] for s in STATES), "-" if v["oldest"] is None else f"{v['oldest']:.1f}s"]
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
        holder = await conn.fetchval(
            "SELECT application_name FROM pg_stat_activity WHERE application_name LIKE "
            "'stoker-leader %' AND pid IN (SELECT pid FROM pg_locks WHERE locktype = 'advisory' "
            "AND granted) LIMIT 1"
        )
        print(f"leader: {holder.removeprefix('stoker-leader ') if holder else 'none'}")
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


def dispatch(settings: Settings, args: argparse.Namespace) -> int:
    if args.command == "run":
        return cmd_run(settings, args)
    work: Callable[[asyncpg.Connection], Awaitable[int]]
    if args.command == "migrate":
        work = cmd_migrate
    elif args.command == "enqueue":
        work = cmd_enqueue(args)
    elif args.command == "status":
        work = cmd_status
    elif args.command == "schedules":
        work = cmd_schedules(settings, args)
    elif args.command == "trigger":
        work = cmd_trigger(settings, args)
    else:
        work = {
            "list": cmd_jobs_list,
            "show": cmd_jobs_show,
            "retry": cmd_jobs_retry,
            "cancel": cmd_jobs_cancel,
        }[args.jobs_command](args)
    return asyncio.run(with_connection(settings, work))


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    overrides: dict[str, Any] = {}
    if args.command == "run":
        if args.no_migrate:
            overrides["migrate_on_start"] = False
        if args.log_format:
            overrides["log_format"] = args.log_format
        if args.log_level:
            overrides["log_level"] = args.log_level
    try:
        settings = load_settings(args.config or default_config_path(), **overrides)
        return dispatch(settings, args)
    except UsageError as exc:
        print(f"stoker: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except StokerError as exc:
        print(f"stoker: error: {exc}", file=sys.stderr)
        return 1
    except asyncpg.PostgresError as exc:
        print(f"stoker: database error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
