"""A real pgbouncer (Debian's package) in transaction pool mode in front of the test PostgreSQL,
on a free loopback port, stopped by its PID at teardown.

pgbouncer refuses to run as root: when we are root it runs as `postgres`, like the test
cluster, with its files in a temp dir that user owns. It is started with Popen(user=...)
rather than through runuser, so that the PID we stop is pgbouncer's own and not a wrapper's."""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from daemon.dev.pgcluster import free_port

INSTALL_HINT = "pgbouncer is not installed: `make test` installs it (apt-get install pgbouncer)"


def find_pgbouncer() -> str | None:
    return shutil.which("pgbouncer") or next(
        (p for p in ("/usr/sbin/pgbouncer", "/usr/bin/pgbouncer") if os.path.exists(p)), None
    )


@dataclass
class Bouncer:
    proc: subprocess.Popen[bytes]
    port: int
    root: Path

    def dsn(self, direct: str) -> str:
        """`direct` (a test database's DSN) through pgbouncer: same user and database."""
        parts = urlsplit(direct)
        return parts._replace(netloc=f"{parts.username}@127.0.0.1:{self.port}").geturl()

    def log(self) -> str:
        return "".join(
            (self.root / name).read_text(errors="replace")
            for name in ("stderr.log", "pgbouncer.log")
            if (self.root / name).exists()
        )

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # pgbouncer's "safe shutdown"
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


def _wait_listening(bouncer: Bouncer, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if bouncer.proc.poll() is not None:
            raise RuntimeError(f"pgbouncer exited ({bouncer.proc.returncode}):\n{bouncer.log()}")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", bouncer.port)) == 0:
                return
        if time.monotonic() > deadline:
            raise RuntimeError(f"pgbouncer did not listen within {timeout}s:\n{bouncer.log()}")
        time.sleep(0.02)


def start_pgbouncer(server_dsn: str, *, pool_size: int = 4) -> Bouncer:
    binary = find_pgbouncer()
    if binary is None:
        pytest.fail(INSTALL_HINT)
    server = urlsplit(server_dsn)
    root = Path(tempfile.mkdtemp(prefix="stoker-pgbouncer-"))
    port = free_port()
    # trust, like the test cluster; pgbouncer still wants the user in its auth_file. A small
    # server pool, so that clients really do share server sessions between transactions.
    (root / "userlist.txt").write_text(f'"{server.username}" ""\n')
    (root / "pgbouncer.ini").write_text(
        f"""[databases]
* = host={server.hostname} port={server.port}

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {port}
unix_socket_dir =
auth_type = trust
auth_file = {root}/userlist.txt
pool_mode = transaction
default_pool_size = {pool_size}
max_client_conn = 500
logfile = {root}/pgbouncer.log
"""
    )
    user: str | None = None
    if os.geteuid() == 0:
        user = "postgres"
        entry = pwd.getpwnam(user)
        for path in (root, *root.iterdir()):
            os.chown(path, entry.pw_uid, entry.pw_gid)
    with (root / "stderr.log").open("wb") as stderr:
        proc = subprocess.Popen(
            [binary, str(root / "pgbouncer.ini")],
            user=user,
            group=user,
            extra_groups=[] if user else None,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
    bouncer = Bouncer(proc, port, root)
    try:
        _wait_listening(bouncer)
    except BaseException:
        bouncer.stop()
        raise
    return bouncer


@pytest.fixture(scope="module", name="pgbouncer")
def pgbouncer_fixture(server_dsn: str) -> Iterator[Bouncer]:
    """One pgbouncer per test module (each test has a database of its own behind it)."""
    bouncer = start_pgbouncer(server_dsn)
    try:
        yield bouncer
    finally:
        bouncer.stop()
