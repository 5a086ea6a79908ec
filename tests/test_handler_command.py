"""command.run with real daemons running real programs: exit codes, output tails, the job's
environment, refused payloads, and process groups stopped whole on timeout and shutdown."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from pydantic import ValidationError

from handlers.command import MAX_LOG_LINE, Output, RunCommand, group_alive
from tests.conftest import DaemonFactory, DaemonProcess, eventually

QUEUE = """
lease_seconds = 30
[queues.default]
concurrency = 12
poll_interval = 60
max_attempts = 2
backoff = { base = 0.1, cap = 1, jitter = 0 }
"""


async def enqueue(db: asyncpg.Connection, payload: dict[str, Any], **cols: Any) -> int:
    names = ["queue", "kind", "payload", *cols]
    values = ", ".join(f"${i + 1}" for i in range(len(names)))
    job_id: int = await db.fetchval(
        f"INSERT INTO stoker.jobs ({', '.join(names)}) VALUES ({values}) RETURNING id",
        "default",
        "command.run",
        payload,
        *cols.values(),
    )
    return job_id


async def row(db: asyncpg.Connection, job_id: int) -> asyncpg.Record | None:
    found: asyncpg.Record | None = await db.fetchrow(
        "SELECT * FROM stoker.all_jobs WHERE id = $1", job_id
    )
    return found


async def done(db: asyncpg.Connection, job_id: int, timeout: float = 20) -> asyncpg.Record:
    async def check() -> asyncpg.Record | None:
        found = await row(db, job_id)
        return found if found is not None and found["state"] in ("succeeded", "failed") else None

    return await eventually(check, timeout)


def script(tmp: Path, name: str, body: str) -> Path:
    path = tmp / name
    path.write_text("#!/bin/sh\n" + textwrap.dedent(body), encoding="utf-8")
    return path


def state(pid: int) -> str | None:
    """The process's state letter (Z: a zombie), or None once it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    return stat[stat.rfind(b")") + 2 :].split()[0].decode()


def gone(pid: int) -> bool:
    return state(pid) in (None, "Z")


def read_pid(path: Path) -> int:
    return int(path.read_text().strip())


async def pid_file(path: Path) -> int:
    async def written() -> bool:
        return path.exists() and path.read_text().strip().isdigit()

    await eventually(written)
    return read_pid(path)


def records(daemon: DaemonProcess, job_id: int) -> list[str]:
    return [r["message"] for r in daemon.log_records() if r.get("job_id") == job_id]


@pytest.fixture
def strays(tmp_path: Path) -> Iterator[Path]:
    """Scripts write the pids of what they start to *.pid files in tmp_path: whatever a failing
    test left alive is killed by pid at teardown."""
    yield tmp_path
    for path in tmp_path.glob("*.pid"):
        with contextlib.suppress(ValueError, OSError):
            pid = read_pid(path)
            if not gone(pid) and b"sleep" in Path(f"/proc/{pid}/cmdline").read_bytes():
                os.kill(pid, signal.SIGKILL)


async def test_exit_codes_output_and_environment(
    daemons: DaemonFactory, db: asyncpg.Connection, strays: Path
) -> None:
    tmp = strays
    loud = tmp / "loud.py"
    loud.write_text(
        "import sys\nsys.stdout.write('x' * 100_000 + '\\n')\n"
        "for i in range(3000):\n    print(f'line {i}')\nprint('THE END')\n"
    )
    leaves = script(tmp, "leaves.sh", f'sleep 30 &\necho $! > {tmp}/background.pid\necho "left"\n')
    daemon = await daemons.start(
        QUEUE
        + f"""
        [commands.show_env]
        argv = ["env"]
        env = {{ FROM_CONFIG = "yes" }}
        params = {{ x = "default-x", flag = false, count = 1, empty = "" }}

        [commands.inherit]
        argv = ["env"]
        inherit_env = true

        [commands.exit_permanent]
        argv = ["/bin/sh", "-c", "echo about to fail; echo bad input >&2; exit 3"]
        permanent_exit_codes = [3, 7]

        [commands.exit_other]
        argv = ["/bin/sh", "-c", "echo flaky >&2; exit 4"]
        permanent_exit_codes = [3]

        [commands.killed]
        argv = ["/bin/sh", "-c", "echo dying; kill -KILL $$"]

        [commands.loud]
        argv = ["{sys.executable}", "{loud}"]
        output_max_bytes = 1024

        [commands.missing]
        argv = ["/nonexistent/program", "--flag"]

        [commands.bad_cwd]
        argv = ["true"]
        cwd = "/nonexistent/dir"

        [commands.leaves_child]
        argv = ["/bin/sh", "{leaves}"]
        kill_grace = 1
        """
    )
    tick = "2026-01-01T04:15:00+00:00"
    ids = {
        "env": await enqueue(
            db,
            {"command": "show_env", "params": {"x": "it's $(rm -rf /); `x`", "empty": None}},
            meta={"schedule": "nightly", "tick": tick},
        ),
        "inherit": await enqueue(db, {"command": "inherit"}),
        "permanent": await enqueue(db, {"command": "exit_permanent"}),
        "other": await enqueue(db, {"command": "exit_other"}),
        "killed": await enqueue(db, {"command": "killed"}),
        "loud": await enqueue(db, {"command": "loud"}),
        "missing": await enqueue(db, {"command": "missing"}),
        "bad_cwd": await enqueue(db, {"command": "bad_cwd"}),
        "leaves": await enqueue(db, {"command": "leaves_child"}),
    }
    rows = {name: await done(db, job_id) for name, job_id in ids.items()}

    env_row = rows["env"]
    assert env_row["state"] == "succeeded", env_row["last_error"]
    result = env_row["result"]
    assert (result["exit_code"], result["signal"], result["stderr_tail"]) == (0, None, "")
    assert result["duration_s"] >= 0
    seen = dict(line.split("=", 1) for line in result["stdout_tail"].splitlines())
    assert seen["STOKER_JOB_ID"] == str(ids["env"])
    assert seen["STOKER_ATTEMPT"] == "1"
    assert seen["STOKER_QUEUE"] == "default"
    assert seen["STOKER_KIND"] == "command.run"
    assert (seen["STOKER_SCHEDULE"], seen["STOKER_TICK"]) == ("nightly", tick)
    assert seen["STOKER_PARAM_X"] == "it's $(rm -rf /); `x`"  # a value, never shell text
    assert (seen["STOKER_PARAM_FLAG"], seen["STOKER_PARAM_COUNT"]) == ("false", "1")
    assert "STOKER_PARAM_EMPTY" not in seen  # null: no value
    assert seen["FROM_CONFIG"] == "yes"
    assert "DATABASE_URL" not in seen and "STOKER_HTTP__PORT" not in seen
    allowed = {"PATH", "HOME", "LANG", "TZ", "USER", "LOGNAME", "SHELL", "TMPDIR", "FROM_CONFIG"}
    assert {k for k in seen if not k.startswith(("STOKER_", "LC_"))} <= allowed
    assert f"show_env stdout: STOKER_JOB_ID={ids['env']}" in records(daemon, ids["env"])

    inherited = rows["inherit"]["result"]["stdout_tail"]
    assert f"DATABASE_URL={daemons.dsn}" in inherited.splitlines()
    assert "STOKER_SCHEDULE=" not in inherited

    permanent = rows["permanent"]
    assert (permanent["state"], permanent["attempts"]) == ("failed", 1)
    error = permanent["last_error"]
    assert error.startswith("PermanentJobError: command 'exit_permanent' exited with code 3")
    assert "bad input" in error and "about to fail" in error

    other = rows["other"]
    assert (other["state"], other["attempts"]) == ("failed", 2)  # retried, then gave up
    assert "command 'exit_other' exited with code 4" in other["last_error"]
    assert "flaky" in other["last_error"]
    assert "exited with code 4" in other["errors"][0]["error"]

    killed = rows["killed"]
    assert (killed["state"], killed["attempts"]) == ("failed", 2)
    assert "command 'killed' was killed by SIGKILL" in killed["last_error"]
    assert "dying" in killed["last_error"]

    tail = rows["loud"]["result"]["stdout_tail"]
    marker, kept = tail.split("\n", 1)
    assert marker.startswith("[... ") and marker.endswith(" earlier bytes cut ...]")
    assert len(kept.encode()) == 1024
    assert kept.endswith("line 2999\nTHE END\n")
    loud_log = records(daemon, ids["loud"])
    assert f"loud stdout: {'x' * MAX_LOG_LINE} [line cut]" in loud_log
    assert "loud stdout: THE END" in loud_log

    missing = rows["missing"]
    assert (missing["state"], missing["attempts"]) == ("failed", 1)
    assert "command 'missing': cannot start '/nonexistent/program'" in missing["last_error"]
    assert "No such file or directory" in missing["last_error"]
    bad_cwd = rows["bad_cwd"]
    assert (bad_cwd["state"], bad_cwd["attempts"]) == ("failed", 1)
    assert "its cwd '/nonexistent/dir' is not a directory" in bad_cwd["last_error"]

    leaves_row = rows["leaves"]
    assert leaves_row["state"] == "succeeded", leaves_row["last_error"]
    assert leaves_row["result"]["stdout_tail"] == "left\n"
    assert gone(read_pid(tmp / "background.pid"))
    assert any("left processes of its group" in m for m in records(daemon, ids["leaves"]))


async def test_timeout_stops_the_whole_group_then_retries_and_fails_with_the_output(
    daemons: DaemonFactory, db: asyncpg.Connection, strays: Path
) -> None:
    tmp = strays
    slow = script(
        tmp,
        "slow.sh",
        f"""
        echo $$ > {tmp}/main-$STOKER_ATTEMPT.pid
        # A grandchild that ignores SIGTERM: only SIGKILL stops it.
        sh -c 'trap "" TERM; echo $$ > {tmp}/grandchild-'$STOKER_ATTEMPT'.pid; exec sleep 60' &
        echo "working on it"
        echo "half way" >&2
        sleep 60
        """,
    )
    daemon = await daemons.start(
        QUEUE
        + f"""
        [commands.slow]
        argv = ["/bin/sh", "{slow}"]
        timeout = 1
        kill_grace = 0.5
        """
    )
    job_id = await enqueue(db, {"command": "slow"})
    failed = await done(db, job_id)
    assert (failed["state"], failed["attempts"]) == ("failed", 2)
    error = failed["last_error"]
    assert error.startswith("CommandError: command 'slow' timed out after 1s")
    assert "working on it" in error and "half way" in error
    assert "timed out after 1s" in failed["errors"][0]["error"]
    for attempt in (1, 2):
        main = read_pid(tmp / f"main-{attempt}.pid")
        grandchild = read_pid(tmp / f"grandchild-{attempt}.pid")
        assert gone(main) and gone(grandchild)
        assert not group_alive(main)  # no member of the group is left but zombies
    messages = records(daemon, job_id)
    assert any("ran past its timeout of 1s" in m for m in messages)
    assert any("still running 0.5s after SIGTERM; SIGKILL" in m for m in messages)


async def test_payloads_cannot_add_arguments_or_name_a_shell_line(
    daemons: DaemonFactory, db: asyncpg.Connection, tmp_path: Path
) -> None:
    marker = tmp_path / "ran"
    await daemons.start(
        QUEUE
        + f"""
        [commands.touch]
        argv = ["/bin/sh", "-c", "touch {marker}"]
        params = {{ name = "x" }}
        """
    )
    refused: dict[str, tuple[dict[str, Any], str]] = {
        "args": ({"command": "touch", "args": ["; rm -rf /"]}, "args: Extra inputs"),
        "argv": ({"command": "touch", "argv": ["/bin/rm"]}, "argv: Extra inputs"),
        "undeclared": (
            {"command": "touch", "params": {"extra": "x"}},
            "params: command 'touch' has no parameter 'extra'; a payload may only give "
            "values for declared ones: name",
        ),
        "not scalar": (
            {"command": "touch", "params": {"name": ["a", "b"]}},
            "parameter 'name' must be a string, number, boolean or null, not list",
        ),
        "shell line": (
            {"command": "echo hi; rm -rf /"},
            "command: 'echo hi; rm -rf /' is not configured (known: touch)",
        ),
        "no command": ({"params": {}}, "command: Field required"),
    }
    ids = {name: await enqueue(db, payload) for name, (payload, _) in refused.items()}
    for name, (_, expected) in refused.items():
        failed = await done(db, ids[name])
        assert (failed["state"], failed["attempts"]) == ("failed", 1), name
        assert expected in failed["last_error"], (name, failed["last_error"])
    assert not marker.exists()  # nothing ran
    ok = await done(db, await enqueue(db, {"command": "touch", "params": {"name": "y"}}))
    assert ok["state"] == "succeeded", ok["last_error"]
    assert marker.exists()  # the same command, asked properly, runs


async def test_sigterm_hands_the_job_back_after_the_group_stopped(
    daemons: DaemonFactory, db: asyncpg.Connection, strays: Path
) -> None:
    # kill_grace is longer than the engine's usual 5 s wait after cancelling at the shutdown
    # deadline: the drain waits for the command's stop_grace, so the program's SIGTERM trap
    # finishes its clean-up, and the grandchild that ignores SIGTERM is killed after the grace.
    tmp = strays
    slow = script(
        tmp,
        "graceful.sh",
        f"""
        trap 'sleep 5.5; echo cleaned > {tmp}/cleaned; exit 0' TERM
        sh -c 'trap "" TERM; echo $$ > {tmp}/grandchild.pid; exec sleep 60' &
        echo $$ > {tmp}/main.pid
        sleep 60
        """,
    )
    daemon = await daemons.start(
        "shutdown_timeout = 0.5\n"
        + QUEUE
        + f"""
        [commands.graceful]
        argv = ["/bin/sh", "{slow}"]
        kill_grace = 6.5
        """
    )
    job_id = await enqueue(db, {"command": "graceful"})
    main = await pid_file(tmp / "main.pid")
    grandchild = await pid_file(tmp / "grandchild.pid")
    started = time.monotonic()
    daemon.proc.send_signal(signal.SIGTERM)
    assert await daemon.wait_exit() == 0
    assert time.monotonic() - started > 6  # it waited for the grace, past the usual 5 s
    assert (tmp / "cleaned").read_text() == "cleaned\n"
    assert gone(main) and gone(grandchild)
    assert not group_alive(main)
    handed_back = await row(db, job_id)
    assert handed_back is not None
    assert handed_back["state"] == "queued"
    assert handed_back["attempts"] == 0  # an interrupted attempt is not counted
    assert handed_back["worker"] is None
    log = daemon.log()
    assert "handed back" in log
    assert "command graceful cancelled; stopping its process group" in log


def test_a_value_with_a_nul_is_refused() -> None:
    # PostgreSQL's jsonb cannot hold one; the model refuses it anyway.
    with pytest.raises(ValidationError, match="parameter 'a' contains a NUL character"):
        RunCommand.model_validate({"command": "x", "params": {"a": "b\x00c"}})


class Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def test_output_splits_lines_across_chunks_and_cuts_a_line_without_end() -> None:
    logger = logging.getLogger("test.command.output")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    lines = Lines()
    logger.addHandler(lines)
    try:
        output = Output("c stdout", 300, logger)
        for chunk in [b"one\ntw", b"o\r\n", b"y" * 3000, b"y" * 3000, b"z\nend"]:
            output.feed(chunk)
        output.flush()
    finally:
        logger.removeHandler(lines)
    assert lines.lines == [
        "c stdout: one",
        "c stdout: two",
        f"c stdout: {'y' * MAX_LOG_LINE} [line cut]",
        "c stdout: end",
    ]
    tail = output.tail()
    assert tail == f"[... {output.total - 300} earlier bytes cut ...]\n" + "y" * 295 + "z\nend"
    assert output.last_lines(1, 100) == "end"


def test_a_zombie_does_not_count_as_a_live_member_of_its_group() -> None:
    proc = subprocess.Popen(["true"], start_new_session=True)
    try:
        deadline = time.monotonic() + 10
        while state(proc.pid) != "Z":  # exited, not reaped yet
            assert time.monotonic() < deadline
            time.sleep(0.01)
        os.killpg(proc.pid, 0)  # the kernel still counts it...
        assert not group_alive(proc.pid)  # ...but it is gone for every purpose
    finally:
        proc.kill()
        proc.wait()
    sleeper = subprocess.Popen(["sleep", "30"], start_new_session=True)
    try:
        assert group_alive(sleeper.pid)
    finally:
        sleeper.kill()
        sleeper.wait()


def test_the_engine_lets_a_command_run_its_course_and_keeps_both_tails() -> None:
    from daemon import REGISTRY
    from daemon.config import CommandConfig

    registered = REGISTRY.get("command.run")
    assert registered is not None
    most = CommandConfig(argv=["x"], timeout="7d", kill_grace=600, output_max_bytes=16 << 20)
    assert registered.timeout is not None
    assert registered.timeout > most.timeout + most.kill_grace
    assert registered.stop_grace is not None and registered.stop_grace > most.kill_grace
    per_byte = len(json.dumps("\x01" * 1000)[1:-1]) / 1000  # the worst: \u0001 for a byte
    assert registered.max_result_bytes is not None
    assert registered.max_result_bytes > 2 * per_byte * most.output_max_bytes + 200
