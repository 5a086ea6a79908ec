"""command.run: a configured program, in a process group of its own.

The program and its arguments come only from `[commands.NAME]`, never from a payload, and it is
started without a shell. A payload names the command and may give values for the parameters the
command declares, which the program reads as STOKER_PARAM_<NAME> environment variables (never as
argv words). The program starts a session and process group of its own: on its timeout, on
cancellation (the shutdown deadline) and when it exits leaving processes behind, the whole group
gets SIGTERM, then SIGKILL after `kill_grace`, and the attempt ends only once the group is gone.
stdout and stderr are logged line by line with the job's id; the last `output_max_bytes` of each
are kept in the result (or in the error)."""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import signal
import time
from collections import deque
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from daemon import JobContext, PermanentJobError, Settings, handler, resource
from daemon.config import CommandConfig
from handlers.entries import configured_entry, with_declared_params

Logger = logging.Logger | logging.LoggerAdapter[logging.Logger]


def _config_cap(name: str) -> float:
    """The upper bound (`le`) CommandConfig puts on one of its fields."""
    for item in CommandConfig.model_fields[name].metadata:
        bound = getattr(item, "le", None)
        if bound is not None:
            return float(bound)
    raise RuntimeError(f"CommandConfig.{name} has no upper bound")


MAX_TIMEOUT = _config_cap("timeout")
MAX_KILL_GRACE = _config_cap("kill_grace")
MAX_OUTPUT = int(_config_cap("output_max_bytes"))

# The engine's own timeout must never cut a command short (the command's `timeout` governs,
# and stopping its group takes up to kill_grace more, plus the last output to be read).
HANDLER_TIMEOUT = MAX_TIMEOUT + MAX_KILL_GRACE + 60
# What the shutdown waits, once it has cancelled a running command, for the group to be gone.
STOP_GRACE = MAX_KILL_GRACE + 5
# Two tails as JSON: \uXXXX escapes make up to 6 characters of one byte (U+FFFD, controls).
MAX_RESULT_BYTES = 2 * 6 * MAX_OUTPUT + 4096

# What passes from the daemon's environment unless inherit_env: nothing that may carry a secret
# (DATABASE_URL, the STOKER_* settings).
PASSED_ENV = frozenset({"PATH", "HOME", "LANG", "TZ", "USER", "LOGNAME", "SHELL", "TMPDIR"})
MAX_LOG_LINE = 4096  # bytes of one output line in the daemon's log; the rest is cut
ERROR_LINES = 10  # last lines of each stream quoted in an error
ERROR_CHARS = 2000
# Once the group is gone, how long to wait for the rest of its output: only a process that
# left the group (setsid) can keep a pipe open longer.
OUTPUT_DRAIN = 2.0
GONE_POLL_MAX = 0.1  # longest pause between two looks at a stopping group

# Starting the program failed in a way that retrying on the same configuration will not fix:
# the program or the working directory is missing or not executable, the arguments or the
# environment are too long. A deploy in progress could make a program briefly missing, but a
# misconfiguration is far more likely, and retries with backoff would hide it for hours; the
# failed job names the command and argv[0], and `stoker jobs retry` runs it again once fixed.
# Anything else (no memory, too many processes or open files) is transient and retries.
PERMANENT_SPAWN_ERRORS = frozenset(
    {errno.ENOENT, errno.ENOTDIR, errno.EACCES, errno.EPERM, errno.ENOEXEC, errno.E2BIG}
)
SCALARS = (str, int, float, bool, type(None))


class CommandError(Exception):
    """A failed run the queue's backoff may retry: an exit code, a signal, a timeout."""


@dataclass(frozen=True)
class Commands:
    """The configured [commands]."""

    commands: dict[str, CommandConfig]


class RunCommand(BaseModel):
    model_config = ConfigDict(extra="forbid")
    command: str = Field(min_length=1, max_length=200)
    params: dict[str, Any] = Field(default_factory=dict)

    @field_validator("params")
    @classmethod
    def _scalars(cls, value: dict[str, Any]) -> dict[str, Any]:
        for name, item in value.items():
            if not isinstance(item, SCALARS):
                raise ValueError(
                    f"parameter {name!r} must be a string, number, boolean or null, "
                    f"not {type(item).__name__}"
                )
            if "\x00" in name or (isinstance(item, str) and "\x00" in item):
                raise ValueError(f"parameter {name!r} contains a NUL character")
        return value


@resource(Commands)
@asynccontextmanager
async def commands(settings: Settings) -> AsyncIterator[Commands]:
    yield Commands(dict(settings.commands))


@handler(
    "command.run",
    payload=RunCommand,
    timeout=HANDLER_TIMEOUT,
    stop_grace=STOP_GRACE,
    max_result_bytes=MAX_RESULT_BYTES,
)
async def run_command(ctx: JobContext, req: RunCommand) -> dict[str, Any]:
    configured = ctx.resource(Commands).commands
    command = configured_entry(configured, req.command, field="command", section="commands")
    params = with_declared_params("command", req.command, command.params, req.params)
    env = command_env(ctx, command, params, os.environ)
    return await CommandRun(ctx, req.command, command).run(env)


def command_env(
    ctx: JobContext,
    command: CommandConfig,
    params: Mapping[str, Any],
    daemon_env: Mapping[str, str],
) -> dict[str, str]:
    """The program's environment: a few harmless variables of the daemon's (all of them with
    inherit_env), the command's `env`, its parameters and the job's identity."""
    if command.inherit_env:
        env = dict(daemon_env)
    else:
        env = {k: v for k, v in daemon_env.items() if k in PASSED_ENV or k.startswith("LC_")}
    env.update(command.env)
    for name, value in params.items():
        if value is not None:  # a parameter without a value is left unset
            env[f"STOKER_PARAM_{name.upper()}"] = _env_text(value)
    env.update(
        STOKER_JOB_ID=str(ctx.id),
        STOKER_ATTEMPT=str(ctx.attempt),
        STOKER_QUEUE=ctx.queue,
        STOKER_KIND=ctx.kind,
    )
    for key in ("schedule", "tick"):  # set by the scheduler in the meta of the jobs it fires
        value = ctx.meta.get(key)
        name = f"STOKER_{key.upper()}"
        if isinstance(value, str) and "\x00" not in value:
            env[name] = value
        else:
            env.pop(name, None)  # an inherited one would be another job's
    return env


def _env_text(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


class Pipes(asyncio.SubprocessProtocol):
    """The program's stdout and stderr as they come, and its exit. (asyncio's Process.wait()
    on the standard event loop does not return before every holder of its pipes has exited,
    so a process left behind in the group would hide the program's own exit.)"""

    def __init__(self, outputs: dict[int, Output]) -> None:
        self.outputs = outputs
        self.exited = asyncio.Event()
        self.closed = asyncio.Event()  # both pipes at their end
        self._open = set(outputs)

    def pipe_data_received(self, fd: int, data: bytes | str) -> None:
        self.outputs[fd].feed(data.encode() if isinstance(data, str) else data)

    def pipe_connection_lost(self, fd: int, exc: Exception | None) -> None:
        self.outputs[fd].flush()
        self._open.discard(fd)
        if not self._open:
            self.closed.set()

    def process_exited(self) -> None:
        self.exited.set()


class CommandRun:
    """One attempt: start the program, stream its output, stop its group, judge its exit."""

    def __init__(self, ctx: JobContext, name: str, command: CommandConfig) -> None:
        self.ctx = ctx
        self.name = name
        self.command = command
        cap = command.output_max_bytes
        self.stdout = Output(f"{name} stdout", cap, ctx.log)
        self.stderr = Output(f"{name} stderr", cap, ctx.log)

    async def run(self, env: dict[str, str]) -> dict[str, Any]:
        command, log = self.command, self.ctx.log
        started = time.monotonic()
        transport, pipes = await self._start(env)
        group = transport.get_pid()  # start_new_session: the program leads a group of its own
        timed_out = False
        try:
            try:
                async with asyncio.timeout(command.timeout):
                    await pipes.exited.wait()
            except TimeoutError:
                timed_out = True
                log.warning(
                    "command %s ran past its timeout of %gs; stopping its process group %d",
                    self.name,
                    command.timeout,
                    group,
                )
                await stop_group(group, command.kill_grace, log)
            else:
                if group_alive(group):
                    log.warning(
                        "command %s %s but left processes of its group %d running; stopping them",
                        self.name,
                        _status(transport.get_returncode()),
                        group,
                    )
                    await stop_group(group, command.kill_grace, log)
            await pipes.exited.wait()  # reaped: its exit status is known
            await self._rest_of_output(pipes)
        except asyncio.CancelledError:
            # The shutdown deadline (or the engine's own timeout): stop the group, then let
            # the cancellation through so that the job is handed back.
            if group_alive(group):
                log.warning("command %s cancelled; stopping its process group %d", self.name, group)
                await stop_group(group, command.kill_grace, log)
            raise
        finally:
            transport.close()
        return self._outcome(transport.get_returncode(), timed_out, time.monotonic() - started)

    async def _start(self, env: dict[str, str]) -> tuple[asyncio.SubprocessTransport, Pipes]:
        command = self.command
        program = command.argv[0]
        if command.cwd is not None and not command.cwd.is_dir():
            raise PermanentJobError(
                f"command {self.name!r}: cannot start {program!r}: its cwd {str(command.cwd)!r} "
                "is not a directory"
            )
        loop = asyncio.get_running_loop()
        try:
            # exec, never a shell: argv exactly as configured.
            return await loop.subprocess_exec(
                lambda: Pipes({1: self.stdout, 2: self.stderr}),
                program,
                *command.argv[1:],
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                cwd=command.cwd,
                env=env,
                start_new_session=True,
            )
        except OSError as exc:
            reason = exc.strerror or str(exc)
            where = f" (cwd {str(command.cwd)!r})" if command.cwd is not None else ""
            message = f"command {self.name!r}: cannot start {program!r}{where}: {reason}"
            if exc.errno in PERMANENT_SPAWN_ERRORS:
                raise PermanentJobError(message) from exc
            raise CommandError(message) from exc

    async def _rest_of_output(self, pipes: Pipes) -> None:
        """The group is gone: what it wrote is in the pipes; read it to the end."""
        try:
            async with asyncio.timeout(OUTPUT_DRAIN):
                await pipes.closed.wait()
        except TimeoutError:
            self.ctx.log.warning(
                "command %s: a process outside its group (it called setsid?) still holds its "
                "output open; not waiting for it",
                self.name,
            )

    def _outcome(self, code: int | None, timed_out: bool, seconds: float) -> dict[str, Any]:
        command = self.command
        if timed_out:
            raise CommandError(
                f"command {self.name!r} timed out after {command.timeout:g}s; its process group "
                f"was stopped{self._last_lines()}"
            )
        assert code is not None
        if code == 0:
            self.ctx.log.info("command %s succeeded in %.1fs", self.name, seconds)
            return {
                "exit_code": 0,
                "signal": None,
                "duration_s": round(seconds, 3),
                "stdout_tail": self.stdout.tail(),
                "stderr_tail": self.stderr.tail(),
            }
        message = f"command {self.name!r} {_status(code)} after {seconds:.1f}s{self._last_lines()}"
        if code in command.permanent_exit_codes:
            raise PermanentJobError(message)
        raise CommandError(message)

    def _last_lines(self) -> str:
        parts = [
            f"\n--- {output.label}, last lines ---\n{text}"
            for output in (self.stderr, self.stdout)
            if (text := output.last_lines(ERROR_LINES, ERROR_CHARS))
        ]
        return "".join(parts) if parts else "\n(no output)"


def _status(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"was killed by {name}"
    return f"exited with code {code}"


class Output:
    """One of the program's streams: logged line by line (a line cut at MAX_LOG_LINE bytes,
    so that a huge line without a newline cannot grow without bound), its last `cap` bytes
    kept."""

    def __init__(self, label: str, cap: int, log: Logger) -> None:
        self.label = label
        self.cap = cap
        self.log = log
        self.total = 0
        self._chunks: deque[bytes] = deque()
        self._kept = 0
        self._line = bytearray()
        self._skipping = False  # the rest of a line already logged, cut

    def feed(self, chunk: bytes) -> None:
        self.total += len(chunk)
        self._chunks.append(chunk)
        self._kept += len(chunk)
        while self._kept - len(self._chunks[0]) >= self.cap:  # whole chunks beyond the tail
            self._kept -= len(self._chunks.popleft())
        start = 0
        while (end := chunk.find(b"\n", start)) >= 0:
            self._end_line(chunk[start:end])
            start = end + 1
        if start < len(chunk) and not self._skipping:
            self._line += chunk[start : start + MAX_LOG_LINE + 1 - len(self._line)]
            if len(self._line) > MAX_LOG_LINE:
                self._emit(bytes(self._line[:MAX_LOG_LINE]), cut=True)
                self._line.clear()
                self._skipping = True

    def flush(self) -> None:
        """End of the stream: a last line without a newline."""
        if self._line:
            self._end_line(b"")

    def _end_line(self, piece: bytes) -> None:
        if self._skipping:
            self._skipping = False
            return
        if self._line:
            self._line += piece[: MAX_LOG_LINE + 1]
            piece = bytes(self._line)
            self._line.clear()
        self._emit(piece[:MAX_LOG_LINE], cut=len(piece) > MAX_LOG_LINE)

    def _emit(self, line: bytes, *, cut: bool) -> None:
        text = line.rstrip(b"\r").decode("utf-8", errors="replace")
        self.log.info("%s: %s%s", self.label, text, " [line cut]" if cut else "")

    def tail(self) -> str:
        """The last `cap` bytes as text, marked when earlier output was left out."""
        data = b"".join(self._chunks)[-self.cap :]
        # jsonb cannot hold U+0000 (`find -print0`): shown as the error texts show it.
        text = data.decode("utf-8", errors="replace").replace("\x00", "\\0")
        left_out = self.total - len(data)
        return f"[... {left_out} earlier bytes cut ...]\n{text}" if left_out else text

    def last_lines(self, lines: int, chars: int) -> str:
        kept = self.tail().rstrip("\n").splitlines()[-lines:]
        text = "\n".join(kept)
        return text if len(text) <= chars else "..." + text[-chars:]


# -- the process group ----------------------------------------------------------------------


def group_alive(pgid: int) -> bool:
    """Is any process of the group alive? Zombies do not count: an orphan reparented to an
    init that does not reap it stays one forever, and is gone for every purpose but its row.
    Reads /proc; where there is none, asks the kernel (which counts zombies)."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # a member we may not signal: it exists
    try:
        entries = os.listdir("/proc")
    except OSError:
        return True
    if "self" not in entries:
        return True  # no procfs mounted there
    for entry in reversed(entries):  # newest first: a live member is found sooner
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as file:
                stat = file.read()
        except OSError:
            continue  # it has ended meanwhile
        # "pid (comm) state ppid pgrp ...": comm may hold spaces and parentheses.
        fields = stat[stat.rfind(b")") + 2 :].split()
        if len(fields) > 2 and fields[2] == str(pgid).encode() and fields[0] not in (b"Z", b"X"):
            return True
    return False


def signal_group(pgid: int, sig: signal.Signals) -> None:
    with suppress(ProcessLookupError):
        os.killpg(pgid, sig)


async def wait_gone(pgid: int, seconds: float) -> bool:
    """Wait up to `seconds` for the group to be gone; is it?"""
    deadline = time.monotonic() + seconds
    pause = 0.01
    while group_alive(pgid):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        await asyncio.sleep(min(pause, remaining))
        pause = min(pause * 2, GONE_POLL_MAX)
    return True


async def stop_group(pgid: int, grace: float, log: Logger) -> None:
    """SIGTERM to the group, SIGKILL after `grace` seconds (at once if cancelled meanwhile);
    return (or re-raise the cancellation) only once the whole group is gone."""
    if not group_alive(pgid):
        return
    signal_group(pgid, signal.SIGTERM)
    try:
        if await wait_gone(pgid, grace):
            return
    except asyncio.CancelledError:
        log.warning("process group %d: cancelled again; SIGKILL now", pgid)
        await kill_group(pgid, log)
        raise
    log.warning("process group %d still running %gs after SIGTERM; SIGKILL", pgid, grace)
    await kill_group(pgid, log)


async def kill_group(pgid: int, log: Logger) -> None:
    """SIGKILL the group until it is gone. A cancellation meanwhile is held back until then:
    SIGKILL cannot be caught, so this is a matter of milliseconds (unless a process is stuck
    in the kernel, which nothing can help; it is logged)."""
    cancelled: asyncio.CancelledError | None = None
    waited = 0.0
    while True:
        signal_group(pgid, signal.SIGKILL)
        try:
            if await wait_gone(pgid, 1.0):
                break
        except asyncio.CancelledError as exc:
            cancelled = exc
            continue
        waited += 1.0
        if waited in (5.0, 60.0):
            log.error("process group %d survives SIGKILL after %gs; still waiting", pgid, waited)
    if cancelled is not None:
        raise cancelled
