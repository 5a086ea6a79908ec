"""Migrations: ordered, recorded with checksums, safe to run twice at once, tamper-evident."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Iterator

import asyncpg
import pytest

from daemon import migrations
from daemon.errors import MigrationError
from tests.conftest import REPO, scratch_database


@pytest.fixture
def empty_dsn(server_dsn: str) -> Iterator[str]:
    """A database with no Stoker schema at all."""
    with scratch_database(server_dsn) as database:
        yield database


def migrate_process(dsn: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "daemon", "migrate"],
        cwd=REPO,
        env={"DATABASE_URL": dsn, "PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


async def test_two_migrates_at_once_both_succeed(empty_dsn: str) -> None:
    procs = [migrate_process(empty_dsn) for _ in range(2)]
    try:
        outputs = [p.communicate(timeout=60) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [0, 0], outputs
    names = [m.name for m in migrations.load_migrations()]
    said = sorted(out.strip() for out, _ in outputs)
    assert said == [f"applied {', '.join(names)}", "schema is up to date"]
    conn = await asyncpg.connect(empty_dsn)
    try:
        rows = await conn.fetch("SELECT name, checksum FROM stoker.migrations ORDER BY name")
    finally:
        await conn.close()
    assert [(r["name"], r["checksum"]) for r in rows] == [
        (m.name, m.checksum) for m in migrations.load_migrations()
    ]


async def test_edited_applied_migration_is_refused(dsn: str, db: asyncpg.Connection) -> None:
    await db.execute("UPDATE stoker.migrations SET checksum = 'abc123' WHERE name = '001_init.sql'")
    with pytest.raises(MigrationError, match=r"001_init.sql was edited after it was applied"):
        await migrations.migrate(db)


async def test_schema_newer_than_code_is_refused(db: asyncpg.Connection) -> None:
    await db.execute(
        "INSERT INTO stoker.migrations (name, checksum) VALUES ('999_future.sql', 'x')"
    )
    with pytest.raises(MigrationError, match="missing from"):
        await migrations.pending_migrations(db)


async def test_migrate_is_idempotent(db: asyncpg.Connection) -> None:
    assert await migrations.migrate(db) == []
    assert await asyncio.wait_for(migrations.pending_migrations(db), 10) == []
