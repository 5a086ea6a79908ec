"""Jobs by meta containment (an organisation's, a user's): operate.jobs, the CLI's
`jobs list --meta`, the API's `?meta.KEY=`, and the indexes of migration 020 that serve them."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

import daemon
from daemon.config import Settings
from daemon.operate import jobs
from daemon.store import queries
from daemon.store.db import create_pool
from daemon.web.admin import create_admin_app
from tests.conftest import stoker_cli, write_outcome

TOKEN = "s3cret-admin-token-0123456789"


async def _history(
    db: asyncpg.Connection, rows: int, orgs: int, first_id: int = 10_000_000
) -> None:
    """`rows` finished jobs spread over `orgs` organisations, straight into history."""
    await db.execute(
        """
        INSERT INTO stoker.job_history (id, queue, kind, payload, meta, priority, state, run_at,
                                        attempts, errors, created_at)
        SELECT $1 + g, 'default', 'report', '{}',
               jsonb_build_object('org', 'org_' || (g % $3), 'user', 'u_' || (g % 7)),
               0, 'succeeded', now(), 1, '[]', now()
          FROM generate_series(1, $2) g
        """,
        first_id,
        rows,
        orgs,
    )
    await db.execute("ANALYZE stoker.job_history")


async def _org_jobs(db: asyncpg.Connection) -> dict[str, int]:
    """A live, a finished and an unrelated job."""
    live = await daemon.enqueue(db, queue="default", kind="a", meta={"org": "org_x", "user": "u1"})
    done = await daemon.enqueue(db, queue="default", kind="b", meta={"org": "org_x", "user": "u2"})
    await db.fetch(queries.CLAIM, "default", 2, "w", 30.0)
    await write_outcome(db, done, attempt=1, outcome="succeeded", worker="w")
    other = await daemon.enqueue(db, queue="default", kind="c", meta={"org": "org_y"})
    bare = await daemon.enqueue(db, queue="default", kind="d")
    return {"live": live, "done": done, "other": other, "bare": bare}


async def test_list_and_count_by_meta_across_live_and_history(db: asyncpg.Connection) -> None:
    ids = await _org_jobs(db)
    rows = await jobs.list_jobs(db, limit=10, meta={"org": "org_x"})
    assert [r["id"] for r in rows] == [ids["done"], ids["live"]]  # newest first
    assert [r["state"] for r in rows] == ["succeeded", "active"]
    both = await jobs.list_jobs(db, limit=10, meta={"org": "org_x", "user": "u1"})
    assert [r["id"] for r in both] == [ids["live"]]
    assert await jobs.list_jobs(db, limit=10, meta={"org": "org_x"}, state="succeeded") != []
    paged = await jobs.list_jobs(db, limit=10, meta={"org": "org_x"}, before=ids["done"])
    assert [r["id"] for r in paged] == [ids["live"]]
    assert await jobs.count_jobs(db, {"org": "org_x"}) == 2
    assert await jobs.count_jobs(db, {"org": "org_x"}, state="active") == 1
    assert await jobs.count_jobs(db, {"org": "nobody"}) == 0


def test_meta_filter_names_the_bad_field() -> None:
    assert jobs.meta_filter([("org", "o"), ("user", "u")]) == {"org": "o", "user": "u"}
    for pairs, words in [
        ([("", "x")], "key is empty"),
        ([("org", "a"), ("org", "b")], "given twice"),
        ([("org", "a\x00")], "NUL"),
        ([("k" * 201, "v")], "at most"),
    ]:
        with pytest.raises(ValueError, match=words):
            jobs.meta_filter(pairs, field="--meta")
    with pytest.raises(ValueError, match="KEY=VALUE"):
        jobs.meta_pair("org")


async def test_the_meta_indexes_serve_the_filter(db: asyncpg.Connection) -> None:
    await _history(db, rows=50_000, orgs=5_000)
    await db.execute(
        """INSERT INTO stoker.jobs (queue, kind, meta)
           SELECT 'default', 'k', jsonb_build_object('org', 'org_' || (i % 5000))
             FROM generate_series(1, 20000) i"""
    )
    await db.execute("ANALYZE stoker.jobs")
    meta = json.dumps({"org": "org_7"})
    for sql, limit in ((jobs.LIST_BY_META, 51), (jobs.COUNT_BY_META, None)):
        plan = await db.fetchval(
            "EXPLAIN (FORMAT JSON) " + sql, None, None, None, None, limit, meta
        )
        assert "job_history_meta_idx" in plan, plan
        assert "jobs_meta_idx" in plan, plan
    rows = await jobs.list_jobs(db, limit=50, meta={"org": "org_7"})
    assert len(rows) == 14  # 10 in history, 4 live


async def test_cli_jobs_list_meta(dsn: str, db: asyncpg.Connection) -> None:
    ids = await _org_jobs(db)
    out = stoker_cli(dsn, "jobs", "list", "--meta", "org=org_x", "--meta", "user=u2", "--json")
    assert out.returncode == 0, out.stderr
    assert [json.loads(line)["id"] for line in out.stdout.splitlines()] == [ids["done"]]
    counted = stoker_cli(dsn, "jobs", "list", "--meta", "org=org_x", "--count")
    assert (counted.returncode, counted.stdout.strip()) == (0, "2")
    table = stoker_cli(dsn, "jobs", "list", "--meta", "org=org_y")
    assert table.returncode == 0 and str(ids["other"]) in table.stdout
    for bad, words in [
        (["--meta", "org"], "--meta: 'org' is not KEY=VALUE"),
        (["--meta", "=x"], "key is empty"),
        (["--meta", "org=a", "--meta", "org=b"], "--meta 'org': given twice"),
        (["--count"], "--count goes with --meta"),
    ]:
        res = stoker_cli(dsn, "jobs", "list", *bad)
        assert res.returncode == 2, (bad, res.stdout, res.stderr)
        assert words in res.stderr and "Traceback" not in res.stderr, res.stderr


@pytest.fixture
async def http(dsn: str) -> AsyncIterator[TestClient[web.Request, web.Application]]:
    settings = Settings.model_validate({"database_url": dsn})
    pool = await create_pool(dsn, max_size=2, application_name="stoker-meta-test")
    main = web.Application()
    main.add_subapp(
        "/api/v1", create_admin_app(db=pool, settings=settings, token=TOKEN, max_body_bytes=65536)
    )
    client = TestClient(TestServer(main, host="127.0.0.1"))
    await client.start_server()
    try:
        yield client
    finally:
        await client.close()
        await pool.close()


async def _get(http: TestClient[web.Request, web.Application], query: str) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {TOKEN}"}
    async with http.get("/api/v1/jobs?" + query, headers=headers) as resp:
        return resp.status, await resp.json()


async def test_api_jobs_by_meta(
    http: TestClient[web.Request, web.Application], db: asyncpg.Connection
) -> None:
    ids = await _org_jobs(db)
    status, body = await _get(http, "meta.org=org_x&meta.user=u1")
    assert status == 200, body
    assert [j["id"] for j in body["jobs"]] == [ids["live"]]
    status, body = await _get(http, "meta.org=org_x&limit=1")
    assert (status, [j["id"] for j in body["jobs"]]) == (200, [ids["done"]])
    assert body["next_before"] == ids["done"]
    status, body = await _get(http, f"meta.org=org_x&before={ids['done']}&state=active")
    assert (status, [j["id"] for j in body["jobs"]]) == (200, [ids["live"]])
    for query, loc in [
        ("meta.=x", "query.meta."),
        ("meta.org=a&meta.org=b", "query.meta.org"),
        ("meta.org=a%00", "query.meta.org"),
        ("metaorg=a", "query.metaorg"),
    ]:
        status, body = await _get(http, query)
        assert status == 422, (query, body)
        assert loc in [f["loc"] for f in body["fields"]], body


async def test_api_counts_jobs_by_meta(
    http: TestClient[web.Request, web.Application], db: asyncpg.Connection
) -> None:
    await _org_jobs(db)
    headers = {"Authorization": f"Bearer {TOKEN}"}

    async def count(query: str) -> tuple[int, Any]:
        async with http.get("/api/v1/jobs/count?" + query, headers=headers) as resp:
            return resp.status, await resp.json()

    assert await count("meta.org=org_x") == (200, {"count": 2})
    assert await count("meta.org=org_x&meta.user=u1") == (200, {"count": 1})
    assert await count("meta.org=org_x&state=active") == (200, {"count": 1})
    assert await count("meta.org=nobody") == (200, {"count": 0})
    for query, loc in [
        ("", "query.meta"),
        ("state=active", "query.meta"),
        ("meta.=x", "query.meta."),
    ]:
        status, body = await count(query)
        assert status == 422, (query, body)
        assert loc in [f["loc"] for f in body["fields"]], body
