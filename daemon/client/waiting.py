"""wait_for: a job's end, announced by a notification, never polled.

The order is what makes it sound: LISTEN, then register as a waiter (migration 020: only while
a waiter is registered does a finished job NOTIFY, so producers and workers pay nothing when
nobody waits), then look at the job once (it may have finished already), then wait for the
job's notification and look again. A job that ends between the look and the wait is not
missed: the notification is queued on the listening connection from LISTEN on.

Which connection listens (LISTEN takes effect only when its transaction commits, and we never
commit the caller's):
- asyncpg: a Pool lends one of its connections; a Connection is used as it is, and must not be
  in a transaction.
- psycopg 3: the connection itself, through its notifies(); it must not be in a transaction
  (autocommit, or idle: each of our statements is then a transaction of its own).
- SQLAlchemy: a connection of its own, checked out of the caller's engine in AUTOCOMMIT, whose
  driver connection (asyncpg or psycopg 3) listens; the caller's transaction is untouched.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Any

from daemon.client import statements
from daemon.client.drivers import Row, driver_of
from daemon.client.jobs import FINISHED_STATES, JobStatus, status_of

_NOT_IN_TRANSACTION = (
    "wait_for needs a connection outside a transaction (LISTEN takes effect only at commit, "
    "and the caller's transaction is never committed here): commit first, or pass a pool"
)


def _look(rows: Sequence[Row], job_id: int) -> JobStatus | None:
    """The job from GET_JOB's rows if it has finished."""
    if not rows:
        raise LookupError(f"no job with id {job_id} (not enqueued, or not yet committed)")
    status = status_of(rows[0])
    return status if status.finished else None


# -- async ------------------------------------------------------------------------------------


class _AsyncpgListener:
    def __init__(self, conn: Any) -> None:
        self.conn = conn
        self.heard: asyncio.Queue[str] = asyncio.Queue()

    def _on_notify(self, _conn: Any, _pid: int, _channel: str, payload: str) -> None:
        self.heard.put_nowait(payload)

    async def listen(self) -> None:
        await self.conn.add_listener(statements.CHANNEL, self._on_notify)

    async def unlisten(self) -> None:
        await self.conn.remove_listener(statements.CHANNEL, self._on_notify)

    async def rows(self, sql: str, args: Sequence[Any]) -> list[Row]:
        return [tuple(r.values()) for r in await self.conn.fetch(sql, *args)]

    async def next_payload(self) -> str:
        return await self.heard.get()


class _PsycopgAsyncListener:
    def __init__(self, conn: Any) -> None:
        self.conn = conn

    async def listen(self) -> None:
        await self.rows(statements.LISTEN, [])

    async def unlisten(self) -> None:
        await self.rows(statements.UNLISTEN, [])

    async def rows(self, sql: str, args: Sequence[Any]) -> list[Row]:
        text, params = statements.for_format(sql, args)
        # Autocommit: just the statement; idle: a transaction of its own, committed at once.
        async with self.conn.transaction():
            cur = await self.conn.execute(text, params)
            return list(await cur.fetchall()) if cur.description else []

    async def next_payload(self) -> str:
        async for n in self.conn.notifies(stop_after=1):
            return str(n.payload)
        raise ConnectionError("the listening connection stopped delivering notifications")


async def _wait_async(listener: Any, job_id: int) -> JobStatus:
    await listener.listen()
    try:
        await listener.rows(statements.HOLD, [])
        try:
            await listener.rows(statements.REGISTER, [job_id])
            try:
                while True:
                    live = await listener.rows(statements.LIVE_STATE, [job_id])
                    if not live or live[0][0] in FINISHED_STATES:
                        done = _look(await listener.rows(statements.GET_JOB, [job_id]), job_id)
                        if done is not None:
                            return done
                    while await listener.next_payload() not in (str(job_id), statements.ANY_JOB):
                        pass
            finally:
                await listener.rows(statements.UNREGISTER, [job_id])
        finally:
            await listener.rows(statements.RELEASE, [])
    finally:
        await listener.unlisten()


async def _wait_asyncpg(conn: Any, job_id: int) -> JobStatus:
    import asyncpg

    if isinstance(conn, asyncpg.Pool):
        async with conn.acquire() as own:
            return await _wait_asyncpg(own, job_id)
    if conn.is_in_transaction():
        raise ValueError(_NOT_IN_TRANSACTION)
    return await _wait_async(_AsyncpgListener(conn), job_id)


async def _wait_psycopg(conn: Any, job_id: int) -> JobStatus:
    import psycopg
    from psycopg.pq import TransactionStatus

    if not isinstance(conn, psycopg.AsyncConnection):
        raise TypeError("a sync psycopg Connection: use wait_for_sync")
    if conn.info.transaction_status != TransactionStatus.IDLE:
        raise ValueError(_NOT_IN_TRANSACTION)
    return await _wait_async(_PsycopgAsyncListener(conn), job_id)


async def _wait_alchemy(conn: Any, job_id: int) -> JobStatus:
    from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

    if isinstance(conn, AsyncConnection):
        engine = conn.engine
    elif isinstance(conn, AsyncSession) and conn.bind is not None:
        bind = conn.bind
        engine = bind.engine if isinstance(bind, AsyncConnection) else bind
    else:
        raise TypeError(
            "wait_for takes a SQLAlchemy AsyncConnection, or an AsyncSession bound "
            "to an engine (bind=...); for sync ones, wait_for_sync"
        )
    async with engine.connect() as checked_out:
        own = await checked_out.execution_options(isolation_level="AUTOCOMMIT")
        raw = await own.get_raw_connection()
        driver_conn = raw.driver_connection
        if driver_of(driver_conn) == "asyncpg":
            return await _wait_asyncpg(driver_conn, job_id)
        return await _wait_psycopg(driver_conn, job_id)


# `timeout` is the API the issue asks for (and asyncio.timeout's own, inside).
async def wait_for(conn: Any, job_id: int, timeout: float) -> JobStatus:  # noqa: ASYNC109
    """The job once it has finished (succeeded, failed or cancelled); TimeoutError if it has
    not within `timeout` seconds; LookupError if there is no such job."""
    driver = driver_of(conn)
    async with asyncio.timeout(timeout):
        if driver == "asyncpg":
            return await _wait_asyncpg(conn, job_id)
        if driver == "psycopg":
            return await _wait_psycopg(conn, job_id)
        return await _wait_alchemy(conn, job_id)


# -- sync -------------------------------------------------------------------------------------


class _PsycopgSyncListener:
    def __init__(self, conn: Any, deadline: float) -> None:
        self.conn = conn
        self.deadline = deadline

    def rows(self, sql: str, args: Sequence[Any]) -> list[Row]:
        text, params = statements.for_format(sql, args)
        with self.conn.transaction():
            cur = self.conn.execute(text, params)
            return list(cur.fetchall()) if cur.description else []

    def next_payload(self, job_id: int) -> str:
        left = self.deadline - time.monotonic()
        if left > 0:
            for n in self.conn.notifies(timeout=left, stop_after=1):
                return str(n.payload)
        raise TimeoutError(f"job {job_id} did not finish in time")


def _wait_psycopg_sync(conn: Any, job_id: int, deadline: float) -> JobStatus:
    import psycopg
    from psycopg.pq import TransactionStatus

    if not isinstance(conn, psycopg.Connection):
        raise TypeError("a psycopg AsyncConnection: use wait_for")
    if conn.info.transaction_status != TransactionStatus.IDLE:
        raise ValueError(_NOT_IN_TRANSACTION)
    listener = _PsycopgSyncListener(conn, deadline)
    listener.rows(statements.LISTEN, [])
    try:
        listener.rows(statements.HOLD, [])
        try:
            listener.rows(statements.REGISTER, [job_id])
            try:
                while True:
                    live = listener.rows(statements.LIVE_STATE, [job_id])
                    if not live or live[0][0] in FINISHED_STATES:
                        done = _look(listener.rows(statements.GET_JOB, [job_id]), job_id)
                        if done is not None:
                            return done
                    while listener.next_payload(job_id) not in (str(job_id), statements.ANY_JOB):
                        pass
            finally:
                listener.rows(statements.UNREGISTER, [job_id])
        finally:
            listener.rows(statements.RELEASE, [])
    finally:
        listener.rows(statements.UNLISTEN, [])


def wait_for_sync(conn: Any, job_id: int, timeout: float) -> JobStatus:
    """wait_for on a psycopg Connection, or a SQLAlchemy Connection or Session (whose engine
    must use the psycopg 3 driver: it lends the connection that listens)."""
    deadline = time.monotonic() + timeout
    if driver_of(conn) == "psycopg":
        return _wait_psycopg_sync(conn, job_id, deadline)
    if driver_of(conn) == "asyncpg":
        raise TypeError("an asyncpg connection is async: use wait_for")
    from sqlalchemy import Connection
    from sqlalchemy.orm import Session

    if isinstance(conn, Connection):
        engine = conn.engine
    elif isinstance(conn, Session) and conn.bind is not None:
        bind = conn.get_bind()
        engine = bind.engine if isinstance(bind, Connection) else bind
    else:
        raise TypeError(
            "wait_for_sync takes a SQLAlchemy Connection, or a Session bound to "
            "an engine; for async ones, wait_for"
        )
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as own:
        driver_conn = own.connection.driver_connection
        if driver_of(driver_conn) != "psycopg":
            raise TypeError(
                "wait_for_sync over SQLAlchemy needs the psycopg (3) driver "
                "(postgresql+psycopg://): it listens on one of the engine's connections"
            )
        return _wait_psycopg_sync(driver_conn, job_id, deadline)
