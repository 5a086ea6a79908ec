"""Schedules: every schedule with its recent runs, and one schedule's run ledger with a chart of
its durations; Run now, Pause and Resume. Everything is read through daemon.operate: the status
and health of every schedule, one indexed probe of the ledger per schedule for the strips, one
page of one schedule's ledger."""

from __future__ import annotations

import functools
from datetime import UTC, datetime
from typing import Any

from aiohttp import web
from cron_descriptor import ExpressionDescriptor, Options  # type: ignore[import-untyped]

from daemon.operate import schedules as operate
from daemon.operate.errors import NotFound
from daemon.web.dashboard.render import DB, SETTINGS, render
from daemon.web.dashboard.security import action
from daemon.web.dashboard.session import Session

routes = web.RouteTableDef()

STRIP = 30  # runs in each schedule's strip
PAGE = 50  # ledger entries on a schedule's page
# Who a run by hand or a pause from here is recorded as (the ledger says "by hand: dashboard").
BY = "dashboard"


@functools.lru_cache(maxsize=1024)
def describe(expr: str) -> str:
    """A cron expression in words ("At 09:30, Monday through Friday"), or the expression itself
    when it cannot be described. Six fields are seconds first, as the scheduler reads them:
    given to the describer with a year field, so that the sixth is never taken for a year."""
    fields = expr.split()
    if len(fields) == 6:
        fields.append("*")
    options = Options()
    options.use_24hour_time_format = True
    try:
        words = ExpressionDescriptor(" ".join(fields), options).get_description()
    except Exception:  # the describer raises its own kinds of error, and not only those
        return expr
    return str(words) if words else expr


def cell_class(run: dict[str, Any]) -> str:
    """What a run's cell is coloured by: its job's state, else skipped or missed."""
    if run["status"] in ("skipped", "missed"):
        return str(run["status"])
    return str(run["state"] or "queued")


def flags(row: dict[str, Any]) -> list[str]:
    found = [f for f in ("paused", "late", "missed") if row.get(f)]
    if row.get("consecutive_failures"):
        found.append("failing")
    return found


def chart(runs: list[dict[str, Any]], width: int = 600, height: int = 120) -> dict[str, Any]:
    """A bar per run, oldest on the left, as tall as it ran (runs without a duration get a
    stub), for an inline SVG drawn with classes only (the CSP allows no style attribute)."""
    ordered = list(reversed(runs))
    longest = max((r["duration_s"] or 0.0 for r in ordered), default=0.0) or 1.0
    step = width / max(len(ordered), 1)
    bars = []
    for i, run in enumerate(ordered):
        took = run["duration_s"]
        h = max(2.0, (took / longest) * (height - 14)) if took else 2.0
        bars.append(
            {
                "x": round(i * step + step * 0.1, 2),
                "y": round(height - h, 2),
                "w": round(max(step * 0.8, 1.0), 2),
                "h": round(h, 2),
                "cls": cell_class(run),
                "run": run,
            }
        )
    return {"width": width, "height": height, "bars": bars, "longest": longest}


@routes.get("/schedules", name="schedules")
async def schedules_page(request: web.Request) -> web.Response:
    settings = request.app[SETTINGS]
    async with request.app[DB].acquire() as conn:
        rows = await operate.schedule_status(conn, settings.schedules)
        strips = await operate.recent_runs(conn, [r["name"] for r in rows], STRIP)
        leader = await operate.leader(conn)
    for row in rows:
        row["words"] = describe(row["cron"])
        row["flags"] = flags(row)
        row["strip"] = list(reversed(strips.get(row["name"], [])))  # oldest first
    return render(
        request,
        "schedules.html.j2",
        title="Schedules",
        schedules=rows,
        leader=leader,
        cell_class=cell_class,
    )


def _before(request: web.Request) -> datetime | None:
    given = request.query.get("before")
    if not given:
        return None
    try:
        moment = datetime.fromisoformat(given.replace(" ", "+"))
    except ValueError:
        raise web.HTTPBadRequest(reason="before must be an ISO 8601 moment") from None
    if moment.tzinfo is None:
        raise web.HTTPBadRequest(reason="before must carry its UTC offset")
    try:
        return moment.astimezone(UTC)
    except OverflowError:
        raise web.HTTPBadRequest(reason="before must be between years 1 and 9999 in UTC") from None


@routes.get("/schedules/{name}", name="schedule")
async def schedule_page(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    before = _before(request)
    settings = request.app[SETTINGS]
    async with request.app[DB].acquire() as conn:
        try:
            runs = await operate.schedule_history(conn, settings.schedules, name, PAGE + 1, before)
        except NotFound:
            return render(
                request, "schedule.html.j2", status=404, title="No such schedule", missing=name
            )
        rows = await operate.schedule_status(conn, settings.schedules)
    more = len(runs) > PAGE
    runs = runs[:PAGE]
    row = next((r for r in rows if r["name"] == name), None)
    if row is not None:
        row["words"] = describe(row["cron"])
        row["flags"] = flags(row)
    return render(
        request,
        "schedule.html.j2",
        title=f"Schedule {name}",
        missing=None,
        name=name,
        schedule=row,
        runs=runs,
        chart=chart(runs),
        cell_class=cell_class,
        older=runs[-1]["tick"].isoformat() if more and runs else None,
        paged=before is not None,
    )


@routes.post("/schedules/{name}/run", name="schedule_run")
@action("schedule.run_now")
async def run_now(
    request: web.Request, session: Session, form: dict[str, str]
) -> tuple[str, dict[str, Any]]:
    name = request.match_info["name"]
    async with request.app[DB].acquire() as conn:
        try:
            job_id = await operate.trigger_schedule(
                conn, request.app[SETTINGS].schedules, name, by=BY
            )
        except NotFound:
            raise web.HTTPNotFound(reason="No such schedule") from None
    return name, {"job_id": job_id}


@routes.post("/schedules/{name}/pause", name="schedule_pause")
@action("schedule.pause")
async def pause(
    request: web.Request, session: Session, form: dict[str, str]
) -> tuple[str, dict[str, Any]]:
    name = request.match_info["name"]
    async with request.app[DB].acquire() as conn:
        try:
            since = await operate.pause_schedule(
                conn, request.app[SETTINGS].schedules, name, by=f"{BY} ({session.role})"
            )
        except NotFound:
            raise web.HTTPNotFound(reason="No such schedule") from None
    return name, {"paused_at": since.isoformat()}


@routes.post("/schedules/{name}/resume", name="schedule_resume")
@action("schedule.resume")
async def resume(
    request: web.Request, session: Session, form: dict[str, str]
) -> tuple[str, dict[str, Any]]:
    name = request.match_info["name"]
    async with request.app[DB].acquire() as conn:
        try:
            resumed = await operate.resume_schedule(conn, request.app[SETTINGS].schedules, name)
        except NotFound:
            raise web.HTTPNotFound(reason="No such schedule") from None
    return name, {"was_paused": resumed}
