"""Enqueue jobs from any Python app, on the app's own connection and in its transaction.

    from daemon import client
    job_id = await client.enqueue(conn, queue="default", kind="email.send", payload={...})
    done = await client.wait_for(pool, job_id, timeout=30)     # after the commit

Async connections: asyncpg Connection or Pool, psycopg 3 AsyncConnection, SQLAlchemy
AsyncConnection or AsyncSession. Sync ones (the *_sync functions): psycopg 3 Connection,
SQLAlchemy Connection or Session. Nothing here commits for the caller. Importing this loads
none of the daemon's machinery (HTTP server, event loop policy, metrics, mail): see
tests/test_client_import.py; psycopg and SQLAlchemy are imported only for their own objects.
"""

from __future__ import annotations

from daemon.client.jobs import (
    Job,
    JobStatus,
    enqueue,
    enqueue_many,
    enqueue_many_sync,
    enqueue_sync,
    get_job,
    get_job_sync,
)
from daemon.client.schedules import save_schedule, save_schedule_sync
from daemon.client.waiting import wait_for, wait_for_sync

__all__ = [
    "Job",
    "JobStatus",
    "enqueue",
    "enqueue_many",
    "enqueue_many_sync",
    "enqueue_sync",
    "get_job",
    "get_job_sync",
    "save_schedule",
    "save_schedule_sync",
    "wait_for",
    "wait_for_sync",
]
