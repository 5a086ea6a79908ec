"""asyncpg pool and dedicated connections, set up the same way everywhere."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import re
from typing import Any
from urllib.parse import unquote, unquote_plus

import asyncpg
from pydantic import SecretStr

# Server-side keepalives let PostgreSQL notice a vanished daemon; the listener's own probe
# notices a vanished server.
SERVER_SETTINGS = {
    "tcp_keepalives_idle": "30",
    "tcp_keepalives_interval": "10",
    "tcp_keepalives_count": "3",
}


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


async def init_connection(conn: asyncpg.Connection) -> None:
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
        server_settings={
            **SERVER_SETTINGS,
            "application_name": application_name,
            **(settings or {}),
        },
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
        server_settings={**SERVER_SETTINGS, "application_name": application_name},
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
