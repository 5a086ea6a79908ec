"""http.request with a real daemon and a real aiohttp server on loopback that records every
request and answers as each test scripts it."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import asyncpg
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from handlers.http import retry_after
from tests.conftest import DaemonFactory, DaemonProcess, finished

# Until handlers/__init__.py imports handlers.http, the daemon loads it as a handler module.
MODULES = '["tests.job_handlers", "handlers.http"]'


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    body: str


@dataclass
class Reply:
    status: int = 200
    body: str = "ok"
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0


class Hook:
    """The webhook receiver: each request to a path gets that path's next scripted reply
    (then 200 "ok"), and is recorded."""

    def __init__(self) -> None:
        self.seen: list[Seen] = []
        self.replies: dict[str, list[Reply]] = {}
        self.port = 0

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.text()
        self.seen.append(Seen(request.method, request.path, dict(request.headers), body))
        script = self.replies.get(request.path) or []
        reply = script.pop(0) if script else Reply()
        if reply.delay:
            await asyncio.sleep(reply.delay)
        auth = request.headers.get("Authorization", "")
        echoes = {
            "{auth}": auth,
            "{token}": auth.split(" ")[-1],
            "{url}": str(request.url),
            "{path}": request.path_qs,
        }
        return web.Response(
            status=reply.status,
            text=_echo(reply.body, echoes),
            headers={name: _echo(value, echoes) for name, value in reply.headers.items()},
        )

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"


def _echo(text: str, echoes: dict[str, str]) -> str:
    for placeholder, value in echoes.items():
        text = text.replace(placeholder, value)
    return text


@contextlib.asynccontextmanager
async def serve_hook() -> AsyncIterator[Hook]:
    """A webhook receiver listening on 127.0.0.1, closed on leaving."""
    receiver = Hook()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", receiver.handle)
    server = TestServer(app, host="127.0.0.1", port=0)
    await server.start_server()
    assert server.port is not None
    receiver.port = server.port
    try:
        yield receiver
    finally:
        await server.close()


@pytest.fixture
async def hook() -> AsyncIterator[Hook]:
    async with serve_hook() as receiver:
        yield receiver


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def config(
    port: int,
    *,
    max_result_bytes: int = 4096,
    target_timeout: float = 5,
    other_ports: tuple[int, ...] = (),
) -> str:
    # Payload URLs reach the receiver on loopback only because the test allows it.
    allowed = json.dumps([f"127.0.0.1:{p}" for p in (port, *other_ports)])
    return f"""
    [queues.default]
    backoff = {{ base = 0.2, jitter = 0 }}
    [webhooks]
    allowed_hosts = {allowed}
    allow_private_addresses = true
    max_result_bytes = {max_result_bytes}
    [webhooks.targets.recheck]
    url = "http://127.0.0.1:{port}/recheck"
    headers = {{ Authorization = "Bearer s3cret", X-Api-Key = "k3y-k3y" }}
    timeout = {target_timeout}
    [webhooks.targets.echo]
    url = "http://127.0.0.1:{port}/echo"
    method = "PUT"
    headers = {{ Authorization = "Bearer s3cret" }}
    """


async def start(daemons: DaemonFactory, body: str) -> DaemonProcess:
    return await daemons.start(body, STOKER_HANDLER_MODULES=MODULES)


async def call(db: asyncpg.Connection, payload: dict[str, Any], max_attempts: int = 5) -> int:
    job_id: int = await db.fetchval(
        "SELECT stoker.enqueue('default', 'http.request', $1, max_attempts => $2)",
        payload,
        max_attempts,
    )
    return job_id


def row_text(row: asyncpg.Record) -> str:
    return json.dumps(
        {k: row[k] for k in ("result", "errors", "last_error", "progress")}, default=str
    )


async def test_target_sends_configured_headers_and_json_and_keeps_secrets_out(
    daemons: DaemonFactory, db: asyncpg.Connection, hook: Hook
) -> None:
    hook.replies["/recheck"] = [Reply(201, "queued")]
    hook.replies["/echo"] = [Reply(200, "you sent {auth}, token {token}")]
    daemon = await start(daemons, config(hook.port))
    job_id = await call(db, {"target": "recheck", "json": {"sku": 42}})
    echo_id = await call(db, {"target": "echo", "json": None})
    row = await finished(db, job_id)
    assert row["state"] == "succeeded", row["last_error"]
    assert row["result"] == {"status": 201, "body": "queued"}
    echo = await finished(db, echo_id)
    assert echo["state"] == "succeeded", echo["last_error"]
    assert echo["result"] == {"status": 200, "body": "you sent [redacted], token [redacted]"}

    [sent] = [s for s in hook.seen if s.path == "/recheck"]
    assert sent.method == "POST"
    assert sent.headers["Authorization"] == "Bearer s3cret"
    assert sent.headers["X-Api-Key"] == "k3y-k3y"
    assert sent.headers["Content-Type"] == "application/json"
    assert sent.headers["Idempotency-Key"] == f"stoker-job-{job_id}"
    assert json.loads(sent.body) == {"sku": 42}
    [echoed] = [s for s in hook.seen if s.path == "/echo"]
    assert (echoed.method, echoed.body) == ("PUT", "null")

    await daemon.wait_log("http.request PUT target echo -> 200 in")
    for text in (row_text(row), row_text(echo), daemon.log()):
        assert "s3cret" not in text
        assert "k3y-k3y" not in text
    assert "http.request POST target recheck -> 201 in" in daemon.log()
    daemon.proc.send_signal(signal.SIGTERM)  # the shutdown hook closes the session cleanly
    assert await daemon.wait_exit() == 0
    assert "Unclosed" not in daemon.log()


async def test_allowlisted_url_with_payload_headers_and_a_truncated_result(
    daemons: DaemonFactory, db: asyncpg.Connection, hook: Hook
) -> None:
    hook.replies["/plain"] = [Reply(200, "0123456789abcdef")]
    daemon = await start(daemons, config(hook.port, max_result_bytes=10))
    job_id = await call(
        db,
        {"url": hook.url("/plain?x=1"), "method": "GET", "headers": {"X-Trace": "t-1"}},
    )
    row = await finished(db, job_id)
    assert row["state"] == "succeeded", row["last_error"]
    assert row["result"] == {"status": 200, "body": "0123456789"}
    [sent] = hook.seen
    assert (sent.method, sent.path, sent.body) == ("GET", "/plain", "")
    assert sent.headers["X-Trace"] == "t-1"
    assert "Authorization" not in sent.headers
    # A URL may be a credential: logs show its origin only.
    assert f"http.request GET http://127.0.0.1:{hook.port}/... -> 200 in" in daemon.log()
    assert "/plain" not in daemon.log()


async def test_503_is_retried_with_backoff_until_it_succeeds(
    daemons: DaemonFactory, db: asyncpg.Connection, hook: Hook
) -> None:
    hook.replies["/recheck"] = [Reply(503, "down for maintenance")]
    await start(daemons, config(hook.port))
    row = await finished(db, await call(db, {"target": "recheck"}))
    assert row["state"] == "succeeded", row["last_error"]
    assert row["attempts"] == 2
    assert "HTTP 503 from POST target recheck: down for maintenance" in row["errors"][0]["error"]
    assert len(hook.seen) == 2


async def test_429_waits_for_retry_after(
    daemons: DaemonFactory, db: asyncpg.Connection, hook: Hook
) -> None:
    hook.replies["/recheck"] = [Reply(429, "slow down", {"Retry-After": "2"})]
    await start(daemons, config(hook.port))
    row = await finished(db, await call(db, {"target": "recheck"}))
    assert row["state"] == "succeeded", row["last_error"]
    assert row["attempts"] == 2
    [first] = row["errors"]
    assert "Retry-After 2s" in first["error"]
    failed_at = datetime.fromisoformat(first["at"])
    # The queue's backoff would be 0.2 s: waiting two seconds is the server's doing.
    assert (row["started_at"] - failed_at).total_seconds() >= 2.0


async def test_404_fails_at_once_with_status_and_excerpt(
    daemons: DaemonFactory, db: asyncpg.Connection, hook: Hook
) -> None:
    hook.replies["/recheck"] = [Reply(404, "no such   product\n")]
    await start(daemons, config(hook.port))
    row = await finished(db, await call(db, {"target": "recheck"}))
    assert row["state"] == "failed"
    assert row["attempts"] == 1
    assert "HTTP 404 from POST target recheck: no such product" in row["last_error"]


async def test_a_redirect_is_not_followed(
    daemons: DaemonFactory, db: asyncpg.Connection, hook: Hook
) -> None:
    hook.replies["/recheck"] = [Reply(302, "", {"Location": "http://evil.example/steal"})]
    await start(daemons, config(hook.port))
    row = await finished(db, await call(db, {"target": "recheck"}))
    assert row["state"] == "failed"
    assert row["attempts"] == 1
    assert "HTTP 302" in row["last_error"]
    assert "redirect to http://evil.example/steal not followed" in row["last_error"]
    assert "webhooks.allowed_hosts" in row["last_error"]
    assert [s.path for s in hook.seen] == ["/recheck"]


async def test_connection_refused_is_retried(
    daemons: DaemonFactory, db: asyncpg.Connection, hook: Hook
) -> None:
    closed_port = free_port()
    await start(daemons, config(hook.port, other_ports=(closed_port,)))
    closed = f"http://127.0.0.1:{closed_port}/nobody"
    row = await finished(db, await call(db, {"url": closed}, max_attempts=2))
    assert row["state"] == "failed"
    assert row["attempts"] == 2
    assert len(row["errors"]) == 2
    assert "Cannot connect to host 127.0.0.1" in row["errors"][0]["error"]


async def test_a_slow_server_times_out_at_the_targets_cap(
    daemons: DaemonFactory, db: asyncpg.Connection, hook: Hook
) -> None:
    hook.replies["/recheck"] = [Reply(200, "late", delay=1.5)]
    await start(daemons, config(hook.port, target_timeout=0.3))
    row = await finished(db, await call(db, {"target": "recheck", "timeout": 60}))
    assert row["state"] == "succeeded", row["last_error"]
    assert row["attempts"] == 2
    assert "no response within 0.3s" in row["errors"][0]["error"]


async def test_bad_destinations_and_headers_fail_at_once_naming_the_fix(
    daemons: DaemonFactory, db: asyncpg.Connection, hook: Hook
) -> None:
    daemon = await start(daemons, config(hook.port))
    cases: dict[str, dict[str, Any]] = {
        "host": {"url": "https://evil.example/x"},
        "auth": {"url": hook.url("/x"), "headers": {"authorization": "Bearer mine"}},
        "override": {"target": "recheck", "headers": {"x-api-key": "mine"}},
        "unknown": {"target": "nope"},
        "both": {"target": "recheck", "url": hook.url("/x")},
        "scheme": {"url": "ftp://127.0.0.1/x"},
        "host_header": {"url": hook.url("/x"), "headers": {"Host": "internal"}},
    }
    ids = {name: await call(db, payload) for name, payload in cases.items()}
    errors = {}
    for name, job_id in ids.items():
        row = await finished(db, job_id)
        assert (row["state"], row["attempts"]) == ("failed", 1), name
        errors[name] = row["last_error"]
    assert "url: host evil.example is not in webhooks.allowed_hosts" in errors["host"]
    assert (
        "headers: Value error, header 'authorization' may not come from a payload"
        in (errors["auth"])
    )
    assert "headers: 'x-api-key' is set by [webhooks.targets.recheck]" in errors["override"]
    assert "target: 'nope' is not configured (known: echo, recheck)" in errors["unknown"]
    assert "exactly one of `target`" in errors["both"]
    assert "url: Value error, must be an absolute http:// or https:// URL" in errors["scheme"]
    assert "header 'Host' is set by the HTTP client" in errors["host_header"]
    assert hook.seen == []
    assert "s3cret" not in daemon.log()


def test_retry_after_reads_seconds_and_dates_within_a_day() -> None:
    assert retry_after("7") == 7.0
    assert retry_after(None) is None
    assert retry_after("soon") is None
    assert retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # in the past: now
    assert retry_after("999999") == 86_400.0
