"""Review of #16 (pools stop waiting when woken, linger, the idle sweep, claims on the
listener's connection): wake-ups that came late, and a registration that outlived the wait.
Each test failed before its fix (they were committed as xfail strict first)."""

from __future__ import annotations

import asyncio
import signal
import time
from urllib.parse import urlsplit

import asyncpg

from tests.conftest import DaemonFactory, eventually, finished

# poll_interval 60: a wake-up that is lost shows as a job that waits for the idle sweep, a
# minute away, or as a waiting row that lives for three minutes.
IDLE = """
[queues.default]
poll_interval = 60
"""


async def waiting_rows(db: asyncpg.Connection) -> int:
    n: int = await db.fetchval("SELECT count(*) FROM stoker.waiting WHERE queue = 'default'")
    return n


async def test_a_delayed_job_runs_when_due_while_an_unrelated_transaction_is_open(
    daemons: DaemonFactory, db: asyncpg.Connection, dsn: str
) -> None:
    await daemons.start(IDLE)

    async def registered() -> bool:
        return await waiting_rows(db) == 1

    await eventually(registered)
    # Someone else's writing transaction stays open (a long report, a migration, a session
    # idle in transaction): it has a transaction id, so it is among those in flight.
    other = await asyncpg.connect(dsn)
    tx = other.transaction()
    await tx.start()
    await other.fetchval("SELECT pg_current_xact_id()")
    try:
        # A job wakes the pool; once its claims find nothing it says it waits again, and looks
        # for transactions in flight until none is (the other one, for as long as it lasts).
        first = await db.fetchval("SELECT stoker.enqueue('default', 'noop')")
        await finished(db, first)
        await eventually(registered)
        # A delayed job: its insert NOTIFYs 'default <epoch>', which must wake the pool then.
        delayed = await db.fetchval(
            "SELECT stoker.enqueue('default', 'noop', run_at => now() + interval '1 second')"
        )
        inserted = time.monotonic()
        await finished(db, delayed, timeout=10)
        assert time.monotonic() - inserted < 6
    finally:
        await tx.rollback()
        await other.close()


async def test_a_woken_claim_never_collides_with_the_listeners_probe(
    daemons: DaemonFactory, db: asyncpg.Connection
) -> None:
    # A probe every millisecond makes the collision likely at each wake-up; with the default
    # (10 s) and a wake-up every 20 ms, by estimate once or twice in a hundred probes.
    daemon = await daemons.start("listener_probe_interval = 0.001\n" + IDLE)

    async def registered() -> bool:
        return await waiting_rows(db) == 1

    for _ in range(150):
        await eventually(registered)  # idle: the next insert wakes it by NOTIFY
        job_id = await db.fetchval("SELECT stoker.enqueue('default', 'noop')")
        await finished(db, job_id)
        assert "another operation is in progress" not in daemon.log(), daemon.log()[-2000:]


async def test_a_busy_pool_stops_waiting_after_the_listener_reconnects(
    daemons: DaemonFactory, db: asyncpg.Connection
) -> None:
    daemon = await daemons.start(
        """
        [queues.default]
        concurrency = 2
        batch_size = 2
        poll_interval = 60
        """
    )

    async def registered() -> bool:
        return await waiting_rows(db) == 1

    await eventually(registered)
    # A backlog that falls due without an insert (delayed jobs brought forward: no NOTIFY),
    # found by the wake-up every pool gets when the listener reconnects.
    await db.execute(
        "INSERT INTO stoker.jobs (queue, kind, payload, run_at) "
        "SELECT 'default', 'test.sleep', '{\"seconds\": 0.25}', now() + interval '1 hour' "
        "FROM generate_series(1, 40)"
    )
    await db.execute("UPDATE stoker.jobs SET run_at = now()")
    await db.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
        "WHERE application_name = 'stoker-listener' AND datname = current_database()"
    )
    await daemon.wait_log("listener reconnected")

    async def busy() -> bool:
        n: int = await db.fetchval("SELECT count(*) FROM stoker.jobs WHERE state = 'active'")
        return n > 0

    await eventually(busy)

    # Busy for about 5 s (40 jobs of 0.25 s, two at a time): it no longer waits, so inserts
    # must not NOTIFY it.
    async def stopped_waiting() -> bool:
        left: int = await db.fetchval("SELECT count(*) FROM stoker.jobs")
        assert left > 4, "the backlog ran out before the check could tell"
        return await waiting_rows(db) == 0

    await eventually(stopped_waiting, timeout=2)


async def test_a_repeatable_read_producer_wakes_a_pool_that_registered_meanwhile(
    daemons: DaemonFactory, db: asyncpg.Connection, dsn: str
) -> None:
    await daemons.start(IDLE + "concurrency = 1\n")  # one job makes it busy, not waiting

    async def registered() -> bool:
        return await waiting_rows(db) == 1

    await eventually(registered)
    # A job keeps the pool busy: its claim deleted the waiting row.
    first = await db.fetchval(
        "SELECT stoker.enqueue('default', 'test.sleep', '{\"seconds\": 0.5}')"
    )

    async def busy() -> bool:
        state = await db.fetchval("SELECT state FROM stoker.jobs WHERE id = $1", first)
        return state == "active" and await waiting_rows(db) == 0

    await eventually(busy)
    producer = await asyncpg.connect(dsn)
    tx = producer.transaction(isolation="repeatable_read")
    await tx.start()
    try:
        # The producer's snapshot: taken while no pool waits, before it has a transaction id.
        await producer.fetchval("SELECT count(*) FROM stoker.jobs")
        # The job ends, the pool's claims find nothing, it registers, and looks.
        claimed = (await finished(db, first))["started_at"]
        await eventually(registered)

        async def looked() -> bool:
            # The pool's look after registering (AFTER_REGISTERING) has ended.
            n: int = await db.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                " AND state = 'idle' AND query LIKE '%pg_current_snapshot%'"
                " AND state_change > $1",
                claimed,
            )
            return n > 0

        await eventually(looked)
        job_id = await producer.fetchval("SELECT stoker.enqueue('default', 'noop')")
        await tx.commit()
    finally:
        if producer.is_in_transaction():
            await tx.rollback()
        await producer.close()
    committed = time.monotonic()
    await finished(db, job_id, timeout=10)
    assert time.monotonic() - committed < 5


class FreezingProxy:
    """A TCP proxy to PostgreSQL whose connections can go half-open: `freeze` stops
    forwarding in both directions without closing anything (a dead NAT entry, a cable)."""

    def __init__(self, dsn: str) -> None:
        parts = urlsplit(dsn)
        self.target = (parts.hostname or "127.0.0.1", parts.port or 5432)
        self.flowing = asyncio.Event()
        self.flowing.set()
        self.tasks: set[asyncio.Task[None]] = set()
        self.server: asyncio.Server | None = None
        self.held_from_clients = 0  # bytes clients sent while frozen

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port: int = self.server.sockets[0].getsockname()[1]
        return port

    def freeze(self) -> None:
        self.flowing.clear()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self.target)
        for src, dst in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.create_task(self._pipe(src, dst))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def _pipe(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        try:
            while data := await src.read(65536):
                if not self.flowing.is_set() and dst.get_extra_info("peername") == self.target:
                    self.held_from_clients += len(data)
                await self.flowing.wait()
                dst.write(data)
                await dst.drain()
        except OSError:
            pass
        finally:
            dst.close()

    async def close(self) -> None:
        for task in list(self.tasks):
            task.cancel()
        if self.server is not None:
            self.server.close()


async def test_a_job_found_by_the_sweep_runs_while_the_listen_connection_is_half_open(
    daemons: DaemonFactory, db: asyncpg.Connection, dsn: str
) -> None:
    proxy = FreezingProxy(dsn)
    port = await proxy.start()
    parts = urlsplit(dsn)
    listen_dsn = parts._replace(netloc=f"{parts.username}@127.0.0.1:{port}").geturl()
    try:
        daemon = await daemons.start(
            """
            run_scheduler = false
            [queues.default]
            poll_interval = 1
            """,
            STOKER_LISTEN_DSN=listen_dsn,
        )

        async def registered() -> bool:
            return await waiting_rows(db) == 1

        await eventually(registered)
        proxy.freeze()  # the LISTEN connection goes half-open: its NOTIFYs never arrive
        job_id = await db.fetchval("SELECT stoker.enqueue('default', 'noop')")
        inserted = time.monotonic()
        # No NOTIFY gets through; the idle sweep finds the job within a poll interval (1 s),
        # and the listener's probe (every 10 s, 5 s timeout) finds the connection dead.
        try:
            await finished(db, job_id, timeout=12)
        except AssertionError as exc:
            raise AssertionError(daemon.log()[-1500:]) from exc
        assert time.monotonic() - inserted < 12
    finally:
        await proxy.close()


async def test_sigterm_while_a_lent_claim_hangs_on_a_half_open_listen_connection(
    daemons: DaemonFactory, db: asyncpg.Connection, dsn: str
) -> None:
    proxy = FreezingProxy(dsn)
    port = await proxy.start()
    parts = urlsplit(dsn)
    listen_dsn = parts._replace(netloc=f"{parts.username}@127.0.0.1:{port}").geturl()
    try:
        daemon = await daemons.start(
            """
            run_scheduler = false
            shutdown_timeout = 2
            [queues.default]
            poll_interval = 1
            """,
            STOKER_LISTEN_DSN=listen_dsn,
        )

        async def registered() -> bool:
            return await waiting_rows(db) == 1

        await eventually(registered)
        proxy.freeze()
        job_id = await db.fetchval("SELECT stoker.enqueue('default', 'noop')")
        # The idle sweep finds it and claims it on a pooled connection: a claim goes to the
        # LISTEN connection only when that connection has just delivered a NOTIFY. (Before
        # that fix, the claim went to the frozen connection and hung 30 s, and SIGTERM with it.)
        await finished(db, job_id, timeout=10)
        stopped = time.monotonic()
        daemon.proc.send_signal(signal.SIGTERM)
        try:
            await daemon.wait_exit(timeout=12)
        except AssertionError as exc:
            raise AssertionError(
                f"still running 12 s after SIGTERM:\n{daemon.log()[-1500:]}"
            ) from exc
        assert time.monotonic() - stopped < 12
    finally:
        await proxy.close()
