"""Rendering a page: the Jinja2 templates (autoescaped: a payload holding `<script>` is shown
as text), and what every page knows — the session, its CSRF token, the current path."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import jinja2
from aiohttp import web

from daemon.config import Settings
from daemon.web.dashboard.session import Session, Sessions

TEMPLATES = Path(__file__).parent / "templates"

DB = web.AppKey("db", asyncpg.Pool)
SETTINGS = web.AppKey("settings", Settings)
SESSIONS = web.AppKey("sessions", Sessions)
SESSION = "dashboard.session"  # request key: the Session of a signed-in request


class Renderer:
    def __init__(self) -> None:
        self.env = jinja2.Environment(
            loader=jinja2.FileSystemLoader(str(TEMPLATES)),
            autoescape=True,
            undefined=jinja2.StrictUndefined,
            trim_blocks=True,
            lstrip_blocks=True,
        )
        self.env.filters["when"] = when
        self.env.filters["ago"] = ago
        self.env.filters["seconds"] = seconds
        self.env.filters["pretty_json"] = pretty_json

    def page(
        self, request: web.Request, template: str, status: int = 200, **context: Any
    ) -> web.Response:
        session: Session | None = request.get(SESSION)
        sessions = request.app[SESSIONS]
        html = self.env.get_template(template).render(
            session=session,
            csrf=sessions.csrf(session) if session else "",
            path=request.path,
            back=request.path_qs,
            static=lambda name: str(request.app.router["static"].url_for(filename=name)),
            **context,
        )
        return web.Response(text=html, status=status, content_type="text/html", charset="utf-8")


RENDERER = web.AppKey("renderer", Renderer)


def render(request: web.Request, template: str, status: int = 200, **context: Any) -> web.Response:
    return request.app[RENDERER].page(request, template, status, **context)


def when(value: datetime | None) -> str:
    """A moment as people read it: UTC, to the second."""
    if value is None:
        return "-"
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")


def ago(value: datetime | None, now: datetime | None = None) -> str:
    if value is None:
        return "-"
    delta = (now or datetime.now(UTC)) - value
    return seconds(delta.total_seconds()) + (" ago" if delta >= timedelta(0) else " ahead")


def seconds(value: float | None) -> str:
    """A duration made short: 850ms, 12.3s, 4m 05s, 3h 12m, 2d 4h."""
    if value is None:
        return "-"
    value = abs(value)
    if value < 1:
        return f"{value * 1000:.0f}ms"
    if value < 60:
        return f"{value:.1f}s"
    minutes, secs = divmod(int(value), 60)
    if minutes < 60:
        return f"{minutes}m {secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours}h {minutes:02d}m"
    days, hours = divmod(hours, 24)
    return f"{days}d {hours}h"


def pretty_json(value: Any) -> str:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            return str(value)
    return json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False, default=str)
