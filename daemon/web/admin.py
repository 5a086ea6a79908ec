"""The admin HTTP API, mounted at /api/v1 when an admin token is configured: enqueue, inspect,
retry and cancel jobs, pause queues, list and trigger schedules. JSON in and out, every route
behind the bearer token, every database call time-boxed so a slow database cannot pile up
requests. The route table below drives both the router and /openapi.json."""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, TypeVar

import asyncpg
from aiohttp import web
from aiohttp.typedefs import Handler, Middleware
from pydantic import BaseModel, ValidationError
from pydantic.json_schema import models_json_schema

from daemon.config import QUEUE_NAME, Settings
from daemon.enqueue import enqueue
from daemon.operate import jobs, queues, schedules, workers
from daemon.operate.errors import NotFound, OperationRefused
from daemon.web.admin_models import (
    BIGINT_MAX,
    Cancelled,
    Created,
    EnqueueRequest,
    ErrorBody,
    Job,
    JobCount,
    JobPage,
    JobsCountQuery,
    JobsQuery,
    QueueList,
    QueuePaused,
    Retried,
    RunPage,
    RunsQuery,
    ScheduleList,
)
from daemon.web.auth import CHALLENGE, REFUSALS, caller

log = logging.getLogger("stoker.admin")

DB_TIMEOUT = 5.0  # seconds; also the longest wait for a pool connection
JOB_ID = re.compile(r"^[0-9]{1,19}$")
M = TypeVar("M", bound=BaseModel)


class ApiError(Exception):
    def __init__(
        self, status: int, error: str, headers: dict[str, str] | None = None, **extra: Any
    ) -> None:
        super().__init__(error)
        self.status, self.headers, self.body = status, headers, {"error": error, **extra}


def _default(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, Decimal):
        return float(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


_dumps = functools.partial(json.dumps, default=_default)


def _json(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response(body, status=status, headers=headers, dumps=_dumps)


def _invalid(where: str, exc: ValidationError) -> ApiError:
    fields = [
        {"loc": ".".join([where, *map(str, e["loc"])]), "msg": e["msg"]} for e in exc.errors()
    ]
    return ApiError(422, "invalid request", fields=fields)


def _invalid_path(name: str, msg: str) -> ApiError:
    return ApiError(422, "invalid request", fields=[{"loc": f"path.{name}", "msg": msg}])


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every failure becomes a JSON body; tracebacks go to the log, never to the client."""
    try:
        return await handler(request)
    except ApiError as exc:
        return _json(exc.body, exc.status, exc.headers)
    except OperationRefused as exc:
        status = 404 if isinstance(exc, NotFound) else 409
        return _json({"error": str(exc), **exc.fields}, status)
    except web.HTTPException as exc:  # the router's 404 and 405
        if exc.status < 400:
            raise
        allow = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
        return _json({"error": f"{exc.reason}: {request.method} {request.path}"}, exc.status, allow)
    except TimeoutError:
        log.warning("admin API: %s %s: database timed out", request.method, request.path)
        return _json({"error": f"the database did not answer within {DB_TIMEOUT:g}s"}, 503)
    except (
        OSError,
        asyncpg.InterfaceError,
        asyncpg.PostgresConnectionError,
        asyncpg.CannotConnectNowError,
        asyncpg.TooManyConnectionsError,
    ) as exc:
        log.warning("admin API: %s %s: database unavailable: %s", request.method, request.path, exc)
        return _json({"error": "the database is unavailable"}, 503)
    except Exception:
        log.exception("admin API: %s %s failed", request.method, request.path)
        return _json({"error": "internal error (details are in the daemon's log)"}, 500)


def _guard(token: str, max_body_bytes: int) -> Middleware:
    expected = token.encode()

    @web.middleware
    async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
        who = caller(request, expected)
        if who != "admin":
            status, message = REFUSALS[who]
            raise ApiError(status, message, CHALLENGE if who == "anonymous" else None)
        # Checked after the token so that strangers learn nothing, before reading a byte.
        if (request.content_length or 0) > max_body_bytes:
            raise ApiError(413, f"request body is larger than {max_body_bytes} bytes")
        return await handler(request)

    return guard


# -- handlers ---------------------------------------------------------------------------------


@dataclass
class Api:
    db: asyncpg.Pool
    settings: Settings
    max_body_bytes: int
    spec: dict[str, Any]

    @asynccontextmanager
    async def conn(self) -> AsyncIterator[asyncpg.Connection]:
        # Every database call of a request is time-boxed, however many statements it runs.
        async with self.db.acquire(timeout=DB_TIMEOUT) as conn, asyncio.timeout(DB_TIMEOUT):
            yield conn

    async def body(self, request: web.Request, model: type[M]) -> M:
        # Read by hand: the sub-app's client_max_size does not govern request.read(), and a
        # chunked body has no Content-Length to check up front.
        data = bytearray()
        async for chunk in request.content.iter_chunked(65_536):
            data += chunk
            if len(data) > self.max_body_bytes:
                raise ApiError(413, f"request body is larger than {self.max_body_bytes} bytes")
        try:
            return model.model_validate_json(bytes(data))
        except ValidationError as exc:
            bad = [
                e.get("ctx", {}).get("error", "")
                for e in exc.errors()
                if e["type"] == "json_invalid"
            ]
            if bad:
                raise ApiError(400, f"request body is not valid JSON: {bad[0]}") from None
            raise _invalid("body", exc) from None

    async def enqueue_job(self, request: web.Request) -> web.Response:
        """Enqueue a job."""
        req = await self.body(request, EnqueueRequest)
        async with self.conn() as conn:
            new_id = await enqueue(conn, **req.model_dump())
        return _json({"id": new_id}, 201)

    async def list_jobs(self, request: web.Request) -> web.Response:
        """Jobs, newest first; page with next_before. `meta.KEY=VALUE` (repeatable over keys)
        keeps the jobs whose meta has each KEY with that string value (indexed)."""
        q = _query(request, JobsQuery, skip=META_PREFIX)  # first: it refuses repeated keys
        meta = _meta_query(request)
        async with self.conn() as conn:
            rows = await jobs.list_jobs(
                conn,
                state=q.state,
                queue=q.queue,
                kind=q.kind,
                before=q.before,
                limit=q.limit + 1,  # one more than asked: is there a next page?
                meta=meta,
            )
        more = len(rows) > q.limit
        page = [dict(r) for r in rows[: q.limit]]
        return _json({"jobs": page, "next_before": page[-1]["id"] if more else None})

    async def count_jobs(self, request: web.Request) -> web.Response:
        """How many jobs, live and finished, match every `meta.KEY=VALUE` given (at least one;
        indexed), narrowed by state, queue and kind."""
        q = _query(request, JobsCountQuery, skip=META_PREFIX)
        meta = _meta_query(request)
        if not meta:
            loc = [{"loc": "query.meta", "msg": "give at least one meta.KEY=VALUE to count by"}]
            raise ApiError(422, "invalid request", fields=loc)
        async with self.conn() as conn:
            n = await jobs.count_jobs(conn, meta, state=q.state, queue=q.queue, kind=q.kind)
        return _json({"count": n})

    async def get_job(self, request: web.Request) -> web.Response:
        """One job, with every attempt's error."""
        async with self.conn() as conn:
            return _json(dict(await jobs.get_job(conn, _job_id(request))))

    async def retry_job(self, request: web.Request) -> web.Response:
        """Run a failed or cancelled job again (a delayed queued one now)."""
        async with self.conn() as conn:
            await jobs.retry_job(conn, _job_id(request))
        return _json({"retried": True})

    async def cancel_job(self, request: web.Request) -> web.Response:
        """Cancel a queued job (cancelled at once) or a running one (cancel_requested: its
        daemon stops it within about a second plus the queue's cancel_grace, and it ends
        cancelled); a job that already finished is 409."""
        async with self.conn() as conn:
            answer = await jobs.cancel_job(conn, _job_id(request), by="the admin API")
        if answer == "requested":
            return _json({"cancelled": False, "cancel_requested": True})
        return _json({"cancelled": True, "cancel_requested": False})

    async def list_queues(self, request: web.Request) -> web.Response:
        """Every known queue: job counts, pause state, oldest due job's age, its limits with
        their standing (null for a queue without limits), and the configurations of live
        daemons serving it with different limits (null when they agree)."""
        async with self.conn() as conn:
            found = await queues.queue_status(
                conn,
                self.settings.queues,
                limits=self.settings.queues,
                gone_after=workers.gone_after(self.settings.lease_seconds),
            )
        return _json({"queues": found})

    async def set_paused(self, request: web.Request, paused: bool) -> web.Response:
        name = request.match_info["name"]
        if not QUEUE_NAME.match(name):
            raise _invalid_path("name", "a queue name is 1-128 of A-Z a-z 0-9 _ . : -")
        async with self.conn() as conn:
            await queues.set_paused(conn, name, paused)
        return _json({"name": name, "paused": paused})

    async def pause_queue(self, request: web.Request) -> web.Response:
        """Stop every daemon claiming from a queue."""
        return await self.set_paused(request, True)

    async def resume_queue(self, request: web.Request) -> web.Response:
        """Let daemons claim from a queue again."""
        return await self.set_paused(request, False)

    async def list_schedules(self, request: web.Request) -> web.Response:
        """Cron schedules and their state."""
        async with self.conn() as conn:
            rows = await schedules.schedule_status(conn, self.settings.schedules)
        return _json({"schedules": rows})

    async def trigger_schedule(self, request: web.Request) -> web.Response:
        """Enqueue a schedule's job now (not a tick: the timetable is unchanged)."""
        name = request.match_info["name"]
        async with self.conn() as conn:
            job_id = await schedules.trigger_schedule(
                conn, self.settings.schedules, name, by="api (admin token)"
            )
        return _json({"id": job_id}, 201)

    async def schedule_runs(self, request: web.Request) -> web.Response:
        """A schedule's run ledger, newest first; page with next_before."""
        q = _query(request, RunsQuery)
        name = request.match_info["name"]
        async with self.conn() as conn:
            runs = await schedules.schedule_history(
                conn, self.settings.schedules, name, q.limit + 1, q.before
            )
        more = len(runs) > q.limit
        page = runs[: q.limit]
        # In UTC with a Z: a "+00:00" pasted unescaped into a query string would be a space.
        after = None
        if more:
            after = page[-1]["tick"].astimezone(UTC).isoformat().replace("+00:00", "Z")
        return _json({"runs": page, "next_before": after})

    async def openapi(self, request: web.Request) -> web.Response:
        """This document."""
        return _json(self.spec)


def _query(request: web.Request, model: type[M], *, skip: str | None = None) -> M:
    """The query string as `model`; parameters starting with `skip` are another's to read."""
    repeated = sorted({k for k in request.query if len(request.query.getall(k)) > 1})
    if repeated:
        fields = [{"loc": f"query.{k}", "msg": "given more than once"} for k in repeated]
        raise ApiError(422, "invalid request", fields=fields)
    values = {k: v for k, v in request.query.items() if not (skip and k.startswith(skip))}
    try:
        return model.model_validate(values)
    except ValidationError as exc:
        raise _invalid("query", exc) from None


META_PREFIX = "meta."


def _meta_query(request: web.Request) -> dict[str, str]:
    """?meta.org=org_123&meta.user=u_1 as {"org": "org_123", "user": "u_1"}; a bad one is a
    422 naming its parameter."""
    pairs = [(k, v) for k, v in request.query.items() if k.startswith(META_PREFIX)]
    for k, v in pairs:
        try:
            jobs.meta_filter([(k.removeprefix(META_PREFIX), v)])
        except ValueError as exc:
            loc = [{"loc": f"query.{k}", "msg": str(exc)}]
            raise ApiError(422, "invalid request", fields=loc) from None
    return jobs.meta_filter((k.removeprefix(META_PREFIX), v) for k, v in pairs)


def _job_id(request: web.Request) -> int:
    text = request.match_info["id"]
    if not JOB_ID.match(text) or not 1 <= int(text) <= BIGINT_MAX:
        raise _invalid_path("id", "a job id is a positive integer")
    return int(text)


# -- routes and their OpenAPI description -----------------------------------------------------


@dataclass(frozen=True)
class Route:
    endpoint: str  # "METHOD /path"
    handler: str  # an Api method; its docstring is the summary
    ok: type[BaseModel] | None
    status: int = 200
    body: type[BaseModel] | None = None
    query: type[BaseModel] | None = None
    errors: tuple[int, ...] = ()


ROUTES = (
    Route("POST /jobs", "enqueue_job", Created, 201, body=EnqueueRequest),
    Route("GET /jobs", "list_jobs", JobPage, query=JobsQuery),
    Route("GET /jobs/count", "count_jobs", JobCount, query=JobsCountQuery),
    Route("GET /jobs/{id}", "get_job", Job, errors=(404,)),
    Route("POST /jobs/{id}/retry", "retry_job", Retried, errors=(404, 409)),
    Route("POST /jobs/{id}/cancel", "cancel_job", Cancelled, errors=(404, 409)),
    Route("GET /queues", "list_queues", QueueList),
    Route("POST /queues/{name}/pause", "pause_queue", QueuePaused),
    Route("POST /queues/{name}/resume", "resume_queue", QueuePaused),
    Route("GET /schedules", "list_schedules", ScheduleList),
    Route("POST /schedules/{name}/trigger", "trigger_schedule", Created, 201, errors=(404,)),
    Route("GET /schedules/{name}/runs", "schedule_runs", RunPage, query=RunsQuery, errors=(404,)),
    Route("GET /openapi.json", "openapi", None),
)


def _openapi() -> dict[str, Any]:
    models: set[type[BaseModel]] = {ErrorBody}
    for r in ROUTES:
        models |= {m for m in (r.body, r.ok) if m is not None}
    refs, top = models_json_schema(
        [(m, "validation") for m in sorted(models, key=lambda m: m.__name__)],
        ref_template="#/components/schemas/{model}",
    )

    def content(model: type[BaseModel] | None) -> dict[str, Any]:
        schema = refs[(model, "validation")] if model else {"type": "object"}
        return {"application/json": {"schema": schema}}

    error = {"description": "error", "content": content(ErrorBody)}
    paths: dict[str, dict[str, Any]] = {}
    for r in ROUTES:
        method, path = r.endpoint.split(" ")
        params: list[dict[str, Any]] = []
        for name in re.findall(r"{(\w+)}", path):
            schema = {"type": "integer", "minimum": 1} if name == "id" else {"type": "string"}
            params.append({"name": name, "in": "path", "required": True, "schema": schema})
        if r.query:
            props = r.query.model_json_schema()["properties"]
            params += [{"name": k, "in": "query", "schema": v} for k, v in props.items()]
        codes = {401, 403, *r.errors} | ({400, 413, 422} if r.body else set())
        codes |= {422} if params else set()
        op: dict[str, Any] = {
            "operationId": r.handler,
            "summary": (getattr(Api, r.handler).__doc__ or "").strip(),
            "parameters": params,
            "responses": {str(r.status): {"description": "success", "content": content(r.ok)}}
            | {str(c): error for c in sorted(codes)},
        }
        if r.body:
            op["requestBody"] = {"required": True, "content": content(r.body)}
        paths.setdefault(path, {})[method.lower()] = op
    return {
        "openapi": "3.1.0",
        "info": {"title": "Stoker admin API", "version": "1"},
        "servers": [{"url": "/api/v1"}],
        "security": [{"bearerAuth": []}],
        "paths": paths,
        "components": {
            "schemas": top["$defs"],
            "securitySchemes": {"bearerAuth": {"type": "http", "scheme": "bearer"}},
        },
    }


def create_admin_app(
    *, db: asyncpg.Pool, settings: Settings, token: str, max_body_bytes: int
) -> web.Application:
    """The admin API as a sub-application; mount it with app.add_subapp("/api/v1", ...)."""
    api = Api(db, settings, max_body_bytes, _openapi())
    app = web.Application(
        client_max_size=max_body_bytes, middlewares=[_errors, _guard(token, max_body_bytes)]
    )
    for r in ROUTES:
        method, path = r.endpoint.split(" ")
        app.router.add_route(method, path, getattr(api, r.handler))
    return app
