"""The daemon's own sections: queues, schedules and the HTTP server."""

from __future__ import annotations

import json
import re
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from daemon.cron.cronspec import CronSpec

QUEUE_NAME = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


DURATION = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*(ms|s|m|h|d|w)?\s*$")
UNIT_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86_400, "w": 604_800}


def parse_duration(value: Any) -> Any:
    """Seconds as a number, or text such as "90", "90s", "5m", "2h", "30d", "1w"."""
    if isinstance(value, str):
        match = DURATION.match(value)
        if match is None:
            raise ValueError(
                f"{value!r} is not a duration: write seconds (90) or a number with a unit "
                "(500ms, 90s, 5m, 2h, 30d, 1w)"
            )
        return float(match[1]) * UNIT_SECONDS[match[2] or "s"]
    return value


# A duration in seconds, written as a number or as "5m", "2h", "30d".
Seconds = Annotated[float, BeforeValidator(parse_duration)]


class BackoffConfig(Strict):
    """Exponential backoff between attempts: base * 2**(attempt-1), capped, +/- jitter."""

    base: float = Field(1.0, gt=0, description="seconds after the first failure")
    cap: float = Field(600.0, gt=0, le=30 * 86_400, description="longest wait in seconds")
    jitter: float = Field(0.2, ge=0, le=1, description="fraction of spread, 0..1")


RATE_LIMIT = re.compile(r"^\s*([0-9]+)\s*/\s*(.+)$")


class RateLimit(BaseModel):
    """At most `count` starts in any `window` seconds (a sliding window)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    count: int = Field(ge=1, le=1_000_000)
    window: float = Field(ge=0.001, le=86_400, description="seconds")

    def __str__(self) -> str:
        return f"{self.count}/{self.window:g}s"


def parse_rate_limit(value: Any) -> Any:
    """ "100/1m", "10/1s", "5/500ms": starts per window."""
    if isinstance(value, str):
        match = RATE_LIMIT.match(value)
        if match is None:
            raise ValueError(
                f'{value!r} is not a rate limit: write starts/window, such as "100/1m" or "10/1s"'
            )
        count, window = int(match[1]), parse_duration(match[2].strip())
        if not 1 <= count <= 1_000_000:
            raise ValueError(f"{value!r}: the number of starts must be 1 to 1,000,000")
        if not 0.001 <= window <= 86_400:
            raise ValueError(f"{value!r}: the window must be 1ms to 1d")
        return {"count": count, "window": window}
    return value


class QueueConfig(Strict):
    concurrency: int = Field(10, ge=1, le=10_000)
    batch_size: int = Field(100, ge=1, le=10_000)
    timeout: float = Field(300.0, gt=0, description="default handler timeout, seconds")
    max_attempts: int = Field(5, ge=1, le=1000)
    backoff: BackoffConfig = Field(default_factory=BackoffConfig)
    poll_interval: float = Field(2.0, gt=0, le=3600)
    max_payload_bytes: int = Field(
        16 * 1_048_576,
        ge=1024,
        le=512 * 1_048_576,
        description="a larger payload fails its job at once, before it is parsed",
    )
    max_result_bytes: int = Field(
        1_048_576,
        ge=64,
        le=256 * 1_048_576,
        description="a larger result is not stored; the job still succeeds, with a note",
    )
    cancel_grace: Seconds | None = Field(
        None,
        ge=0,
        le=86_400,
        description="seconds a cancelled running job may take to stop before its task is "
        "cancelled; unset: the top-level cancel_grace",
    )
    # The limits hold across every daemon serving the queue (each must be configured alike);
    # see stoker.claim_limited in sql/migrations/019_job_limits.sql.
    global_concurrency: int | None = Field(
        None, ge=1, le=1_000_000, description="most jobs of the queue running at once, all daemons"
    )
    key_concurrency: int | None = Field(
        None, ge=1, le=1_000_000, description="most running jobs per concurrency_key, all daemons"
    )
    rate_limit: Annotated[RateLimit | None, BeforeValidator(parse_rate_limit)] = Field(
        None, description='most starts in any window, "100/1m": a sliding window, all daemons'
    )
    rate_limit_by_key: bool = Field(
        False, description="rate_limit counts each concurrency_key apart (no key: one window)"
    )

    @model_validator(mode="after")
    def _rate_by_key_needs_rate(self) -> QueueConfig:
        if self.rate_limit_by_key and self.rate_limit is None:
            raise ValueError('rate_limit_by_key needs a rate_limit, such as "10/1s"')
        return self

    @property
    def limited(self) -> bool:
        """Does a claim of this queue go through stoker.claim_limited?"""
        return (
            self.global_concurrency is not None
            or self.key_concurrency is not None
            or self.rate_limit is not None
        )


SCHEDULE_NAME = re.compile(r"^[a-z0-9][a-z0-9_.:-]{0,127}$")


class ScheduleConfig(Strict):
    """One cron schedule: every tick enqueues a job of `kind` on `queue`."""

    cron: str = Field(description="5 fields, or 6 with seconds first")
    timezone: str = "UTC"
    kind: str = Field(min_length=1, max_length=200)
    queue: str = "default"
    payload: dict[str, Any] = Field(default_factory=dict)
    meta: dict[str, Any] = Field(default_factory=dict)
    enabled: bool = True
    catch_up: Literal["skip", "latest", "all"] = "latest"
    max_catch_up: int = Field(10, ge=1, le=1000)
    skip_grace: float = Field(
        60.0, ge=0, description='catch_up = "skip": seconds late a tick may still fire'
    )
    overlap: Literal["skip", "allow"] = "skip"
    description: str = ""
    # Called (GET) after each successful run: an outside monitor notices when runs stop.
    ping_url: str | None = Field(None, pattern=r"^https?://", repr=False)

    @model_validator(mode="after")
    def _valid_cron(self) -> ScheduleConfig:
        CronSpec(self.cron, self.timezone)  # raises ValueError naming the expression or zone
        for field in ("payload", "meta"):
            try:
                json.dumps(getattr(self, field), allow_nan=False)
            except ValueError as exc:
                raise ValueError(f"{field} is not valid JSON for PostgreSQL: {exc}") from None
        if not QUEUE_NAME.match(self.queue):
            raise ValueError(f"queue {self.queue!r} is not a valid queue name")
        return self


def checked_schedule(name: str, fields: dict[str, Any]) -> ScheduleConfig:
    """A schedule saved at run time (stoker.schedules), checked as the daemon checks its own:
    ValueError naming each field at fault, never repeating a value (a ping URL may hold a
    token), so a bad schedule never reaches the table, where the leader could only log it."""
    try:
        cfg = ScheduleConfig(**fields)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'schedule'}: {e['msg']}"
            for e in exc.errors(include_url=False, include_input=False)
        )
        raise ValueError(f"invalid schedule {name!r}: {problems}") from None
    if not SCHEDULE_NAME.match(name):
        raise ValueError(f"schedule name {name!r} is not valid: use lowercase a-z 0-9 _ . : -")
    return cfg


class HttpConfig(Strict):
    """The daemon's HTTP server: /health, /ready, /metrics and the admin API."""

    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    # A secret type, so that repr, model_dump and logs never show it; read it as admin_token.
    admin_token_secret: SecretStr | None = Field(
        None,
        alias="admin_token",
        description="bearer token for /api/v1, 16 characters or more; the admin API is off without",
    )

    @field_validator("admin_token_secret", "viewer_token_secret")
    @classmethod
    def _long_token(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value()) < 16:
            raise ValueError("must be at least 16 characters (e.g. from `openssl rand -hex 32`)")
        return value

    @property
    def admin_token(self) -> str | None:
        secret = self.admin_token_secret
        return None if secret is None else secret.get_secret_value()

    viewer_token_secret: SecretStr | None = Field(
        None,
        alias="viewer_token",
        description="a dashboard token that can look but not act, 16 characters or more",
    )

    @model_validator(mode="after")
    def _tokens_differ(self) -> HttpConfig:
        if self.viewer_token is not None and self.viewer_token == self.admin_token:
            raise ValueError("viewer_token must differ from admin_token (it would act as admin)")
        return self

    @property
    def viewer_token(self) -> str | None:
        secret = self.viewer_token_secret
        return None if secret is None else secret.get_secret_value()

    max_body_bytes: int = Field(1_048_576, ge=1024, le=64 * 1_048_576)
    loop_lag_threshold: float = Field(5.0, gt=0, description="seconds blocked before /health fails")
    depth_sample_interval: float = Field(5.0, gt=0, description="queue depth sampling, seconds")
    max_requests_per_second: float = Field(
        100.0,
        gt=0,
        description="admin API requests beyond this wait their turn (probes never do)",
    )
    max_queued_requests: int = Field(
        100,
        ge=0,
        le=100_000,
        description="admin API requests that may wait their turn; beyond, 429 with Retry-After",
    )
