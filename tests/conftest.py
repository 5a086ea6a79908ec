"""Fixtures: a throwaway PostgreSQL per session, a fresh database per test cloned from a
migrated template, and real daemon processes stopped by PID at teardown."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import pytest

from daemon.dev.pgcluster import Cluster
from daemon.store.db import init_connection
from daemon.store.migrations import migrate

REPO = Path(__file__).resolve().parent.parent
T = TypeVar("T")


def run_sync(coro: Awaitable[T]) -> T:
    """Run a coroutine on a private loop (for sync fixtures), leaving any test loop alone."""
    loop = asyncio.new_event_loop()
    try:
        return loop.run_until_complete(coro)
    finally:
        loop.close()


def with_database(dsn: str, name: str) -> str:
    return dsn.rsplit("/", 1)[0] + f"/{name}"


@pytest.fixture(scope="session")
def server_dsn() -> Iterator[str]:
    """STOKER_TEST_DSN, or a cluster of our own in a temp dir, stopped at the end."""
    given = os.environ.get("STOKER_TEST_DSN")
    if given:
        yield given
        return
    root = Path(tempfile.mkdtemp(prefix="stoker-test-pg-"))
    cluster = Cluster(root, fast=True)
    try:
        yield cluster.start()
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def template_db(server_dsn: str) -> Iterator[str]:
    name = f"stoker_tpl_{os.getpid()}"

    async def create() -> None:
        conn = await asyncpg.connect(server_dsn)
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()
        conn = await asyncpg.connect(with_database(server_dsn, name))
        try:
            await migrate(conn)
        finally:
            await conn.close()

    async def drop() -> None:
        conn = await asyncpg.connect(server_dsn)
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await conn.close()

    run_sync(create())
    try:
        yield name
    finally:
        run_sync(drop())


@contextlib.contextmanager
def scratch_database(server_dsn: str, template: str | None = None) -> Iterator[str]:
    """A database of its own (a copy of `template`, if given), dropped afterwards."""
    name = f"t_{uuid.uuid4().hex[:12]}"

    async def admin(sql: str) -> None:
        conn = await asyncpg.connect(server_dsn)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    copy = f' TEMPLATE "{template}"' if template else ""
    run_sync(admin(f'CREATE DATABASE "{name}"{copy}'))
    try:
        yield with_database(server_dsn, name)
    finally:
        run_sync(admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture
def own_cluster() -> Iterator[Cluster]:
    """A PostgreSQL of the test's own, which it may stop and start (the session's stays up)."""
    cluster = Cluster(Path(tempfile.mkdtemp(prefix="stoker-own-pg-")), fast=True)
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def dsn(server_dsn: str, template_db: str) -> Iterator[str]:
    """A fresh, migrated database for this test alone."""
    with scratch_database(server_dsn, template_db) as database:
        yield database


@pytest.fixture
async def db(dsn: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(dsn)
    await init_connection(conn)
    try:
        yield conn
    finally:
        await conn.close()


async def eventually(
    check: Callable[[], Awaitable[T | None]], timeout: float = 15, interval: float = 0.02
) -> T:
    """Poll `check` until it returns something truthy, or fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = await check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s (last value: {value!r})")
        await asyncio.sleep(interval)


async def finished(db: asyncpg.Connection, job_id: int, timeout: float = 30) -> asyncpg.Record:
    """Wait until the job has succeeded or failed; return its row (live or in history)."""

    async def done() -> asyncpg.Record | None:
        row: asyncpg.Record | None = await db.fetchrow(
            "SELECT * FROM stoker.all_jobs WHERE id = $1 AND state IN ('succeeded', 'failed')",
            job_id,
        )
        return row

    return await eventually(done, timeout)


@dataclass
class DaemonProcess:
    proc: subprocess.Popen[bytes]
    log_path: Path
    events_path: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def log_records(self) -> list[dict[str, Any]]:
        records = []
        for line in self.log().splitlines():
            if line.startswith("{"):
                records.append(json.loads(line))
        return records

    async def wait_log(self, text: str, timeout: float = 20) -> None:
        async def seen() -> bool:
            if self.proc.poll() is not None and text not in self.log():
                raise AssertionError(
                    f"daemon exited ({self.proc.returncode}) before logging {text!r}:\n{self.log()}"
                )
            return text in self.log()

        await eventually(seen, timeout)

    async def wait_exit(self, timeout: float = 30) -> int:
        async def exited() -> bool:
            return self.proc.poll() is not None

        await eventually(exited, timeout)
        return self.proc.returncode

    def events(self) -> list[dict[str, Any]]:
        if not self.events_path.exists():
            return []
        return [json.loads(x) for x in self.events_path.read_text().splitlines() if x]


@dataclass
class DaemonFactory:
    dsn: str
    tmp: Path
    started: list[DaemonProcess] = field(default_factory=list)

    def write_config(self, body: str, name: str = "stoker.toml") -> Path:
        path = self.tmp / name
        header = 'handler_modules = ["tests.job_handlers"]\n'
        path.write_text(header + textwrap.dedent(body), encoding="utf-8")
        return path

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("STOKER_")}
        env.update(
            DATABASE_URL=self.dsn,
            PYTHONPATH=str(REPO),
            STOKER_TEST_EVENTS=str(self.tmp / "events.jsonl"),
            STOKER_HTTP__PORT="0",  # many daemons at once: each on a port of its own
        )
        env.update(extra)
        return env

    async def start(self, body: str, *, wait_ready: bool = True, **env: str) -> DaemonProcess:
        config = self.write_config(body, f"stoker-{len(self.started)}.toml")
        return await self.start_files([config], wait_ready=wait_ready, **env)

    async def start_files(
        self, configs: list[Path], *, wait_ready: bool = True, **env: str
    ) -> DaemonProcess:
        """`stoker --config A --config B ... run`: the files layered as given."""
        log_path = self.tmp / f"daemon-{len(self.started)}.log"
        argv = [sys.executable, "-m", "daemon"]
        for config in configs:
            argv += ["--config", str(config)]
        with log_path.open("wb") as log_file:
            proc = subprocess.Popen(
                [*argv, "run", "--log-format", "json"],
                cwd=REPO,
                env=self.env(**env),
                stdout=log_file,
                stderr=subprocess.STDOUT,
            )
        daemon = DaemonProcess(proc, log_path, self.tmp / "events.jsonl")
        self.started.append(daemon)
        if wait_ready:
            await daemon.wait_log('"message": "listening on channel stoker_jobs"')
        return daemon

    def stop_all(self) -> None:
        for daemon in self.started:
            if daemon.proc.poll() is None:
                os.kill(daemon.pid, signal.SIGKILL)
                daemon.proc.wait(timeout=10)


@pytest.fixture
def daemons(dsn: str, tmp_path: Path) -> Iterator[DaemonFactory]:
    factory = DaemonFactory(dsn, tmp_path)
    try:
        yield factory
    finally:
        factory.stop_all()


def stoker_cli(
    dsn: str, *args: str, config: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """Run the real `stoker` command line against the test database."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("STOKER_")}
    env.update(DATABASE_URL=dsn, PYTHONPATH=str(REPO))
    argv = [sys.executable, "-m", "daemon"]
    if config is not None:
        argv += ["--config", str(config)]
    return subprocess.run(
        [*argv, *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


async def write_outcome(
    db: asyncpg.Connection,
    job_id: int,
    *,
    attempt: int,
    outcome: str,
    worker: str,
    error: str | None = None,
    tb: str | None = None,
) -> list[asyncpg.Record]:
    """Write one finishing outcome exactly as a daemon's completer does."""
    from daemon.store import queries

    rows: list[asyncpg.Record] = await db.fetch(
        queries.COMPLETE,
        [job_id],
        [attempt],
        [outcome],
        [None],
        [error],
        [tb],
        [],
        [],
        [],
        [],
        [],
        [],
        worker,
    )
    return rows


@pytest.fixture
async def browser() -> AsyncIterator[Any]:
    """Debian's Chromium, driven by Playwright (tests/browser.py): its process group is killed
    by PID when the test ends."""
    from tests.browser import chromium

    async with chromium() as launched:
        yield launched
