"""The overview: per queue counts and rates, throughput charts, the daemons alive and the
leader."""

from __future__ import annotations

from aiohttp import web

from daemon.web.dashboard.render import render

routes = web.RouteTableDef()


@routes.get("/", name="overview")
async def overview(request: web.Request) -> web.Response:
    return render(request, "overview.html.j2", title="Overview")
