"""Alerts as an operator sees them: the incidents (open, or recently closed too) and a test
message to a destination, delivered like any alert (a job on the internal queue)."""

from __future__ import annotations

import json
import socket
from typing import Any

import asyncpg

from daemon.alerts import queries
from daemon.alerts.incidents import DELIVER_KIND, as_dict
from daemon.config.alerts import AlertsConfig
from daemon.operate.errors import NotFound


async def incidents(
    conn: asyncpg.Connection, *, include_closed: bool = False, limit: int = 100
) -> list[dict[str, Any]]:
    """Open incidents first, newest first; with include_closed, closed ones after them."""
    rows = await conn.fetch(queries.INCIDENTS, include_closed, limit)
    found = []
    for r in rows:
        item = dict(r)
        item["details"] = {
            k: v for k, v in as_dict(r["details"]).items() if k not in ("what", "latest")
        }
        found.append(item)
    return found


def test_document(destination: str, now: Any) -> dict[str, Any]:
    host = socket.gethostname()
    return {
        "event": "test",
        "rule": None,
        "incident_id": 0,
        "started_at": now.isoformat(),
        "schedule": None,
        "queue": None,
        "kind": None,
        "job_id": None,
        "attempt": None,
        "error": None,
        "count": 0,
        "text": f"test message from stoker on {host}: destination {destination} works",
    }


async def send_test(conn: asyncpg.Connection, config: AlertsConfig, destination: str) -> int:
    """Enqueue a test message to `destination` on the internal queue; the job's id. A daemon
    serving that queue delivers it (see delivery() for the outcome)."""
    if destination not in config.destinations:
        raise NotFound(
            f"no alert destination named {destination!r}",
            name=destination,
            known=sorted(config.destinations),
        )
    now = await conn.fetchval(queries.NOW)
    job_id: int = await conn.fetchval(
        queries.ENQUEUE_MESSAGE,
        config.queue,
        DELIVER_KIND,
        json.dumps({"destination": destination, "message": test_document(destination, now)}),
        3,
        json.dumps({"alert": {"test": True}}),
    )
    return job_id


async def delivery(conn: asyncpg.Connection, job_id: int) -> dict[str, Any] | None:
    """A delivery job's state, attempts and last error."""
    row = await conn.fetchrow(queries.JOB_OUTCOME, job_id)
    return None if row is None else dict(row)
