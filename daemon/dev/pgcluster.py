"""A throwaway PostgreSQL cluster for development (`make run`) and tests.

Finds the server binaries, runs `initdb`/`pg_ctl` (as the `postgres` user when we are root,
because PostgreSQL refuses to run as root), and listens on loopback only with trust auth.

    python -m daemon.dev.pgcluster start DIR     # prints the DSN of database "stoker"
    python -m daemon.dev.pgcluster stop DIR
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

INSTALL_HINT = (
    "PostgreSQL server binaries (initdb, pg_ctl) were not found. Install them, e.g. "
    "`apt-get install postgresql` on Debian/Ubuntu or `dnf install postgresql-server` on "
    "Fedora, or set DATABASE_URL to an existing server."
)


class ClusterError(RuntimeError):
    """The cluster could not be found, created, started or stopped."""


def find_bindir() -> Path:
    """The directory holding initdb and pg_ctl: `pg_config --bindir`, then Debian's layout."""
    candidates: list[Path] = []
    pg_config = shutil.which("pg_config")
    if pg_config:
        with contextlib.suppress(OSError, subprocess.CalledProcessError):
            out = subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True, check=True
            )
            candidates.append(Path(out.stdout.strip()))

    def version(path: str) -> float:
        try:
            return float(Path(path).parent.name)
        except ValueError:
            return 0.0

    for path in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=version, reverse=True):
        candidates.append(Path(path))
    for directory in candidates:
        if (directory / "initdb").exists() and (directory / "pg_ctl").exists():
            return directory
    raise ClusterError(INSTALL_HINT)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # As PostgreSQL binds: connections of its last run may linger in TIME_WAIT.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


@dataclass
class Cluster:
    """One cluster in `root`: data in root/data, log in root/postgres.log, port in root/port."""

    root: Path
    fast: bool = False  # tests: fsync off; never for data someone keeps
    settings: tuple[str, ...] = ()  # extra `-c name=value` server settings
    # A streaming standby of this running cluster: its data dir is a pg_basebackup -R of it.
    primary: Cluster | None = None
    # The name the standby gives itself on the primary, what synchronous_standby_names lists.
    application_name: str = "standby"

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def port_file(self) -> Path:
        return self.root / "port"

    @property
    def log_file(self) -> Path:
        return self.root / "postgres.log"

    @property
    def port(self) -> int:
        return int(self.port_file.read_text().strip())

    def dsn(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def _as_server_user(self, argv: list[str]) -> list[str]:
        if os.geteuid() == 0:
            if not shutil.which("runuser"):
                raise ClusterError("running as root needs `runuser` to start PostgreSQL")
            return ["runuser", "-u", "postgres", "--", *argv]
        return argv

    def _chown(self, path: Path) -> None:
        if os.geteuid() == 0:
            try:
                entry = pwd.getpwnam("postgres")
            except KeyError as exc:
                raise ClusterError(
                    "running as root, PostgreSQL needs a `postgres` user to run as; "
                    "create one (`useradd --system postgres`) or run as a normal user"
                ) from exc
            os.chown(path, entry.pw_uid, entry.pw_gid)

    def _run(self, argv: list[str]) -> None:
        result = subprocess.run(
            self._as_server_user(argv), capture_output=True, text=True, check=False
        )
        if result.returncode != 0:
            raise ClusterError(
                f"{Path(argv[0]).name} failed (exit {result.returncode}): "
                f"{(result.stderr or result.stdout).strip()}\nlog: {self.log_file}"
            )

    def pid(self) -> int | None:
        """The postmaster's PID if it is running, read from postmaster.pid."""
        pidfile = self.data / "postmaster.pid"
        try:
            pid = int(pidfile.read_text().splitlines()[0])
        except (OSError, ValueError, IndexError):
            return None
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            return pid
        return pid

    def start(self) -> str:
        """Create the cluster if needed, start it if it is not running; return the DSN."""
        bindir = find_bindir()
        self.root.mkdir(parents=True, exist_ok=True)
        self._chown(self.root)
        if not (self.data / "PG_VERSION").exists() and self.primary is not None:
            self._base_backup(bindir, self.primary)
        elif not (self.data / "PG_VERSION").exists():
            self.data.mkdir(exist_ok=True)
            self._chown(self.data)
            argv = [str(bindir / "initdb"), "-D", str(self.data), "-U", "postgres"]
            argv += ["-A", "trust", "-E", "UTF8", "--locale=C"]
            if self.fast:
                argv.append("--no-sync")
            self._run(argv)
            self._allow_replication()
        if self.pid() is not None and self.port_file.exists():
            return self.dsn()
        # The same port as last time when it is free, so that DSNs survive a restart.
        port = self.port if self.port_file.exists() and _port_free(self.port) else free_port()
        options = [
            f"-p {port}",
            "-c listen_addresses=127.0.0.1",
            f"-c unix_socket_directories={self.root}",
            "-c max_connections=200",
            # PostgreSQL's defaults, stated: a standby can be made from any cluster of ours.
            "-c wal_level=replica",
            "-c max_wal_senders=10",
        ]
        if self.fast:
            options += ["-c fsync=off", "-c synchronous_commit=off", "-c full_page_writes=off"]
        options += [f"-c {setting}" for setting in self.settings]
        if not self.log_file.exists():
            self.log_file.touch()
        self._chown(self.log_file)
        self._run(
            [
                str(bindir / "pg_ctl"),
                "-D",
                str(self.data),
                "-l",
                str(self.log_file),
                "-o",
                " ".join(options),
                "-w",
                "-t",
                "60",
                "start",
            ]
        )
        self.port_file.write_text(f"{port}\n")
        return self.dsn()

    def _allow_replication(self) -> None:
        """A standby connects to the replication pseudo-database from loopback: initdb's -A
        trust usually lists that already, but a packaged template may not."""
        hba = self.data / "pg_hba.conf"
        entry = "host replication all 127.0.0.1/32 trust"
        lines = [" ".join(line.split()) for line in hba.read_text().splitlines()]
        if entry not in lines:
            with hba.open("a") as out:
                out.write(f"{entry}\n")

    def _base_backup(self, bindir: Path, primary: Cluster) -> None:
        if primary.pid() is None:
            raise ClusterError(f"the primary in {primary.root} is not running")
        # -R writes standby.signal and a primary_conninfo; ours, appended after it, wins and
        # carries the application_name that the primary's synchronous_standby_names names.
        self._run(
            [
                str(bindir / "pg_basebackup"),
                "-D",
                str(self.data),
                "-h",
                "127.0.0.1",
                "-p",
                str(primary.port),
                "-U",
                "postgres",
                "-R",
                "-X",
                "stream",
                "-c",
                "fast",
            ]
        )
        conninfo = (
            f"host=127.0.0.1 port={primary.port} user=postgres "
            f"application_name={self.application_name}"
        )
        auto = self.data / "postgresql.auto.conf"
        with auto.open("a") as out:
            out.write(f"primary_conninfo = '{conninfo}'\n")

    def promote(self) -> None:
        """Make this standby a primary (`pg_ctl promote`), waiting until it accepts writes."""
        bindir = find_bindir()
        self._run([str(bindir / "pg_ctl"), "-D", str(self.data), "-w", "-t", "60", "promote"])

    def stop(self, immediate: bool = False) -> None:
        """Stop the postmaster by its PID (fast shutdown, or `immediate`: as if it crashed),
        waiting until it is gone."""
        pid = self.pid()
        if pid is None:
            return
        # SIGQUIT is PostgreSQL's "immediate" shutdown, SIGINT its "fast" one.
        os.kill(pid, signal.SIGQUIT if immediate else signal.SIGINT)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.pid() is None:
                return
            time.sleep(0.05)
        os.kill(pid, signal.SIGQUIT)  # "immediate" shutdown


def ensure_database(dsn: str, name: str) -> str:
    """Create database `name` if missing (via psql-free asyncpg); return its DSN."""
    import asyncio

    import asyncpg

    async def create() -> None:
        conn = await asyncpg.connect(dsn)
        try:
            exists = await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name)
            if not exists:
                await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()

    asyncio.run(create())
    return dsn.rsplit("/", 1)[0] + f"/{name}"


def load_sql(dsn: str, path: Path) -> None:
    """Run a file of SQL statements (the development demo data) in one transaction."""
    import asyncio

    import asyncpg

    sql = path.read_text(encoding="utf-8")

    async def run() -> None:
        conn = await asyncpg.connect(dsn)
        try:
            async with conn.transaction():
                await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(run())


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) == 3 and args[0] == "load":
        load_sql(args[1], Path(args[2]))
        return 0
    if len(args) != 2 or args[0] not in {"start", "stop"}:
        print(
            "usage: python -m daemon.dev.pgcluster start|stop DIR | load DSN FILE", file=sys.stderr
        )
        return 2
    cluster = Cluster(Path(args[1]).resolve())
    try:
        if args[0] == "start":
            dsn = cluster.start()
            print(ensure_database(dsn, "stoker"))
        else:
            cluster.stop()
    except ClusterError as exc:
        print(f"stoker: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
