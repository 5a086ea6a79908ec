"""The daemon's HTTP server: /health (liveness), /ready (readiness), /metrics (Prometheus) and,
when a token is configured, the admin API under /api/v1. Handlers read in-memory state; the one
database call (/ready) is cached briefly and time-boxed, so probes never slow the job path.

Probes never queue behind the admin API: their cost per request is bounded by those caches, and
they matter most when something hammers the daemon. Admin API requests show their token before
they take a turn in the throttle, whose queue is capped (429 with Retry-After beyond)."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import os
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field

import asyncpg
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from daemon.config import HttpConfig, QueueConfig, ScheduleConfig
from daemon.cron.schedules import Sampled, Schedule
from daemon.events import wait_any
from daemon.observe.metrics import OTHER, Metrics
from daemon.operate import limits as operate_limits
from daemon.operate import schedules as operate_schedules
from daemon.operate.throughput import QueueSample
from daemon.store import queries
from daemon.store.db import DB_ERRORS
from daemon.store.migrations import load_migrations
from daemon.web.auth import CHALLENGE, REFUSALS, Caller, caller

log = logging.getLogger("stoker.web")

BEAT = 0.25  # seconds between loop-lag probes
DB_CHECK_TTL = 0.5  # seconds a database check result is reused
DB_CHECK_TIMEOUT = 2.0
METRICS_TTL = 0.25  # seconds a rendered /metrics page is served again
API_PREFIX = "/api/v1"
SAMPLE_ERRORS: tuple[type[Exception], ...] = (*DB_ERRORS, ValueError)
DB_SCHEDULES = "(db)"  # the metric label all schedules of stoker.schedules share
NOT_CHECKED = "not checked yet"


@dataclass
class HealthState:
    """What the probes look at. The runtime fills it; the probes only read it."""

    db: asyncpg.Pool | None = None
    listener_up: Callable[[], bool] = lambda: False  # not ready until the runtime wires it
    draining: Callable[[], bool] = lambda: False
    migrations_current: bool = True
    read_only: str | None = None  # why the database takes no writes (a standby), if it does not
    last_beat: float = field(default_factory=time.monotonic)
    lag: float = 0.0
    db_checked_at: float = 0.0
    db_error: str | None = NOT_CHECKED
    db_check: asyncio.Future[str | None] | None = None
    queue_sample: QueueSample | None = None  # the latest, for the dashboard


async def loop_lag_probe(state: HealthState, stopping: asyncio.Event) -> None:
    """Beat every BEAT seconds; how late each beat wakes is the loop's lag."""
    while not stopping.is_set():
        before = time.monotonic()
        await wait_any(stopping, seconds=BEAT)
        now = time.monotonic()
        state.lag = max(0.0, now - before - BEAT)
        state.last_beat = now


async def sample_database(
    state: HealthState,
    metrics: Metrics,
    stopping: asyncio.Event,
    interval: float,
    schedules: dict[str, ScheduleConfig] | None = None,
    queues: Mapping[str, QueueConfig] | None = None,
) -> None:
    """Queue depth, oldest due job, migration state and, given the configured `schedules`,
    each schedule's health, and given the configured `queues`, the standing of those with
    limits; read on a timer, never per scrape."""
    known = {m.name for m in load_migrations()}
    sampler = None
    if schedules is not None:
        configured = {n: Schedule.from_config(n, cfg) for n, cfg in schedules.items()}
        sampler = operate_schedules.health_sampler(configured)
    while not stopping.is_set():
        db = state.db
        if db is not None:
            try:
                rows = await db.fetch(queries.QUEUE_DEPTH, timeout=10)
                applied = {
                    r["name"]
                    for r in await db.fetch("SELECT name FROM stoker.migrations", timeout=10)
                }
                depth: dict[tuple[str, str], int] = {}
                oldest: dict[str, float] = {}
                for r in rows:
                    queue = metrics.queue_label(r["queue"])
                    depth[(queue, r["state"])] = depth.get((queue, r["state"]), 0) + r["jobs"]
                    if r["oldest_due_s"] is not None:
                        oldest[queue] = max(oldest.get(queue, 0.0), float(r["oldest_due_s"]))
                for queue in metrics.queues:
                    oldest.setdefault(queue, 0.0)
                metrics.snapshot.depth = depth
                metrics.snapshot.oldest_due = oldest
                state.queue_sample = QueueSample.from_rows(rows)
                state.migrations_current = known <= applied
            except DB_ERRORS as exc:
                log.debug("metrics sample failed: %s", exc)
            if queues and state.queue_sample is not None:
                await _sample_limits(state, metrics, db, queues)
            if sampler is not None:
                try:
                    sampled = await sampler.sample(db)
                    metrics.snapshot.schedule_health = schedule_gauges(sampled)
                except SAMPLE_ERRORS as exc:
                    log.debug("schedule health sample failed: %s", exc)
        await wait_any(stopping, seconds=interval)


async def _sample_limits(
    state: HealthState, metrics: Metrics, db: asyncpg.Pool, queues: Mapping[str, QueueConfig]
) -> None:
    """The limited queues' standing, for the held-back gauge and the dashboard."""
    try:
        async with asyncio.timeout(10):
            standing = await operate_limits.limit_standing(db, queues)
    except DB_ERRORS as exc:
        log.debug("limits sample failed: %s", exc)
        return
    metrics.snapshot.held_back = {
        metrics.queue_label(name): s["held_back"] for name, s in standing.items()
    }
    if state.queue_sample is not None:
        state.queue_sample = dataclasses.replace(state.queue_sample, limits=standing)


def schedule_gauges(sampled: list[Sampled]) -> dict[str, tuple[float | None, int, bool]]:
    """Per enabled schedule: (last success epoch, consecutive failures, late). Schedules of
    stoker.schedules share the label "(db)": the most failures of any, late if any is; no last
    success, as their cadences differ."""
    gauges: dict[str, tuple[float | None, int, bool]] = {}
    for s in sampled:
        if not s.enabled:
            continue
        h = s.health
        if s.source == "config":
            success = h.last_success.timestamp() if h.last_success else None
            gauges[s.name] = (success, h.consecutive_failures, h.late)
        else:
            _, failed, late = gauges.get(DB_SCHEDULES, (None, 0, False))
            gauges[DB_SCHEDULES] = (None, max(failed, h.consecutive_failures), late or h.late)
    return gauges


async def _check_database(state: HealthState) -> str | None:
    """One probe query at a time, its answer shared for DB_CHECK_TTL: fifty probes a second
    cost the database two queries, not fifty."""
    if time.monotonic() - state.db_checked_at < DB_CHECK_TTL:
        return state.db_error
    if state.db_check is None or state.db_check.done():
        state.db_check = asyncio.ensure_future(_probe_database(state))
    return await asyncio.shield(state.db_check)


async def _probe_database(state: HealthState) -> str | None:
    previous = state.db_error
    if state.db is None:
        state.db_error = "no database pool"
    else:
        try:
            # Bounds the wait for a pool connection too, not only the query.
            async with asyncio.timeout(DB_CHECK_TIMEOUT):
                await state.db.fetchval("SELECT 1")
            state.db_error = None
        except DB_ERRORS as exc:
            state.db_error = f"{type(exc).__name__}: {exc}".strip() or type(exc).__name__
    state.db_checked_at = time.monotonic()
    # The detail (host names, user names) is for the operator's log, once per change, and for
    # /ready callers bearing the admin token; anyone else learns only that "database" fails.
    if state.db_error is not None and state.db_error != previous:
        log.warning("readiness: database check failing: %s", state.db_error)
    elif state.db_error is None and previous not in (None, NOT_CHECKED):
        log.info("readiness: database check ok again")
    return state.db_error


class Governor:
    """A token bucket for the admin API: past `rate` requests a second, each request waits its
    turn, so that the event loop keeps its time for jobs; past `max_queued` waiting, a request
    is refused at once with the seconds until the queue has drained."""

    def __init__(self, rate: float, max_queued: int) -> None:
        self._interval = 1.0 / rate
        self._max_wait = max_queued * self._interval
        self._next = 0.0

    def reserve(self) -> float | None:
        """Seconds until this request's turn, or None when the queue is full."""
        now = time.monotonic()
        wait = max(now, self._next) - now
        if wait > self._max_wait:
            return None
        self._next = now + wait + self._interval
        return wait

    def retry_after(self) -> int:
        return max(1, math.ceil(self._next - time.monotonic()))


def build_app(
    config: HttpConfig,
    state: HealthState,
    metrics: Metrics,
    admin: web.Application | None = None,
    dashboard: web.Application | None = None,
) -> web.Application:
    app = web.Application(client_max_size=config.max_body_bytes)
    governor = Governor(config.max_requests_per_second, config.max_queued_requests)
    token = _admin_token(config) if admin is not None else None
    scraped: tuple[float, bytes] = (0.0, b"")

    async def health(_request: web.Request) -> web.Response:
        stalled = time.monotonic() - state.last_beat
        lag = max(state.lag, stalled - BEAT)
        body = {"status": "ok", "loop_lag_seconds": round(lag, 4)}
        if lag > config.loop_lag_threshold:
            body["status"] = "event loop blocked"
            return web.json_response(body, status=503)
        return web.json_response(body)

    async def ready(request: web.Request) -> web.Response:
        checks: dict[str, str] = {}
        db_error = await _check_database(state)
        checks["database"] = db_error or state.read_only or "ok"
        checks["listener"] = "ok" if state.listener_up() else "not connected"
        checks["migrations"] = "ok" if state.migrations_current else "schema is not current"
        checks["draining"] = "shutting down" if state.draining() else "ok"
        failing = sorted(name for name, result in checks.items() if result != "ok")
        body: dict[str, object] = {"status": "not ready" if failing else "ready"}
        if failing:
            body["failing"] = failing
        if caller(request, token) == "admin":
            body["checks"] = checks
        return web.json_response(body, status=503 if failing else 200)

    async def scrape(_request: web.Request) -> web.Response:
        nonlocal scraped
        now = time.monotonic()
        if now - scraped[0] > METRICS_TTL:  # scrapers arriving together share one rendering
            scraped = (now, generate_latest(metrics.registry))
        return web.Response(body=scraped[1], headers={"Content-Type": CONTENT_TYPE_LATEST})

    @web.middleware
    async def governed(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        # Only the admin API is throttled. Probes never are: each costs little whatever the
        # rate (cached /ready check, /metrics rendered at most every METRICS_TTL), and a probe
        # or scraper timing out during a flood would hide the flood from the alerts. Unknown
        # paths cost no more than a refusal would.
        if token is None or not _is_api(request.path):
            return await handler(request)
        who = caller(request, token)
        if who != "admin":  # refused before taking a turn: strangers cannot fill the queue
            return _unauthorized(who)
        wait = governor.reserve()
        if wait is None:
            seconds = governor.retry_after()
            return web.json_response(
                {"error": f"too many requests waiting; retry after {seconds}s"},
                status=429,
                headers={"Retry-After": str(seconds)},
            )
        await asyncio.sleep(wait)
        return await handler(request)

    app.router.add_get("/health", health)
    app.router.add_get("/ready", ready)
    app.router.add_get("/metrics", scrape)
    if admin is not None:
        app.add_subapp("/api/v1", admin)
    if dashboard is not None:

        async def to_dashboard(_request: web.Request) -> web.Response:
            raise web.HTTPPermanentRedirect("/dashboard/")

        app.router.add_get("/dashboard", to_dashboard)
        app.add_subapp("/dashboard", dashboard)
    app.middlewares.append(_json_errors)
    app.middlewares.append(governed)
    return app


@web.middleware
async def _json_errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Every error is JSON: an unknown path or method too, never an HTML page (but on the
    dashboard's pages, which answer people in HTML)."""
    if request.path.startswith("/dashboard/"):
        return await handler(request)
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.content_type == "application/json" or exc.status < 400:
            raise
        return web.json_response(
            {"error": exc.reason}, status=exc.status, headers=_kept_headers(exc)
        )


def _is_api(path: str) -> bool:
    return path == API_PREFIX or path.startswith(API_PREFIX + "/")


def _admin_token(config: HttpConfig) -> bytes | None:
    token = config.admin_token
    return token.encode() if token else None


def _unauthorized(who: Caller) -> web.Response:
    # Refused before taking a turn of the throttle; the admin API's own guard stays behind.
    status, message = REFUSALS[who]
    headers = CHALLENGE if who == "anonymous" else None
    return web.json_response({"error": message}, status=status, headers=headers)


def _kept_headers(exc: web.HTTPException) -> dict[str, str]:
    keep = ("Allow", "WWW-Authenticate", "Retry-After")
    return {k: v for k, v in exc.headers.items() if k in keep}


class HttpServer:
    """Owns the aiohttp runner; binds at start so that a taken port fails the start-up."""

    def __init__(self, app: web.Application, config: HttpConfig) -> None:
        self._app = app
        self._config = config
        self._runner = web.AppRunner(app, handle_signals=False, access_log=None)
        self.port: int | None = None

    async def start(self) -> None:
        await self._runner.setup()
        site = web.TCPSite(self._runner, self._config.host, self._config.port)
        try:
            await site.start()
        except OSError as exc:
            await self._runner.cleanup()
            reason = os.strerror(exc.errno) if exc.errno else str(exc)
            raise OSError(
                f"http: cannot listen on {self._config.host}:{self._config.port}: "
                f"{reason} (set [http] port, or http.enabled = false)"
            ) from exc
        server = site._server  # the bound socket tells the real port when port = 0
        sockets = getattr(server, "sockets", None) or []
        self.port = sockets[0].getsockname()[1] if sockets else self._config.port
        log.info("http listening on %s:%s", self._config.host, self.port)

    async def stop(self) -> None:
        await self._runner.cleanup()


__all__ = ["OTHER", "HealthState", "HttpServer", "build_app", "loop_lag_probe", "sample_database"]
