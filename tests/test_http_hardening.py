"""Hardening of Stoker's HTTP surfaces, seen from outside real daemons (issue 11):
webhook URLs that are themselves credentials (point 12), the HTTP server's throttle and /ready
under floods (point 14), and the webhook allowlist's ports and address ranges (point 16).
Every server here listens on 127.0.0.1, and every request goes there."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import asyncpg
import pytest

from tests.conftest import DaemonFactory, finished
from tests.test_handler_http import Hook, Reply, call, serve_hook, start

# -- point 12: a webhook URL that is the credential ------------------------------------------

SLACK_PATH = "/services/T0001/B0002/XXXXsecretXXXX"
# What a leak would show: the path, its token-like segments, the query's values.
URL_SECRETS = ("XXXXsecretXXXX", "T0001/B0002", "qv-s3cret-q", "Abc-secret", "%41bc-secret")


@pytest.fixture
async def hook() -> AsyncIterator[Hook]:
    async with serve_hook() as receiver:
        yield receiver


def everything(row: asyncpg.Record) -> str:
    """The whole job row as an operator could read it (errors, tracebacks, result...)."""
    return json.dumps(dict(row), default=str)


def assert_no_url_secrets(*texts: str) -> None:
    for text in texts:
        for secret in URL_SECRETS:
            assert secret not in text, f"{secret!r} leaked: ...{_around(text, secret)}..."


def _around(text: str, secret: str) -> str:
    at = text.index(secret)
    return text[max(0, at - 120) : at + 80]


def credential_url_config(port: int, garbled_port: int = 1) -> str:
    return f"""
    [queues.default]
    backoff = {{ base = 0.2, jitter = 0 }}
    [webhooks.targets.slack]
    url = "http://127.0.0.1:{port}{SLACK_PATH}?token=qv-s3cret-q&channel=ops"
    [webhooks.targets.garbled]
    url = "http://127.0.0.1:{garbled_port}/hooks/T0001/%41bc-secret?token=qv-s3cret-q"
    """


async def test_a_credential_url_never_shows_in_excerpts_results_or_logs(
    daemons: DaemonFactory, db: asyncpg.Connection, hook: Hook
) -> None:
    # Servers echo what they were called with, in errors and in successes alike.
    hook.replies[SLACK_PATH] = [
        Reply(500, "no route for {url}"),
        Reply(200, "ok: posted to {path}"),
        Reply(404, "channel_not_found at {path} ({url})"),
        Reply(302, "", {"Location": "{url}"}),
    ]
    daemon = await start(daemons, credential_url_config(hook.port))
    retried = await finished(db, await call(db, {"target": "slack", "json": {"text": "hi"}}))
    assert retried["state"] == "succeeded", retried["last_error"]
    assert retried["attempts"] == 2
    failed = await finished(db, await call(db, {"target": "slack"}))
    assert (failed["state"], failed["attempts"]) == ("failed", 1)
    redirected = await finished(db, await call(db, {"target": "slack"}))
    assert (redirected["state"], redirected["attempts"]) == ("failed", 1)
    assert (
        "HTTP 302 from POST target slack: redirect to http://127.0.0.1"
        in (redirected["last_error"])
    )
    # The server did see the real URL: redaction is about what is kept, not what is sent.
    assert [s.path for s in hook.seen] == [SLACK_PATH] * 4

    first_error = retried["errors"][0]["error"]
    assert "HTTP 500 from POST target slack: no route for http://127.0.0.1" in first_error
    assert retried["result"]["status"] == 200
    assert retried["result"]["body"].startswith("ok: posted to ")
    assert "HTTP 404 from POST target slack: channel_not_found at" in failed["last_error"]
    await daemon.wait_log("http.request POST target slack -> 302 in")
    rows = (retried, failed, redirected)
    assert_no_url_secrets(*map(everything, rows), daemon.log())


async def test_a_credential_url_never_shows_in_client_errors_or_tracebacks(
    daemons: DaemonFactory, db: asyncpg.Connection, hook: Hook
) -> None:
    # aiohttp names the URL it called, in its own normalised spelling (%41 becomes A), in
    # errors about a response it cannot parse.
    async def garble(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nBad Header Line\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(garble, "127.0.0.1", 0)
    try:
        garbled_port = server.sockets[0].getsockname()[1]
        daemon = await start(daemons, credential_url_config(hook.port, garbled_port))
        row = await finished(db, await call(db, {"target": "garbled"}, max_attempts=1))
    finally:
        server.close()
        await server.wait_closed()
    assert row["state"] == "failed"
    assert "POST target garbled: 400" in row["last_error"]
    assert "Invalid header token" in row["last_error"]
    await daemon.wait_log("http.request POST target garbled -> ClientResponseError in")
    assert_no_url_secrets(everything(row), daemon.log())
