"""Schedules: every schedule with its recent runs, and one schedule's run ledger."""

from __future__ import annotations

from aiohttp import web

routes = web.RouteTableDef()
