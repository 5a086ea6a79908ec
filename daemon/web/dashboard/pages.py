"""Every page's routes, one module a page: sign-in, overview, jobs, schedules, queues, audit."""

from __future__ import annotations

from aiohttp import web

from daemon.web.dashboard import audit_log, jobs, login, overview, queues, schedules


def routes() -> list[web.AbstractRouteDef]:
    found: list[web.AbstractRouteDef] = []
    for module in (login, overview, jobs, schedules, queues, audit_log):
        found.extend(module.routes)
    return found
