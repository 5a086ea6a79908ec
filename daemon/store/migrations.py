"""Applies sql/migrations/NNN_name.sql in order, each in its own transaction, under an
advisory lock, recording each file's name and checksum."""

from __future__ import annotations

import asyncio
import hashlib
import importlib.resources
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import asyncpg

from daemon.errors import MigrationError

log = logging.getLogger("stoker.migrations")

# pg_advisory_lock key: the bytes "stokmigr" as a signed 64-bit integer.
MIGRATION_LOCK_KEY = int.from_bytes(b"stokmigr", "big", signed=True)
MIGRATION_LOCK_POLL = 0.1  # seconds between tries while another process migrates
FILE_NAME = re.compile(r"^(\d{3})_[a-z0-9_]+\.sql$")


# Where the connection landed, for the one line that says it is read-only. No TCP address on a
# Unix socket: then the socket's directory.
READ_ONLY = """
SELECT pg_is_in_recovery() AS recovery,
       current_setting('transaction_read_only') = 'on' AS read_only,
       coalesce(host(inet_server_addr()) || ':' || inet_server_port(),
                'the Unix socket in ' || current_setting('unix_socket_directories')) AS server"""


class ReadOnlyServer(MigrationError):
    """The server takes no writes: a standby, or one with transaction_read_only on."""


async def read_only(conn: asyncpg.Connection) -> str | None:
    """Why the server on this connection takes no writes, naming it; None when it does."""
    row = await conn.fetchrow(READ_ONLY)
    if row["recovery"]:
        return f"the database server at {row['server']} is a standby (in recovery): read-only"
    if row["read_only"]:
        return f"the database server at {row['server']} is read-only (transaction_read_only)"
    return None


@dataclass(frozen=True)
class Migration:
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


def migrations_dir() -> Path:
    """Installed wheels carry the files inside the package; a checkout has them at the top."""
    packaged = importlib.resources.files("daemon") / "sql" / "migrations"
    if packaged.is_dir():
        return Path(str(packaged))
    return Path(__file__).resolve().parents[2] / "sql" / "migrations"


def load_migrations(directory: Path | None = None) -> list[Migration]:
    directory = directory or migrations_dir()
    found = []
    for path in sorted(directory.glob("*.sql")):
        if not FILE_NAME.match(path.name):
            raise MigrationError(f"{path}: migration files are named NNN_lowercase_name.sql")
        found.append(Migration(path.name, path.read_text(encoding="utf-8")))
    if not found:
        raise MigrationError(f"no migrations found in {directory}")
    return found


async def applied_migrations(conn: asyncpg.Connection) -> dict[str, str]:
    exists = await conn.fetchval("SELECT to_regclass('stoker.migrations') IS NOT NULL")
    if not exists:
        return {}
    rows = await conn.fetch("SELECT name, checksum FROM stoker.migrations")
    return {row["name"]: row["checksum"] for row in rows}


async def pending_migrations(conn: asyncpg.Connection) -> list[Migration]:
    """Files not yet applied; raises if an applied file was edited or is missing."""
    applied = await applied_migrations(conn)
    known = load_migrations()
    names = {m.name for m in known}
    for name in applied:
        if name not in names:
            raise MigrationError(
                f"migration {name} is applied in the database but missing from "
                f"{migrations_dir()}: this Stoker is older than the schema; upgrade it"
            )
    for migration in known:
        checksum = applied.get(migration.name)
        if checksum is not None and checksum != migration.checksum:
            raise MigrationError(
                f"migration {migration.name} was edited after it was applied "
                f"(checksum {checksum[:12]} in the database, {migration.checksum[:12]} on disk); "
                "restore the file and put the change in a new migration"
            )
    return [m for m in known if m.name not in applied]


async def migrate(conn: asyncpg.Connection) -> list[str]:
    """Apply pending migrations; return the names applied. Safe to run concurrently.
    Raises ReadOnlyServer on a standby, before taking any lock."""
    reason = await read_only(conn)
    if reason is not None:
        raise ReadOnlyServer(reason)
    # Tried, not waited for inside a statement: a statement waiting on a lock holds a snapshot,
    # which would keep VACUUM from cleaning up any table while another process migrates.
    while True:
        if await conn.fetchval("SELECT pg_try_advisory_lock($1)", MIGRATION_LOCK_KEY):
            break
        await asyncio.sleep(MIGRATION_LOCK_POLL)  # polling the database: no event to wait on
    try:
        try:
            async with conn.transaction():
                await conn.execute("CREATE SCHEMA IF NOT EXISTS stoker")
                await conn.execute(
                    """CREATE TABLE IF NOT EXISTS stoker.migrations (
                           name text PRIMARY KEY,
                           checksum text NOT NULL,
                           applied_at timestamptz NOT NULL DEFAULT now())"""
                )
        except asyncpg.ReadOnlySQLTransactionError as exc:
            # Turned read-only since the look above (a failover, default_transaction_read_only).
            raise ReadOnlyServer(f"the database server is read-only: {exc}") from exc
        done = []
        for migration in await pending_migrations(conn):
            async with conn.transaction():
                try:
                    await conn.execute(migration.sql)
                except asyncpg.PostgresError as exc:
                    raise MigrationError(f"migration {migration.name} failed: {exc}") from exc
                await conn.execute(
                    "INSERT INTO stoker.migrations (name, checksum) VALUES ($1, $2)",
                    migration.name,
                    migration.checksum,
                )
            log.info("applied migration %s", migration.name)
            done.append(migration.name)
        return done
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK_KEY)
