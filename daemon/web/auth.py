"""Who is calling: the one check of the admin token, for the server's throttle, the admin API
and (later) the dashboard."""

from __future__ import annotations

import hmac
from typing import Literal

from aiohttp import web

Caller = Literal["admin", "anonymous", "forged"]

# What a caller without the right token is told; the same words everywhere.
REFUSALS: dict[Caller, tuple[int, str]] = {
    "anonymous": (401, "authentication required: send Authorization: Bearer <token>"),
    "forged": (403, "invalid token"),
}
CHALLENGE = {"WWW-Authenticate": "Bearer"}


def caller(request: web.Request, token: bytes | None) -> Caller:
    """ "admin" for the admin token, "anonymous" without credentials, "forged" otherwise; the
    comparison takes the same time whatever the guess."""
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not given.strip():
        return "anonymous"
    if token is not None and hmac.compare_digest(given.strip().encode("utf-8", "replace"), token):
        return "admin"
    return "forged"
