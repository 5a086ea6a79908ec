"""The overview: per queue counts and rates, throughput charts, the daemons alive and the
leader. Nothing here counts jobs: counts come from the sampler's latest reading, rates and
charts from stoker.throughput (per-minute counts the leader records), daemons from
stoker.workers."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from aiohttp import web

from daemon.operate import schedules as operate_schedules
from daemon.operate import throughput, workers
from daemon.web.dashboard.queues import sampled_queues
from daemon.web.dashboard.render import DB, SETTINGS, render

routes = web.RouteTableDef()

WIDTH, HEIGHT, TOP, BOTTOM = 720, 150, 14, 128  # the chart's box and its plot area


@dataclass(frozen=True)
class Bar:
    x: float
    width: float
    ok_y: float
    ok_h: float
    bad_y: float
    bad_h: float
    title: str


@dataclass(frozen=True)
class Chart:
    """A bar chart drawn on the server as inline SVG: attributes only, no style, no script."""

    label: str
    bars: list[Bar]
    peak: int
    completed: int
    failed: int
    ticks: list[tuple[float, str]]  # (x, text) under the plot
    width: int = WIDTH
    height: int = HEIGHT
    top: int = TOP
    bottom: int = BOTTOM


def chart(label: str, series: throughput.Series, tick_every: int) -> Chart:
    buckets = series.buckets
    peak = max((c + f for _, c, f in buckets), default=0)
    scale = (BOTTOM - TOP) / peak if peak else 0.0
    step = WIDTH / max(len(buckets), 1)
    bars = []
    ticks = []
    minutes = series.step.total_seconds() / 60
    for i, (start, completed, failed) in enumerate(buckets):
        ok_h = completed * scale
        bad_h = failed * scale
        bars.append(
            Bar(
                x=round(i * step, 2),
                width=round(max(step - 1, 1), 2),
                ok_y=round(BOTTOM - ok_h, 2),
                ok_h=round(ok_h, 2),
                bad_y=round(BOTTOM - ok_h - bad_h, 2),
                bad_h=round(bad_h, 2),
                title=f"{start:%Y-%m-%d %H:%M} UTC, {minutes:g} min: "
                f"{completed} completed, {failed} failed",
            )
        )
        back = len(buckets) - i
        if back % tick_every == 0:
            ticks.append((round(i * step, 2), _before(back * series.step.total_seconds())))
    ticks.append((WIDTH, "now"))
    return Chart(
        label=label,
        bars=bars,
        peak=peak,
        completed=sum(c for _, c, _ in buckets),
        failed=sum(f for _, _, f in buckets),
        ticks=ticks,
    )


def _before(secs: float) -> str:
    return f"-{secs / 60:.0f}m" if secs < 3600 else f"-{secs / 3600:.0f}h"


@routes.get("/", name="overview")
async def overview(request: web.Request) -> web.Response:
    settings = request.app[SETTINGS]
    async with request.app[DB].acquire() as conn:
        queues = await sampled_queues(request, conn)
        hour = await throughput.series(conn, timedelta(minutes=1), timedelta(hours=1))
        day = await throughput.series(conn, timedelta(minutes=15), timedelta(days=1))
        daemons = await workers.registered(
            conn, gone_after=workers.gone_after(settings.lease_seconds)
        )
        leader = await operate_schedules.leader(conn)
    return render(
        request,
        "overview.html.j2",
        title="Overview",
        queues=queues,
        charts=[
            chart("Last hour, per minute", hour, tick_every=15),
            chart("Last day, per 15 minutes", day, tick_every=24),
        ],
        daemons=daemons,
        leader=leader,
    )
