"""Hardening of Stoker's HTTP surfaces, seen from outside real daemons (issue 11):
webhook URLs that are themselves credentials (point 12), the HTTP server's throttle and /ready
under floods (point 14), and the webhook allowlist's ports and address ranges (point 16).
Every server here listens on 127.0.0.1, and every request goes there."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest

from daemon.config import load_settings
from daemon.dev.pgcluster import Cluster
from daemon.errors import ConfigError
from daemon.store.migrations import migrate
from tests.conftest import DaemonFactory, eventually, finished
from tests.test_handler_http import Hook, Reply, call, serve_hook, start
from tests.test_http import http_port

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


def test_a_credential_url_never_shows_in_the_settings_repr(tmp_path: Path) -> None:
    path = tmp_path / "stoker.toml"
    path.write_text(
        'database_url = "postgresql://stoker@127.0.0.1/stoker"\n'
        "[webhooks.targets.slack]\n"
        f'url = "https://hooks.slack.com{SLACK_PATH}?token=qv-s3cret-q"\n'
    )
    settings = load_settings(path)
    assert settings.webhooks.targets["slack"].url.endswith("?token=qv-s3cret-q")
    assert_no_url_secrets(repr(settings), str(settings), repr(settings.webhooks))


# -- point 14: the HTTP server under floods, and what /ready tells strangers -------------------

TOKEN = "admin-t0ken-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


async def admin_daemon(daemons: DaemonFactory, rate: float) -> int:
    daemon = await daemons.start(
        f"[http]\nmax_requests_per_second = {rate}\n", STOKER_HTTP__ADMIN_TOKEN=TOKEN
    )
    return await http_port(daemon)


@contextlib.asynccontextmanager
async def flooding(
    port: int, count: int, headers: dict[str, str] | None = None
) -> AsyncIterator[list[int]]:
    """`count` concurrent GET /api/v1/queues on connections of their own; yields the statuses
    as they arrive (a refusal that is not JSON, or a 429 without Retry-After, counts as 0),
    and abandons whatever is unanswered on leaving."""
    statuses: list[int] = []
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, headers=headers) as session:

        async def one() -> None:
            async with session.get(f"http://127.0.0.1:{port}/api/v1/queues") as response:
                body = await response.read()
                status = response.status
                if status >= 400 and "error" not in json.loads(body):
                    status = 0
                if status == 429 and int(response.headers.get("Retry-After", "0")) < 1:
                    status = 0
                statuses.append(status)

        tasks = [asyncio.ensure_future(one()) for _ in range(count)]
        try:
            yield statuses
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


async def until(condition: Callable[[], bool], timeout: float = 15) -> None:
    async def check() -> bool:
        return condition()

    await eventually(check, timeout)


async def timed_get(port: int, path: str, headers: dict[str, str] | None = None) -> float:
    """Seconds a fresh client waits for an answer (any answer) to GET path."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as session,
        session.get(f"http://127.0.0.1:{port}{path}", headers=headers) as response,
    ):
        await response.read()
    return loop.time() - started


async def test_probes_answer_within_a_second_under_an_admin_api_flood(
    daemons: DaemonFactory,
) -> None:
    port = await admin_daemon(daemons, rate=5)
    # 40 requests at 5 a second keep the throttle's queue busy for eight seconds.
    async with flooding(port, 40, AUTH) as statuses:
        await until(lambda: len(statuses) >= 1)  # the flood is in
        for path in ("/ready", "/health", "/metrics"):
            elapsed = await timed_get(port, path)
            assert elapsed < 1.0, f"{path} took {elapsed:.1f}s under the flood"
        assert len(statuses) < 40  # the flood was still queued while the probes answered


async def test_the_throttle_queue_is_capped_and_answers_429_with_retry_after(
    daemons: DaemonFactory,
) -> None:
    port = await admin_daemon(daemons, rate=2)
    # At most max_queued_requests (100) wait their turn; the rest hear at once when to return.
    async with flooding(port, 150, AUTH) as statuses:
        await until(lambda: statuses.count(429) >= 25, timeout=10)
    assert set(statuses) <= {200, 429}


async def test_unauthenticated_requests_are_refused_before_taking_a_turn(
    daemons: DaemonFactory,
) -> None:
    port = await admin_daemon(daemons, rate=2)
    wrong = {"Authorization": "Bearer not-the-token-at-all"}
    async with flooding(port, 30) as anonymous, flooding(port, 30, wrong) as forged:
        await until(lambda: len(anonymous) + len(forged) == 60, timeout=3)
    assert set(anonymous) == {401}
    assert set(forged) == {403}
    # Sixty refusals took no turn: the admin's own request is next, not thirty seconds away.
    assert await timed_get(port, "/api/v1/queues", AUTH) < 1.0


async def test_ready_names_the_failing_check_only_unless_the_admin_token_is_sent(
    own_cluster: Cluster, tmp_path: Path
) -> None:
    dsn = own_cluster.dsn()
    conn = await asyncpg.connect(dsn)
    try:
        await migrate(conn)
    finally:
        await conn.close()
    factory = DaemonFactory(dsn, tmp_path)
    try:
        daemon = await factory.start("", STOKER_HTTP__ADMIN_TOKEN=TOKEN)
        port = await http_port(daemon)
        async with aiohttp.ClientSession() as client:

            async def ready(headers: dict[str, str] | None = None) -> tuple[int, Any]:
                url = f"http://127.0.0.1:{port}/ready"
                async with client.get(url, headers=headers) as response:
                    return response.status, await response.json()

            first = await ready()
            assert first[0] == 200
            own_cluster.stop()

            async def database_down() -> dict[str, Any] | None:
                status, body = await ready()
                return body if status == 503 and "database" in body["failing"] else None

            body = await eventually(database_down, timeout=20)
            assert set(body) == {"status", "failing"}, body
            assert first[1] == {"status": "ready"}  # nothing to tell strangers but that
            assert body["status"] == "not ready"
            assert "127.0.0.1" not in json.dumps(body)
            status, detailed = await ready(AUTH)
            assert status == 503
            assert detailed["checks"]["database"] not in ("ok", "failing")
            assert (await ready({"Authorization": "Bearer wrong-token-0123456789"}))[1].keys() == {
                "status",
                "failing",
            }
        await daemon.wait_log("readiness: database check failing: ")
    finally:
        factory.stop_all()


# -- point 16: the allowlist's ports, and the addresses a payload URL may reach ---------------


def allowlist_config(port: int, allowed: list[str], private: bool | None = None) -> str:
    setting = "" if private is None else f"allow_private_addresses = {str(private).lower()}"
    return f"""
    [webhooks]
    allowed_hosts = {json.dumps(allowed)}
    {setting}
    [webhooks.targets.recheck]
    url = "http://127.0.0.1:{port}/recheck"
    """


async def test_a_bare_allowed_host_means_its_default_ports_only(
    daemons: DaemonFactory, db: asyncpg.Connection, hook: Hook
) -> None:
    port = hook.port
    allowed = ["127.0.0.1", f"LOCALHOST.:{port}"]  # spelled as an operator might
    await start(daemons, allowlist_config(port, allowed, private=True))
    refused = await finished(db, await call(db, {"url": hook.url("/other-port")}))
    assert (refused["state"], refused["attempts"]) == ("failed", 1)
    assert (
        f"url: port {port} of 127.0.0.1 is not in webhooks.allowed_hosts "
        '(a bare "127.0.0.1" allows ports 80 and 443 only); '
        f'add "127.0.0.1:{port}" there' in refused["last_error"]
    )
    sent = await finished(db, await call(db, {"url": f"http://localhost:{port}/listed"}))
    assert sent["state"] == "succeeded", sent["last_error"]
    assert [s.path for s in hook.seen] == ["/listed"]


async def test_payload_urls_reaching_loopback_are_refused_at_connect_time(
    daemons: DaemonFactory, db: asyncpg.Connection, hook: Hook
) -> None:
    port = hook.port
    # Allowed by name and port, so only the address they reach can refuse them.
    allowed = [f"127.0.0.1:{port}", f"localhost:{port}", f"[::ffff:127.0.0.1]:{port}"]
    daemon = await start(daemons, allowlist_config(port, allowed))
    urls = {
        "127.0.0.1": hook.url("/literal"),
        "localhost": f"http://localhost:{port}/by-name",  # /etc/hosts: resolved, then refused
        "::ffff:127.0.0.1": f"http://[::ffff:127.0.0.1]:{port}/mapped",
    }
    ids = {name: await call(db, {"url": url}) for name, url in urls.items()}
    configured = await call(db, {"target": "recheck"})
    for name, job_id in ids.items():
        row = await finished(db, job_id)
        assert (row["state"], row["attempts"]) == ("failed", 1), (name, row["last_error"])
        error = row["last_error"]
        assert "(loopback), which a payload URL may not reach" in error, error
        assert "set [webhooks] allow_private_addresses = true" in error, error
    literal = await finished(db, ids["127.0.0.1"])
    assert "127.0.0.1 (loopback)" in literal["last_error"]
    mapped = await finished(db, ids["::ffff:127.0.0.1"])
    assert "::ffff:127.0.0.1 (loopback)" in mapped["last_error"]
    by_name = await finished(db, ids["localhost"])
    assert (
        "127.0.0.1 (loopback)" in by_name["last_error"]
        or "::1 (loopback)" in (by_name["last_error"])
    )
    # Configured targets are the operator's own choice: loopback is fine for them.
    row = await finished(db, configured)
    assert row["state"] == "succeeded", row["last_error"]
    assert [s.path for s in hook.seen] == ["/recheck"]  # nothing else reached the server
    assert "Traceback" not in daemon.log()


@pytest.mark.parametrize(
    ("address", "reason"),
    [
        ("10.1.2.3", "private"),
        ("172.16.0.1", "private"),
        ("192.168.1.1", "private"),
        ("169.254.169.254", "link-local"),
        ("0.0.0.0", "unspecified"),
        ("224.0.0.1", "multicast"),
        ("127.0.0.2", "loopback"),
        ("100.64.0.1", "not globally routable"),
        ("::1", "loopback"),
        ("::", "unspecified"),
        ("fe80::1%1", "link-local"),
        ("fc00::1", "private"),
        ("ff02::1", "multicast"),
        ("::ffff:10.0.0.1", "private"),
        ("::ffff:169.254.169.254", "link-local"),
        ("64:ff9b::a00:1", "private"),  # NAT64 of 10.0.0.1
        ("2002:a00:1::", "private"),  # 6to4 of 10.0.0.1
    ],
)
def test_the_connect_guard_refuses_each_range_before_a_socket_exists(
    address: str, reason: str
) -> None:
    # No network at all: the guard is aiohttp's socket factory, called with the address about
    # to be connected to; a refusal means no socket was ever made.
    import socket

    from handlers.http import RefusedAddress, guarded_socket

    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sockaddr = (address, 443, 0, 0) if family == socket.AF_INET6 else (address, 443)
    with pytest.raises(RefusedAddress) as refused:
        guarded_socket((family, socket.SOCK_STREAM, 6, "", sockaddr))
    assert f"{address.split('%', maxsplit=1)[0]} ({reason})" in str(refused.value)


def test_the_connect_guard_lets_public_addresses_through() -> None:
    import socket

    from handlers.http import guarded_socket

    for family, sockaddr in (
        (socket.AF_INET, ("93.184.215.14", 443)),
        (socket.AF_INET6, ("2606:4700::1111", 443, 0, 0)),
    ):
        sock = guarded_socket((family, socket.SOCK_STREAM, 6, "", sockaddr))
        sock.close()  # made, never connected


@pytest.mark.parametrize(
    "entry",
    ["https://hooks.example.com/", "hooks.example.com:0", "hooks.example.com:99999", "a b", ""],
)
def test_a_bad_allowed_hosts_entry_is_a_clear_config_error(entry: str, tmp_path: Path) -> None:
    path = tmp_path / "stoker.toml"
    path.write_text(f"[webhooks]\nallowed_hosts = [{json.dumps(entry)}]\n")
    with pytest.raises(ConfigError) as error:
        load_settings(path)
    text = str(error.value)
    assert f"{path}: webhooks.allowed_hosts: Value error, {entry!r} is not" in text
    assert '"host" (ports 80 and 443) or "host:port"' in text
    assert '"hooks.example.com:8443"' in text
