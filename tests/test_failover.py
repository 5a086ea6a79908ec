"""Failover (#18): a real primary with a synchronous streaming standby, a daemon given both in a
multi-host DATABASE_URL; the primary is stopped, the standby promoted, and the same daemon
process carries on against it without losing or doubling a job, an outcome or a tick."""

from __future__ import annotations

import asyncio
import itertools
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import aiohttp
import asyncpg
import pytest

from daemon.dev.pgcluster import Cluster, ensure_database
from daemon.errors import ConfigError
from daemon.store.migrations import migrate
from tests.conftest import DaemonFactory, DaemonProcess, eventually, run_sync, stoker_cli
from tests.test_http import get, http_port

SECRET = "Failover-Sekr3t"
RECONNECT_LIMIT = 10.0  # seconds from the promotion to everything working again
OUTAGE = 2.5  # seconds between the primary's end and the promotion: ticks fall due meanwhile

CONFIG = """
lease_seconds = 30
leader_retry = 0.5
listener_probe_interval = 1
rescue_interval = 1

[queues.default]
concurrency = 10
poll_interval = 0.5

# overlap = "allow": the run of the tick before the outage may still hold its outcome when the
# catch-up fires; that is not under test here.
[schedules.tick]
cron = "* * * * * *"
kind = "test.record"
payload = { label = "tick" }
catch_up = "all"
max_catch_up = 100
overlap = "allow"
"""


def multi_host(primary: Cluster, standby: Cluster, database: str = "stoker") -> str:
    return (
        f"postgresql://postgres:{SECRET}@127.0.0.1:{primary.port},127.0.0.1:{standby.port}"
        f"/{database}?target_session_attrs=read-write"
    )


@pytest.fixture
def replicated() -> Iterator[tuple[Cluster, Cluster]]:
    """A primary and its synchronous standby: a commit returns once the standby has it."""
    primary = Cluster(
        Path(tempfile.mkdtemp(prefix="stoker-primary-")),
        fast=True,
        # fast turns these off; a synchronous standby needs commits to wait for it, and a base
        # backup needs full-page writes.
        settings=(
            "synchronous_commit=on",
            "full_page_writes=on",
            "synchronous_standby_names=standby",
        ),
    )
    standby = Cluster(
        Path(tempfile.mkdtemp(prefix="stoker-standby-")),
        fast=True,
        settings=("log_connections=on",),
        primary=primary,
    )
    try:
        primary.start()
        standby.start()
        # Before any write: a commit on the primary waits for the synchronous standby.
        run_sync(_until_synchronous(primary))
        run_sync(_migrate(ensure_database(primary.dsn(), "stoker")))
        yield primary, standby
    finally:
        standby.stop()
        primary.stop()


async def _migrate(dsn: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await migrate(conn)
    finally:
        await conn.close()


async def _until_synchronous(primary: Cluster) -> None:
    conn = await asyncpg.connect(primary.dsn())
    try:

        async def synchronous() -> bool:
            state: str | None = await conn.fetchval("SELECT sync_state FROM pg_stat_replication")
            return state == "sync"

        await eventually(synchronous, timeout=30)
    finally:
        await conn.close()


def runs(daemon: DaemonProcess, label: str) -> Counter[int]:
    return Counter(e["id"] for e in daemon.events() if e["label"] == label)


async def test_a_daemon_carries_on_after_the_standby_is_promoted(
    replicated: tuple[Cluster, Cluster], tmp_path: Path
) -> None:
    primary, standby = replicated
    factory = DaemonFactory(multi_host(primary, standby), tmp_path)
    timeout = aiohttp.ClientTimeout(total=5)
    try:
        async with aiohttp.ClientSession(timeout=timeout) as client:
            daemon = await factory.start(CONFIG)
            port = await http_port(daemon)
            assert (await get(client, port, "/ready"))[0] == 200

            db = await asyncpg.connect(primary.dsn("stoker"))
            try:
                jobs: list[int] = [
                    r["id"]
                    for r in await db.fetch(
                        "INSERT INTO stoker.jobs (queue, kind, payload) SELECT 'default', "
                        '\'test.record\', \'{"seconds": 0.2, "label": "job"}\' '
                        "FROM generate_series(1, 200) RETURNING id"
                    )
                ]
            finally:
                await db.close()

            async def some_ran() -> bool:
                return len(runs(daemon, "job")) >= 50 and len(runs(daemon, "tick")) >= 2

            await eventually(some_ran, timeout=30)
            # Fast shutdown: the standby receives all WAL up to the shutdown checkpoint, so
            # every commit the daemon saw (claims, which do not wait for it, included) is there.
            primary.stop()
            outage_began = time.monotonic()

            async def not_ready() -> bool:
                return (await get(client, port, "/ready"))[0] == 503

            await eventually(not_ready, timeout=10)
            # The outage lasts a few ticks: the scenario, not a wait for something to happen.
            await asyncio.sleep(max(0.0, OUTAGE - (time.monotonic() - outage_began)))
            assert daemon.proc.poll() is None
            assert (await get(client, port, "/ready"))[0] == 503
            log_before = len(daemon.log())
            standby.promote()
            promoted = time.monotonic()

            async def ready() -> bool:
                return (await get(client, port, "/ready"))[0] == 200

            await eventually(ready, timeout=RECONNECT_LIMIT)
            ready_after = time.monotonic() - promoted

            async def leading_again() -> bool:
                return "became leader" in daemon.log()[log_before:]

            await eventually(leading_again, timeout=RECONNECT_LIMIT)
            leader_after = time.monotonic() - promoted
            assert "listener reconnected" in daemon.log()[log_before:]

            db = await asyncpg.connect(standby.dsn("stoker"))
            try:
                # New work on the new primary, enqueued after the promotion.
                jobs += [
                    r["id"]
                    for r in await db.fetch(
                        "INSERT INTO stoker.jobs (queue, kind, payload) SELECT 'default', "
                        "'test.record', '{\"label\": \"job\"}' "
                        "FROM generate_series(1, 20) RETURNING id"
                    )
                ]

                async def all_done() -> bool:
                    left: int = await db.fetchval(
                        "SELECT count(*) FROM stoker.jobs WHERE kind = 'test.record' "
                        "AND meta->>'schedule' IS NULL"
                    )
                    return left == 0

                await eventually(all_done, timeout=30)
                promoted_at = await db.fetchval(
                    "SELECT now() - make_interval(secs => $1)", time.monotonic() - promoted
                )

                async def ticks_after() -> bool:
                    newest = await db.fetchval(
                        "SELECT max(tick) FROM stoker.schedule_ticks WHERE schedule = 'tick'"
                    )
                    return newest is not None and newest > promoted_at + timedelta(seconds=2)

                await eventually(ticks_after, timeout=RECONNECT_LIMIT)
                print(
                    f"failover: ready {ready_after:.2f}s, leading {leader_after:.2f}s after "
                    f"the promotion; outage {promoted - outage_began:.2f}s"
                )
                assert ready_after < RECONNECT_LIMIT and leader_after < RECONNECT_LIMIT

                # Every job: succeeded exactly once, and (fast shutdown) ran exactly once.
                outcomes = await db.fetch(
                    "SELECT id, state FROM stoker.all_jobs WHERE id = ANY($1::bigint[])", jobs
                )
                assert sorted(r["id"] for r in outcomes) == sorted(jobs)
                assert {r["state"] for r in outcomes} == {"succeeded"}
                ran = runs(daemon, "job")
                assert set(ran) == set(jobs)
                assert [i for i, n in ran.items() if n != 1] == []

                # The schedule: one job per tick, each run once, with no gap: the ticks that
                # fell due in the outage were caught up (catch_up = "all").
                ticks = await db.fetch(
                    "SELECT tick, job_id, caught_up FROM stoker.schedule_ticks "
                    "WHERE schedule = 'tick' AND outcome = 'fired' ORDER BY tick"
                )
                seconds = [r["tick"] for r in ticks]
                gaps = [b for a, b in itertools.pairwise(seconds) if b - a != timedelta(seconds=1)]
                assert gaps == []
                assert any(r["caught_up"] and r["tick"] < promoted_at for r in ticks)
                per_tick = await db.fetch(
                    "SELECT meta->>'tick' AS tick, count(*) AS n FROM stoker.all_jobs "
                    "WHERE meta->>'schedule' = 'tick' GROUP BY 1 HAVING count(*) <> 1"
                )
                assert per_tick == []
                tick_runs = runs(daemon, "tick")
                assert [i for i, n in tick_runs.items() if n != 1] == []
                succeeded = await db.fetch(
                    "SELECT id FROM stoker.all_jobs "
                    "WHERE meta->>'schedule' = 'tick' AND state = 'succeeded'"
                )
                assert {r["id"] for r in succeeded} <= set(tick_runs)
            finally:
                await db.close()
            assert daemon.proc.poll() is None  # the same process throughout
            log = daemon.log()
            assert "Traceback" not in log
            assert SECRET not in log
            records = daemon.log_records()
            assert not [r for r in records if r.get("level") in ("ERROR", "CRITICAL")], [
                r["message"] for r in records if r.get("level") in ("ERROR", "CRITICAL")
            ]
    finally:
        factory.stop_all()


async def test_a_daemon_on_a_standby_says_so_and_starts_once_it_is_promoted(
    replicated: tuple[Cluster, Cluster], tmp_path: Path
) -> None:
    _primary, standby = replicated
    url = standby.dsn("stoker").replace("postgres@", f"postgres:{SECRET}@")
    factory = DaemonFactory(url, tmp_path)
    try:
        daemon = await factory.start(CONFIG, wait_ready=False)
        await daemon.wait_log(f"the database server at 127.0.0.1:{standby.port} is a standby")
        line = "is a standby (in recovery): read-only; not starting: looking again every 1s"

        async def looked_again() -> bool:
            # Each look is a new connection, which the standby logs (log_connections).
            logged = standby.log_file.read_text(errors="replace")
            return logged.count("application_name=stoker ") >= 3

        await eventually(looked_again)
        assert daemon.proc.poll() is None
        migrated = stoker_cli(url, "migrate")
        assert migrated.returncode == 1
        assert f"127.0.0.1:{standby.port} is a standby (in recovery): read-only" in (
            migrated.stderr
        )
        assert "Traceback" not in migrated.stderr
        assert SECRET not in migrated.stderr
        assert daemon.log().count(line) == 1  # said once, however often it looks again
        standby.promote()
        await daemon.wait_log('"message": "listening on channel stoker_jobs"', timeout=15)
        log = daemon.log()
        assert "Traceback" not in log
        assert SECRET not in log
    finally:
        factory.stop_all()


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("postgresql://app:{s}@h1:5432,h2:x/app", "has a port that is not a number"),
        ("postgresql://app:{s}@h1:5432,,h2/app", "has an empty host name"),
        (
            "postgresql://app:{s}@h1,h2/app?target_session_attrs=master",
            "has a target_session_attrs that asyncpg does not know",
        ),
    ],
)
def test_a_multi_host_url_is_checked_naming_the_setting(
    monkeypatch: pytest.MonkeyPatch, url: str, problem: str
) -> None:
    from daemon.config import load_settings

    monkeypatch.setenv("DATABASE_URL", url.format(s=SECRET))
    with pytest.raises(ConfigError) as raised:
        load_settings(None)
    assert "environment DATABASE_URL: database_url: " in str(raised.value)
    assert problem in str(raised.value)
    assert SECRET not in str(raised.value)


def test_a_multi_host_url_is_accepted(monkeypatch: pytest.MonkeyPatch) -> None:
    from daemon.config import load_settings

    url = f"postgresql://app:{SECRET}@h1:5432,[::1]:5433,h3/app?target_session_attrs=read-write"
    monkeypatch.setenv("DATABASE_URL", url)
    monkeypatch.setenv("STOKER_LISTEN_DSN", url)
    settings = load_settings(None)
    assert settings.database_url == url
    assert settings.listen_dsn == url


async def test_a_running_daemon_whose_server_turns_read_only_says_so_and_recovers(
    own_cluster: Cluster, tmp_path: Path
) -> None:
    """What a managed service does on a full disk, and what a single host name that now points
    at a standby looks like: the same connections, no writes."""
    dsn = own_cluster.dsn()
    await _migrate(dsn)
    factory = DaemonFactory(dsn, tmp_path)
    admin = await asyncpg.connect(dsn)
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as client:
            daemon = await factory.start(CONFIG)
            port = await http_port(daemon)
            await admin.execute("ALTER SYSTEM SET default_transaction_read_only = on")
            await admin.execute("SELECT pg_reload_conf()")
            line = (
                f"the database server at 127.0.0.1:{own_cluster.port} is read-only "
                "(transaction_read_only): claims and writes fail until a primary answers"
            )
            await daemon.wait_log(line)

            async def not_ready() -> bool:
                status, body = await get(client, port, "/ready")
                return status == 503 and body["failing"] == ["database"]

            await eventually(not_ready, timeout=10)
            await admin.execute("ALTER SYSTEM RESET default_transaction_read_only")
            await admin.execute("SELECT pg_reload_conf()")
            await daemon.wait_log("the database takes writes again")
            job_id = await admin.fetchval("SELECT stoker.enqueue('default', 'noop')")

            async def done() -> bool:
                state: str | None = await admin.fetchval(
                    "SELECT state FROM stoker.all_jobs WHERE id = $1", job_id
                )
                return state == "succeeded"

            await eventually(done, timeout=10)
            assert (await get(client, port, "/ready"))[0] == 200
            assert daemon.proc.poll() is None
            assert daemon.log().count(line) == 1
            assert "Traceback" not in daemon.log()
    finally:
        await admin.close()
        factory.stop_all()
