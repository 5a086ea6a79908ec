"""Queues: their counts, and pausing and resuming them."""

from __future__ import annotations

from aiohttp import web

routes = web.RouteTableDef()
