"""Limits made visible (issue 17), with a real daemon and a real PostgreSQL: a queue held back
by its global limit shows its limits and standing in `stoker status`, /api/v1/queues, /metrics
and the dashboard's queues page; a queue without limits shows none; `stoker jobs show` and the
job page print a job's concurrency key and a pending cancel request."""

from __future__ import annotations

import re
from typing import Any

import aiohttp
import asyncpg

from tests.browser import ADMIN_TOKEN, http_port
from tests.conftest import DaemonFactory, eventually, stoker_cli

CONFIG = f"""
[http]
admin_token = "{ADMIN_TOKEN}"
depth_sample_interval = 0.2

[queues.capped]
concurrency = 10
global_concurrency = 2
key_concurrency = 1
rate_limit = "100/1m"

[queues.plain]
concurrency = 2
"""


async def fill(db: asyncpg.Connection) -> list[int]:
    """Two keyed jobs that go first (priority 10) and four without a key, in one statement so
    that the daemon's first claim sees them all: it starts the two keyed ones, and the global
    limit of 2 holds back the four others."""
    ids: list[int] = await db.fetchval(
        """
        WITH made AS (
            INSERT INTO stoker.jobs (queue, kind, payload, priority, concurrency_key)
            SELECT 'capped', 'test.sleep', '{"seconds": 60}', p, k
              FROM unnest(ARRAY[10, 10, 0, 0, 0, 0], ARRAY['org_a', 'org_b', NULL, NULL,
                          NULL, NULL]) AS t(p, k)
            RETURNING id
        )
        SELECT array_agg(id ORDER BY id) FROM made
        """
    )
    return ids


def metric(page: str, name: str, **labels: str) -> float | None:
    """The sample of `name` with exactly these labels, in whatever order they are written."""
    for found in re.finditer(rf"^{name}{{(.*)}} (\S+)$", page, re.M):
        if dict(re.findall(r'(\w+)="([^"]*)"', found[1])) == labels:
            return float(found[2])
    return None


async def test_a_queue_held_back_by_its_global_limit_shows_it_everywhere(
    daemons: DaemonFactory, db: asyncpg.Connection, dsn: str
) -> None:
    daemon = await daemons.start(CONFIG)
    base = f"http://127.0.0.1:{http_port(daemon.log())}"
    ids = await fill(db)
    # A job of the unlimited queue, due later: `stoker status` lists queues that have jobs.
    await db.execute(
        "INSERT INTO stoker.jobs (queue, kind, run_at) VALUES ('plain', 'test.sleep',"
        " now() + interval '1 hour')"
    )

    async def two_running() -> bool:
        n: int = await db.fetchval(
            "SELECT count(*) FROM stoker.jobs WHERE queue = 'capped' AND state = 'active'"
        )
        return n == 2

    await eventually(two_running, 20)
    assert set(
        await db.fetchval(
            "SELECT array_agg(concurrency_key) FROM stoker.jobs WHERE state = 'active'"
        )
    ) == {"org_a", "org_b"}

    # The CLI, with the daemons' configuration: the limits and their standing; the unlimited
    # queue keeps its plain line.
    cli_config = daemons.write_config(CONFIG, "cli.toml")
    status = stoker_cli(dsn, "status", config=cli_config)
    assert status.returncode == 0, status.stderr
    lines = status.stdout.splitlines()
    assert "LIMITS (as configured here)" in lines
    assert (
        "capped: running 2/2 (global), keys at limit 2 (key_concurrency 1), "
        "rate 2/100 in 60s, held back 4"
    ) in lines
    assert not any(line.startswith("plain:") for line in lines)
    assert any(line.split()[:1] == ["plain"] for line in lines)
    # Without limits configured, `stoker status` is as before.
    bare = stoker_cli(dsn, "status")
    assert bare.returncode == 0 and "LIMITS" not in bare.stdout

    shown = stoker_cli(dsn, "jobs", "show", str(ids[0]), config=cli_config)
    assert shown.returncode == 0, shown.stderr
    assert re.search(r"^\s+concurrency_key: org_a$", shown.stdout, re.M), shown.stdout
    plain_job = stoker_cli(dsn, "jobs", "show", str(ids[2]), config=cli_config)
    assert "concurrency_key" not in plain_job.stdout
    assert "cancel_requested" not in plain_job.stdout

    auth = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
        async with http.get(f"{base}/api/v1/queues", headers=auth) as response:
            assert response.status == 200
            queues = {q["name"]: q for q in (await response.json())["queues"]}
        assert queues["capped"]["limits"] == {
            "global_concurrency": 2,
            "key_concurrency": 1,
            "rate_limit": "100/60s",
            "rate_limit_by_key": False,
            "running": 2,
            "keys_at_limit": 2,
            "rate_window_starts": 2,
            "held_back": 4,
        }
        assert queues["plain"]["limits"] is None

        async def scraped() -> str | None:
            async with http.get(f"{base}/metrics") as response:
                page = await response.text()
            held = metric(page, "stoker_queue_limit_held_back", queue="capped")
            limited = metric(page, "stoker_queue_limited", queue="capped", limit="global")
            return page if held == 4 and limited == 1 else None

        page = await eventually(scraped, 20)
        assert metric(page, "stoker_queue_limit", queue="capped", limit="global") == 2
        assert metric(page, "stoker_queue_limit", queue="capped", limit="key") == 1
        assert metric(page, "stoker_queue_limit", queue="capped", limit="rate") == 100
        assert metric(page, "stoker_queue_limited", queue="capped", limit="rate") == 0
        assert 'queue="plain"' not in "".join(line for line in page.splitlines() if "limit" in line)
        assert ADMIN_TOKEN not in page

        cookie = await sign_in(http, base)
        dashboard = await eventually(lambda: queues_page(http, base, cookie), 20)
        assert "2/2 running" in dashboard
        assert "2 keys at limit (1 each)" in dashboard
        assert "2/100 per 60s" in dashboard
        assert "4 held back" in dashboard
        async with http.get(f"{base}/dashboard/jobs/{ids[0]}", headers=cookie) as response:
            assert response.status == 200
            assert '<code class="concurrency-key">org_a</code>' in await response.text()

        # The admin API enqueues with a key, and names the field of a bad one.
        job = {"queue": "plain", "kind": "test.sleep", "run_at": "2100-01-01T00:00:00Z"}
        async with http.post(
            f"{base}/api/v1/jobs", headers=auth, json=job | {"concurrency_key": "org_c"}
        ) as response:
            assert response.status == 201
            made = (await response.json())["id"]
        assert (
            await db.fetchval("SELECT concurrency_key FROM stoker.jobs WHERE id = $1", made)
            == "org_c"
        )
        async with http.post(
            f"{base}/api/v1/jobs", headers=auth, json=job | {"concurrency_key": ""}
        ) as response:
            assert response.status == 422
            assert "concurrency_key" in await response.text()


async def sign_in(http: aiohttp.ClientSession, base: str) -> dict[str, str]:
    async with http.post(
        f"{base}/dashboard/login", data={"token": ADMIN_TOKEN}, allow_redirects=False
    ) as response:
        assert response.status in (302, 303), response.status
        session = response.cookies["stoker_session"].value
    return {"Cookie": f"stoker_session={session}"}


async def queues_page(http: aiohttp.ClientSession, base: str, cookie: dict[str, str]) -> str | None:
    """The queues page once its sample holds the limited queue's standing."""
    async with http.get(f"{base}/dashboard/queues", headers=cookie) as response:
        assert response.status == 200
        html = await response.text()
    row = re.search(r'<tr data-queue="capped">.*?</tr>', html, re.S)
    plain = re.search(r'<tr data-queue="plain">.*?</tr>', html, re.S)
    assert plain is not None and "held back" not in plain[0]
    return row[0] if row is not None and "4 held back" in row[0] else None


async def test_jobs_show_prints_a_pending_cancel_request(db: asyncpg.Connection, dsn: str) -> None:
    # A running job asked to stop, as stoker.cancel leaves it (no daemon here to stop it).
    job_id: int = await db.fetchval(
        """
        INSERT INTO stoker.jobs (queue, kind, state, worker, lease_expires_at, started_at,
                                 attempts, concurrency_key, cancel_requested_at,
                                 cancel_requested_by)
        VALUES ('plain', 'test.sleep', 'active', 'w1', now() + interval '1 hour', now(), 1,
                'org_9', now(), 'alice')
        RETURNING id
        """
    )
    shown = stoker_cli(dsn, "jobs", "show", str(job_id))
    assert shown.returncode == 0, shown.stderr
    fields: dict[str, Any] = dict(
        line.strip().split(": ", 1) for line in shown.stdout.splitlines() if ": " in line
    )
    assert fields["concurrency_key"] == "org_9"
    assert fields["cancel_requested_by"] == "alice"
    assert fields["cancel_requested_at"] not in ("", "-")


async def test_stoker_enqueue_takes_a_concurrency_key(db: asyncpg.Connection, dsn: str) -> None:
    made = stoker_cli(dsn, "enqueue", "plain", "test.sleep", "--concurrency-key", "org_7")
    assert made.returncode == 0, made.stderr
    key = await db.fetchval(
        "SELECT concurrency_key FROM stoker.jobs WHERE id = $1", int(made.stdout)
    )
    assert key == "org_7"
    bad = stoker_cli(dsn, "enqueue", "plain", "test.sleep", "--concurrency-key", "x" * 201)
    assert bad.returncode == 2
    assert "--concurrency-key" in bad.stderr and "Traceback" not in bad.stderr
