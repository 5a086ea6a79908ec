"""Which driver a caller's connection belongs to, and how to run a statement on it.

The driver is told from the object's classes (their module names) before anything of it is
imported: an app on psycopg never imports asyncpg's or SQLAlchemy's client code through us,
and the library is imported only once the caller's object shows it is already loaded."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal, Protocol

from daemon.client import statements

Driver = Literal["asyncpg", "psycopg", "sqlalchemy"]
Row = tuple[Any, ...]


def driver_of(conn: object) -> Driver:
    for cls in type(conn).__mro__:
        top = cls.__module__.partition(".")[0]
        if top in ("asyncpg", "psycopg", "sqlalchemy"):
            return top  # type: ignore[return-value]
    raise TypeError(
        f"unsupported connection {type(conn).__module__}.{type(conn).__qualname__}: pass an "
        "asyncpg Connection or Pool, a psycopg 3 (Async)Connection, or a SQLAlchemy "
        "(Async)Connection or (Async)Session"
    )


class AsyncRunner(Protocol):
    async def rows(self, sql: str, args: Sequence[Any]) -> list[Row]: ...


class SyncRunner(Protocol):
    def rows(self, sql: str, args: Sequence[Any]) -> list[Row]: ...


class _Asyncpg:
    def __init__(self, conn: Any) -> None:
        self.conn = conn  # a Connection, a Pool (one statement: its own connection) or a proxy

    async def rows(self, sql: str, args: Sequence[Any]) -> list[Row]:
        records = await self.conn.fetch(sql, *args)
        return [tuple(r.values()) for r in records]


class _PsycopgAsync:
    def __init__(self, conn: Any) -> None:
        self.conn = conn

    async def rows(self, sql: str, args: Sequence[Any]) -> list[Row]:
        text, params = statements.for_format(sql, args)
        cur = await self.conn.execute(text, params)
        return list(await cur.fetchall()) if cur.description else []


class _PsycopgSync:
    def __init__(self, conn: Any) -> None:
        self.conn = conn

    def rows(self, sql: str, args: Sequence[Any]) -> list[Row]:
        text, params = statements.for_format(sql, args)
        cur = self.conn.execute(text, params)
        return list(cur.fetchall()) if cur.description else []


class _AlchemyAsync:
    def __init__(self, conn: Any) -> None:
        self.conn = conn  # AsyncConnection or AsyncSession: the same execute()

    async def rows(self, sql: str, args: Sequence[Any]) -> list[Row]:
        from sqlalchemy import text as sa_text

        text, params = statements.for_named(sql, args)
        result = await self.conn.execute(sa_text(text), params)
        return [tuple(r) for r in result.fetchall()] if result.returns_rows else []


class _AlchemySync:
    def __init__(self, conn: Any) -> None:
        self.conn = conn  # Connection or Session

    def rows(self, sql: str, args: Sequence[Any]) -> list[Row]:
        from sqlalchemy import text as sa_text

        text, params = statements.for_named(sql, args)
        result = self.conn.execute(sa_text(text), params)
        return [tuple(r) for r in result.fetchall()] if result.returns_rows else []


def _is_async_alchemy(conn: object) -> bool:
    from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

    return isinstance(conn, AsyncConnection | AsyncSession)


def async_runner(conn: object) -> AsyncRunner:
    driver = driver_of(conn)
    if driver == "asyncpg":
        return _Asyncpg(conn)
    if driver == "psycopg":
        import psycopg

        if isinstance(conn, psycopg.AsyncConnection):
            return _PsycopgAsync(conn)
        raise TypeError("a sync psycopg Connection: use the *_sync functions")
    if _is_async_alchemy(conn):
        return _AlchemyAsync(conn)
    raise TypeError("a sync SQLAlchemy Connection or Session: use the *_sync functions")


def sync_runner(conn: object) -> SyncRunner:
    driver = driver_of(conn)
    if driver == "asyncpg":
        raise TypeError("an asyncpg connection is async: use the coroutine functions")
    if driver == "psycopg":
        import psycopg

        if isinstance(conn, psycopg.Connection):
            return _PsycopgSync(conn)
        raise TypeError("a psycopg AsyncConnection: use the coroutine functions")
    if _is_async_alchemy(conn):
        raise TypeError("a SQLAlchemy AsyncConnection or AsyncSession: use the coroutine functions")
    return _AlchemySync(conn)
