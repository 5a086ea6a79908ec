"""Request and response models of the admin API: validation of what comes in, and the
schemas /openapi.json publishes for what goes out."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, AwareDatetime, BaseModel, BeforeValidator, ConfigDict, Field

from daemon.config import QUEUE_NAME
from daemon.operate.jobs import State
from daemon.store.db import json_problem, text_problem

BIGINT_MAX = 2**63 - 1


def _jsonb_safe(value: dict[str, Any]) -> dict[str, Any]:
    # What PostgreSQL would refuse (NaN, NUL, lone surrogates) is refused here, naming the
    # field, instead of failing in the database as a 500.
    problem = json_problem(value)
    if problem:
        raise ValueError(problem)
    return value


def _text_safe(value: str) -> str:
    problem = text_problem(value)
    if problem:
        raise ValueError(problem)
    return value


JsonObject = Annotated[dict[str, Any], AfterValidator(_jsonb_safe)]
QueueName = Annotated[str, Field(pattern=QUEUE_NAME.pattern)]
Kind = Annotated[str, Field(min_length=1, max_length=200), AfterValidator(_text_safe)]
# an index key: PostgreSQL refuses btree entries much larger than 2 kB
UniqueKey = Annotated[str, Field(min_length=1, max_length=1000), AfterValidator(_text_safe)]
# as jobs.concurrency_key's check
ConcurrencyKey = Annotated[str, Field(min_length=1, max_length=200), AfterValidator(_text_safe)]


class EnqueueRequest(BaseModel):
    # strict: a JSON "5" is not a priority; JSON strings still parse as datetimes
    model_config = ConfigDict(extra="forbid", strict=True)

    queue: QueueName
    kind: Kind
    payload: JsonObject = Field(default_factory=dict)
    run_at: AwareDatetime | None = Field(None, description="ISO 8601 with a zone; default now")
    priority: int = Field(0, ge=-32768, le=32767, description="higher runs first")
    unique_key: UniqueKey | None = Field(None, description="skip if held")
    max_attempts: int | None = Field(None, ge=1, le=2**31 - 1)
    meta: JsonObject = Field(default_factory=dict)
    concurrency_key: ConcurrencyKey | None = Field(
        None, description="what the queue's key_concurrency and rate_limit_by_key count per"
    )


class JobsQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")  # lax: query values arrive as text

    state: State | None = None
    queue: QueueName | None = None
    kind: Kind | None = None
    limit: int = Field(50, ge=1, le=500)
    before: int | None = Field(None, ge=1, le=BIGINT_MAX, description="only smaller ids")


class JobsCountQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")  # lax: query values arrive as text

    state: State | None = None
    queue: QueueName | None = None
    kind: Kind | None = None


class JobCount(BaseModel):
    count: int


class Created(BaseModel):
    id: int


class Job(BaseModel):
    id: int
    queue: str
    kind: str
    payload: Any
    meta: dict[str, Any]
    priority: int
    state: State
    run_at: datetime
    attempts: int
    max_attempts: int | None
    unique_key: str | None
    worker: str | None
    lease_expires_at: datetime | None
    last_error: str | None
    errors: list[dict[str, Any]]
    result: Any
    progress: Any
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    concurrency_key: str | None
    cancel_requested_at: datetime | None = Field(description="a running job asked to stop")
    cancel_requested_by: str | None


class JobPage(BaseModel):
    jobs: list[Job]
    next_before: int | None = Field(description="pass as ?before= for the next page")


class Retried(BaseModel):
    retried: bool


class Cancelled(BaseModel):
    cancelled: bool  # a queued job: cancelled now
    cancel_requested: bool  # a running job: its daemon stops it, and it ends cancelled


class QueueLimitsInfo(BaseModel):
    global_concurrency: int | None
    key_concurrency: int | None
    rate_limit: str | None = Field(description='starts per window, such as "50/1s"')
    rate_limit_by_key: bool
    running: int = Field(description="jobs of the queue active now, all daemons")
    keys_at_limit: int = Field(description="concurrency keys with key_concurrency jobs active")
    rate_window_starts: int = Field(
        description="starts in the current rate window (per key: the busiest key's)"
    )
    held_back: int = Field(description="due jobs waiting because a limit is reached")


class DaemonRefInfo(BaseModel):
    worker: str
    host: str
    pid: int


class LimitsVariantInfo(BaseModel):
    limits: dict[str, Any] = Field(
        description="global_concurrency, key_concurrency, rate_limit and rate_limit_by_key, as "
        "these daemons are configured"
    )
    workers: list[DaemonRefInfo] = Field(description="the live daemons configured so")


class QueueInfo(BaseModel):
    name: str
    paused: bool
    counts: dict[State, int]
    oldest_due_s: float | None
    limits: QueueLimitsInfo | None = Field(
        description="the queue's limits and its standing; null for a queue without limits"
    )
    limits_mismatch: list[LimitsVariantInfo] | None = Field(
        description="each configuration the live daemons serving the queue have, when their "
        "limits differ (the limit that holds then depends on which daemon claims: configure "
        "them alike); null when they agree"
    )


class QueueList(BaseModel):
    queues: list[QueueInfo]


class QueuePaused(BaseModel):
    name: str
    paused: bool


class ScheduleInfo(BaseModel):
    name: str
    source: Literal["config", "db"]
    enabled: bool
    cron: str
    timezone: str
    kind: str
    queue: str
    last_tick: datetime | None
    last_job_id: int | None
    last_job_state: State | None
    last_duration_s: float | None
    fired: int
    skipped: int
    next_tick: datetime | None
    description: str

    last_success: datetime | None = Field(description="when the newest succeeded run finished")
    consecutive_failures: int = Field(description="runs failed for good since the last success")
    late: bool = Field(
        description="the newest fired tick's job has not started a minute after its tick, or "
        "the next tick is a minute overdue and no leader has handled it"
    )
    missed: bool = Field(description="the newest tick was passed over by the catch-up policy")
    paused: bool = Field(
        default=False, description="paused by an operator: no tick fires until resumed"
    )
    paused_at: datetime | None = Field(default=None, description="when it was paused")
    paused_by: str | None = Field(default=None, description="who paused it (dashboard, ...)")


class ScheduleList(BaseModel):
    schedules: list[ScheduleInfo]


def _plus_sign(value: Any) -> Any:
    # A "+01:00" written unescaped into a query string arrives as " 01:00".
    if isinstance(value, str):
        return re.sub(r" (\d\d(?::?\d\d)?)$", r"+\1", value)
    return value


def _in_range(value: datetime | None) -> datetime | None:
    # PostgreSQL (and asyncpg) take years 1 to 9999 in UTC: 0001-01-01T00:00:00+01:00 is not.
    if value is None:
        return None
    try:
        return value.astimezone(UTC)
    except OverflowError:
        raise ValueError("is out of range: give a time between years 1 and 9999 in UTC") from None


class RunsQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")  # lax: query values arrive as text

    limit: int = Field(50, ge=1, le=500)
    before: Annotated[
        AwareDatetime | None, BeforeValidator(_plus_sign), AfterValidator(_in_range)
    ] = Field(
        None, description="only runs with an earlier tick (ISO 8601 with a zone): next_before"
    )


class Run(BaseModel):
    tick: datetime = Field(description="the tick; for a run by hand, when it was asked for")
    status: Literal["fired", "caught_up", "skipped", "missed", "manual"]
    reason: str | None
    job_id: int | None
    state: State | None = Field(description="the job's state: queued, active, or how it ended")
    started_at: datetime | None
    finished_at: datetime | None
    duration_s: float | None
    error: str | None


class RunPage(BaseModel):
    runs: list[Run]
    next_before: datetime | None = Field(description="pass as ?before= for the next page")


class FieldError(BaseModel):
    loc: str
    msg: str


class ErrorBody(BaseModel):
    error: str
    fields: list[FieldError] | None = None


# -- errors and JSON ------------------------------------------------------------------------
