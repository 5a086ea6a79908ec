"""Where PostgreSQL's time goes during a bench window: `pg_stat_statements` per database, the
wait events of backends sampled from `pg_stat_activity`, WAL flushes from `pg_stat_wal`, and the
CPU of processes from /proc. Used by the idle and keepup scenarios (issue #16)."""

from __future__ import annotations

import asyncio
import collections
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg

from daemon.events import wait_any
from daemon.store import queries

TICK = os.sysconf("SC_CLK_TCK")


class StatsUnavailable(RuntimeError):
    """The server does not load pg_stat_statements."""


async def prepare(admin: asyncpg.Connection) -> None:
    """The extension in the admin database, from which every bench database is read. The bench's
    own cluster preloads the library (bench/common.py); a server given by STOKER_BENCH_DSN must
    too (`shared_preload_libraries = 'pg_stat_statements'`)."""
    libraries = await admin.fetchval("SELECT current_setting('shared_preload_libraries')")
    if "pg_stat_statements" not in libraries:
        raise StatsUnavailable(
            "this scenario reads pg_stat_statements: the server must be started with "
            "shared_preload_libraries = 'pg_stat_statements' (the bench's own cluster is; "
            "if it was already running, stop it: python -m daemon.dev.pgcluster stop "
            ".stoker/bench-pg)"
        )
    await admin.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")


async def database_oid(admin: asyncpg.Connection, dsn: str) -> int:
    oid: int = await admin.fetchval(
        "SELECT oid FROM pg_database WHERE datname = $1", dsn.rsplit("/", 1)[1]
    )
    return oid


async def reset(admin: asyncpg.Connection, dbid: int) -> None:
    """Forget the statements of one database only (others may be measured meanwhile)."""
    await admin.execute("SELECT pg_stat_statements_reset(0, $1::oid, 0)", dbid)


@dataclass
class Statement:
    text: str
    calls: int
    total_ms: float
    toplevel: bool = True


async def statements(admin: asyncpg.Connection, dbid: int) -> list[Statement]:
    rows = await admin.fetch(
        "SELECT query, calls, total_exec_time, toplevel FROM pg_stat_statements"
        " WHERE dbid = $1::oid AND query NOT LIKE '%pg_stat_statements%'",
        dbid,
    )
    return [Statement(r["query"], r["calls"], r["total_exec_time"], r["toplevel"]) for r in rows]


def _signature(sql: str) -> str:
    """The text with every literal and parameter a '?': pg_stat_statements replaces literals
    with $n, so the engine's statements and their recorded form compare equal."""
    sql = re.sub(r"--[^\n]*", " ", sql)
    sql = re.sub(r"'(?:[^']|'')*'", "?", sql)
    sql = re.sub(r"\$\d+", "?", sql)
    sql = re.sub(r"\b\d+(?:\.\d+)?\b", "?", sql)
    return " ".join(sql.split())


_KNOWN = {
    _signature(value): name
    for name, value in vars(queries).items()
    if name.isupper() and isinstance(value, str) and not name.startswith("_")
}


def label(sql: str, width: int = 90) -> str:
    """`queries.NAME` for the engine's own statements, else the start of the text."""
    name = _KNOWN.get(_signature(sql))
    text = " ".join(sql.split())
    short = text if len(text) <= width else text[: width - 3] + "..."
    return f"[queries.{name}] {short}" if name else short


def merge(runs: Iterable[list[Statement]]) -> list[Statement]:
    """The same statement's calls and time summed over runs."""
    total: dict[tuple[str, bool], Statement] = {}
    for run in runs:
        for s in run:
            key = (" ".join(s.text.split()), s.toplevel)
            have = total.setdefault(key, Statement(s.text, 0, 0.0, s.toplevel))
            have.calls += s.calls
            have.total_ms += s.total_ms
    return list(total.values())


def print_statements(
    title: str, stmts: Sequence[Statement], seconds: float, top: int = 10, by: str = "calls"
) -> None:
    """The top statements by calls (or total time), with calls a second and mean time."""
    ranked = sorted(stmts, key=lambda s: s.calls if by == "calls" else s.total_ms, reverse=True)[
        :top
    ]
    calls = sum(s.calls for s in stmts if s.toplevel)
    print(f"\n{title}: {calls / seconds:,.2f} top-level statements/s over {seconds:,.0f} s\n")
    print(f"{'calls/s':>10} {'mean ms':>8} {'total ms':>10}  statement")
    for s in ranked:
        nested = "" if s.toplevel else "(nested) "
        print(
            f"{s.calls / seconds:>10,.2f} {s.total_ms / max(1, s.calls):>8.3f} "
            f"{s.total_ms:>10,.0f}  {nested}{label(s.text)}"
        )


@dataclass
class Waits:
    """Backends of one database seen by `pg_stat_activity` samples, by what they were doing."""

    samples: int = 0
    seen: dict[str, collections.Counter[str]] = field(default_factory=dict)

    def add(self, role: str, what: str) -> None:
        self.seen.setdefault(role, collections.Counter())[what] += 1

    def merged(self, other: Waits) -> Waits:
        out = Waits(self.samples + other.samples)
        for source in (self, other):
            for role, counts in source.seen.items():
                out.seen.setdefault(role, collections.Counter()).update(counts)
        return out


async def sample_waits(dsn: str, stop: asyncio.Event, every: float = 0.05) -> Waits:
    """Sample every `every` seconds the backends of the database `dsn` names, producers (pgbench)
    apart from the daemon's: 'CPU' is an active backend waiting on nothing, 'client' one idle
    between statements (the client's turn), else wait_event_type:wait_event."""
    waits = Waits()
    admin = await asyncpg.connect(dsn.rsplit("/", 1)[0] + "/postgres")
    try:
        while not stop.is_set():
            rows = await admin.fetch(
                "SELECT application_name, state, wait_event_type, wait_event"
                " FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()",
                dsn.rsplit("/", 1)[1],
            )
            waits.samples += 1
            for r in rows:
                role = "producers" if r["application_name"] == "pgbench" else "daemon"
                if r["state"] == "active":
                    what = f"{r['wait_event_type']}:{r['wait_event']}" if r["wait_event"] else "CPU"
                elif r["state"] and r["state"].startswith("idle in transaction"):
                    what = f"idle in transaction ({r['wait_event'] or '-'})"
                else:
                    what = f"idle ({r['wait_event'] or '-'})"
                waits.add(role, what)
            await wait_any(stop, seconds=every)
    finally:
        await admin.close()
    return waits


def print_waits(title: str, waits: Waits, top: int = 8) -> None:
    """Per role, the share of backend-samples in each state: what producers wait on."""
    print(f"\n{title}: {waits.samples} samples of pg_stat_activity")
    for role, counts in sorted(waits.seen.items()):
        total = sum(counts.values())
        per_sample = total / max(1, waits.samples)
        print(f"  {role} ({per_sample:.1f} backends a sample):")
        for what, n in counts.most_common(top):
            print(f"    {100 * n / total:5.1f}%  {what}")


async def wal_syncs(conn: asyncpg.Connection) -> tuple[int, int]:
    """(WAL flushes, commits of every database) so far: commits per flush over a window."""
    syncs = await conn.fetchval("SELECT wal_sync FROM pg_stat_wal")
    commits = await conn.fetchval("SELECT sum(xact_commit) FROM pg_stat_database")
    return int(syncs), int(commits)


async def wal_bytes(conn: asyncpg.Connection) -> int:
    """WAL written by the whole cluster so far."""
    return int(await conn.fetchval("SELECT wal_bytes FROM pg_stat_wal"))


async def wal_lsn(conn: asyncpg.Connection) -> str:
    return str(await conn.fetchval("SELECT pg_current_wal_insert_lsn()::text"))


async def wal_records(
    conn: asyncpg.Connection, start: str, end: str
) -> dict[str, tuple[int, int]] | None:
    """What the cluster's WAL between two LSNs is made of, from `pg_waldump --stats=record`:
    record kind (Heap/UPDATE, Btree/INSERT_LEAF, ...) -> (records, bytes, full-page images
    included). None when the WAL cannot be read here (a server given by STOKER_BENCH_DSN on
    another machine, or no pg_waldump)."""
    from daemon.dev.pgcluster import find_bindir  # only where the bench's own cluster runs

    wal = Path(str(await conn.fetchval("SHOW data_directory"))) / "pg_wal"
    try:
        waldump = find_bindir() / "pg_waldump"
    except Exception:
        return None
    argv = [str(waldump), "--stats=record", "-p", str(wal), "-s", start, "-e", end]
    if os.geteuid() == 0 and shutil.which("runuser"):
        argv = ["runuser", "-u", "postgres", "--", *argv]  # pg_wal is the server user's
    try:
        out = await asyncio.to_thread(
            subprocess.run, argv, capture_output=True, text=True, timeout=120
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    records: dict[str, tuple[int, int]] = {}
    for line in out.stdout.splitlines():
        # "Heap/UPDATE   50455 (  8.86)   7476042 ( 14.68)   0 (  0.00)   7476042 ( 14.67)"
        m = re.match(r"^(\S+/\S+)\s+(\d+)\s+\(.*?\)\s+\d+.*?(\d+)\s+\(\s*[\d.]+\)\s*$", line)
        if m:
            records[m.group(1)] = (int(m.group(2)), int(m.group(3)))
    return records or None


def print_wal_records(
    title: str, records: Sequence[dict[str, tuple[int, int]]], transactions: float, top: int = 10
) -> None:
    """Bytes of WAL per producer transaction by record kind, summed over windows."""
    if not records or transactions <= 0:
        return
    total: collections.Counter[str] = collections.Counter()
    count: collections.Counter[str] = collections.Counter()
    for r in records:
        for kind, (n, size) in r.items():
            total[kind] += size
            count[kind] += n
    print(
        f"\n{title}: {sum(total.values()) / transactions:,.0f} bytes of WAL per producer "
        "transaction (pg_waldump --stats)"
    )
    print("   records/tx   bytes/tx  record kind")
    for kind, size in total.most_common(top):
        print(f"   {count[kind] / transactions:10.2f} {size / transactions:10.0f}  {kind}")


def cpu_seconds(pid: int) -> float | None:
    """utime + stime of a process (all its threads), or None once it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


class CpuWindow:
    """CPU of some processes between start() and stop(), as a share of one core."""

    def __init__(self, pids: Sequence[int]) -> None:
        self._pids = list(pids)
        self._before: dict[int, float] = {}
        self._t0 = 0.0

    def start(self) -> None:
        self._t0 = time.monotonic()
        self._before = {p: c for p in self._pids if (c := cpu_seconds(p)) is not None}

    def stop(self) -> float:
        wall = time.monotonic() - self._t0
        used = 0.0
        for pid, before in self._before.items():
            after = cpu_seconds(pid)
            if after is not None:
                used += after - before
        return 100 * used / wall
