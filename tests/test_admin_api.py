"""The admin HTTP API, through real HTTP on loopback against a real PostgreSQL, mounted under
/api/v1 the way the daemon's HTTP server mounts it."""

from __future__ import annotations

import io
import json
import re
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import asyncpg
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

import daemon
from daemon.config import QueueConfig, ScheduleConfig, Settings
from daemon.cron.schedules import save_schedule
from daemon.store import queries
from daemon.store.db import create_pool
from daemon.web import admin, admin_models
from daemon.web.admin import ROUTES, create_admin_app
from tests.conftest import DaemonFactory, eventually, write_outcome
from tests.test_http import http_port as _daemon_port

TOKEN = "s3cret-admin-token-0123456789"
MIB = 1_048_576


@dataclass
class Reply:
    status: int
    body: Any
    headers: dict[str, str]


@dataclass
class Api:
    client: TestClient[web.Request, web.Application]
    app: web.Application  # the admin sub-app

    async def call(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        token: str | None = TOKEN,
        headers: dict[str, str] | None = None,
        **kwargs: Any,
    ) -> Reply:
        sent = dict(headers or {})
        if token is not None:
            sent.setdefault("Authorization", f"Bearer {token}")
        if body is not None:
            kwargs["json"] = body
        async with self.client.request(method, "/api/v1" + path, headers=sent, **kwargs) as resp:
            assert resp.content_type == "application/json", await resp.text()
            return Reply(resp.status, await resp.json(), dict(resp.headers))


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    import os

    for name in list(os.environ):
        if name.startswith("STOKER_") or name == "DATABASE_URL":
            monkeypatch.delenv(name)
    yield


@pytest.fixture
def settings(dsn: str) -> Settings:
    return Settings.model_validate(
        {
            "database_url": dsn,  # by its name in the file: the field holds a SecretStr
            "queues": {"default": QueueConfig(), "emails": QueueConfig()},
            "schedules": {
                "nightly": ScheduleConfig(
                    cron="0 2 * * *", kind="maintenance.cleanup", payload={"older_than_days": 30}
                )
            },
        }
    )


@pytest.fixture
async def api(dsn: str, settings: Settings) -> AsyncIterator[Api]:
    pool = await create_pool(dsn, max_size=4, application_name="stoker-admin-test")
    sub = create_admin_app(db=pool, settings=settings, token=TOKEN, max_body_bytes=MIB)
    main = web.Application()
    main.add_subapp("/api/v1", sub)
    client = TestClient(TestServer(main, host="127.0.0.1"))
    await client.start_server()
    try:
        yield Api(client, sub)
    finally:
        await client.close()
        await pool.close()


def concrete(endpoint: str) -> tuple[str, str]:
    method, path = endpoint.split(" ")
    return method, path.replace("{id}", "1").replace("{name}", "default")


async def failed_job(db: asyncpg.Connection, queue: str = "default", **kw: Any) -> int:
    job_id = await daemon.enqueue(db, queue=queue, kind="noop", **kw)
    claimed = await db.fetch(queries.CLAIM, queue, 1, "w", 30.0)
    assert [r["id"] for r in claimed] == [job_id], "the queue must hold no other due job"
    await write_outcome(db, job_id, attempt=1, outcome="failed", worker="w", error="boom")
    return job_id


async def active_job(db: asyncpg.Connection, queue: str = "default") -> int:
    job_id = await daemon.enqueue(db, queue=queue, kind="noop")
    claimed = await db.fetch(queries.CLAIM, queue, 1, "w", 30.0)
    assert [r["id"] for r in claimed] == [job_id], "the queue must hold no other due job"
    return job_id


# -- authentication ---------------------------------------------------------------------------


@pytest.mark.parametrize("endpoint", [r.endpoint for r in ROUTES])
async def test_every_route_needs_the_token(api: Api, db: asyncpg.Connection, endpoint: str) -> None:
    method, path = concrete(endpoint)
    body = {"queue": "default", "kind": "noop"} if endpoint == "POST /jobs" else None

    missing = await api.call(method, path, body, token=None)
    assert missing.status == 401
    assert missing.headers["WWW-Authenticate"] == "Bearer"
    assert "Bearer" in missing.body["error"]

    for header in ("Basic dXNlcjpwYXNz", "Bearer", "Bearer ", TOKEN):
        malformed = await api.call(method, path, body, headers={"Authorization": header})
        assert malformed.status == 401, header

    wrong = await api.call(method, path, body, token=TOKEN + "x")
    assert (wrong.status, wrong.body) == (403, {"error": "invalid token"})
    assert TOKEN not in json.dumps(wrong.body)
    assert await db.fetchval("SELECT count(*) FROM stoker.all_jobs") == 0
    assert await db.fetchval("SELECT count(*) FROM stoker.queues") == 0


async def test_unknown_path_and_method_are_json(api: Api) -> None:
    assert (await api.call("GET", "/nope", token=None)).status == 401
    missing = await api.call("GET", "/nope")
    assert missing.status == 404
    assert "/api/v1/nope" in missing.body["error"]
    wrong_method = await api.call("DELETE", "/jobs")
    assert wrong_method.status == 405
    assert set(wrong_method.headers["Allow"].split(",")) == {"GET", "POST"}


# -- POST /jobs -------------------------------------------------------------------------------


async def test_enqueue_then_show_the_job(api: Api, db: asyncpg.Connection) -> None:
    run_at = datetime(2031, 1, 31, 9, 0, tzinfo=UTC)
    created = await api.call(
        "POST",
        "/jobs",
        {
            "queue": "reports",
            "kind": "reports.build",
            "payload": {"org": 42},
            "run_at": "2031-01-31T10:00:00+01:00",
            "priority": 5,
            "unique_key": "report:42",
            "max_attempts": 3,
            "meta": {"by": "alice"},
        },
    )
    assert created.status == 201
    job_id = created.body["id"]
    row = await db.fetchrow("SELECT * FROM stoker.jobs WHERE id = $1", job_id)
    assert row is not None
    assert (row["queue"], row["kind"], row["payload"], row["run_at"]) == (
        "reports",
        "reports.build",
        {"org": 42},
        run_at,
    )
    assert (row["priority"], row["unique_key"], row["max_attempts"], row["meta"]) == (
        5,
        "report:42",
        3,
        {"by": "alice"},
    )

    shown = await api.call("GET", f"/jobs/{job_id}")
    assert shown.status == 200
    job = shown.body
    assert set(job) == set(admin_models.Job.model_fields)
    assert (job["id"], job["state"], job["errors"], job["attempts"]) == (job_id, "queued", [], 0)
    assert datetime.fromisoformat(job["run_at"]) == run_at

    again = await api.call("POST", "/jobs", {"queue": "x", "kind": "k", "unique_key": "report:42"})
    assert (again.status, again.body) == (201, {"id": job_id})


async def test_enqueue_defaults(api: Api, db: asyncpg.Connection) -> None:
    created = await api.call("POST", "/jobs", {"queue": "default", "kind": "noop"})
    assert created.status == 201
    row = await db.fetchrow("SELECT * FROM stoker.jobs WHERE id = $1", created.body["id"])
    assert row is not None
    assert (row["payload"], row["meta"], row["priority"], row["max_attempts"]) == ({}, {}, 0, None)


@pytest.mark.parametrize(
    ("change", "loc"),
    [
        ({"queue": "bad queue!"}, "body.queue"),
        ({"queue": 7}, "body.queue"),
        ({"kind": ""}, "body.kind"),
        ({"kind": "k" * 201}, "body.kind"),
        ({"payload": [1, 2]}, "body.payload"),
        ({"payload": "{}"}, "body.payload"),
        ({"meta": None}, "body.meta"),
        ({"priority": "5"}, "body.priority"),
        ({"priority": 1.5}, "body.priority"),
        ({"priority": 40000}, "body.priority"),
        ({"priority": True}, "body.priority"),
        ({"max_attempts": 0}, "body.max_attempts"),
        ({"run_at": "2031-01-31T09:00:00"}, "body.run_at"),
        ({"run_at": "tomorrow"}, "body.run_at"),
        ({"unique_key": ""}, "body.unique_key"),
        ({"unique_key": "u" * 1001}, "body.unique_key"),
        ({"colour": "blue"}, "body.colour"),
    ],
)
async def test_enqueue_rejects_bad_fields(
    api: Api, db: asyncpg.Connection, change: dict[str, Any], loc: str
) -> None:
    reply = await api.call("POST", "/jobs", {"queue": "default", "kind": "noop"} | change)
    assert reply.status == 422
    assert reply.body["error"] == "invalid request"
    assert [f["loc"] for f in reply.body["fields"]] == [loc]
    assert all(f["msg"] for f in reply.body["fields"])
    assert await db.fetchval("SELECT count(*) FROM stoker.jobs") == 0


async def test_enqueue_requires_queue_and_kind(api: Api) -> None:
    reply = await api.call("POST", "/jobs", {})
    assert reply.status == 422
    assert sorted(f["loc"] for f in reply.body["fields"]) == ["body.kind", "body.queue"]


async def test_enqueue_refuses_nan_which_jsonb_cannot_hold(api: Api) -> None:
    reply = await api.call("POST", "/jobs", data=b'{"queue": "q", "kind": "k", "meta": {"x": NaN}}')
    assert reply.status == 422
    assert [f["loc"] for f in reply.body["fields"]] == ["body.meta"]


@pytest.mark.parametrize("raw", [b"", b"{", b"queue=default", b"\xff\xfe"])
async def test_enqueue_invalid_json_is_400(api: Api, raw: bytes) -> None:
    reply = await api.call("POST", "/jobs", data=raw, headers={"Content-Type": "application/json"})
    assert reply.status == 400
    assert reply.body["error"].startswith("request body is not valid JSON")


async def test_enqueue_body_must_be_an_object(api: Api) -> None:
    reply = await api.call("POST", "/jobs", [{"queue": "default", "kind": "noop"}])
    assert reply.status == 422
    assert reply.body["fields"][0]["loc"] == "body"


async def test_oversized_body_is_413(api: Api, db: asyncpg.Connection) -> None:
    big = {"queue": "default", "kind": "noop", "payload": {"blob": "x" * (2 * MIB)}}
    data = json.dumps(big).encode()
    reply = await api.call("POST", "/jobs", data=io.BytesIO(data))  # with a Content-Length
    assert reply.status == 413
    assert str(MIB) in reply.body["error"]

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: caught while reading
        for i in range(0, len(data), 64 * 1024):
            yield data[i : i + 64 * 1024]

    chunked = await api.call("POST", "/jobs", data=chunks())
    assert chunked.status == 413
    assert await db.fetchval("SELECT count(*) FROM stoker.jobs") == 0

    # a route that reads no body still refuses one announced too large
    unread = await api.call("POST", "/queues/default/pause", data=io.BytesIO(data))
    assert unread.status == 413
    assert await db.fetchval("SELECT count(*) FROM stoker.queues") == 0

    just_fits = {"queue": "default", "kind": "noop", "payload": {"blob": "x" * (MIB - 200)}}
    assert (await api.call("POST", "/jobs", just_fits)).status == 201


# -- GET /jobs, GET /jobs/{id} ------------------------------------------------------------------


async def test_list_filters_and_pages_newest_first(api: Api, db: asyncpg.Connection) -> None:
    failed = await failed_job(db, "a")
    ids = [await daemon.enqueue(db, queue="a", kind="k1") for _ in range(5)]
    other = await daemon.enqueue(db, queue="b", kind="k2")

    everything = await api.call("GET", "/jobs")
    assert everything.status == 200
    assert [j["id"] for j in everything.body["jobs"]] == [other, *reversed(ids), failed]
    assert everything.body["next_before"] is None
    assert isinstance(everything.body["jobs"][0]["created_at"], str)

    page = await api.call("GET", "/jobs", params={"queue": "a", "kind": "k1", "limit": "2"})
    assert [j["id"] for j in page.body["jobs"]] == [ids[4], ids[3]]
    assert page.body["next_before"] == ids[3]
    params = {"queue": "a", "kind": "k1", "limit": "2", "before": str(ids[3])}
    rest = await api.call("GET", "/jobs", params=params)
    assert [j["id"] for j in rest.body["jobs"]] == [ids[2], ids[1]]
    last = await api.call("GET", "/jobs", params=params | {"before": str(ids[1])})
    assert ([j["id"] for j in last.body["jobs"]], last.body["next_before"]) == ([ids[0]], None)

    by_state = await api.call("GET", "/jobs", params={"state": "failed"})
    assert [(j["id"], j["state"]) for j in by_state.body["jobs"]] == [(failed, "failed")]
    assert by_state.body["jobs"][0]["last_error"] == "boom"
    by_kind = await api.call("GET", "/jobs", params={"kind": "k2"})
    assert [j["id"] for j in by_kind.body["jobs"]] == [other]


@pytest.mark.parametrize(
    ("query", "loc"),
    [
        ("limit=0", "query.limit"),
        ("limit=501", "query.limit"),
        ("limit=ten", "query.limit"),
        ("state=running", "query.state"),
        ("queue=no%20spaces", "query.queue"),
        ("before=0", "query.before"),
        ("before=abc", "query.before"),
        ("color=red", "query.color"),
        ("state=failed&state=queued", "query.state"),
    ],
)
async def test_list_rejects_bad_query(api: Api, query: str, loc: str) -> None:
    reply = await api.call("GET", f"/jobs?{query}")
    assert reply.status == 422
    assert [f["loc"] for f in reply.body["fields"]] == [loc]


async def test_show_unknown_or_malformed_id(api: Api) -> None:
    missing = await api.call("GET", "/jobs/999")
    assert (missing.status, missing.body) == (404, {"error": "no job with id 999", "id": 999})
    for bad in ("abc", "0", "-1", "1.5", "99999999999999999999"):
        reply = await api.call("GET", f"/jobs/{bad}")
        assert reply.status == 422, bad
        assert reply.body["fields"][0]["loc"] == "path.id"


# -- retry and cancel ---------------------------------------------------------------------------


async def test_retry_brings_a_failed_job_back(api: Api, db: asyncpg.Connection) -> None:
    job_id = await failed_job(db)
    reply = await api.call("POST", f"/jobs/{job_id}/retry")
    assert (reply.status, reply.body) == (200, {"retried": True})
    row = await db.fetchrow("SELECT * FROM stoker.jobs WHERE id = $1", job_id)
    assert row is not None
    assert (row["state"], row["attempts"], row["last_error"]) == ("queued", 0, "boom")
    assert await db.fetchval("SELECT count(*) FROM stoker.job_history") == 0

    again = await api.call("POST", f"/jobs/{job_id}/retry")
    assert again.status == 409
    assert again.body["state"] == "queued"
    assert "already queued" in again.body["error"]


async def test_retry_hurries_a_delayed_job(api: Api, db: asyncpg.Connection) -> None:
    later = datetime.now(UTC) + timedelta(hours=1)
    job_id = await daemon.enqueue(db, queue="default", kind="noop", run_at=later)
    assert (await api.call("POST", f"/jobs/{job_id}/retry")).status == 200
    assert await db.fetchval("SELECT run_at <= now() FROM stoker.jobs WHERE id = $1", job_id)


async def test_retry_refusals(api: Api, db: asyncpg.Connection) -> None:
    running = await active_job(db)
    reply = await api.call("POST", f"/jobs/{running}/retry")
    assert (reply.status, reply.body["state"]) == (409, "active")
    assert "running on w" in reply.body["error"]

    await write_outcome(db, running, attempt=1, outcome="succeeded", worker="w")
    reply = await api.call("POST", f"/jobs/{running}/retry")
    assert (reply.status, reply.body["state"]) == (409, "succeeded")

    held = await failed_job(db, unique_key="only-one")
    await daemon.enqueue(db, queue="default", kind="noop", unique_key="only-one")
    reply = await api.call("POST", f"/jobs/{held}/retry")
    assert (reply.status, reply.body["state"]) == (409, "failed")
    assert "unique_key" in reply.body["error"]

    missing = await api.call("POST", "/jobs/424242/retry")
    assert (missing.status, missing.body["error"]) == (404, "no job with id 424242")
    assert (await api.call("POST", "/jobs/x/retry")).status == 422


async def test_cancel_a_queued_job(api: Api, db: asyncpg.Connection) -> None:
    job_id = await daemon.enqueue(db, queue="default", kind="noop")
    reply = await api.call("POST", f"/jobs/{job_id}/cancel")
    assert (reply.status, reply.body) == (200, {"cancelled": True, "cancel_requested": False})
    state = await db.fetchval("SELECT state::text FROM stoker.job_history WHERE id = $1", job_id)
    assert state == "cancelled"

    again = await api.call("POST", f"/jobs/{job_id}/cancel")
    assert again.status == 409
    assert again.body == {
        "error": f"job {job_id} is already cancelled",
        "id": job_id,
        "state": "cancelled",
    }


async def test_cancel_of_a_running_job_is_a_request(api: Api, db: asyncpg.Connection) -> None:
    # Its daemon stops it (tests/test_cancel.py); here nobody runs it: the request is on the row.
    job_id = await active_job(db)
    reply = await api.call("POST", f"/jobs/{job_id}/cancel")
    assert (reply.status, reply.body) == (200, {"cancelled": False, "cancel_requested": True})
    row = await db.fetchrow("SELECT * FROM stoker.jobs WHERE id = $1", job_id)
    assert row["state"] == "active"
    assert row["cancel_requested_by"] == "the admin API"
    assert row["cancel_requested_at"] is not None
    assert (await api.call("POST", "/jobs/31337/cancel")).status == 404
    assert (await api.call("POST", "/jobs/0/cancel")).status == 422


# -- queues -------------------------------------------------------------------------------------


async def test_queues_counts_pause_and_resume(api: Api, db: asyncpg.Connection) -> None:
    await db.execute(
        "INSERT INTO stoker.jobs (queue, kind, run_at) "
        "VALUES ('reports', 'k', now() - interval '90 s')"
    )
    await failed_job(db, "emails")

    def by_name(reply: Reply) -> dict[str, Any]:
        return {q["name"]: q for q in reply.body["queues"]}

    listed = await api.call("GET", "/queues")
    assert listed.status == 200
    queues = by_name(listed)
    assert list(queues) == ["default", "emails", "reports"]
    zero = {"queued": 0, "active": 0, "succeeded": 0, "failed": 0, "cancelled": 0}
    assert queues["default"] == {
        "name": "default",
        "paused": False,
        "counts": zero,
        "oldest_due_s": None,
        "limits": None,  # no limits configured
        "limits_mismatch": None,  # no daemons configured apart
    }
    assert queues["emails"]["counts"] == zero | {"failed": 1}
    assert queues["reports"]["counts"] == zero | {"queued": 1}
    assert 89 <= queues["reports"]["oldest_due_s"] < 300

    paused = await api.call("POST", "/queues/emails/pause")
    assert (paused.status, paused.body) == (200, {"name": "emails", "paused": True})
    assert by_name(await api.call("GET", "/queues"))["emails"]["paused"] is True
    assert await db.fetchval("SELECT paused FROM stoker.queues WHERE name = 'emails'") is True

    resumed = await api.call("POST", "/queues/emails/resume")
    assert (resumed.status, resumed.body) == (200, {"name": "emails", "paused": False})
    assert by_name(await api.call("GET", "/queues"))["emails"]["paused"] is False
    assert await db.fetchval("SELECT paused FROM stoker.queues WHERE name = 'emails'") is False

    # a queue known only from stoker.queues is listed too, paused or not
    assert (await api.call("POST", "/queues/adhoc:1/pause")).status == 200
    assert by_name(await api.call("GET", "/queues"))["adhoc:1"]["paused"] is True
    assert (await api.call("POST", "/queues/adhoc:1/resume")).status == 200
    assert by_name(await api.call("GET", "/queues"))["adhoc:1"] == {
        "name": "adhoc:1",
        "paused": False,
        "counts": zero,
        "oldest_due_s": None,
        "limits": None,  # no limits configured
        "limits_mismatch": None,  # no daemons configured apart
    }


async def test_pause_refuses_an_invalid_queue_name(api: Api, db: asyncpg.Connection) -> None:
    for path in ("/queues/no%20spaces/pause", f"/queues/{'q' * 129}/resume"):
        reply = await api.call("POST", path)
        assert reply.status == 422, path
        assert reply.body["fields"][0]["loc"] == "path.name"
    assert await db.fetchval("SELECT count(*) FROM stoker.queues") == 0


# -- schedules ----------------------------------------------------------------------------------


async def test_schedules_list_and_trigger(api: Api, db: asyncpg.Connection) -> None:
    await save_schedule(db, name="report.org-42", cron="0 6 1 * *", kind="reports.build")
    listed = await api.call("GET", "/schedules")
    assert listed.status == 200
    rows = {s["name"]: s for s in listed.body["schedules"]}
    assert list(rows) == ["nightly", "report.org-42"]
    nightly = rows["nightly"]
    assert (nightly["source"], nightly["cron"], nightly["kind"], nightly["enabled"]) == (
        "config",
        "0 2 * * *",
        "maintenance.cleanup",
        True,
    )
    next_tick = datetime.fromisoformat(nightly["next_tick"])
    assert (next_tick.hour, next_tick.minute, next_tick.utcoffset()) == (2, 0, timedelta(0))
    assert (nightly["last_job_id"], nightly["fired"]) == (None, 0)
    assert rows["report.org-42"]["source"] == "db"

    fired = await api.call("POST", "/schedules/nightly/trigger")
    assert fired.status == 201
    job = await db.fetchrow("SELECT * FROM stoker.jobs WHERE id = $1", fired.body["id"])
    assert job is not None
    assert (job["kind"], job["payload"]) == ("maintenance.cleanup", {"older_than_days": 30})
    assert job["meta"] == {"schedule": "nightly", "trigger": "manual"}
    after = {s["name"]: s for s in (await api.call("GET", "/schedules")).body["schedules"]}
    assert (after["nightly"]["last_job_id"], after["nightly"]["last_job_state"]) == (
        fired.body["id"],
        "queued",
    )

    missing = await api.call("POST", "/schedules/weekly/trigger")
    assert missing.status == 404
    assert missing.body == {
        "error": "no schedule named 'weekly'",
        "name": "weekly",
        "known": ["nightly", "report.org-42"],
    }


# -- robustness and the document ----------------------------------------------------------------


async def test_slow_database_gives_503_not_a_pile_up(
    api: Api, db: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(admin, "DB_TIMEOUT", 0.3)
    async with db.transaction():
        await db.execute("LOCK TABLE stoker.queues IN ACCESS EXCLUSIVE MODE")
        reply = await api.call("POST", "/queues/default/pause")
    assert reply.status == 503
    assert "did not answer" in reply.body["error"]
    assert (await api.call("POST", "/queues/default/pause")).status == 200


async def test_unexpected_failure_is_a_json_500_without_details(
    api: Api, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    async def broken(*_args: Any) -> list[dict[str, Any]]:
        raise RuntimeError("internal detail")

    monkeypatch.setattr(daemon.cron.schedules, "status", broken)
    reply = await api.call("GET", "/schedules")
    assert reply.status == 500
    assert "internal detail" not in json.dumps(reply.body)
    assert "internal detail" in caplog.text


async def test_openapi_describes_exactly_the_served_routes(api: Api) -> None:
    reply = await api.call("GET", "/openapi.json")
    assert reply.status == 200
    doc = reply.body
    assert doc["openapi"] == "3.1.0"
    assert doc["components"]["securitySchemes"]["bearerAuth"] == {
        "type": "http",
        "scheme": "bearer",
    }
    assert doc["security"] == [{"bearerAuth": []}]
    prefix = doc["servers"][0]["url"]
    assert prefix == "/api/v1"

    documented = {(m.upper(), prefix + p) for p, ops in doc["paths"].items() for m in ops}
    served = {(r.method, r.resource.canonical) for r in api.app.router.routes() if r.resource}
    assert documented == served
    assert len(served) == 13

    enqueue = doc["paths"]["/jobs"]["post"]
    assert {"201", "401", "403", "413", "422"} <= set(enqueue["responses"])
    listing = {p["name"] for p in doc["paths"]["/jobs"]["get"]["parameters"]}
    assert listing == {"state", "queue", "kind", "limit", "before"}
    refs = set(re.findall(r'"#/components/schemas/([^"]+)"', json.dumps(doc)))
    assert refs and refs <= set(doc["components"]["schemas"])
    assert "EnqueueRequest" in refs


async def test_pause_stops_claiming_on_two_daemons_and_resume_restarts_it(
    daemons: DaemonFactory, db: asyncpg.Connection
) -> None:
    token = "t" * 32
    first = await daemons.start("", STOKER_HTTP__ADMIN_TOKEN=token)
    await daemons.start("")
    port = await _daemon_port(first)
    headers = {"Authorization": f"Bearer {token}"}
    async with aiohttp.ClientSession(headers=headers) as http:
        async with http.post(f"http://127.0.0.1:{port}/api/v1/queues/default/pause") as r:
            assert r.status == 200
            assert await r.json() == {"name": "default", "paused": True}
        ids = [
            r["id"]
            for r in await db.fetch(
                "INSERT INTO stoker.jobs (queue, kind) SELECT 'default', 'noop' "
                "FROM generate_series(1, 20) RETURNING id"
            )
        ]
        # A control queue keeps running: once its job is done, both daemons have had their
        # chance to claim the paused jobs, and neither did.
        control = await db.fetchval(
            "INSERT INTO stoker.jobs (queue, kind) VALUES ('other', 'noop') RETURNING id"
        )
        await daemons.start("[queues.other]\n")

        async def control_done() -> bool:
            row: str | None = await db.fetchval(
                "SELECT state::text FROM stoker.all_jobs WHERE id = $1", control
            )
            return row == "succeeded"

        await eventually(control_done)
        states = await db.fetch(
            "SELECT DISTINCT state::text FROM stoker.jobs WHERE id = ANY($1)", ids
        )
        assert [r["state"] for r in states] == ["queued"]

        async with http.post(f"http://127.0.0.1:{port}/api/v1/queues/default/resume") as r:
            assert r.status == 200

        async def all_done() -> bool:
            done: int = await db.fetchval(
                "SELECT count(*) FROM stoker.job_history WHERE id = ANY($1)", ids
            )
            return done == 20

        await eventually(all_done)
        claimed_by = await db.fetch(
            "SELECT DISTINCT worker FROM stoker.job_history WHERE id = ANY($1)", ids
        )
        assert len(claimed_by) >= 1


async def test_retry_through_the_api_runs_a_failed_job_again(
    daemons: DaemonFactory, db: asyncpg.Connection
) -> None:
    token = "r" * 32
    running = await daemons.start(
        "[queues.default]\nmax_attempts = 1\n", STOKER_HTTP__ADMIN_TOKEN=token
    )
    port = await _daemon_port(running)
    marker = daemons.tmp / "fixed"
    job_id = await db.fetchval(
        "INSERT INTO stoker.jobs (queue, kind, payload) VALUES ('default', 'test.needs_file', $1) "
        "RETURNING id",
        {"path": str(marker)},
    )

    async def state() -> str | None:
        value: str | None = await db.fetchval(
            "SELECT state::text FROM stoker.all_jobs WHERE id = $1", job_id
        )
        return value

    async def failed() -> bool:
        return await state() == "failed"

    await eventually(failed)
    marker.write_text("the operator fixed the cause")
    headers = {"Authorization": f"Bearer {token}"}
    url = f"http://127.0.0.1:{port}/api/v1/jobs/{job_id}/retry"
    async with aiohttp.ClientSession(headers=headers) as http, http.post(url) as r:
        assert r.status == 200
        assert await r.json() == {"retried": True}

    async def succeeded() -> bool:
        return await state() == "succeeded"

    await eventually(succeeded)
    row = await db.fetchrow(
        "SELECT attempts, result, errors FROM stoker.job_history WHERE id = $1", job_id
    )
    assert row is not None
    assert (row["attempts"], row["result"]) == (1, "found")  # a retried job starts over
    assert "FileNotFoundError" in row["errors"][0]["error"]  # the failure stays on record
