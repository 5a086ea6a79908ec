"""Behind a real pgbouncer in transaction pool mode (tests/pgbouncer.py), as users run it: the
pool through pgbouncer with listen_dsn direct, poll_only with no direct connection at all, and
the setups a transaction pooler breaks refused at start with the fix to make."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import asyncpg
import pytest

from daemon.store.db import KEEPALIVE_IDLE, close_quietly, connect
from tests.conftest import DaemonFactory, eventually
from tests.pgbouncer import (
    Bouncer,
    pgbouncer_fixture,  # noqa: F401 - the `pgbouncer` fixture
)
from tests.test_http import http_port

TOKEN = "b" * 32


@pytest.fixture
def bounced(pgbouncer: Bouncer, dsn: str, tmp_path: Path) -> Iterator[DaemonFactory]:
    """Daemons whose database_url is the test database through pgbouncer."""
    factory = DaemonFactory(pgbouncer.dsn(dsn), tmp_path)
    try:
        yield factory
    finally:
        factory.stop_all()


async def count(db: asyncpg.Connection, sql: str, *args: object) -> int:
    value: int = await db.fetchval(sql, *args)
    return value


async def test_keepalives_without_startup_parameters(pgbouncer: Bouncer, dsn: str) -> None:
    # pgbouncer refuses tcp_keepalives_* startup parameters: connecting through it is the test.
    for target, direct in ((dsn, True), (pgbouncer.dsn(dsn), False)):
        conn = await connect(target, application_name="keepalive-test", statement_cache_size=0)
        try:
            sock = conn._transport.get_extra_info("socket")
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == KEEPALIVE_IDLE
            shown = await conn.fetchval("SHOW tcp_keepalives_idle")
            # PostgreSQL's end only on a session of our own, never on a pooler's shared one.
            assert (shown == str(KEEPALIVE_IDLE)) is direct, shown
        finally:
            await close_quietly(conn)


async def test_through_pgbouncer_jobs_retries_cron_admin_api_and_dashboard(
    pgbouncer: Bouncer, bounced: DaemonFactory, dsn: str, db: asyncpg.Connection
) -> None:
    daemon = await bounced.start(
        """
        statement_cache_size = 0
        leader_retry = 0.5
        [queues.default]
        concurrency = 20
        backoff = { base = 0.2, cap = 1, jitter = 0 }
        [schedules.tick]
        cron = "* * * * * *"
        kind = "test.record"
        payload = { label = "tick" }
        """,
        STOKER_LISTEN_DSN=dsn,
        STOKER_HTTP__ADMIN_TOKEN=TOKEN,
    )
    database = dsn.rsplit("/", 1)[1]
    assert f"login attempt: db={database}" in pgbouncer.log()  # the pool really goes through it
    port = await http_port(daemon)
    await db.execute(
        "INSERT INTO stoker.jobs (queue, kind) "
        "SELECT 'default', 'noop' FROM generate_series(1, 200)"
    )
    flaky = await db.fetchval(
        "INSERT INTO stoker.jobs (queue, kind, payload) "
        """VALUES ('default', 'test.flaky', '{"succeed_on": 2}') RETURNING id"""
    )

    async def drained() -> bool:
        done = await count(
            db,
            "SELECT count(*) FROM stoker.job_history WHERE kind = 'noop' AND state = 'succeeded'",
        )
        return done == 200

    await eventually(drained, timeout=30)

    async def retried() -> asyncpg.Record | None:
        row: asyncpg.Record | None = await db.fetchrow(
            "SELECT attempts FROM stoker.job_history WHERE id = $1 AND state = 'succeeded'", flaky
        )
        return row

    assert (await eventually(retried, timeout=30))["attempts"] == 2

    async def ticked() -> bool:
        ticks = [e for e in daemon.events() if e["label"] == "tick"]
        return len(ticks) >= 2

    await eventually(ticked, timeout=30)

    base = f"http://127.0.0.1:{port}"
    headers = {"Authorization": f"Bearer {TOKEN}"}
    async with aiohttp.ClientSession(headers=headers) as http:
        async with http.post(f"{base}/api/v1/jobs", json={"queue": "default", "kind": "noop"}) as r:
            assert r.status == 201, await r.text()
            job_id = (await r.json())["id"]

        async def succeeded() -> bool:
            async with http.get(f"{base}/api/v1/jobs/{job_id}") as r:
                assert r.status == 200, await r.text()
                state: str = (await r.json())["state"]
                return state == "succeeded"

        await eventually(succeeded)
        async with http.get(f"{base}/api/v1/queues") as r:
            assert r.status == 200, await r.text()
    async with aiohttp.ClientSession() as browser:
        async with browser.post(f"{base}/dashboard/login", data={"token": TOKEN}) as r:
            assert r.status == 200, await r.text()  # followed the redirect to the overview
        for page in ("/dashboard/", "/dashboard/jobs", "/dashboard/schedules/tick"):
            async with browser.get(base + page) as r:
                assert r.status == 200, (page, await r.text())
    assert "prepared statement" not in daemon.log()
    assert '"level": "ERROR"' not in daemon.log(), daemon.log()


async def test_poll_only_with_no_direct_connection_runs_jobs(
    pgbouncer: Bouncer, bounced: DaemonFactory, db: asyncpg.Connection
) -> None:
    daemon = await bounced.start(
        """
        statement_cache_size = 0
        poll_only = true
        run_scheduler = false
        migrate_on_start = false
        [queues.default]
        poll_interval = 0.2
        """,
        wait_ready=False,
    )
    await daemon.wait_log('"message": "ready: worker')
    await db.execute(
        "INSERT INTO stoker.jobs (queue, kind) SELECT 'default', 'noop' FROM generate_series(1, 50)"
    )

    async def drained() -> bool:
        return await count(db, "SELECT count(*) FROM stoker.job_history") == 50

    await eventually(drained, timeout=30)
    assert '"level": "ERROR"' not in daemon.log(), daemon.log()


@pytest.mark.parametrize(
    ("config", "direct_listen", "expected"),
    [
        # prepared statements on (the default cache), everything else right
        ("", True, ["statement_cache_size = 100", "max_prepared_statements in pgbouncer >= 1.21"]),
        # no direct connection: LISTEN, the leader's lock and migrations have no session
        (
            "statement_cache_size = 0\n",
            False,
            ["poll_only = true", "run_scheduler = false", "migrate_on_start = false"],
        ),
    ],
    ids=["prepared-statements", "no-direct-connection"],
)
async def test_a_setup_the_pooler_breaks_is_refused_at_start(
    bounced: DaemonFactory, dsn: str, config: str, direct_listen: bool, expected: list[str]
) -> None:
    env = {"STOKER_LISTEN_DSN": dsn} if direct_listen else {}
    daemon = await bounced.start(config, wait_ready=False, **env)
    assert await daemon.wait_exit() == 1
    log = daemon.log()
    assert "stoker: error: database_url goes through a transaction pooler" in log
    assert "transaction pooler" in log
    for fix in expected:
        assert fix in log, log
    assert "Traceback" not in log
    assert '"message": "ready:' not in log and "listening on channel" not in log


async def test_listen_dsn_through_the_pooler_is_refused(
    pgbouncer: Bouncer, bounced: DaemonFactory, dsn: str
) -> None:
    daemon = await bounced.start(
        "statement_cache_size = 0\n", wait_ready=False, STOKER_LISTEN_DSN=pgbouncer.dsn(dsn)
    )
    assert await daemon.wait_exit() == 1
    assert "listen_dsn goes through a transaction pooler" in daemon.log()
    assert "Traceback" not in daemon.log()
