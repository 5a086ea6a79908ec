"""Jobs: the list with its filters and bulk actions, and one job with its attempts."""

from __future__ import annotations

from aiohttp import web

routes = web.RouteTableDef()
