"""Signing in with a token (the admin token acts, the viewer token only looks) and out."""

from __future__ import annotations

import math
import time
from collections import deque

from aiohttp import web

from daemon.web.dashboard.render import SESSIONS, render
from daemon.web.dashboard.session import COOKIE, LIFETIME

routes = web.RouteTableDef()


class LoginThrottle:
    """At most `limit` failed sign-ins a minute on this daemon; beyond, 429 until the oldest
    is a minute old. Guessing a token of 16 characters or more is hopeless anyway; this keeps
    a script from trying at the speed of the network."""

    def __init__(self, limit: int = 20, window: float = 60.0) -> None:
        self.limit, self.window = limit, window
        self.failures: deque[float] = deque()

    def wait(self, now: float) -> float:
        while self.failures and self.failures[0] <= now - self.window:
            self.failures.popleft()
        if len(self.failures) < self.limit:
            return 0.0
        return self.failures[0] + self.window - now

    def failed(self, now: float) -> None:
        self.failures.append(now)


THROTTLE = web.AppKey("login_throttle", LoginThrottle)


def _next(value: str | None) -> str:
    """Where to go after signing in: a dashboard path only, never another site."""
    if value and value.startswith("/dashboard/") and not value.startswith("//"):
        return value
    return "/dashboard/"


@routes.get("/login", name="login")
async def login_form(request: web.Request) -> web.Response:
    return render(request, "login.html.j2", next=_next(request.query.get("next")), failed=False)


@routes.post("/login")
async def login(request: web.Request) -> web.StreamResponse:
    throttle = request.app[THROTTLE]
    wait = throttle.wait(time.monotonic())
    if wait > 0:
        seconds = str(max(1, math.ceil(wait)))
        response = render(request, "login.html.j2", status=429, next="/dashboard/", failed=False)
        response.headers["Retry-After"] = seconds
        return response
    form = await request.post()
    token = form.get("token")
    target = _next(str(form.get("next") or ""))
    role = request.app[SESSIONS].sign_in(token) if isinstance(token, str) else None
    if role is None:
        throttle.failed(time.monotonic())
        return render(request, "login.html.j2", status=401, next=target, failed=True)
    _, cookie = request.app[SESSIONS].issue(role)
    response = web.HTTPSeeOther(location=target)
    response.set_cookie(
        COOKIE,
        cookie,
        max_age=LIFETIME,
        path="/dashboard",
        httponly=True,
        samesite="Strict",
        secure=request.secure,
    )
    raise response


@routes.post("/logout")
async def logout(request: web.Request) -> web.StreamResponse:
    response = web.HTTPSeeOther(location="/dashboard/login")
    response.del_cookie(COOKIE, path="/dashboard")
    raise response
