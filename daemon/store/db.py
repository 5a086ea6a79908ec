"""asyncpg pool and dedicated connections, set up the same way everywhere."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import re
import secrets
import socket
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, unquote_plus

import asyncpg
from pydantic import SecretStr

# TCP keepalives: idle seconds before the first probe, seconds between probes, probes lost
# before the connection is dropped. Never sent as startup parameters: pgbouncer refuses a
# connection that carries tcp_keepalives_* (unless told to ignore them). The daemon's end is set
# on its socket, for every connection; PostgreSQL's end (so that it notices a vanished daemon
# and frees its backend and locks) is set with set_config, on direct connections only, where
# the session is ours: through a pooler the server sessions are the pooler's, and its own
# keepalive settings cover them.
KEEPALIVE_IDLE, KEEPALIVE_INTERVAL, KEEPALIVE_COUNT = 30, 10, 3
SERVER_KEEPALIVES = (
    ("tcp_keepalives_idle", KEEPALIVE_IDLE),
    ("tcp_keepalives_interval", KEEPALIVE_INTERVAL),
    ("tcp_keepalives_count", KEEPALIVE_COUNT),
)


# What a lost, refused or timed-out database round trip raises. The engine retries these;
# anything else is a bug and is reported as one.
DB_ERRORS: tuple[type[Exception], ...] = (
    OSError,
    TimeoutError,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,  # e.g. an operation cut off mid-flight by a dying connection
)

# Connecting can also fail on a malformed DSN.
CONNECT_ERRORS: tuple[type[Exception], ...] = (*DB_ERRORS, ValueError)

# No statement of the engine's own should take this long; a half-open connection must not hang
# a claim, a write or the shutdown forever.
COMMAND_TIMEOUT = 30.0


def set_socket_keepalives(conn: asyncpg.Connection) -> None:
    """Keepalives on the daemon's own socket: a vanished server or pooler is noticed by the
    kernel even while no statement is in flight. A Unix socket has none."""
    sock = conn._transport.get_extra_info("socket") if conn._transport else None
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for name, value in (
        ("TCP_KEEPIDLE", KEEPALIVE_IDLE),
        ("TCP_KEEPINTVL", KEEPALIVE_INTERVAL),
        ("TCP_KEEPCNT", KEEPALIVE_COUNT),
    ):
        option = getattr(socket, name, None)  # not every platform has all three
        if option is not None:
            sock.setsockopt(socket.IPPROTO_TCP, option, value)


def _server_keepalives_sql(pid: int) -> str:
    # Applied only where pg_backend_pid() is the pid of the startup handshake: a pooler hands
    # the client a key of its own, so through one nothing is set on a server session shared
    # with other clients. The simple query protocol (no parameters): nothing is prepared.
    calls = ", ".join(
        f"set_config('{name}', '{value}', false)" for name, value in SERVER_KEEPALIVES
    )
    return f"SELECT {calls} WHERE pg_backend_pid() = {int(pid)}"


async def init_connection(conn: asyncpg.Connection) -> None:
    set_socket_keepalives(conn)
    await conn.execute(_server_keepalives_sql(conn.get_server_pid()))
    await conn.set_type_codec("jsonb", encoder=json.dumps, decoder=json.loads, schema="pg_catalog")


async def keep_session(conn: asyncpg.Connection) -> None:
    """Pool reset: none. asyncpg's default sends `pg_advisory_unlock_all(); CLOSE ALL;
    UNLISTEN *; RESET ALL` on every release, a round trip per claim and per write. The pool
    runs only the engine's own statements, which leave no session state behind (LISTEN and
    advisory locks live on dedicated connections); asyncpg still rolls back a transaction
    left open before a connection goes back."""


async def create_pool(
    dsn: str,
    *,
    max_size: int = 10,
    statement_cache_size: int = 100,
    application_name: str = "stoker",
    settings: dict[str, str] | None = None,
) -> asyncpg.Pool:
    pool: asyncpg.Pool = await asyncpg.create_pool(
        dsn,
        min_size=1,
        max_size=max_size,
        init=init_connection,
        reset=keep_session,
        statement_cache_size=statement_cache_size,
        command_timeout=COMMAND_TIMEOUT,
        server_settings={"application_name": application_name, **(settings or {})},
    )
    return pool


async def connect(
    dsn: str,
    *,
    application_name: str,
    statement_cache_size: int = 100,
    connect_timeout: float = 10,
    command_timeout: float | None = None,
) -> asyncpg.Connection:
    """A connection of its own (LISTEN, advisory locks): never borrowed from the pool, because
    the pool resets connections with UNLISTEN * and pg_advisory_unlock_all()."""
    conn: asyncpg.Connection = await asyncpg.connect(
        dsn,
        timeout=connect_timeout,
        command_timeout=command_timeout,
        statement_cache_size=statement_cache_size,
        server_settings={"application_name": application_name},
    )
    await init_connection(conn)
    return conn


MASK = "***"
# libpq's key=value form: a value is a word or a single-quoted string with backslash escapes.
KEYWORD_SECRET = re.compile(r"""(?i)\b(\w*password)\s*=\s*('(?:[^'\\]|\\.)*'|\S*)""")
AMBIGUOUS = (
    f"{MASK} (not shown: the URL is ambiguous; percent-encode @ / ? # in the password, "
    "e.g. @ as %40)"
)


def _plain(dsn: str | SecretStr) -> str:
    return dsn.get_secret_value() if isinstance(dsn, SecretStr) else dsn


def _secret_key(key: str) -> bool:
    # asyncpg reads query keys percent-decoded: pass%77ord= is a password too
    return "password" in unquote_plus(key).lower()


def _redact_query(query: str) -> str:
    params = []
    for param in query.split("&"):
        key, eq, _ = param.partition("=")
        params.append(f"{key}={MASK}" if eq and _secret_key(key) else param)
    return "&".join(params)


def redact(dsn: str | SecretStr) -> str:
    """The DSN for logs and error messages: every password masked (userinfo, `password` and
    `sslpassword` query parameters however encoded, libpq's key=value form)."""
    text = _plain(dsn)
    if "://" not in text:
        return KEYWORD_SECRET.sub(lambda m: f"{m[1]}={MASK}", text)
    scheme, rest = text.split("://", 1)
    cut = min((i for i in (rest.find(c) for c in "/?#") if i >= 0), default=len(rest))
    authority, tail = rest[:cut], rest[cut:]
    tail, hash_, fragment = tail.partition("#")
    path, q, query = tail.partition("?")
    tail = f"{path}{q}{_redact_query(query)}"
    # Outside a password's query value, an @ after the authority means a raw / ? or # in the
    # userinfo password ended the authority early: where the password ends is unknowable.
    if "@" in tail or "@" in fragment:
        return f"{scheme}://{AMBIGUOUS}"
    userinfo, at, hosts = authority.rpartition("@")
    if at:
        user, colon, _ = userinfo.partition(":")
        authority = f"{user}:{MASK}@{hosts}" if colon else f"{user}@{hosts}"
    return f"{scheme}://{authority}{tail}{hash_ and '#' + MASK}"


def _secrets(dsn: str) -> set[str]:
    """Every spelling of every password in the DSN, as an error text might repeat it."""
    found: set[str] = set()
    if "://" not in dsn:
        found.update(m[2].strip("'") for m in KEYWORD_SECRET.finditer(dsn))
    else:
        rest = dsn.split("://", 1)[1]
        found.add(rest.rpartition("@")[0].partition(":")[2])
        for param in rest.partition("?")[2].split("&"):
            key, _, value = param.partition("=")
            if _secret_key(key):
                found.update({value, value.partition("#")[0]})
        # An ambiguous URL's pieces, any of which a parser may have taken for a host or port.
        found.update(re.split(r"[@/?#:&=,]", rest))
    found |= {unquote(s) for s in found} | {unquote_plus(s) for s in found}
    return {s for s in found if len(s) >= 3}


def describe_failure(dsn: str | SecretStr, exc: BaseException) -> str:
    """`<redacted DSN>: <error>` for a failed connection; the error text is scrubbed too, since
    a driver may quote part of a malformed DSN back."""
    text, plain = str(exc), _plain(dsn)
    shown = redact(plain)
    for secret in sorted(_secrets(plain), key=len, reverse=True):
        if secret not in shown:  # what the redacted DSN shows anyway (host, user) is no secret
            text = text.replace(secret, MASK)
    return f"{shown}: {text}"


def text_problem(value: str) -> str | None:
    """Why PostgreSQL's text (and jsonb) cannot hold this string, as the fix to make."""
    if "\x00" in value:
        return "contains a NUL character (\\u0000), which PostgreSQL cannot store; remove it"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return "is not valid Unicode (a lone surrogate such as \\ud800); send UTF-8 text"
    return None


def json_problem(value: Any) -> str | None:
    """Why jsonb cannot hold this decoded JSON value (NaN, Infinity, NUL, lone surrogates),
    or None. Walks without recursion: a deeply nested value must not blow the stack."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            problem = text_problem(item)
        elif isinstance(item, float) and not math.isfinite(item):
            problem = "NaN and Infinity are not JSON (jsonb cannot hold them); use null or a string"
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
            continue
        elif isinstance(item, list | tuple):
            stack.extend(item)
            continue
        else:
            continue
        if problem:
            return problem
    return None


def as_json_text(value: Any) -> str:
    """JSON for a jsonb parameter; NaN and Infinity are refused (PostgreSQL has no such JSON)."""
    return json.dumps(value, default=str, separators=(",", ":"), allow_nan=False)


async def close_quietly(conn: asyncpg.Connection) -> None:
    """Close a dedicated connection that may already be dead, without raising."""
    try:
        await asyncio.wait_for(conn.close(), timeout=2)
    except Exception:  # a dead connection may fail to close in many ways
        with contextlib.suppress(Exception):
            conn.terminate()


@dataclass(frozen=True)
class Pooling:
    """What sits between the daemon and PostgreSQL on one DSN."""

    pooler: bool  # not a direct connection: the startup handshake's key is not the backend's
    transaction: bool  # one client connection's transactions run on different server sessions
    prepared_broken: bool  # a prepared statement is lost when the server session changes


DIRECT = Pooling(pooler=False, transaction=False, prepared_broken=False)
# asyncpg's errors when its prepared statements land on a server session that does not have
# them, or that has another client's of the same name.
PREPARED_LOST = (asyncpg.InvalidSQLStatementNameError, asyncpg.DuplicatePreparedStatementError)


async def probe_pooling(dsn: str, *, statement_cache_size: int, rounds: int = 3) -> Pooling:
    """Find out whether `dsn` is a transaction pooler and whether prepared statements survive
    it, with two plain connections (no pool, no init: init itself prepares statements).

    Direct: pg_backend_pid() is the pid of the startup handshake; one round trip. Otherwise,
    client A sets a session setting to a token of its own, and A and B (each with the
    statement cache asked for) read it in turns: through a session pooler only A ever sees it;
    through a transaction pooler B sees it once it runs on the server session A used, or A
    loses it once A runs on another (whichever way the pooler hands out sessions: most
    recently used, round robin, or a single one). No statement waits on another client, so
    a pool of one server connection cannot deadlock the probe. Prepared statements survive
    only a pooler that manages them (pgbouncer >= 1.21 with max_prepared_statements), which
    renames them on the server."""
    a: asyncpg.Connection = await asyncpg.connect(
        dsn, statement_cache_size=statement_cache_size, timeout=10
    )
    b: asyncpg.Connection | None = None
    try:
        if await a.fetchval("SELECT pg_backend_pid()") == a.get_server_pid():
            return DIRECT
        b = await asyncpg.connect(dsn, statement_cache_size=statement_cache_size, timeout=10)
        token = secrets.token_hex(8)
        await a.fetchval("SELECT set_config('stoker.pooling_probe', $1, false)", token)
        read = "SELECT current_setting('stoker.pooling_probe', true)"
        transaction = False
        for _ in range(rounds):
            # B, then A twice: A's own consecutive transactions move on under round robin.
            seen = [await b.fetchval(read) == token]
            seen += [await a.fetchval(read) != token for _ in range(2)]
            if any(seen):
                transaction = True
                break
        if not transaction:
            return Pooling(pooler=True, transaction=False, prepared_broken=False)
        if statement_cache_size > 0:
            # A pooler that carries prepared statements across server sessions renames them
            # (pgbouncer >= 1.21: PGBOUNCER_n); asyncpg's own names mean they pass through,
            # to be lost, or to clash with another client's, on the next session.
            names = await a.fetch("SELECT name FROM pg_prepared_statements")
            if any(r["name"].startswith("__asyncpg") for r in names):
                return Pooling(pooler=True, transaction=True, prepared_broken=True)
        return Pooling(pooler=True, transaction=True, prepared_broken=False)
    except PREPARED_LOST:
        return Pooling(pooler=True, transaction=True, prepared_broken=True)
    finally:
        for conn in (a, b):
            if conn is not None:
                await close_quietly(conn)


def pooling_problem(
    pooling: Pooling,
    *,
    statement_cache_size: int,
    has_listen_dsn: bool,
    poll_only: bool,
    run_scheduler: bool,
    migrate_on_start: bool,
) -> str | None:
    """Why this configuration cannot work through the pooler found on database_url, as the fix
    to make; None when it can. Checked at start, so that a wrong setup stops the daemon before
    it reports ready instead of stranding jobs later."""
    if not pooling.transaction:
        return None
    problems = []
    if statement_cache_size > 0 and pooling.prepared_broken:
        problems.append(
            f"statement_cache_size = {statement_cache_size} keeps prepared statements, which "
            "the pooler loses between transactions ('prepared statement does not exist'): "
            "set statement_cache_size = 0, or max_prepared_statements in pgbouncer >= 1.21"
        )
    if not has_listen_dsn:
        if not poll_only:
            problems.append(
                "LISTEN needs a session of its own, which a transaction pooler does not keep: "
                "set listen_dsn to a direct PostgreSQL connection, or poll_only = true"
            )
        if run_scheduler:
            problems.append(
                "the cron leader holds a session advisory lock, which a transaction pooler "
                "does not keep: set listen_dsn to a direct PostgreSQL connection, or "
                "run_scheduler = false on this daemon (another one, with a direct "
                "connection, fires the schedules)"
            )
        if migrate_on_start:
            problems.append(
                "migrations run under a session advisory lock: set listen_dsn to a direct "
                "PostgreSQL connection, or run `stoker migrate` against PostgreSQL directly "
                "and set migrate_on_start = false"
            )
    if not problems:
        return None
    return (
        "database_url goes through a transaction pooler (pgbouncer pool_mode = transaction): "
        + ("; ".join(problems))
    )
