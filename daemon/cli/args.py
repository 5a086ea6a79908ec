"""The `stoker` command line's grammar: argument types that reject bad input with one clear
line, and the parser."""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, NoReturn

from daemon.cli.alerts import add_alerts_parser
from daemon.config import QUEUE_NAME
from daemon.config.models import parse_duration
from daemon.errors import StokerError
from daemon.operate.jobs import STATES, meta_filter, meta_pair
from daemon.store.db import json_problem

EXIT_USAGE = 2
RELATIVE = re.compile(r"^\+(\d+(?:\.\d+)?)([smhd])$")
UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
MAX_DIGITS = 4300  # Python's own limit for turning text into an int


class UsageError(StokerError):
    """A bad command-line argument."""


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        print(f"{self.prog}: error: {message} (see `{self.prog} --help`)", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


# -- argument types ------------------------------------------------------------------------


def meta_condition(text: str) -> tuple[str, str]:
    """--meta org=org_123: one condition on a job's meta."""
    try:
        pair = meta_pair(text)
        meta_filter([pair])
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return pair


def _no_constant(name: str) -> Any:
    raise ValueError("NaN and Infinity are not JSON (jsonb cannot hold them); use null or a string")


def _finite(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise ValueError(
            f"{text} is too large a number for JSON (it would be Infinity); write it as a string"
        )
    return value


def _integer(text: str) -> int:
    if len(text.lstrip("-")) > MAX_DIGITS:
        raise ValueError(
            f"a number of {len(text)} digits is too large a number here (at most {MAX_DIGITS}); "
            "write it as a string"
        )
    return int(text)


def json_value(text: str) -> Any:
    """JSON that PostgreSQL's jsonb can hold; anything else is refused naming the fix."""
    try:
        value = json.loads(
            text, parse_constant=_no_constant, parse_float=_finite, parse_int=_integer
        )
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON: {exc}") from None
    except RecursionError:
        raise argparse.ArgumentTypeError("nested too deeply; flatten it") from None
    except ValueError as exc:  # the hooks' refusals above
        raise argparse.ArgumentTypeError(str(exc)) from None
    problem = json_problem(value)
    if problem:
        raise argparse.ArgumentTypeError(problem)
    return value


@dataclass(frozen=True)
class Offset:
    """+N[s|m|h|d]: added to the database's now(), not this host's clock, because the
    database's clock decides when a job is due."""

    text: str
    delta: timedelta


def when(text: str) -> datetime | Offset:
    """An ISO 8601 time with a zone, or +N[s|m|h|d] from now."""
    match = RELATIVE.match(text)
    if match:
        try:
            return Offset(text, timedelta(seconds=float(match[1]) * UNITS[match[2]]))
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


def whole_number(text: str, low: int, high: int | None, *, what: str, bounds: str) -> int:
    """`text` as an int from `low` to `high` (None: no upper bound), or an argparse error
    saying `{text} is not {what}` or `{text} {bounds}`."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
    if value < low or (high is not None and value > high):
        raise argparse.ArgumentTypeError(f"{text!r} {bounds}")
    return value


def priority(text: str) -> int:
    return whole_number(
        text, -32768, 32767, what="a whole number", bounds="is out of range (-32768 to 32767)"
    )


def concurrency_key(text: str) -> str:
    """As jobs.concurrency_key's check: 1-200 characters, and text PostgreSQL can store."""
    text = utf8(text)
    if not 1 <= len(text) <= 200 or "\x00" in text:
        raise argparse.ArgumentTypeError("a concurrency key is 1-200 characters, without NUL")
    return text


def utf8(text: str) -> str:
    """Text PostgreSQL can store. Bytes the locale could not decode arrive as lone surrogates
    (surrogateescape), which no text column can hold."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        shown = text.encode("utf-8", "surrogateescape").decode("ascii", "backslashreplace")
        raise argparse.ArgumentTypeError(
            f"'{shown}' is not valid UTF-8: retype it, or set a UTF-8 locale (LANG=C.UTF-8)"
        ) from None
    return text


def kind_name(text: str) -> str:
    if not text.strip() or len(text) > 200:
        raise argparse.ArgumentTypeError("a job kind is 1-200 characters, e.g. reports.build")
    return utf8(text)


def job_id(text: str) -> int:
    what = "a job id (a positive integer)"
    return whole_number(text, 1, None, what=what, bounds=f"is not {what}")


def positive_int(text: str) -> int:
    return whole_number(text, 1, None, what="a whole number", bounds="must be at least 1")


def non_negative_seconds(text: str) -> float:
    """Seconds, as a number or with a unit ("90", "90s", "5m"): never negative (no sign)."""
    try:
        return float(parse_duration(text))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> Parser:
    parser = Parser(prog="stoker", description="Background jobs for PostgreSQL.")
    parser.add_argument(
        "--config",
        type=Path,
        action="append",
        help="TOML configuration; give it again to layer files, later ones overriding earlier "
        "ones key by key (default: $STOKER_CONFIG, ':'-separated, else "
        "/etc/stoker/stoker.toml, else deploy/stoker.toml)",
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
    enq.add_argument("--unique-key", type=utf8, help="skip if a live job holds this key")
    enq.add_argument(
        "--concurrency-key", type=concurrency_key, help="what key_concurrency counts per"
    )
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
    lst.add_argument(
        "--meta",
        type=meta_condition,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="only jobs whose meta has this string value (repeatable: all of them)",
    )
    lst.add_argument("--count", action="store_true", help="with --meta: print how many")
    show = jsub.add_parser("show", help="one job with its errors and tracebacks")
    show.add_argument("id", type=job_id)
    show.add_argument("--json", action="store_true")
    retry = jsub.add_parser("retry", help="run failed/cancelled jobs again, or delayed ones now")
    retry.add_argument("ids", type=job_id, nargs="*")
    retry.add_argument("--all-failed", action="store_true")
    retry.add_argument("--queue", type=queue_name, help="with --all-failed: only this queue")
    cancel = jsub.add_parser("cancel", help="cancel a queued job, or stop a running one")
    cancel.add_argument("id", type=job_id)

    sub.add_parser("status", help="jobs per queue and state, oldest due job's age")
    for verb, text in (
        ("pause", "stop every daemon claiming from a queue"),
        ("resume", "let daemons claim from a paused queue again"),
    ):
        cmd = sub.add_parser(verb, help=text)
        cmd.add_argument("queue", type=queue_name)

    sched = sub.add_parser("schedules", help="list cron schedules; add or remove user schedules")
    sched.add_argument("--json", action="store_true", help="one JSON object per line")
    ssub = sched.add_subparsers(dest="schedules_command", parser_class=Parser)
    add = ssub.add_parser("add", help="create or replace a schedule in stoker.schedules")
    add.add_argument("name", type=utf8)
    add.add_argument("--cron", required=True, type=utf8, help="5 fields, or 6 with seconds first")
    add.add_argument("--kind", required=True, type=kind_name)
    add.add_argument("--timezone", type=utf8, default="UTC")
    add.add_argument("--queue", type=queue_name, default="default")
    add.add_argument("--payload", type=json_value, default={})
    add.add_argument("--meta", type=json_value, default={})
    add.add_argument("--disabled", action="store_true")
    add.add_argument("--catch-up", choices=["skip", "latest", "all"], default="latest")
    add.add_argument("--max-catch-up", type=positive_int, default=10)
    add.add_argument("--overlap", choices=["skip", "allow"], default="skip")
    add.add_argument("--description", type=utf8, default="")
    add.add_argument(
        "--skip-grace",
        type=non_negative_seconds,
        default=60.0,
        help='catch_up "skip": seconds late a tick may still fire (default 60)',
    )
    add.add_argument(
        "--ping-url", type=utf8, default=None, help="GET after each successful run (a monitor)"
    )
    rm = ssub.add_parser("remove", help="delete a schedule from stoker.schedules")
    rm.add_argument("name", type=utf8)
    hist = ssub.add_parser(
        "history", help="a schedule's run ledger, newest first: every tick and run by hand"
    )
    hist.add_argument("name", type=utf8)
    hist.add_argument("--limit", type=positive_int, default=50, help="how many (default 50)")
    hist.add_argument(
        "--json", action="store_true", default=argparse.SUPPRESS, help="one JSON object per line"
    )
    trig = sub.add_parser("trigger", help="enqueue a schedule's job now (not counted as a tick)")
    trig.add_argument("name", type=utf8)
    add_alerts_parser(sub)
    return parser


# -- commands --------------------------------------------------------------------------------
