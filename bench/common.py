"""What every scenario shares: the PostgreSQL server, fresh databases, worker processes stopped
by PID, polling with a deadline, process memory, and the table the results are printed in."""

from __future__ import annotations

import asyncio
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg

from daemon.dev.pgcluster import Cluster
from daemon.store.migrations import migrate

REPO = Path(__file__).resolve().parent.parent
LOGS = REPO / ".stoker"
# Seconds between the bench's checks that a drain is over. Not part of any timing (rates are
# read from the systems' own tables on the database clock), but each check is a query, so
# checking often would take PostgreSQL time from the system under test.
POLL = 0.2


def server_dsn() -> tuple[str, Cluster | None]:
    given = os.environ.get("STOKER_BENCH_DSN")
    if given:
        return given, None
    # Durable (fsync on), but with room for the WAL of a whole run, so that a checkpoint
    # forced by max_wal_size does not land in the middle of one run and not another.
    # pg_stat_statements loaded (a scenario creates the extension in its database to read it):
    # where PostgreSQL's time goes, per statement.
    cluster = Cluster(
        REPO / ".stoker" / "bench-pg",
        settings=(
            "max_wal_size=8GB",
            "checkpoint_timeout=30min",
            "shared_preload_libraries=pg_stat_statements",
        ),
    )
    return cluster.start(), cluster


@asynccontextmanager
async def fresh_database(admin_dsn: str, *, stoker_schema: bool = True) -> AsyncIterator[str]:
    name = f"bench_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(admin_dsn)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        dsn = admin_dsn.rsplit("/", 1)[0] + f"/{name}"
        if stoker_schema:
            conn = await asyncpg.connect(dsn)
            try:
                await migrate(conn)
            finally:
                await conn.close()
        yield dsn
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


async def settle(conn: asyncpg.Connection, tables: str) -> None:
    """Every run starts from the same state: statistics fresh, no I/O debt."""
    await conn.execute(f"VACUUM ANALYZE {tables}")
    await conn.execute("CHECKPOINT")


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM by PID, SIGKILL after 30 s: never by name."""
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()


@contextmanager
def worker_process(
    name: str, argv: Sequence[str], env: dict[str, str] | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    """A worker under test in a process of its own, its output kept in .stoker/bench-NAME.log
    (warnings there explain odd runs); stopped by PID however the block is left."""
    log = LOGS / f"bench-{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    base = {k: v for k, v in os.environ.items() if not k.startswith("STOKER_")}
    base["PYTHONPATH"] = str(REPO)
    with log.open("wb") as out:
        proc = subprocess.Popen(
            list(argv),
            cwd=REPO,
            env={**base, **(env or {})},
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        yield proc
    finally:
        stop_process(proc)


def log_text(name: str) -> str:
    return (LOGS / f"bench-{name}.log").read_text(errors="replace")


async def wait_for(
    what: str,
    check: Callable[[], Awaitable[bool]],
    *,
    timeout: float = 300.0,
    proc: subprocess.Popen[bytes] | None = None,
    log_name: str | None = None,
    interval: float = POLL,
) -> None:
    """Poll `check` until true; fail with the worker's log if it exits or time runs out."""
    deadline = time.monotonic() + timeout
    while not await check():
        if proc is not None and proc.poll() is not None:
            tail = log_text(log_name)[-4000:] if log_name else ""
            raise RuntimeError(f"{what}: the worker exited ({proc.returncode})\n{tail}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: not done after {timeout:.0f} s")
        await asyncio.sleep(interval)


def rss_mb(pid: int) -> tuple[float, float]:
    """(current, peak) resident memory of a process, in MB."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.split()
    return int(fields["VmRSS"][0]) / 1024, int(fields["VmHWM"][0]) / 1024


def cpu_ticks() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine, from /proc/stat."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields) - idle, sum(fields)


def cores_busy(before: tuple[int, int], after: tuple[int, int]) -> float:
    """How many of the machine's cores were busy on average between two cpu_ticks()."""
    busy, total = after[0] - before[0], after[1] - before[1]
    return (os.cpu_count() or 1) * busy / max(1, total)


def pct(values: Sequence[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


@dataclass
class Row:
    """One line of the results table: a system in a scenario, with one figure per run."""

    scenario: str
    system: str
    setting: str
    unit: str
    values: list[float] = field(default_factory=list)
    note: str = ""
    higher_is_better: bool = True

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    def figure(self, value: float) -> str:
        return f"{value:,.2f}" if abs(value) < 100 else f"{value:,.0f}"


def print_table(rows: Sequence[Row], title: str) -> None:
    print(f"\n{title}\n")
    header = f"{'scenario':<10} {'system':<14} {'setting':<34} {'median':>16} {'min-max':>20}  note"
    print(header)
    print("-" * len(header))
    for r in rows:
        if not r.values:
            continue
        span = f"{r.figure(min(r.values))}-{r.figure(max(r.values))}"
        print(
            f"{r.scenario:<10} {r.system:<14} {r.setting:<34} "
            f"{r.figure(r.median) + ' ' + r.unit:>16} {span:>20}  {r.note}"
        )


@asynccontextmanager
async def stoker_process(
    name: str,
    config: str,
    dsn: str,
    *,
    http_port: int = 0,
    ready: str = "listening on channel",
    timeout: float = 30.0,
) -> AsyncIterator[subprocess.Popen[bytes]]:
    """`stoker run` with the TOML `config`, its log in .stoker/bench-NAME.log, yielded once
    the log shows `ready`; stopped by PID however the block is left."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "stoker.toml"
        path.write_text(config)
        argv = [sys.executable, "-m", "daemon", "--config", str(path), "run"]
        argv += ["--log-format", "text", "--log-level", "INFO"]
        env = {"DATABASE_URL": dsn, "STOKER_HTTP__PORT": str(http_port)}
        with worker_process(name, argv, env) as proc:

            async def started() -> bool:
                return ready in log_text(name)

            await wait_for("daemon start", started, timeout=timeout, proc=proc, log_name=name)
            yield proc
