"""Migrations: ordered, recorded with checksums, safe to run twice at once, tamper-evident."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Iterator

import asyncpg
import pytest

from daemon.errors import MigrationError
from daemon.store import migrations
from tests.conftest import REPO, eventually, scratch_database


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


async def test_a_migrate_waiting_for_another_holds_no_snapshot(empty_dsn: str) -> None:
    # Waiting for the lock inside a statement would hold a snapshot all along, and keep VACUUM
    # from cleaning up any table of the database while another process migrates.
    holder = await asyncpg.connect(empty_dsn)
    proc: subprocess.Popen[str] | None = None
    try:
        await holder.execute("SELECT pg_advisory_lock($1)", migrations.MIGRATION_LOCK_KEY)
        proc = migrate_process(empty_dsn)
        others = (
            "FROM pg_stat_activity WHERE datname = current_database() "
            "AND pid <> pg_backend_pid() AND query LIKE '%advisory_lock%'"
        )

        async def tried() -> bool:
            return bool(await holder.fetchval(f"SELECT count(*) {others}"))

        await eventually(tried)
        for _ in range(5):  # over a few of its tries
            pinned = await holder.fetch(
                f"SELECT state, query {others} AND backend_xmin IS NOT NULL"
            )
            assert not pinned, [dict(r) for r in pinned]
            await asyncio.sleep(0.1)
        assert proc.poll() is None  # still waiting for the lock
        await holder.execute("SELECT pg_advisory_unlock($1)", migrations.MIGRATION_LOCK_KEY)
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        assert out.startswith("applied "), out
    finally:
        await holder.close()
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()


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
