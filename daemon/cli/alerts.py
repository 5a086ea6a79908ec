"""`stoker alerts`: the open incidents; `stoker alerts test DESTINATION`: a test message.

Wired by daemon/cli/args.py (add_alerts_parser) and daemon/cli/app.py (cmd_alerts), in the
style of daemon/cli/commands.py: the command returns the work to run on one connection."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import asyncpg

from daemon.config import Settings
from daemon.errors import StokerError
from daemon.operate import alerts
from daemon.operate.errors import NotFound

TEST_WAIT = 30.0  # seconds `stoker alerts test` waits for the delivery's outcome


def add_alerts_parser(sub: Any) -> None:
    """`stoker alerts [--all] [--json]` and `stoker alerts test DESTINATION [--no-wait]`."""
    parser = sub.add_parser("alerts", help="open alert incidents; send a test message")
    parser.add_argument("--all", action="store_true", help="closed incidents too (newest first)")
    parser.add_argument("--limit", type=int, default=100)
    parser.add_argument("--json", action="store_true", help="one JSON object per line")
    asub = parser.add_subparsers(dest="alerts_command", parser_class=type(parser))
    test = asub.add_parser("test", help="send a test message to a destination")
    test.add_argument("destination")
    test.add_argument(
        "--no-wait", action="store_true", help="enqueue the message and print its job id"
    )


def _when(value: datetime | None) -> str:
    return "-" if value is None else value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")


def _table(headers: list[str], rows: list[list[Any]]) -> str:
    cells = [headers] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells
    )


def cmd_alerts(
    settings: Settings, args: argparse.Namespace
) -> Callable[[asyncpg.Connection], Awaitable[int]]:
    async def work(conn: asyncpg.Connection) -> int:
        if getattr(args, "alerts_command", None) == "test":
            return await _test(conn, settings, args)
        rows = await alerts.incidents(conn, include_closed=args.all, limit=args.limit)
        if args.json:
            for row in rows:
                print(json.dumps(row, default=str))
            return 0
        if not rows:
            print("no open incidents" if not args.all else "no incidents")
            return 0
        table = [
            [
                r["id"],
                r["rule"],
                r["event"],
                r["subject"],
                _when(r["opened_at"]),
                _when(r["closed_at"]) if r["closed_at"] else "open",
                r["count"],
                _when(r["last_message_at"]),
            ]
            for r in rows
        ]
        headers = ["ID", "RULE", "EVENT", "SUBJECT", "OPENED (UTC)", "CLOSED", "COUNT"]
        print(_table([*headers, "LAST MESSAGE"], table))
        return 0

    return work


async def _test(conn: asyncpg.Connection, settings: Settings, args: argparse.Namespace) -> int:
    config = settings.alerts
    try:
        job_id = await alerts.send_test(conn, config, args.destination)
    except NotFound as exc:
        known = ", ".join(exc.fields["known"]) or "none configured"
        raise StokerError(f"{exc} (known: {known})") from None
    if args.no_wait:
        print(job_id)
        return 0
    deadline = time.monotonic() + TEST_WAIT
    row: dict[str, Any] | None = None
    while time.monotonic() < deadline:
        row = await alerts.delivery(conn, job_id)
        if row is not None and row["state"] in ("succeeded", "failed", "cancelled"):
            break
        await asyncio.sleep(0.2)
    if row is not None and row["state"] == "succeeded":
        print(f"test message delivered to {args.destination} (job {job_id})")
        return 0
    if row is not None and row["state"] == "failed":
        print(f"test message to {args.destination} failed: {row['last_error']}", file=sys.stderr)
        return 1
    attempts = row["attempts"] if row is not None else 0
    error = row["last_error"] if row is not None else None
    if attempts and error:
        detail = f"attempt {attempts} failed: {error}; it will be retried"
    else:
        detail = f"is a daemon running that serves queue {config.queue}?"
    print(
        f"test message to {args.destination} not delivered within {TEST_WAIT:g}s "
        f"(job {job_id}): {detail}",
        file=sys.stderr,
    )
    return 1
