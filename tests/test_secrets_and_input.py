"""Secrets never printed (DSN passwords in every form, tokens), and bad input that must end in
a clear error naming the field, never a traceback or a 500."""

from __future__ import annotations

import json
import socket
from collections.abc import AsyncIterator, Iterator
from typing import Any

import asyncpg
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from daemon.config import Settings
from daemon.store import db as database
from daemon.store.db import create_pool, redact
from daemon.web.admin import create_admin_app
from tests.conftest import DaemonFactory, eventually, stoker_cli, with_database

SECRET = "hunter2-Sekr3t"
SSL_SECRET = "ssl-Pa55phrase"
TOKEN = "admin-token-Sekr3t-0123456789"


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def with_query(dsn: str, query: str) -> str:
    return dsn + ("&" if "?" in dsn else "?") + query


def assert_hidden(text: str, *secrets: str) -> None:
    for secret in secrets:
        assert secret not in text, f"{secret!r} shown in:\n{text}"


# -- 11: DSN passwords in every form ----------------------------------------------------------


@pytest.mark.parametrize(
    ("dsn", "shown"),
    [
        (f"postgresql://app:{SECRET}@db:5432/app", "postgresql://app:***@db:5432/app"),
        (f"postgresql://app@db/app?password={SECRET}", "postgresql://app@db/app?password=***"),
        (
            f"postgresql://app@db/app?sslmode=require&sslpassword={SSL_SECRET}&password={SECRET}",
            "postgresql://app@db/app?sslmode=require&sslpassword=***&password=***",
        ),
        # asyncpg decodes query keys and values: a percent-encoded key is still the password
        (f"postgresql://app@db/app?pass%77ord={SECRET}", "postgresql://app@db/app?pass%77ord=***"),
        (f"postgresql://app@db/app?PASSWORD={SECRET}", "postgresql://app@db/app?PASSWORD=***"),
        ("postgresql://app:hunter2%40Sekr3t@db/app", "postgresql://app:***@db/app"),
        (
            f"postgres://app:{SECRET}@db1:5432,db2:5433/app?target_session_attrs=primary",
            "postgres://app:***@db1:5432,db2:5433/app?target_session_attrs=primary",
        ),
        (
            f"postgresql://app:{SECRET}@/app?host=/run/postgresql",
            "postgresql://app:***@/app?host=/run/postgresql",
        ),
        # a raw @ / ? or # in the password makes the URL ambiguous: everything is masked
        ("postgresql://app:hunter2@Sekr3t@db/app", "postgresql://app:***@db/app"),
        ("postgresql://app:hunter2/Sekr3t@db/app", None),
        ("postgresql://app:hunter2?Sekr3t@db/app", None),
        ("postgresql://app:hunter2#Sekr3t@db/app", None),
        (
            f"postgresql://app@db/app?password={SECRET}#frag",
            "postgresql://app@db/app?password=***#***",
        ),
        # libpq's key=value form
        (
            f"host=db user=app password={SECRET} dbname=app",
            "host=db user=app password=*** dbname=app",
        ),
        (
            "host=db password = 'hunter2 Sekr3t\\' x' sslpassword=x dbname=app",
            "host=db password=*** sslpassword=*** dbname=app",
        ),
        ("postgresql://db/app", "postgresql://db/app"),
    ],
)
def test_redact_masks_every_form_of_password(dsn: str, shown: str | None) -> None:
    masked = redact(dsn)
    assert_hidden(masked, SECRET, SSL_SECRET, "hunter2", "Sekr3t")
    if shown is not None:
        assert masked == shown
    else:
        assert masked.startswith("postgresql://***")


def test_an_error_text_that_repeats_the_password_is_scrubbed() -> None:
    dsn = f"postgresql://app:{SECRET}@db:5432/app?sslpassword={SSL_SECRET}"
    exc = ValueError(f"invalid port {SECRET!r}, key {SSL_SECRET}")
    text = database.describe_failure(dsn, exc)
    assert_hidden(text, SECRET, SSL_SECRET)
    assert text.startswith("postgresql://app:***@db:5432/app?sslpassword=***: invalid port")


def test_settings_never_show_secrets_but_asyncpg_still_gets_them() -> None:
    database_url = f"postgresql://app:{SECRET}@db:5432/app?sslpassword={SSL_SECRET}"
    listen_dsn = f"postgresql://app@db:5432/app?password={SECRET}"
    settings = Settings.model_validate(
        {
            "database_url": database_url,
            "listen_dsn": listen_dsn,
            "http": {"admin_token": TOKEN},
            "email": {"smtp": {"host": "smtp.example.com", "username": "shop", "password": SECRET}},
        }
    )
    for shown in (
        repr(settings),
        str(settings),
        f"{settings}",
        repr(settings.model_dump()),
        json.dumps(settings.model_dump(mode="json")),
        settings.model_dump_json(),
        repr(settings.http),
    ):
        assert_hidden(shown, SECRET, SSL_SECRET, TOKEN)
    # what the engine reads is the real value
    assert settings.database_url == database_url
    assert settings.listen_dsn == listen_dsn
    assert settings.http.admin_token == TOKEN


def test_settings_from_the_environment_keep_their_names(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABASE_URL", f"postgresql://app:{SECRET}@db/app")
    monkeypatch.setenv("STOKER_LISTEN_DSN", f"postgresql://app:{SECRET}@direct/app")
    monkeypatch.setenv("STOKER_HTTP__ADMIN_TOKEN", TOKEN)
    settings = Settings()
    assert settings.database_url == f"postgresql://app:{SECRET}@db/app"
    assert settings.listen_dsn == f"postgresql://app:{SECRET}@direct/app"
    assert settings.http.admin_token == TOKEN
    assert_hidden(repr(settings), SECRET, TOKEN)


def test_short_admin_token_is_refused_without_showing_it(monkeypatch: pytest.MonkeyPatch) -> None:
    from daemon.config import load_settings
    from daemon.errors import ConfigError

    monkeypatch.setenv("DATABASE_URL", "postgresql://db/app")
    monkeypatch.setenv("STOKER_HTTP__ADMIN_TOKEN", "short-Sekr3t")
    with pytest.raises(ConfigError) as raised:
        load_settings(None)
    assert "environment STOKER_HTTP__ADMIN_TOKEN: http.admin_token: " in str(raised.value)
    assert "must be at least 16 characters (e.g. from `openssl rand -hex 32`)" in str(raised.value)
    assert_hidden(str(raised.value), "short-Sekr3t")


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("DATABASE_URL", f"host=db user=app password={SECRET} dbname=app"),
        ("DATABASE_URL", f"postgresql://app:{SECRET}@db:port/app"),
        ("STOKER_LISTEN_DSN", f"mysql://app:{SECRET}@db/app"),
    ],
)
def test_a_refused_dsn_is_named_not_shown(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    from daemon.config import load_settings
    from daemon.errors import ConfigError

    monkeypatch.setenv("DATABASE_URL", "postgresql://db/app")
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as raised:
        load_settings(None)
    assert f"environment {name}: " in str(raised.value)
    assert_hidden(str(raised.value), SECRET)


def test_cli_connect_error_hides_a_query_string_password() -> None:
    dsn = (
        f"postgresql://app@127.0.0.1:{closed_port()}/app?password={SECRET}&sslpassword={SSL_SECRET}"
    )
    for command in ("status", "migrate", "run"):  # the CLI's connection, and the daemon's
        out = stoker_cli(dsn, command)
        assert out.returncode == 1, out.stderr
        assert "cannot connect to the database at postgresql://app@127.0.0.1:" in out.stderr
        assert "/app?password=***&sslpassword=***: " in out.stderr
        assert "Traceback" not in out.stderr
        assert_hidden(out.stderr + out.stdout, SECRET, SSL_SECRET)


async def test_listener_reconnect_logs_hide_the_password(
    daemons: DaemonFactory, db: asyncpg.Connection, dsn: str
) -> None:
    # trust authentication: the password is carried along and ignored by the server
    listen_dsn = with_query(dsn, f"password={SECRET}&sslpassword={SSL_SECRET}")
    database_url = dsn.replace("postgres@", f"postgres:{SECRET}@")
    proc = await daemons.start(
        "", DATABASE_URL=database_url, STOKER_LISTEN_DSN=listen_dsn, STOKER_LOG_LEVEL="DEBUG"
    )
    database = dsn.rsplit("/", 1)[1]

    async def listener_pid() -> int | None:
        pid: int | None = await db.fetchval(
            "SELECT pid FROM pg_stat_activity WHERE application_name = 'stoker-listener'"
        )
        return pid

    pid = await eventually(listener_pid)
    # The reconnect fails while the database refuses connections, then succeeds.
    server = await asyncpg.connect(with_database(dsn, "postgres"))
    try:
        await server.execute(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS false')
        try:
            await db.execute("SELECT pg_terminate_backend($1)", pid)
            await proc.wait_log("listener cannot connect to")
        finally:
            await server.execute(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS true')
    finally:
        await server.close()
    await proc.wait_log("listener reconnected")
    log = proc.log()
    assert "?password=***&sslpassword=***" in log
    assert_hidden(log, SECRET, SSL_SECRET)


# -- 13a: NUL characters in the admin API -----------------------------------------------------


@pytest.fixture
async def admin(dsn: str) -> AsyncIterator[TestClient[web.Request, web.Application]]:
    pool = await create_pool(dsn, max_size=2, application_name="stoker-admin-test")
    settings = Settings.model_validate({"database_url": dsn})
    sub = create_admin_app(db=pool, settings=settings, token=TOKEN, max_body_bytes=1_048_576)
    main = web.Application()
    main.add_subapp("/api/v1", sub)
    client = TestClient(TestServer(main, host="127.0.0.1"))
    await client.start_server()
    try:
        yield client
    finally:
        await client.close()
        await pool.close()


AUTH = {"Authorization": f"Bearer {TOKEN}"}
NUL = "\u0000"
LONE_SURROGATE = "\ud800"


@pytest.mark.parametrize(
    ("body", "loc"),
    [
        ({"queue": "default", "kind": "noop", "payload": {"a": f"x{NUL}y"}}, "body.payload"),
        ({"queue": "default", "kind": "noop", "payload": {f"k{NUL}": 1}}, "body.payload"),
        ({"queue": "default", "kind": "noop", "payload": {"a": [[f"{NUL}"]]}}, "body.payload"),
        ({"queue": "default", "kind": f"no{NUL}op"}, "body.kind"),
        ({"queue": "default", "kind": "noop", "unique_key": f"k{NUL}"}, "body.unique_key"),
        ({"queue": "default", "kind": "noop", "meta": {"m": NUL}}, "body.meta"),
        ({"queue": f"default{NUL}", "kind": "noop"}, "body.queue"),
    ],
)
async def test_admin_enqueue_refuses_nul_with_422_naming_the_field(
    admin: TestClient[web.Request, web.Application],
    db: asyncpg.Connection,
    body: dict[str, Any],
    loc: str,
) -> None:
    async with admin.post("/api/v1/jobs", json=body, headers=AUTH) as resp:
        assert resp.status == 422, await resp.text()
        reply = await resp.json()
    assert reply["error"] == "invalid request"
    [field] = reply["fields"]
    assert field["loc"] == loc
    if loc != "body.queue":
        assert "NUL character (\\u0000)" in field["msg"], field
        assert "remove it" in field["msg"]
    assert await db.fetchval("SELECT count(*) FROM stoker.jobs") == 0


@pytest.mark.parametrize(
    "raw",
    [
        b'{"queue": "default", "kind": "no\\ud800op"}',
        b'{"queue": "default", "kind": "noop", "payload": {"a": "\\udc00"}}',
        b'{"queue": "default", "kind": "noop", "unique_key": "\\ud800"}',
    ],
)
async def test_admin_enqueue_refuses_lone_surrogates_as_invalid_json(
    admin: TestClient[web.Request, web.Application], raw: bytes
) -> None:
    headers = {**AUTH, "Content-Type": "application/json"}
    async with admin.post("/api/v1/jobs", data=raw, headers=headers) as resp:
        assert resp.status == 400, await resp.text()
        reply = await resp.json()
    assert reply["error"].startswith("request body is not valid JSON: ")
    assert "hex escape" in reply["error"]


@pytest.mark.parametrize("query", ["kind=no%00op", "queue=de%00fault"])
async def test_admin_job_list_refuses_nul_in_filters(
    admin: TestClient[web.Request, web.Application], query: str
) -> None:
    async with admin.get(f"/api/v1/jobs?{query}", headers=AUTH) as resp:
        assert resp.status == 422, await resp.text()
        reply = await resp.json()
    [field] = reply["fields"]
    assert field["loc"] == "query." + query.split("=", maxsplit=1)[0]


async def test_admin_paths_with_nul_are_refused_not_500(
    admin: TestClient[web.Request, web.Application],
) -> None:
    for method, path, status in (
        ("POST", "/api/v1/schedules/a%00b/trigger", 404),
        ("POST", "/api/v1/queues/a%00b/pause", 422),
        ("GET", "/api/v1/jobs/1%00", 422),
    ):
        async with admin.request(method, path, headers=AUTH) as resp:
            assert resp.status == status, (path, await resp.text())
            assert resp.content_type == "application/json"


# -- 13b: the command line's JSON options -----------------------------------------------------


@pytest.mark.parametrize(
    ("option", "value", "reason"),
    [
        ("--payload", "NaN", "NaN and Infinity are not JSON"),
        ("--payload", "Infinity", "NaN and Infinity are not JSON"),
        ("--payload", '{"a": -Infinity}', "NaN and Infinity are not JSON"),
        ("--payload", "[1e999]", "1e999 is too large a number for JSON"),
        ("--payload", '{"a": "x\\u0000y"}', "NUL character (\\u0000)"),
        ("--payload", '{"\\u0000": 1}', "NUL character (\\u0000)"),
        ("--payload", '"\\ud800"', "not valid Unicode"),
        ("--payload", "1" * 5000, "too large a number"),
        ("--payload", "[" * 100_000, "nested too deeply"),
        ("--meta", '{"a": NaN}', "NaN and Infinity are not JSON"),
        ("--meta", '{"a": "\\u0000"}', "NUL character (\\u0000)"),
    ],
)
async def test_cli_enqueue_refuses_json_postgresql_cannot_hold(
    db: asyncpg.Connection, dsn: str, option: str, value: str, reason: str
) -> None:
    out = stoker_cli(dsn, "enqueue", "default", "noop", option, value)
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr
    [line] = out.stderr.splitlines()
    assert line.startswith(f"stoker enqueue: error: argument {option}: ")
    assert reason in line
    assert line.endswith("(see `stoker enqueue --help`)")
    assert await db.fetchval("SELECT count(*) FROM stoker.jobs") == 0


@pytest.mark.parametrize(
    ("args", "argument"),
    [
        (["enqueue", "default", "no\udcffop"], "kind"),
        (["enqueue", "default", "noop", "--unique-key", "k\udcff"], "--unique-key"),
        (["schedules", "add", "n", "--cron", "@daily", "--kind", "x", "--description", "\udcff"],
         "--description"),
        (["schedules", "remove", "x\udcff"], "name"),
    ],
)  # fmt: skip
async def test_cli_refuses_arguments_that_are_not_utf8(
    db: asyncpg.Connection, dsn: str, args: list[str], argument: str
) -> None:
    out = stoker_cli(dsn, *args)  # \udcff: the byte 0xff, as Python decodes a non-UTF-8 argv
    assert out.returncode == 2, out.stderr
    assert f"error: argument {argument}: " in out.stderr
    assert "\\xff" in out.stderr  # the bad byte, shown
    assert "' is not valid UTF-8: retype it, or set a UTF-8 locale (LANG=C.UTF-8)" in out.stderr
    assert "Traceback" not in out.stderr
    assert await db.fetchval("SELECT count(*) FROM stoker.jobs") == 0


async def test_cli_schedules_add_refuses_nan_payload(db: asyncpg.Connection, dsn: str) -> None:
    out = stoker_cli(
        dsn, "schedules", "add", "nightly", "--cron", "0 2 * * *", "--kind", "noop",
        "--payload", '{"days": NaN}',
    )  # fmt: skip
    assert out.returncode == 2
    assert "argument --payload: " in out.stderr
    assert "Traceback" not in out.stderr
    assert await db.fetchval("SELECT count(*) FROM stoker.schedules") == 0


@pytest.fixture(autouse=True)
def _no_stoker_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    import os

    for name in list(os.environ):
        if name.startswith("STOKER_") or name == "DATABASE_URL":
            monkeypatch.delenv(name)
    yield
