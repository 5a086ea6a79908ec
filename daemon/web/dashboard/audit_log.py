"""The audit log: every action taken, by whom, from where, when."""

from __future__ import annotations

from aiohttp import web

routes = web.RouteTableDef()
