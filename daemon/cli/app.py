"""The `stoker` command: run the daemon, migrate, and operate on jobs through the database."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import asyncpg

from daemon.cli.alerts import cmd_alerts
from daemon.cli.args import EXIT_USAGE, UsageError, build_parser
from daemon.cli.commands import (
    cmd_enqueue,
    cmd_jobs_cancel,
    cmd_jobs_list,
    cmd_jobs_retry,
    cmd_jobs_show,
    cmd_migrate,
    cmd_pause,
    cmd_run,
    cmd_schedules,
    cmd_status,
    cmd_trigger,
    with_connection,
)
from daemon.config import Settings, default_config_paths, load_settings
from daemon.errors import StokerError


def dispatch(settings: Settings, args: argparse.Namespace) -> int:
    if args.command == "run":
        return cmd_run(settings, args)
    work: Callable[[asyncpg.Connection], Awaitable[int]]
    if args.command == "migrate":
        work = cmd_migrate
    elif args.command == "enqueue":
        work = cmd_enqueue(args)
    elif args.command == "status":
        work = cmd_status(settings)
    elif args.command in ("pause", "resume"):
        work = cmd_pause(args.queue, paused=args.command == "pause")
    elif args.command == "schedules":
        work = cmd_schedules(settings, args)
    elif args.command == "trigger":
        work = cmd_trigger(settings, args)
    elif args.command == "alerts":
        work = cmd_alerts(settings, args)
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
        settings = load_settings(args.config or default_config_paths(), **overrides)
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
