"""The audit log: every action taken, by whom, from where, when; newest first, paged by id."""

from __future__ import annotations

from aiohttp import web

from daemon.operate import audit
from daemon.web.dashboard.render import DB, render

routes = web.RouteTableDef()

PAGE = 50


@routes.get("/audit", name="audit")
async def audit_page(request: web.Request) -> web.Response:
    before: int | None = None
    given = request.query.get("before")
    if given:
        try:
            before = int(given)
            if not 1 <= before <= 2**63 - 1:
                raise ValueError(given)
        except ValueError:
            raise web.HTTPBadRequest(reason="before must be an entry's id") from None
    async with request.app[DB].acquire() as conn:
        entries = await audit.recent(conn, limit=PAGE + 1, before=before)
    older = entries[PAGE - 1]["id"] if len(entries) > PAGE else None
    return render(
        request,
        "audit.html.j2",
        title="Audit log",
        entries=entries[:PAGE],
        older=older,
        paged=before is not None,
    )
