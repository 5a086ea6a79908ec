"""Signing in with a token (the admin token acts, the viewer token only looks) and out."""

from __future__ import annotations

from aiohttp import web

from daemon.web.dashboard.render import SESSIONS, render
from daemon.web.dashboard.session import COOKIE, LIFETIME

routes = web.RouteTableDef()


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
    form = await request.post()
    token = form.get("token")
    target = _next(str(form.get("next") or ""))
    role = request.app[SESSIONS].sign_in(token) if isinstance(token, str) else None
    if role is None:
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
