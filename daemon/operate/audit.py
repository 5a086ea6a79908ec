"""The audit log: every action taken by an operator through the dashboard (and who took it)."""

from __future__ import annotations

import json
from typing import Any

import asyncpg

RECORD = """
INSERT INTO stoker.audit_log (role, address, action, target, details)
VALUES ($1, $2, $3, $4, $5::text::jsonb)
"""

RECENT = """
SELECT id, at, role, address, action, target, details::text AS details
  FROM stoker.audit_log
 WHERE $1::bigint IS NULL OR id < $1::bigint
 ORDER BY id DESC LIMIT $2
"""


async def record(
    conn: asyncpg.Connection,
    *,
    role: str,
    address: str | None,
    action: str,
    target: str | None,
    details: dict[str, Any],
) -> None:
    await conn.execute(RECORD, role, address, action, target, json.dumps(details, default=str))


async def recent(
    conn: asyncpg.Connection, limit: int = 100, before: int | None = None
) -> list[dict[str, Any]]:
    """Newest first; `before` an id to page from."""
    rows = await conn.fetch(RECENT, before, limit)
    return [{**dict(r), "details": json.loads(r["details"])} for r in rows]
