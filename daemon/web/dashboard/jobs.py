"""Jobs: the list with its filters and bulk actions, and one job with its attempts."""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import datetime
from typing import Any
from urllib.parse import urlencode

from aiohttp import web

from daemon.operate import jobs
from daemon.operate.errors import NotFound, OperationRefused
from daemon.web.dashboard.render import DB, render
from daemon.web.dashboard.security import action
from daemon.web.dashboard.session import Session

routes = web.RouteTableDef()

PAGE_SIZE = 50
MAX_PAGE_SIZE = 200
MAX_TEXT = 200
BIGINT_MAX = 2**63 - 1
DIGITS = re.compile(r"[0-9]{1,19}")
FILTER_FIELDS = ("state", "queue", "kind", "meta_key", "meta_value", "error")


def _job_id(text: str) -> int:
    """A job id from a path or a form, or 404: a non-numeric id names no job."""
    if not DIGITS.fullmatch(text) or not 1 <= int(text) <= BIGINT_MAX:
        raise web.HTTPNotFound(reason=f"No job with id {text[:40]!r}"[:200].replace("\n", " "))
    return int(text)


def _text(params: Mapping[str, str], name: str) -> str | None:
    value = params.get(name, "").strip()
    if "\x00" in value:
        raise web.HTTPBadRequest(reason=f"{name} holds a NUL character, which no job can")
    if len(value) > MAX_TEXT:
        raise web.HTTPBadRequest(reason=f"{name} is longer than {MAX_TEXT} characters")
    return value or None


def read_filter(params: Mapping[str, str]) -> tuple[jobs.JobFilter, dict[str, str]]:
    """The filter of a query string (or a form carrying one), and its fields as given."""
    state = _text(params, "state")
    if state is not None and state not in jobs.STATES:
        raise web.HTTPBadRequest(reason=f"state is one of {', '.join(jobs.STATES)}")
    meta_key = _text(params, "meta_key")
    f = jobs.JobFilter(
        states=(state,) if state else (),  # checked above
        queue=_text(params, "queue"),
        kind=_text(params, "kind"),
        meta_key=meta_key,
        meta_value=_text(params, "meta_value") if meta_key else None,
        error=_text(params, "error"),
    )
    given = {k: v for k in FILTER_FIELDS if (v := (_text(params, k) or ""))}
    return f, given


def _page_size(params: Mapping[str, str]) -> int:
    text = params.get("limit", "")
    if DIGITS.fullmatch(text) and 1 <= int(text) <= MAX_PAGE_SIZE:
        return int(text)
    return PAGE_SIZE


def _duration(start: datetime | None, end: datetime | None) -> float | None:
    if start is None or end is None:
        return None
    return (end - start).total_seconds()


@routes.get("/jobs", name="jobs")
async def job_list(request: web.Request) -> web.Response:
    params = request.query
    f, given = read_filter(params)
    limit = _page_size(params)
    before_text = params.get("before", "")
    before = _job_id(before_text) if before_text else None
    async with request.app[DB].acquire() as conn:
        page = await jobs.search_jobs(conn, f, before=before, limit=limit)
    keep = dict(given)
    if limit != PAGE_SIZE:
        keep["limit"] = str(limit)
    next_url = (
        f"/dashboard/jobs?{urlencode({**keep, 'before': page.next_before})}"
        if page.next_before
        else None
    )
    newest_url = f"/dashboard/jobs?{urlencode(keep)}" if before else None
    states = f.states or jobs.STATES
    return render(
        request,
        "jobs.html.j2",
        title="Jobs",
        page=page,
        filters=given,
        states=jobs.STATES,
        next_url=next_url,
        newest_url=newest_url,
        scan_rows=jobs.SCAN_ROWS,
        bulk_max=jobs.BULK_MAX,
        bulk_scan=jobs.SCAN_ROWS * jobs.BULK_SCAN_PAGES,
        can_retry_filter=any(s in jobs.RETRYABLE for s in states),
        can_cancel_filter=any(s in jobs.CANCELLABLE for s in states),
    )


@routes.get("/jobs/{id}", name="job")
async def job_page(request: web.Request) -> web.Response:
    job_id = _job_id(request.match_info["id"])
    async with request.app[DB].acquire() as conn:
        try:
            job = await jobs.get_job(conn, job_id)
        except NotFound as exc:
            raise web.HTTPNotFound(reason=str(exc).capitalize()) from None
    meta: Any = job["meta"]
    schedule = meta.get("schedule") if isinstance(meta, dict) else None
    progress: Any = job["progress"]
    percent = None
    if isinstance(progress, dict) and isinstance(progress.get("percent"), int | float):
        percent = max(0.0, min(100.0, float(progress["percent"])))
    attempts = job["errors"] if isinstance(job["errors"], list) else []
    return render(
        request,
        "job.html.j2",
        title=f"Job {job_id}",
        job=job,
        schedule=schedule if isinstance(schedule, str) else None,
        tick=meta.get("tick") or meta.get("trigger") if isinstance(meta, dict) else None,
        percent=percent,
        progress_message=progress.get("message", "") if isinstance(progress, dict) else "",
        attempts=list(reversed(attempts)),
        waited=_duration(job["run_at"], job["started_at"]),
        ran=_duration(job["started_at"], job["finished_at"]),
        can_retry=job["state"] in jobs.RETRYABLE,
        can_cancel=job["state"] in jobs.CANCELLABLE_ONE,
    )


def _refused(exc: OperationRefused) -> web.HTTPException:
    reason = str(exc).replace("\n", " ")
    if isinstance(exc, NotFound):
        return web.HTTPNotFound(reason=reason)
    return web.HTTPConflict(reason=reason)


@routes.post("/jobs/{id}/retry", name="job_retry")
@action("jobs.retry")
async def retry_one(
    request: web.Request, session: Session, form: dict[str, str]
) -> tuple[str, dict[str, Any]]:
    job_id = _job_id(request.match_info["id"])
    async with request.app[DB].acquire() as conn:
        try:
            await jobs.retry_job(conn, job_id)
        except OperationRefused as exc:
            raise _refused(exc) from None
    return f"job {job_id}", {"ids": [job_id]}


@routes.post("/jobs/{id}/cancel", name="job_cancel")
@action("jobs.cancel")
async def cancel_one(
    request: web.Request, session: Session, form: dict[str, str]
) -> tuple[str, dict[str, Any]]:
    job_id = _job_id(request.match_info["id"])
    async with request.app[DB].acquire() as conn:
        try:
            await jobs.cancel_job(conn, job_id, by="the dashboard")
        except OperationRefused as exc:
            raise _refused(exc) from None
    return f"job {job_id}", {"ids": [job_id]}


async def _selected(request: web.Request) -> list[int]:
    ids = [_job_id(str(v)) for v in (await request.post()).getall("id", [])]
    if not ids:
        raise web.HTTPBadRequest(reason="Select some jobs first")
    if len(ids) > jobs.BULK_MAX:
        raise web.HTTPBadRequest(reason=f"At most {jobs.BULK_MAX} jobs at once")
    return list(dict.fromkeys(ids))


def _bulk_details(outcome: jobs.BulkOutcome, **more: Any) -> dict[str, Any]:
    return {"done": len(outcome.touched), "ids": outcome.touched, "left": outcome.skipped, **more}


@action("jobs.retry")
async def retry_selected(
    request: web.Request, session: Session, form: dict[str, str]
) -> tuple[str, dict[str, Any]]:
    ids = await _selected(request)
    async with request.app[DB].acquire() as conn:
        outcome = await jobs.retry_many(conn, ids)
    return "selected jobs", _bulk_details(outcome)


@action("jobs.cancel")
async def cancel_selected(
    request: web.Request, session: Session, form: dict[str, str]
) -> tuple[str, dict[str, Any]]:
    ids = await _selected(request)
    async with request.app[DB].acquire() as conn:
        outcome = await jobs.cancel_many(conn, ids)
    return "selected jobs", _bulk_details(outcome)


@routes.post("/jobs/selected", name="jobs_selected")
async def selected(request: web.Request) -> web.StreamResponse:
    """One form of checkboxes, two buttons (`do` = retry or cancel): each its own action."""
    do = (await request.post()).get("do")
    if do == "retry":
        return await retry_selected(request)
    if do == "cancel":
        return await cancel_selected(request)
    raise web.HTTPBadRequest(reason="Choose Retry or Cancel")


def _sure(form: dict[str, str]) -> None:
    """Acting on a whole filter is confirmed by a ticked box (required by the browser, with
    or without the script), never by a click alone."""
    if form.get("confirm") != "yes":
        raise web.HTTPBadRequest(reason="Tick 'I am sure' to act on every job this filter matches")


async def _filtered(
    request: web.Request, form: dict[str, str], states: tuple[jobs.State, ...]
) -> tuple[list[int], dict[str, str]]:
    f, given = read_filter(form)
    f = f.narrowed(states)
    if not f.states:
        return [], given
    async with request.app[DB].acquire() as conn:
        return await jobs.matching_ids(conn, f), given


@routes.post("/jobs/retry-filter", name="jobs_filter_retry")
@action("jobs.retry_filter")
async def retry_filter(
    request: web.Request, session: Session, form: dict[str, str]
) -> tuple[str, dict[str, Any]]:
    _sure(form)
    ids, given = await _filtered(request, form, jobs.RETRYABLE)
    async with request.app[DB].acquire() as conn:
        outcome = await jobs.retry_many(conn, ids)
    return "jobs matching a filter", _bulk_details(outcome, filter=given)


@routes.post("/jobs/cancel-filter", name="jobs_filter_cancel")
@action("jobs.cancel_filter")
async def cancel_filter(
    request: web.Request, session: Session, form: dict[str, str]
) -> tuple[str, dict[str, Any]]:
    _sure(form)
    ids, given = await _filtered(request, form, jobs.CANCELLABLE)
    async with request.app[DB].acquire() as conn:
        outcome = await jobs.cancel_many(conn, ids)
    return "jobs matching a filter", _bulk_details(outcome, filter=given)
