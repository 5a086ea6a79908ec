"""sql.report: run a configured read-only query and send its rows through an email template.

The query is only ever taken from `[reports.NAME]`, never from a payload; its `:name`
placeholders are bound as values, as in sql.batch, and a payload may override declared params
only. The rows do not travel by SMTP from here: the report enqueues one `email.send` job in the
same transaction that read them, so the email is durable and retried on its own, and a report
whose email job was committed never enqueues a second one when it runs again."""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import json
import math
import uuid
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import asyncpg
import jinja2
import jinja2.sandbox
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from daemon import JobContext, PermanentJobError, Settings, handler, resource
from daemon.config import ReportConfig
from handlers.email import Mailer, SendEmail
from handlers.entries import configured_entry, with_declared_params
from handlers.params import bind, typed_args

# The email job of a report job carries its id here (in stoker.jobs.meta, then job_history's).
REPORT_JOB_KEY = "report_job_id"

# Serialises the attempts of one report job (a worker whose lease ran out may still be running
# when the rescued job starts again), so that only one of them can enqueue the email: the
# second waits for the first to commit, then finds its email job. The key is a 64-bit hash
# of the job id: a clash with some other advisory lock (about 1 in 2**64) would make that one
# report wait for it, under its statement_timeout.
LOCK = "SELECT pg_advisory_xact_lock(hashtextextended('stoker sql.report', $1::bigint))"

# An earlier attempt's email job. Unique keys cannot say this: they hold only while a job is
# queued or active, and a retry may come after the email was sent (the daemon died before it
# recorded the report's outcome). all_jobs covers live, parked and finished jobs; the email job
# was enqueued after the report job, so its id is larger, which keeps the scan of history to
# the jobs created since (history is purged after history_retention_days).
EARLIER_EMAIL = f"""
SELECT id, payload->'context'->'count' AS count, payload->'context'->'truncated' AS truncated
  FROM stoker.all_jobs
 WHERE id > $1::bigint AND kind = 'email.send'
   AND meta @> jsonb_build_object('{REPORT_JOB_KEY}', $1::bigint)
 ORDER BY id
 LIMIT 1
"""

# The email job, its payload and meta given as JSON text (encoded off the event loop; the
# Python enqueue() would encode the payload again, on the loop), through the SQL API.
ENQUEUE_EMAIL = "SELECT stoker.enqueue($1, 'email.send', $2::text::jsonb, meta => $3::text::jsonb)"

# What the configuration cannot fix by waiting: the query is wrong, refers to something that
# is not there, is not allowed, is given values of the wrong type, or tries to write.
PERMANENT_ERRORS: tuple[type[Exception], ...] = (
    asyncpg.SyntaxOrAccessError,
    asyncpg.DataError,
    asyncpg.InvalidTransactionStateError,  # 25006: cannot execute INSERT in a read-only ...
    asyncpg.FeatureNotSupportedError,
)


@dataclass(frozen=True)
class Reports:
    """The configured [reports], and the payload limit of each queue this daemon knows."""

    reports: dict[str, ReportConfig]
    max_payload_bytes: dict[str, int] = field(default_factory=dict)


class RunReport(BaseModel):
    model_config = ConfigDict(extra="forbid")
    report: str = Field(min_length=1)
    params: dict[str, str | int | float | bool | None] = Field(default_factory=dict)


@resource(Reports)
@asynccontextmanager
async def configured_reports(settings: Settings) -> AsyncIterator[Reports]:
    limits = {name: queue.max_payload_bytes for name, queue in settings.queues.items()}
    yield Reports(dict(settings.reports), limits)


@handler("sql.report", payload=RunReport)
async def run_report(ctx: JobContext, run: RunReport) -> dict[str, Any]:
    reports = ctx.resource(Reports)
    configured = reports.reports
    report = configured_entry(configured, run.report, field="report", section="reports")
    values = with_declared_params("report", run.report, report.params, run.params)
    query, args = bind(report.query, values)
    mailer = ctx.resource(Mailer)
    # The client waits a little longer than the server, so the server's timeout is what ends
    # a slow query (and the pool's default command timeout does not cut a longer one short).
    wait = report.statement_timeout + 5
    async with ctx.db.acquire() as conn, conn.transaction():
        generated_at = await conn.fetchval(
            "SELECT now() FROM set_config('statement_timeout', $1, true)",
            f"{max(1, round(report.statement_timeout * 1000))}ms",  # 0 would mean none
            timeout=wait,
        )
        await conn.execute(LOCK, ctx.id, timeout=wait)
        earlier = await conn.fetchrow(EARLIER_EMAIL, ctx.id, timeout=wait)
        if earlier is not None:
            ctx.log.info("report %s: email job %s was enqueued before", run.report, earlier["id"])
            return result(run.report, earlier["count"] or 0, earlier["truncated"], earlier["id"])
        columns, records, truncated = await _read(conn, run.report, report, query, args, wait)
        if not records and report.skip_when_empty:
            ctx.log.info("report %s: no rows, nothing sent", run.report)
            return result(run.report, 0, False, None)
        # Converting, measuring, validating and rendering up to max_rows rows takes a while
        # (about half a second for 100 000): all of it in one thread, off the event loop.
        payload = await asyncio.to_thread(
            _email_payload,
            mailer,
            ctx.id,
            run.report,
            report,
            values,
            columns,
            records,
            truncated,
            generated_at,
            reports.max_payload_bytes,
        )
        meta = json.dumps({"report": run.report, REPORT_JOB_KEY: ctx.id}, ensure_ascii=False)
        email_id: int = await conn.fetchval(ENQUEUE_EMAIL, report.email_queue, payload, meta)
    ctx.log.info(
        "report %s: %d rows%s, email job %s",
        run.report,
        len(records),
        " (truncated)" if truncated else "",
        email_id,
    )
    return result(run.report, len(records), truncated, email_id)


def result(report: str, rows: int, truncated: bool, email_job_id: int | None) -> dict[str, Any]:
    return {
        "report": report,
        "rows": rows,
        "truncated": bool(truncated),
        "email_job_id": email_job_id,
        "skipped": email_job_id is None,
    }


async def _read(
    conn: asyncpg.Connection,
    name: str,
    report: ReportConfig,
    query: str,
    args: list[Any],
    wait: float,
) -> tuple[list[str], list[asyncpg.Record], bool]:
    """Run the query read-only: its column names, at most max_rows rows (as read: converting
    them is left to _email_payload, off the event loop), and whether more were left out.

    Read-only holds for this query alone: `SET LOCAL transaction_read_only = on` inside a
    savepoint, undone by ROLLBACK TO SAVEPOINT (PostgreSQL restores the GUC to its value at
    the savepoint), after which the same transaction may write the email job. Inside a
    subtransaction PostgreSQL refuses any attempt to turn read-write back on ("cannot set
    transaction read-write mode inside a read-only transaction"), so the query cannot lift the
    restriction itself (set_config in a subquery, a function), and the rollback undoes
    anything it could still do (temporary tables). Prepared statements take one command
    only, so nothing can follow the query either."""
    await conn.execute("SAVEPOINT report_query", timeout=wait)
    await conn.execute("SET LOCAL transaction_read_only = on", timeout=wait)
    try:
        statement = await conn.prepare(query, timeout=wait)
        args = typed_args(f"report {name!r}", statement.get_parameters(), args)
        columns = [attribute.name for attribute in statement.get_attributes()]
        doubled = sorted({c for c in columns if columns.count(c) > 1})
        if doubled:
            raise PermanentJobError(
                f"report {name!r}: the query returns more than one column named "
                f"{', '.join(doubled)}; give each column a name of its own (AS ...)"
            )
        cursor = await statement.cursor(*args, timeout=wait)
        fetched = await cursor.fetch(report.max_rows + 1, timeout=wait)
    except asyncpg.QueryCanceledError as exc:  # statement_timeout: perhaps quicker later
        raise RuntimeError(f"report {name!r} timed out: {exc}") from exc
    except PERMANENT_ERRORS as exc:
        raise PermanentJobError(f"report {name!r}: {type(exc).__name__}: {exc}") from exc
    await conn.execute("ROLLBACK TO SAVEPOINT report_query", timeout=wait)
    truncated = len(fetched) > report.max_rows
    return columns, fetched[: report.max_rows], truncated


def _email_payload(
    mailer: Mailer,
    job_id: int,
    name: str,
    report: ReportConfig,
    values: dict[str, Any],
    columns: list[str],
    records: list[asyncpg.Record],
    truncated: bool,
    generated_at: dt.datetime,
    limits: dict[str, int],
) -> str:
    """The report's email job payload as JSON text, its rows made JSON-safe, checked against
    its queue's max_payload_bytes and rendered as email.send will. Blocking: run in a thread."""
    rows = [
        {column: json_safe(value, column) for column, value in zip(columns, record, strict=True)}
        for record in records
    ]
    context = {
        "report": name,
        "description": report.description,
        "columns": columns,
        "rows": rows,
        "count": len(rows),
        "truncated": truncated,
        "params": {param: json_safe(value, param) for param, value in values.items()},
        "generated_at": generated_at.isoformat(timespec="seconds"),
    }
    payload: dict[str, Any] = {"to": report.to, "template": report.template}
    payload["context"] = context
    if report.subject is not None:
        payload["subject"] = render_subject(name, report.subject, context)
    # As PostgreSQL prints jsonb, which is what the engine measures; jsonb takes it as it is.
    text = json.dumps(payload, ensure_ascii=False, allow_nan=False)
    _check_size(name, report, text, limits)
    _check_email(mailer, job_id, name, payload)
    return text


def render_subject(name: str, source: str, context: dict[str, Any]) -> str:
    """The configured subject, rendered in a sandbox with the report's context, on one line."""
    environment = jinja2.sandbox.SandboxedEnvironment(
        undefined=jinja2.StrictUndefined, autoescape=False
    )
    try:
        text = environment.from_string(source).render(context)
    except jinja2.TemplateError as exc:
        raise PermanentJobError(f"report {name!r}: subject {source!r}: {exc}") from exc
    subject = " ".join(text.split())
    if not subject:
        raise PermanentJobError(f"report {name!r}: subject {source!r} renders empty")
    return subject


def _check_size(name: str, report: ReportConfig, payload: str, limits: dict[str, int]) -> None:
    """An email job whose payload (JSON text) its queue would refuse (max_payload_bytes) fails
    the report instead, when this daemon knows the queue."""
    limit = limits.get(report.email_queue)
    if limit is None:
        return
    size = len(payload.encode())
    if size > limit:
        raise PermanentJobError(
            f"report {name!r}: its email job's payload would be about {size} bytes, over "
            f"max_payload_bytes ({limit}) of queue {report.email_queue!r}; lower max_rows "
            f"({report.max_rows}), select fewer or shorter columns, or raise the limit"
        )


def _check_email(mailer: Mailer, job_id: int, name: str, payload: dict[str, Any]) -> None:
    """Render the message as email.send will, so that a missing template, a broken one, or a
    variable it needs and the rows lack, fails the report, where it was configured, instead
    of its email job. Blocking (a large table takes a while to render): run in a thread."""
    try:
        mail = SendEmail.model_validate(payload)
        mailer.compose(job_id, mail)
    except PermanentJobError as exc:
        raise PermanentJobError(f"report {name!r}: email: {exc}") from exc
    except (ValidationError, ValueError) as exc:  # an address the email library refuses
        raise PermanentJobError(f"report {name!r}: email: {exc}") from exc


def json_safe(value: Any, column: str) -> Any:
    """A value as JSON can carry it into the email job's payload: numbers stay numbers
    (NUMERIC as exact text), times become ISO 8601 text, UUIDs and addresses text."""
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)  # JSON has no NaN or Infinity
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, dt.date | dt.time):  # datetime is a date
        return value.isoformat()
    if isinstance(value, dt.timedelta):
        return str(value)
    if isinstance(value, uuid.UUID | ipaddress.IPv4Address | ipaddress.IPv6Address):
        return str(value)
    if isinstance(value, ipaddress.IPv4Network | ipaddress.IPv6Network):
        return str(value)
    if isinstance(value, ipaddress.IPv4Interface | ipaddress.IPv6Interface):
        return str(value)
    if isinstance(value, bytes | bytearray | memoryview):
        raise PermanentJobError(
            f"column {column!r} is binary (bytea), which an email cannot show: select it as "
            f"text, e.g. encode({column}, 'hex') AS {column}"
        )
    if isinstance(value, list | tuple):
        return [json_safe(item, column) for item in value]
    if isinstance(value, Mapping | asyncpg.Record):  # jsonb (decoded), composite types
        return {str(key): json_safe(item, column) for key, item in value.items()}
    return str(value)  # ranges, geometric types, money...: their text form


__all__ = ["Reports", "RunReport", "json_safe", "run_report"]
