"""Create or update a runtime schedule (stoker.schedules) from any Python app.

Validated as the daemon validates its own (daemon.config.models.ScheduleConfig, whose cron and
timezone go through daemon.cron.cronspec): a bad schedule raises ValueError naming the field
and never reaches the table, where the leader would only log it."""

from __future__ import annotations

from typing import Any

from daemon.client import statements
from daemon.client.drivers import async_runner, sync_runner
from daemon.client.jobs import _json
from daemon.config.models import checked_schedule
from daemon.cron.cronspec import CronSpec, parse_zone


def _schedule_args(name: str, fields: dict[str, Any]) -> list[Any]:
    # The zone and the expression first, each on its own, so the error names its field
    # (ScheduleConfig checks them together, in a validator of the whole schedule).
    for field, check in (
        ("timezone", lambda: parse_zone(str(fields["timezone"]))),
        ("cron", lambda: CronSpec(str(fields["cron"]))),
    ):
        try:
            check()
        except ValueError as exc:
            raise ValueError(f"invalid schedule {name!r}: {field}: {exc}") from None
    cfg = checked_schedule(name, fields)
    return [
        name,
        cfg.cron,
        cfg.timezone,
        cfg.kind,
        cfg.queue,
        _json(cfg.payload),
        _json(cfg.meta),
        cfg.enabled,
        cfg.catch_up,
        cfg.max_catch_up,
        cfg.overlap,
        cfg.description,
        cfg.skip_grace,
        cfg.ping_url,
    ]


def _fields(
    cron: str,
    kind: str,
    timezone: str,
    queue: str,
    payload: dict[str, Any] | None,
    meta: dict[str, Any] | None,
    options: dict[str, Any],
) -> dict[str, Any]:
    return dict(
        cron=cron,
        kind=kind,
        timezone=timezone,
        queue=queue,
        payload=payload or {},
        meta=meta or {},
        **options,
    )


async def save_schedule(
    conn: Any,
    *,
    name: str,
    cron: str,
    kind: str,
    timezone: str = "UTC",
    queue: str = "default",
    payload: dict[str, Any] | None = None,
    meta: dict[str, Any] | None = None,
    **options: Any,
) -> None:
    """Create or replace schedule `name` in the caller's transaction; running daemons pick it
    up once it commits. `options`: enabled, catch_up, max_catch_up, overlap, description,
    skip_grace, ping_url (as in a [schedules.X] table of the configuration)."""
    args = _schedule_args(name, _fields(cron, kind, timezone, queue, payload, meta, options))
    await async_runner(conn).rows(statements.SAVE_SCHEDULE, args)


def save_schedule_sync(
    conn: Any,
    *,
    name: str,
    cron: str,
    kind: str,
    timezone: str = "UTC",
    queue: str = "default",
    payload: dict[str, Any] | None = None,
    meta: dict[str, Any] | None = None,
    **options: Any,
) -> None:
    """save_schedule on a sync connection."""
    args = _schedule_args(name, _fields(cron, kind, timezone, queue, payload, meta, options))
    sync_runner(conn).rows(statements.SAVE_SCHEDULE, args)
