"""The connections daemon.client takes, each opened against a test database, for
tests/test_client*.py: one context manager per driver, yielding the connection (or session)
a caller would pass, and what commits or rolls back its transaction."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from typing import Any

import asyncpg
import psycopg
from sqlalchemy import create_engine
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine
from sqlalchemy.orm import Session


def sa_url(dsn: str, driver: str) -> str:
    return dsn.replace("postgresql://", f"postgresql+{driver}://", 1).replace(
        "postgres://", f"postgresql+{driver}://", 1
    )


@dataclass
class AsyncTx:
    conn: Any  # what the caller passes to daemon.client
    commit: Any
    rollback: Any


ASYNC_DRIVERS = ["asyncpg", "psycopg", "sqlalchemy-conn", "sqlalchemy-session"]
SYNC_DRIVERS = ["psycopg", "sqlalchemy-conn", "sqlalchemy-session"]


@asynccontextmanager
async def async_tx(dsn: str, driver: str) -> AsyncIterator[AsyncTx]:
    """A connection (or session) with a transaction open."""
    if driver == "asyncpg":
        conn = await asyncpg.connect(dsn)
        tx = conn.transaction()
        await tx.start()
        try:
            yield AsyncTx(conn, tx.commit, tx.rollback)
        finally:
            await conn.close()
    elif driver == "psycopg":
        pconn = await psycopg.AsyncConnection.connect(dsn)  # not autocommit: a transaction
        try:
            yield AsyncTx(pconn, pconn.commit, pconn.rollback)
        finally:
            await pconn.close()
    else:
        engine = create_async_engine(sa_url(dsn, "asyncpg"))
        try:
            if driver == "sqlalchemy-conn":
                async with engine.connect() as sconn:
                    await sconn.begin()
                    yield AsyncTx(sconn, sconn.commit, sconn.rollback)
            else:
                async with AsyncSession(engine) as session:
                    yield AsyncTx(session, session.commit, session.rollback)
        finally:
            await engine.dispose()


@dataclass
class SyncTx:
    conn: Any
    commit: Any
    rollback: Any


@contextmanager
def sync_tx(dsn: str, driver: str) -> Iterator[SyncTx]:
    if driver == "psycopg":
        with psycopg.Connection.connect(dsn) as pconn:
            yield SyncTx(pconn, pconn.commit, pconn.rollback)
        return
    engine = create_engine(sa_url(dsn, "psycopg"))
    try:
        if driver == "sqlalchemy-conn":
            with engine.connect() as sconn:
                sconn.begin()
                yield SyncTx(sconn, sconn.commit, sconn.rollback)
        else:
            with Session(engine) as session:
                yield SyncTx(session, session.commit, session.rollback)
    finally:
        engine.dispose()
