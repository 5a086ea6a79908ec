"""asyncpg pool and dedicated connections, set up the same way everywhere."""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any

import asyncpg

# Server-side keepalives let PostgreSQL notice a vanished daemon; the listener's own probe
# notices a vanished server.
SERVER_SETTINGS = {
    "tcp_keepalives_idle": "30",
    "tcp_keepalives_interval": "10",
    "tcp_keepalives_count": "3",
}


# What a lost, refused or timed-out database round trip raises. The engine retries these;
# anything else is a bug and is reported as one.
DB_ERRORS: tuple[type[Exception], ...] = (
    OSError,
    TimeoutError,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,  # e.g. an operation cut off mid-flight by a dying connection
)

# Connecting can also fail on a malformed DSN.
CONNECT_ERRORS: tuple[type[Exception], ...] = (*DB_ERRORS, ValueError)

# No statement of the engine's own should take this long; a half-open connection must not hang
# a claim, a write or the shutdown forever.
COMMAND_TIMEOUT = 30.0


async def init_connection(conn: asyncpg.Connection) -> None:
    await conn.set_type_codec("jsonb", encoder=json.dumps, decoder=json.loads, schema="pg_catalog")


async def keep_session(conn: asyncpg.Connection) -> None:
    """Pool reset: none. asyncpg's default sends `pg_advisory_unlock_all(); CLOSE ALL;
    UNLISTEN *; RESET ALL` on every release, a round trip per claim and per write. The pool
    runs only the engine's own statements, which leave no session state behind (LISTEN and
    advisory locks live on dedicated connections); asyncpg still rolls back a transaction
    left open before a connection goes back."""


async def create_pool(
    dsn: str,
    *,
    max_size: int = 10,
    statement_cache_size: int = 100,
    application_name: str = "stoker",
    settings: dict[str, str] | None = None,
) -> asyncpg.Pool:
    pool: asyncpg.Pool = await asyncpg.create_pool(
        dsn,
        min_size=1,
        max_size=max_size,
        init=init_connection,
        reset=keep_session,
        statement_cache_size=statement_cache_size,
        command_timeout=COMMAND_TIMEOUT,
        server_settings={
            **SERVER_SETTINGS,
            "application_name": application_name,
            **(settings or {}),
        },
    )
    return pool


async def connect(
    dsn: str,
    *,
    application_name: str,
    statement_cache_size: int = 100,
    connect_timeout: float = 10,
    command_timeout: float | None = None,
) -> asyncpg.Connection:
    """A connection of its own (LISTEN, advisory locks): never borrowed from the pool, because
    the pool resets connections with UNLISTEN * and pg_advisory_unlock_all()."""
    conn: asyncpg.Connection = await asyncpg.connect(
        dsn,
        timeout=connect_timeout,
        command_timeout=command_timeout,
        statement_cache_size=statement_cache_size,
        server_settings={**SERVER_SETTINGS, "application_name": application_name},
    )
    await init_connection(conn)
    return conn


def redact(dsn: str) -> str:
    """The DSN without its password, for logs and error messages."""
    if "@" not in dsn or "://" not in dsn:
        return dsn
    scheme, rest = dsn.split("://", 1)
    creds, host = rest.rsplit("@", 1)
    user = creds.split(":", 1)[0]
    return f"{scheme}://{user}:***@{host}" if ":" in creds else f"{scheme}://{user}@{host}"


def as_json_text(value: Any) -> str:
    """JSON for a jsonb parameter; NaN and Infinity are refused (PostgreSQL has no such JSON)."""
    return json.dumps(value, default=str, separators=(",", ":"), allow_nan=False)


async def close_quietly(conn: asyncpg.Connection) -> None:
    """Close a dedicated connection that may already be dead, without raising."""
    try:
        await asyncio.wait_for(conn.close(), timeout=2)
    except Exception:  # a dead connection may fail to close in many ways
        with contextlib.suppress(Exception):
            conn.terminate()
