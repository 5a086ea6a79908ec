"""The dedicated LISTEN connection: wakes pools on NOTIFY, reconnects, probes for half-open
connections, and wakes every pool after a reconnect (notifications sent meanwhile are gone)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import asyncpg

from daemon.events import wait_any
from daemon.store.db import CONNECT_ERRORS, DB_ERRORS, close_quietly, connect, describe_failure

log = logging.getLogger("stoker.listener")

CHANNEL = "stoker_jobs"
SCHEDULES_CHANNEL = "stoker_schedules"
CANCEL_CHANNEL = "stoker_cancel"  # payload: the id of a running job someone cancelled
WakeFn = Callable[[str, float | None], None]


def parse_notification(payload: str) -> tuple[str, float | None]:
    """'queue' means due now; 'queue <epoch>' means the earliest new job is due then."""
    queue, _, due = payload.partition(" ")
    try:
        return queue, float(due) if due else None
    except ValueError:
        return queue, None


class Listener:
    def __init__(
        self,
        dsn: str,
        *,
        on_notify: WakeFn,
        on_connected: Callable[[], None],
        probe_interval: float,
        stopping: asyncio.Event,
        statement_cache_size: int = 100,
        on_schedules_changed: Callable[[], None] | None = None,
        on_cancel: Callable[[int], None] | None = None,
    ) -> None:
        self._on_cancel = on_cancel
        self._dsn = dsn
        self._on_notify = on_notify
        self._on_connected = on_connected
        self._on_schedules_changed = on_schedules_changed
        self._probe_interval = probe_interval
        self._stopping = stopping
        self._statement_cache_size = statement_cache_size
        self.connected = False
        self.reconnects = 0
        self.backend_pid: int | None = None
        self._conn: asyncpg.Connection | None = None
        self._lent = False

    def lend(self) -> asyncpg.Connection | None:
        """This connection for one statement, if it is up and nobody else is using it; give
        it back with `give_back`.

        A pool woken by a NOTIFY claims on it: its backend has just sent the notification and
        is awake, while a pooled connection's backend has been asleep since the pool went
        idle, and waking it (and its CPU) cost half a millisecond of every wake-up here. Any
        notification that arrives meanwhile is delivered once the statement ends."""
        if not self.connected or self._conn is None or self._lent:
            return None
        self._lent = True
        return self._conn

    def give_back(self) -> None:
        self._lent = False

    def _notified(self, _conn: object, _pid: int, _channel: str, payload: str) -> None:
        queue, due = parse_notification(payload)
        self._on_notify(queue, due)

    def _cancel_notified(self, _conn: object, _pid: int, _channel: str, payload: str) -> None:
        if self._on_cancel is None:
            return
        try:
            job_id = int(payload)
        except ValueError:
            log.warning("ignoring a %s notification that is not a job id", CANCEL_CHANNEL)
            return
        self._on_cancel(job_id)

    def _schedules_notified(self, *_args: object) -> None:
        if self._on_schedules_changed is not None:
            self._on_schedules_changed()

    async def run(self) -> None:
        delay = 0.1
        ever_connected = False
        while not self._stopping.is_set():
            conn: asyncpg.Connection | None = None
            try:
                conn = await connect(
                    self._dsn,
                    application_name="stoker-listener",
                    statement_cache_size=self._statement_cache_size,
                )
                lost = asyncio.Event()
                conn.add_termination_listener(_setter(lost))
                await conn.add_listener(CHANNEL, self._notified)
                await conn.add_listener(SCHEDULES_CHANNEL, self._schedules_notified)
                if self._on_cancel is not None:
                    await conn.add_listener(CANCEL_CHANNEL, self._cancel_notified)
                self.backend_pid = conn.get_server_pid()
                self._conn = conn
                self.connected = True
                if ever_connected:
                    self.reconnects += 1
                    log.warning("listener reconnected (backend pid %s)", self.backend_pid)
                else:
                    log.info("listening on channel %s", CHANNEL)
                ever_connected = True
                delay = 0.1
                self._on_connected()
                self._schedules_notified()  # changes made while we were away
                await self._watch(conn, lost)
                if not self._stopping.is_set():
                    log.warning("listener connection lost; reconnecting")
            except CONNECT_ERRORS as exc:
                log.warning(
                    "listener cannot connect to %s; retrying in %.1fs",
                    describe_failure(self._dsn, exc),
                    delay,
                )
            finally:
                self.connected = False
                self._conn = None
                if conn is not None:
                    await close_quietly(conn)
            if self._stopping.is_set():
                break
            await wait_any(self._stopping, seconds=delay)
            delay = min(delay * 2, 5.0)

    async def _watch(self, conn: asyncpg.Connection, lost: asyncio.Event) -> None:
        """Return when the connection is lost, fails a probe, or the daemon stops."""
        while True:
            await wait_any(self._stopping, lost, seconds=self._probe_interval)
            if self._stopping.is_set() or lost.is_set():
                return
            if self._lent:
                continue  # in use right now, so not half-open
            self._lent = True  # not lent to a claim while the probe runs on it
            try:
                await conn.fetchval("SELECT 1", timeout=5)
            except DB_ERRORS:
                log.warning("listener probe failed: connection is half-open or gone")
                return
            finally:
                self._lent = False


def _setter(event: asyncio.Event) -> Callable[[object], None]:
    return lambda _conn: event.set()
