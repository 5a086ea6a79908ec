"""Who may see and do what: every page needs a session, every action the admin role and the
session's CSRF token, and is written to the audit log; every response carries headers that
keep the pages from running any script but the dashboard's own."""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler

from daemon.operate import audit
from daemon.web.dashboard.render import DB, SESSION, SESSIONS, render
from daemon.web.dashboard.session import COOKIE, Session

log = logging.getLogger("stoker.dashboard")

# No inline script or style, nothing from elsewhere, not framed, forms only to ourselves.
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; frame-ancestors 'none'; form-action 'self'; base-uri 'none'; "
    "object-src 'none'"
)
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-store",
}
OPEN_PATHS = ("/dashboard/login", "/dashboard/static/")
CSRF_FIELD = "csrf"
CSRF_HEADER = "X-CSRF-Token"


@web.middleware
async def security_headers(request: web.Request, handler: Handler) -> web.StreamResponse:
    started = time.perf_counter()
    try:
        response = await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:  # a redirect: keep it, with our headers
            exc.headers.update(HEADERS)
            raise
        response = error_page(request, exc.status, exc.reason)
    for name, value in HEADERS.items():
        if name == "Cache-Control" and request.path.startswith("/dashboard/static/"):
            continue  # versioned files: let the browser keep them
        response.headers.setdefault(name, value)
    # The server's time for this request (what bench/dashboard.py measures), in milliseconds.
    response.headers["Server-Timing"] = f"app;dur={(time.perf_counter() - started) * 1000:.1f}"
    return response


@web.middleware
async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Pages need a session: without one, a GET is sent to the login page (and back after);
    anything else is refused with 401."""
    if request.path.startswith(OPEN_PATHS):
        return await handler(request)
    session = request.app[SESSIONS].read(request.cookies.get(COOKIE))
    if session is None:
        if request.method in ("GET", "HEAD"):
            login = request.app.router["login"].url_for().with_query(next=request.path_qs)
            raise web.HTTPSeeOther(location=login)
        return error_page(request, 401, "Sign in first")
    request[SESSION] = session
    return await handler(request)


def error_page(request: web.Request, status: int, reason: str) -> web.Response:
    return render(request, "error.html.j2", status=status, status_code=status, reason=reason)


ActionHandler = Callable[[web.Request, Session, dict[str, str]], Awaitable[Any]]


def action(name: str) -> Callable[[ActionHandler], Handler]:
    """An action: POST only, the admin role, the session's CSRF token (form field `csrf` or
    header X-CSRF-Token), then the handler with the form's fields; written to the audit log
    with what the handler returns (the target and details). Answers with a redirect back to
    the page it came from (`back`), or 204 for the dashboard's script (X-Requested-With)."""

    def wrap(handle: ActionHandler) -> Handler:
        @functools.wraps(handle)
        async def run(request: web.Request) -> web.StreamResponse:
            session: Session = request[SESSION]
            form = {k: v for k, v in (await request.post()).items() if isinstance(v, str)}
            if not session.can_act:
                return error_page(request, 403, "This session can look but not act")
            given = form.get(CSRF_FIELD) or request.headers.get(CSRF_HEADER)
            if not request.app[SESSIONS].csrf_ok(session, given):
                return error_page(
                    request, 403, "The form's CSRF token is missing or wrong: reload the page"
                )
            outcome = await handle(request, session, form)
            target, details = outcome if isinstance(outcome, tuple) else (outcome, {})
            async with request.app[DB].acquire() as conn:
                await audit.record(
                    conn,
                    role=session.role,
                    address=request.remote,
                    action=name,
                    target=None if target is None else str(target),
                    details=details,
                )
            if request.headers.get("X-Requested-With") == "stoker-dashboard":
                return web.Response(status=204)
            back = form.get("back", "")
            if not back.startswith("/dashboard/") or back.startswith("//"):
                back = "/dashboard/"
            raise web.HTTPSeeOther(location=back)

        return run

    return wrap
