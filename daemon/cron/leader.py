"""Advisory-lock leader election on a dedicated session connection.

One process at a time holds the session lock `LEADER_KEY`. The lock lives and dies with that
connection: when it drops, PostgreSQL releases the lock and this process stops leading at once.
The others try for it every `retry` seconds with `pg_try_advisory_lock`, so one of them takes
over within `retry` of the old session's end. They never wait for it inside a statement: a
statement waiting on a lock holds its snapshot, and that pinned the whole database's xmin
horizon for as long as it waited, so that no dead row anywhere could be cleaned up (claims
slowed down 4x walking dead index entries at the head of the queue). The connection is never
borrowed from the pool, which would run pg_advisory_unlock_all() on release."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import asyncpg

from daemon.events import wait_any
from daemon.store.db import (
    COMMAND_TIMEOUT,
    CONNECT_ERRORS,
    DB_ERRORS,
    close_quietly,
    connect,
    describe_failure,
)

log = logging.getLogger("stoker.leader")

LEADER_KEY = int.from_bytes(b"stokcron", "big", signed=True)
# The leader's session is named this, then its worker id: how `stoker schedules` finds it.
APPLICATION_PREFIX = "stoker-leader "


class Leader:
    def __init__(self, dsn: str, *, worker_id: str, retry: float, stopping: asyncio.Event) -> None:
        self._dsn = dsn
        self._worker_id = worker_id
        self._retry = retry
        self._stopping = stopping
        self.is_leader = False
        self.conn: asyncpg.Connection | None = None
        # Serialises use of the lock connection (probes and the scheduler's writes).
        self.lock = asyncio.Lock()
        self.changed = asyncio.Event()

    def _set(self, leading: bool) -> None:
        if leading != self.is_leader:
            self.is_leader = leading
            self.changed.set()

    async def run(self) -> None:
        while not self._stopping.is_set():
            conn: asyncpg.Connection | None = None
            try:
                conn = await connect(
                    self._dsn,
                    application_name=f"{APPLICATION_PREFIX}{self._worker_id}"[:63],
                    # A fire stuck on a half-open socket must fail, so that leadership is
                    # given up instead of held by a process that can no longer fire.
                    command_timeout=COMMAND_TIMEOUT,
                )
                lost = asyncio.Event()
                conn.add_termination_listener(_lost(lost, self))
                await self._bid(conn, lost)
            except CONNECT_ERRORS as exc:
                if self.is_leader:
                    log.warning("lost leadership: %s", exc)
                else:
                    log.debug("leader bid failed on %s", describe_failure(self._dsn, exc))
            finally:
                was = self.is_leader
                self._set(False)
                self.conn = None
                if conn is not None:
                    await close_quietly(conn)
                if was and self._stopping.is_set():
                    log.info("gave up leadership (shutting down)")
            await wait_any(self._stopping, seconds=self._retry)

    async def _bid(self, conn: asyncpg.Connection, lost: asyncio.Event) -> None:
        while not self._stopping.is_set() and not lost.is_set():
            # Each try is also the probe that finds a dead connection; bounded like the
            # holder's probe, so that a half-open socket cannot hold up a shutdown.
            got = await conn.fetchval(
                "SELECT pg_try_advisory_lock($1)",
                LEADER_KEY,
                timeout=min(self._retry, COMMAND_TIMEOUT),
            )
            if got:
                if self._stopping.is_set():
                    return  # closing the connection gives the lock straight back
                self.conn = conn
                self._set(True)
                log.info("became leader: worker %s fires the schedules", self._worker_id)
                await self._hold(conn, lost)
                if not self._stopping.is_set():
                    self._set(False)
                    log.warning("lost leadership: the lock connection is gone")
                return
            await wait_any(self._stopping, lost, seconds=self._retry)

    async def _hold(self, conn: asyncpg.Connection, lost: asyncio.Event) -> None:
        """Return when the connection is lost, fails a probe, or the daemon stops."""
        while not self._stopping.is_set() and not lost.is_set():
            await wait_any(self._stopping, lost, seconds=self._retry)
            if self._stopping.is_set() or lost.is_set():
                return
            try:
                async with asyncio.timeout(COMMAND_TIMEOUT + self._retry):
                    async with self.lock:
                        await conn.fetchval("SELECT 1", timeout=self._retry)
            except DB_ERRORS:
                return


def _lost(event: asyncio.Event, leader: Leader) -> Callable[[object], None]:
    def on_lost(_conn: object) -> None:
        event.set()
        leader._set(False)  # stop firing the moment the connection is known gone

    return on_lost
