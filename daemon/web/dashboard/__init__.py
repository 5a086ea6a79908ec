"""The dashboard, mounted at /dashboard when an admin token is configured: HTML pages rendered
on the server (Jinja2, autoescaped), one small vendored script for live updates and actions
without a reload, no build step and nothing fetched from the network.

Every page needs a session (signed cookie from /dashboard/login); every action needs the admin
role, the session's CSRF token, and is written to the audit log. Responses carry a
Content-Security-Policy that allows no inline script."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import asyncpg
from aiohttp import web

from daemon.config import Settings
from daemon.operate.throughput import QueueSample
from daemon.web.dashboard.login import THROTTLE, LoginThrottle
from daemon.web.dashboard.pages import routes as page_routes
from daemon.web.dashboard.queues import SAMPLE
from daemon.web.dashboard.render import DB, RENDERER, SESSIONS, SETTINGS, Renderer
from daemon.web.dashboard.security import guard, security_headers
from daemon.web.dashboard.session import Sessions

STATIC = Path(__file__).parent / "static"


def create_dashboard_app(
    *,
    db: asyncpg.Pool,
    settings: Settings,
    sample: Callable[[], QueueSample | None] = lambda: None,
) -> web.Application:
    """`sample`: the latest queue depth sample of this process (its metrics sampler's)."""
    token = settings.http.admin_token
    if not token:
        raise ValueError("the dashboard needs an admin token")
    app = web.Application(
        middlewares=[security_headers, guard], client_max_size=settings.http.max_body_bytes
    )
    app[DB] = db
    app[SETTINGS] = settings
    app[SAMPLE] = sample
    app[SESSIONS] = Sessions(token, settings.http.viewer_token)
    app[RENDERER] = Renderer()
    app[THROTTLE] = LoginThrottle()
    app.router.add_routes(page_routes())
    app.router.add_static("/static/", STATIC, name="static", append_version=True)
    return app


__all__ = ["create_dashboard_app"]
