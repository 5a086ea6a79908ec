"""/health, /ready, /metrics and sd_notify, seen from outside a real daemon process."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from daemon.dev.pgcluster import Cluster
from daemon.store.migrations import migrate
from tests.conftest import REPO, DaemonFactory, DaemonProcess, eventually

PORT = re.compile(r"http listening on 127\.0\.0\.1:(\d+)")


async def http_port(daemon: DaemonProcess) -> int:
    await daemon.wait_log("http listening on")
    match = PORT.search(daemon.log())
    assert match is not None
    return int(match[1])


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        yield session


async def get(client: aiohttp.ClientSession, port: int, path: str) -> tuple[int, Any]:
    async with client.get(f"http://127.0.0.1:{port}{path}") as response:
        if response.content_type == "application/json":
            return response.status, await response.json()
        return response.status, await response.text()


async def test_health_ready_and_json_errors(
    daemons: DaemonFactory, client: aiohttp.ClientSession
) -> None:
    daemon = await daemons.start("")
    port = await http_port(daemon)
    status, body = await get(client, port, "/health")
    assert status == 200
    assert body["status"] == "ok"
    status, body = await get(client, port, "/ready")
    assert (status, body) == (200, {"status": "ready"})  # the checks are for the admin token
    status, body = await get(client, port, "/nope")
    assert (status, body) == (404, {"error": "Not Found"})
    status, body = await get(client, port, "/api/v1/jobs")
    assert status == 404  # no admin token configured: the admin API does not exist


async def test_ready_turns_503_naming_draining_after_sigterm(
    daemons: DaemonFactory, db: asyncpg.Connection, client: aiohttp.ClientSession
) -> None:
    daemon = await daemons.start("shutdown_timeout = 20\n")
    port = await http_port(daemon)
    await db.execute(
        "INSERT INTO stoker.jobs (queue, kind, payload) VALUES ('default', 'test.sleep', $1)",
        {"seconds": 3},
    )

    async def running() -> bool:
        active: int = await db.fetchval("SELECT count(*) FROM stoker.jobs WHERE state = 'active'")
        return active == 1

    await eventually(running)
    daemon.proc.send_signal(signal.SIGTERM)

    async def draining() -> dict[str, Any] | None:
        status, body = await get(client, port, "/ready")
        return body if status == 503 else None

    body = await eventually(draining)
    assert body == {"status": "not ready", "failing": ["draining"]}
    assert await daemon.wait_exit() == 0


async def test_ready_names_the_database_while_it_is_down_and_recovers(
    own_cluster: Cluster, tmp_path: Path, client: aiohttp.ClientSession
) -> None:
    dsn = own_cluster.dsn()
    conn = await asyncpg.connect(dsn)
    try:
        await migrate(conn)
    finally:
        await conn.close()
    factory = DaemonFactory(dsn, tmp_path)
    try:
        daemon = await factory.start("")
        port = await http_port(daemon)
        assert (await get(client, port, "/ready"))[0] == 200
        own_cluster.stop()

        async def not_ready() -> dict[str, Any] | None:
            status, body = await get(client, port, "/ready")
            return body if status == 503 and "database" in body["failing"] else None

        body = await eventually(not_ready, timeout=20)
        assert "checks" not in body  # the error text is in the log, not for anyone who asks
        assert (await get(client, port, "/health"))[0] == 200  # alive, just not ready

        own_cluster.start()

        async def ready_again() -> bool:
            return (await get(client, port, "/ready"))[0] == 200

        await eventually(ready_again, timeout=30)
        assert daemon.proc.poll() is None  # the same process, never restarted
    finally:
        factory.stop_all()


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


async def test_metrics_count_exactly_what_ran(
    daemons: DaemonFactory, db: asyncpg.Connection, client: aiohttp.ClientSession
) -> None:
    daemon = await daemons.start(
        """
        [queues.default]
        max_attempts = 1
        [http]
        depth_sample_interval = 0.2
        """
    )
    port = await http_port(daemon)
    await db.execute(
        """INSERT INTO stoker.jobs (queue, kind, payload)
           SELECT 'default', CASE WHEN i <= 70 THEN 'noop' ELSE 'test.fail' END,
                  jsonb_build_object('email', 'secret-' || i || '@example.com')
             FROM generate_series(1, 100) AS i"""
    )

    async def all_done() -> bool:
        done: int = await db.fetchval("SELECT count(*) FROM stoker.job_history")
        return done == 100

    await eventually(all_done, timeout=30)

    async def settled() -> dict[Any, float] | None:
        status, text = await get(client, port, "/metrics")
        assert status == 200
        got = samples(text)
        done = got.get(
            (
                "stoker_jobs_completed_total",
                (("kind", "test.fail"), ("outcome", "failed"), ("queue", "default")),
            )
        )
        depth = got.get(("stoker_queue_jobs", (("queue", "default"), ("state", "failed"))))
        return got if done == 30 and depth == 30 else None

    got = await eventually(settled)
    succeeded = (
        "stoker_jobs_completed_total",
        (("kind", "noop"), ("outcome", "succeeded"), ("queue", "default")),
    )
    assert got[succeeded] == 70
    assert (
        got[("stoker_job_duration_seconds_count", (("kind", "noop"), ("queue", "default")))] == 70
    )
    assert (
        got[("stoker_job_duration_seconds_count", (("kind", "test.fail"), ("queue", "default")))]
        == 30
    )
    assert got[("stoker_job_wait_seconds_count", (("queue", "default"),))] == 100
    # Succeeded jobs are counted as they end, never by sampling history.
    assert ("stoker_queue_jobs", (("queue", "default"), ("state", "succeeded"))) not in got
    assert got[("stoker_running_jobs", (("queue", "default"),))] == 0
    assert got[("stoker_free_slots", (("queue", "default"),))] == 10
    assert got[("stoker_leader", ())] == 1
    assert got[("stoker_listener_reconnects_total", ())] == 0
    assert got[("stoker_outcomes_parked_total", ())] == 0
    assert got[("stoker_outcomes_lost_total", ())] == 0

    _, text = await get(client, port, "/metrics")
    assert "secret-" not in text and "example.com" not in text
    ids = {str(r["id"]) for r in await db.fetch("SELECT id FROM stoker.job_history")}
    for _name, labels in got:
        for key, value in labels:
            assert key not in ("id", "job_id")
            assert value not in ids, f"a job id became a label value: {key}={value}"


async def test_sd_notify_ready_watchdog_stopping_in_order(
    daemons: DaemonFactory, tmp_path: Path
) -> None:
    path = tempfile.mktemp(prefix="stoker-notify-", dir="/tmp")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.setblocking(False)
    messages: list[str] = []
    try:
        daemon = await daemons.start("", NOTIFY_SOCKET=path, WATCHDOG_USEC="200000")

        async def drain_socket() -> None:
            while True:
                try:
                    messages.extend(sock.recv(4096).decode().splitlines())
                except BlockingIOError:
                    return

        async def pings(n: int) -> bool:
            await drain_socket()
            return messages.count("WATCHDOG=1") >= n

        await eventually(lambda: pings(3))
        daemon.proc.send_signal(signal.SIGTERM)
        assert await daemon.wait_exit() == 0
        await drain_socket()
    finally:
        sock.close()
        os.unlink(path)
    kinds = [m.split("=")[0] for m in messages if not m.startswith("STATUS=")]
    assert kinds[0] == "READY"
    assert kinds.count("READY") == 1
    assert "STOPPING" in kinds
    stop = kinds.index("STOPPING")
    assert kinds[1:stop].count("WATCHDOG") >= 3
    assert set(kinds[1:stop]) == {"WATCHDOG"}
    assert any(m.startswith("STATUS=serving default(") for m in messages)


def test_systemd_unit_verifies(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (apt-get install systemd)")
    unit = (REPO / "deploy" / "stoker.service").read_text()
    assert "Type=notify" in unit and "WatchdogSec=" in unit and "KillMode=mixed" in unit
    # verify checks that ExecStart exists: point it at this checkout's stoker.
    local = tmp_path / "stoker.service"
    local.write_text(unit.replace("/opt/stoker/bin/stoker", str(Path(sys.prefix) / "bin/stoker")))
    out = subprocess.run(
        [analyze, "verify", str(local)], capture_output=True, text=True, check=False, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert out.stderr.strip() == "", out.stderr


async def test_taken_port_fails_start_with_one_clear_line(
    daemons: DaemonFactory, tmp_path: Path
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        daemon = await daemons.start("", wait_ready=False, STOKER_HTTP__PORT=str(port))
        assert await daemon.wait_exit() == 1
    assert f"http: cannot listen on 127.0.0.1:{port}: Address already in use" in daemon.log()
    assert "Traceback" not in daemon.log()
    await asyncio.sleep(0)


async def test_probes_under_load_while_draining(
    daemons: DaemonFactory, db: asyncpg.Connection, client: aiohttp.ClientSession
) -> None:
    daemon = await daemons.start(
        """
        [queues.default]
        concurrency = 50
        """
    )
    port = await http_port(daemon)
    await db.execute(
        "INSERT INTO stoker.jobs (queue, kind) SELECT 'default', 'noop' "
        "FROM generate_series(1, 5000)"
    )
    statuses: dict[int, int] = {}
    errors: list[str] = []
    loop = asyncio.get_running_loop()
    stop_at = loop.time() + 10

    async def hammer(path: str) -> None:
        while loop.time() < stop_at:
            async with client.get(f"http://127.0.0.1:{port}{path}") as response:
                body = await response.read()
                statuses[response.status] = statuses.get(response.status, 0) + 1
                if response.status != 200:
                    errors.append(body.decode()[:300])

    await asyncio.gather(*(hammer("/metrics" if i % 2 else "/ready") for i in range(50)))
    assert set(statuses) == {200}, (statuses, errors[:3])
    assert sum(statuses.values()) > 100

    async def drained() -> bool:
        done: int = await db.fetchval(
            "SELECT count(*) FROM stoker.job_history WHERE state = 'succeeded'"
        )
        return done == 5000

    await eventually(drained, timeout=60)
    assert await db.fetchval("SELECT count(*) FROM stoker.jobs") == 0


async def test_health_fails_while_the_event_loop_is_blocked(
    daemons: DaemonFactory, db: asyncpg.Connection, client: aiohttp.ClientSession
) -> None:
    daemon = await daemons.start("[http]\nloop_lag_threshold = 0.5\n")
    port = await http_port(daemon)
    assert (await get(client, port, "/health"))[0] == 200
    await db.execute(
        "INSERT INTO stoker.jobs (queue, kind, payload) VALUES ('default', 'test.block_loop', $1)",
        {"seconds": 2},
    )

    async def blocking() -> bool:
        return any(e.get("label") == "blocking" for e in daemon.events())

    await eventually(blocking)
    # Sent while the loop is blocked: answered once it runs again, and it says so.
    status, body = await get(client, port, "/health")
    assert status == 503
    assert body["status"] == "event loop blocked"
    assert body["loop_lag_seconds"] > 0.5

    async def healthy_again() -> bool:
        return (await get(client, port, "/health"))[0] == 200

    await eventually(healthy_again)


def test_job_histograms_count_a_value_on_a_bucket_bound_in_that_bucket() -> None:
    # The per-job counters are plain numbers turned into metric families at scrape time: they
    # must read as Prometheus's own histograms do (`le` inclusive, cumulative, +Inf = count).
    from prometheus_client import generate_latest

    from daemon.observe.metrics import Metrics

    metrics = Metrics(["default"], ["noop"])
    for seconds in (0.001, 0.0011, 4000.0):
        metrics.job_ended("default", "noop", "succeeded", seconds)
    metrics.job_ended("elsewhere", "mystery", "failed", 0.5)
    metrics.job_started("default", 0.0)
    metrics.job_started("elsewhere", 2.0)
    metrics.job_started("also-unknown", 7.0)
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(generate_latest(metrics.registry).decode())
        for s in family.samples
    }

    def duration(le: str) -> float:
        key = (("kind", "noop"), ("le", le), ("queue", "default"))
        return samples["stoker_job_duration_seconds_bucket", key]

    assert duration("0.001") == 1
    assert duration("0.005") == 2
    assert duration("3600.0") == 2
    assert duration("+Inf") == 3
    noop = (("kind", "noop"), ("queue", "default"))
    assert samples["stoker_job_duration_seconds_count", noop] == 3
    assert samples["stoker_job_duration_seconds_sum", noop] == pytest.approx(4000.0021)
    other = (("kind", "(other)"), ("outcome", "failed"), ("queue", "(other)"))
    assert samples["stoker_jobs_completed_total", other] == 1
    # Unknown queues share one "(other)" wait histogram, reported once.
    assert samples["stoker_job_wait_seconds_count", (("queue", "(other)"),)] == 2
    assert samples["stoker_job_wait_seconds_count", (("queue", "default"),)] == 1
    waits = [k for k in samples if k[0] == "stoker_job_wait_seconds_count"]
    assert len(waits) == 2


async def test_a_timed_out_job_is_counted_as_timed_out(
    daemons: DaemonFactory, db: asyncpg.Connection, client: aiohttp.ClientSession
) -> None:
    daemon = await daemons.start(
        """
        [queues.default]
        max_attempts = 1
        timeout = 0.2
        """
    )
    port = await http_port(daemon)
    await db.execute(
        """INSERT INTO stoker.jobs (queue, kind, payload)
           VALUES ('default', 'test.sleep', '{"seconds": 5}'),
                  ('default', 'test.fail', '{}')"""
    )
    timed_out = (
        "stoker_jobs_completed_total",
        (("kind", "test.sleep"), ("outcome", "timed_out"), ("queue", "default")),
    )
    failed = (
        "stoker_jobs_completed_total",
        (("kind", "test.fail"), ("outcome", "failed"), ("queue", "default")),
    )

    async def counted() -> dict[Any, float] | None:
        _, text = await get(client, port, "/metrics")
        got = samples(text)
        return got if got.get(timed_out) == 1 and got.get(failed) == 1 else None

    await eventually(counted)
