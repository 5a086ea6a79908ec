"""Queues: their counts (from the sampler's latest reading, never counted per request), paused
or not, and pausing and resuming them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

import asyncpg
from aiohttp import web

from daemon.operate import queues as operate_queues
from daemon.operate import throughput, workers
from daemon.operate.limits import (
    LimitsVariant,
    QueueLimits,
    daemon_text,
    differing,
    limit_mismatches,
    limits_text,
)
from daemon.operate.throughput import QueueSample
from daemon.web.dashboard.render import DB, SETTINGS, render
from daemon.web.dashboard.security import action
from daemon.web.dashboard.session import Session

routes = web.RouteTableDef()

# The latest queue depth sample of this process (None until the first one is taken).
SAMPLE = web.AppKey[Callable[[], QueueSample | None]]("queue_sample")


@dataclass(frozen=True)
class QueueRow:
    name: str
    queued: int | None
    active: int | None
    failed: int | None
    oldest_due_s: float | None
    paused: bool
    completed_per_min: float
    failed_per_min: float
    limits: QueueLimits | None = None  # a limited queue's, as of the sample
    # Each configuration live daemons serve the queue with, when they differ (read per request)
    limits_mismatch: list[LimitsVariant] | None = None

    @property
    def limits_differing(self) -> list[str]:
        """The limits the daemons disagree on, for the warning."""
        return differing([v["limits"] for v in self.limits_mismatch or []])

    @property
    def limits_variants(self) -> list[tuple[str, str]]:
        """Per configuration: its differing limits, and the daemons that have it."""
        fields = self.limits_differing
        return [
            (limits_text(v["limits"], fields), ", ".join(daemon_text(d) for d in v["workers"]))
            for v in self.limits_mismatch or []
        ]


@dataclass(frozen=True)
class Sampled:
    """The queues as of the latest sample; `sampled_s` its age, None while it is pending."""

    rows: list[QueueRow]
    sampled_s: float | None
    interval: float


async def sampled_queues(request: web.Request, conn: asyncpg.Connection) -> Sampled:
    """Every configured, sampled or paused queue: counts from the sample, paused from
    stoker.queues, rates from stoker.throughput, limits mismatched between live daemons from
    stoker.workers (all small reads)."""
    sample = request.app[SAMPLE]()
    settings = request.app[SETTINGS]
    flags = await throughput.paused(conn)
    rates = await throughput.rates(conn)
    apart = await limit_mismatches(conn, workers.gone_after(settings.lease_seconds))
    names = {*settings.queues, *flags, *rates, *apart, *(sample.counts if sample else ())}
    rows = []
    for name in sorted(names):
        counts = sample.counts.get(name, {}) if sample else None
        done, failing = rates.get(name, (0.0, 0.0))
        rows.append(
            QueueRow(
                name=name,
                queued=None if counts is None else counts.get("queued", 0),
                active=None if counts is None else counts.get("active", 0),
                failed=None if counts is None else counts.get("failed", 0),
                oldest_due_s=sample.oldest_due_s.get(name) if sample else None,
                paused=flags.get(name, False),
                completed_per_min=done,
                failed_per_min=failing,
                limits=sample.limits.get(name) if sample else None,
                limits_mismatch=apart.get(name),
            )
        )
    age = (datetime.now(UTC) - sample.at).total_seconds() if sample else None
    return Sampled(rows, age, settings.http.depth_sample_interval)


@routes.get("/queues", name="queues")
async def queues_page(request: web.Request) -> web.Response:
    async with request.app[DB].acquire() as conn:
        found = await sampled_queues(request, conn)
    return render(request, "queues.html.j2", title="Queues", queues=found)


async def _known(request: web.Request, name: str) -> None:
    sample = request.app[SAMPLE]()
    if name in request.app[SETTINGS].queues or (sample and name in sample.counts):
        return
    async with request.app[DB].acquire() as conn:
        if name in await throughput.paused(conn):
            return
    raise web.HTTPNotFound(reason=f"No queue named {name!r}")


async def _set_paused(request: web.Request, paused: bool) -> str:
    name = request.match_info["name"]
    await _known(request, name)
    async with request.app[DB].acquire() as conn:
        await operate_queues.set_paused(conn, name, paused)
    return name


@routes.post("/queues/{name}/pause", name="queue-pause")
@action("queue.pause")
async def pause(request: web.Request, _session: Session, _form: dict[str, str]) -> str:
    return await _set_paused(request, True)


@routes.post("/queues/{name}/resume", name="queue-resume")
@action("queue.resume")
async def resume(request: web.Request, _session: Session, _form: dict[str, str]) -> str:
    return await _set_paused(request, False)
