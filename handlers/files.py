"""files.cleanup: old files in a directory, or the files rows name, deleted inside a root.

A task is configured as `[file_tasks.NAME]` and a payload only names it: `{"task": "NAME"}`,
plus `"dry_run": true` to report what would be deleted without deleting anything (a payload
may turn a dry run on, never off). Two kinds:

- a directory sweep: the files in `directory` (and below it, if `recursive`) whose names match
  `pattern` and that were modified more than `older_than` seconds ago. Symlinked directories
  are never followed; a symlink is deleted as the link itself, and one pointing outside the
  directory is refused.
- a query cleanup: `query` returns `id` and `path` of files nothing references any more; the
  job pages through it by id, `batch_size` rows at a time, unlinks each file inside `root`, then
  runs `delete_statement` with `:ids` bound to the ids whose file is gone (deleted now, or
  missing already). A file that cannot be deleted keeps its row.

Every path must resolve inside the root (or directory): one with a `..` component, or whose
symlinks lead outside, is refused and named. Files that cannot be deleted are skipped and
counted `failed`; the job itself succeeds. Disk work runs in a worker thread, one batch at a
time, so the event loop never waits on the disk; the query runs on a connection of its own with
`statement_timeout`, each statement its own short transaction (no snapshot held for the length
of a cleanup).

A job cancelled (its timeout, or a shutdown handing it back) while a worker thread is busy lets
the cancellation through at once, after waiting at most for one unlink under way: the thread,
which cannot be interrupted, unlinks nothing more and stops at its next file. So no file is
deleted after the job has ended. In a query cleanup the rows of the files already deleted in
that batch stay; the next run finds their files missing and deletes them."""

from __future__ import annotations

import asyncio
import errno
import fnmatch
import os
import stat
import threading
import time
from collections.abc import AsyncIterator, Generator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path, PurePosixPath
from typing import Any, TypeVar

import asyncpg
from pydantic import BaseModel, ConfigDict, Field

from daemon import JobContext, PermanentJobError, Settings, handler, resource
from daemon.config import FileTaskConfig
from handlers.entries import configured_entry
from handlers.params import bind, coerce
from handlers.sql import rows_touched

NAMED = 20  # paths named per job: refused ones in the result, problems in the log
T = TypeVar("T")


@dataclass(frozen=True)
class FileTasks:
    """The configured [file_tasks], and the database a query cleanup runs in."""

    tasks: dict[str, FileTaskConfig]
    database_url: str = field(repr=False)  # may hold a password


class Cleanup(BaseModel):
    model_config = ConfigDict(extra="forbid")
    task: str = Field(min_length=1)
    dry_run: bool | None = Field(None, description="true: delete nothing (never turns one off)")


class Gate:
    """Lets a job's worker threads unlink only while the job runs. A cancelled job closes it
    before its cancellation goes through, so no file is unlinked after the job has ended."""

    def __init__(self) -> None:
        self._lock = threading.Lock()  # held by a thread for one check and unlink
        self.closed = False  # read by the threads without the lock: stop at the next file

    def unlink(self, path: str) -> bool:
        """Unlink `path` (in a worker thread), unless the gate is closed: then False."""
        with self._lock:
            if self.closed:
                return False
            os.unlink(path)  # a symlink itself, never its target
            return True

    async def close(self) -> None:
        """Close the gate, once an unlink under way (at most one) has finished. Polled, so the
        event loop never blocks on the disk; cancelled again meanwhile, it keeps waiting."""
        while not self._lock.acquire(blocking=False):
            try:
                await asyncio.sleep(0.002)
            except asyncio.CancelledError:
                continue  # one unlink is bounded; the caller re-raises its cancellation
        self.closed = True
        self._lock.release()


@dataclass
class Tally:
    """What a job did. Worker threads fill it in one batch at a time, and the event loop reads
    it between batches (never both at once). A cancelled job closes the gate and ends without
    waiting for the thread, which may still count the file it was at when the job ended."""

    dry_run: bool
    deleted: int = 0
    missing: int = 0
    failed: int = 0
    would_delete: int = 0
    refused_total: int = 0
    refused: list[str] = field(default_factory=list)  # the first NAMED
    sample: list[str] = field(default_factory=list)  # a dry run's first NAMED deletions
    problems: int = 0
    unlogged: list[str] = field(default_factory=list)  # the first NAMED, logged batch by batch
    gate: Gate = field(default_factory=Gate, repr=False)

    def refuse(self, shown: str, why: str) -> None:
        self.failed += 1
        self.refused_total += 1
        if len(self.refused) < NAMED:
            self.refused.append(shown)
        self.problem(f"refused {shown}: {why}")

    def problem(self, text: str) -> None:
        self.problems += 1
        if self.problems <= NAMED:
            self.unlogged.append(text)
        elif self.problems == NAMED + 1:
            self.unlogged.append(f"more problems: only the first {NAMED} are logged")

    def log_problems(self, ctx: JobContext, name: str) -> None:
        for text in self.unlogged:
            ctx.log.warning("file task %s: %s", name, text)
        self.unlogged.clear()


@resource(FileTasks)
@asynccontextmanager
async def file_tasks(settings: Settings) -> AsyncIterator[FileTasks]:
    yield FileTasks(dict(settings.file_tasks), settings.database_url)


@handler("files.cleanup", payload=Cleanup)
async def cleanup(ctx: JobContext, run: Cleanup) -> dict[str, Any]:
    configured = ctx.resource(FileTasks)
    task = configured_entry(configured.tasks, run.task, field="task", section="file_tasks")
    if task.dry_run and run.dry_run is False:
        ctx.log.warning(
            "file task %s: dry_run = true in its configuration; a payload cannot turn it off",
            run.task,
        )
    tally = Tally(dry_run=task.dry_run or bool(run.dry_run))
    started = time.monotonic()
    extra: dict[str, Any] = {}
    try:
        if task.directory is not None:
            await _sweep(ctx, run.task, task, task.directory, tally)
        else:
            extra = await _query_cleanup(ctx, run.task, task, configured.database_url, tally)
    finally:
        tally.log_problems(ctx, run.task)
    elapsed = time.monotonic() - started
    if tally.dry_run:
        ctx.log.info(
            "file task %s (dry run): would delete %d files, %d missing, %d failed "
            "(%d refused), %.1fs",
            run.task,
            tally.would_delete,
            tally.missing,
            tally.failed,
            tally.refused_total,
            elapsed,
        )
    else:
        ctx.log.info(
            "file task %s: %d files deleted, %d missing, %d failed (%d refused), %.1fs",
            run.task,
            tally.deleted,
            tally.missing,
            tally.failed,
            tally.refused_total,
            elapsed,
        )
    result: dict[str, Any] = {
        "task": run.task,
        "deleted": tally.deleted,
        "missing": tally.missing,
        "failed": tally.failed,
        "refused": tally.refused,
        "dry_run": tally.dry_run,
    }
    if tally.dry_run:
        result.update(would_delete=tally.would_delete, sample=tally.sample)
    return {**result, **extra, "seconds": round(elapsed, 3)}


# -- paths -------------------------------------------------------------------------------------


def real_directory(name: str, what: str, place: Path) -> str:
    """The real path of the task's root or directory, which must exist and not be /."""
    real = os.path.realpath(place)
    if real.strip("/") == "":  # e.g. a symlink to /: every file on the system would be inside
        raise PermanentJobError(
            f"task {name!r}: {what} {str(place)!r} resolves to {real}, the filesystem root; "
            f"point {what} at a directory below it"
        )
    if not os.path.isdir(real):
        raise PermanentJobError(
            f"task {name!r}: {what} {str(place)!r} does not exist or is not a directory"
        )
    return real


def refusal(root_real: str, candidate: str) -> str | None:
    """Why `candidate` may not be unlinked, or None when it may: it has no `..` component and
    its real path (every symlink resolved, the last component's too) lies strictly inside
    `root_real`. A symlink that passes is unlinked as the link itself, never its target.

    A race remains (time of check to time of use): between this check and the unlink, someone
    able to write inside the root could replace a parent directory of the candidate with a
    symlink to somewhere else, and the unlink would follow it. Closing that would take walking
    every component with openat(O_NOFOLLOW) and unlinkat; the roots this handler cleans are
    written by the application itself, which is trusted not to race it."""
    if ".." in PurePosixPath(candidate).parts:
        return "has a .. component"
    try:
        real = os.path.realpath(candidate)
    except (OSError, ValueError) as exc:  # ValueError: a NUL byte
        return f"is not a usable path ({exc})"
    if real == root_real:
        return f"is {root_real} itself"
    if os.path.commonpath([root_real, real]) != root_real:
        return f"resolves to {real}, outside {root_real}"
    return None


def remove(path: str, shown: str, root_real: str, tally: Tally) -> bool:
    """Unlink one file (in a worker thread): True when it is gone, deleted now or missing
    already, so that its row may go too. A dry run looks instead of unlinking. Once the job
    has ended (its gate closed), nothing is done and it is False."""
    if tally.gate.closed:
        return False
    why = refusal(root_real, path)
    if why is not None:
        tally.refuse(shown, why)
        return False
    try:
        if tally.dry_run:
            if stat.S_ISDIR(os.lstat(path).st_mode):
                raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR))
            tally.would_delete += 1
            if len(tally.sample) < NAMED:
                tally.sample.append(shown)
        elif tally.gate.unlink(path):
            tally.deleted += 1
        else:
            return False  # the job has ended
    except (FileNotFoundError, NotADirectoryError):  # gone, or a parent is no directory
        tally.missing += 1
    except OSError as exc:  # a directory, permission, a read-only or busy file system
        tally.failed += 1
        tally.problem(f"could not delete {shown}: {exc.strerror or exc}")
        return False
    return True


# -- a directory sweep -------------------------------------------------------------------------


def old_files(
    directory: str, pattern: str, cutoff: float, recursive: bool, tally: Tally
) -> Generator[str, None, None]:
    """Files and symlinks below `directory` named like `pattern` and modified (the link
    itself, for a symlink) before `cutoff`. Symlinked directories are never entered. Stops
    when the job has ended (its gate closed)."""
    pending = [directory]
    while pending and not tally.gate.closed:
        current = pending.pop()
        try:
            listing = os.scandir(current)
        except OSError as exc:
            if current == directory:
                raise  # the job's own directory: retry (it was there a moment ago)
            tally.failed += 1
            tally.problem(f"could not list {current}: {exc.strerror or exc}")
            continue
        with listing:
            for entry in listing:
                if tally.gate.closed:
                    return
                try:
                    if entry.is_dir(follow_symlinks=False):
                        if recursive:
                            pending.append(entry.path)
                        continue
                    if not fnmatch.fnmatchcase(entry.name, pattern):
                        continue
                    info = entry.stat(follow_symlinks=False)
                except FileNotFoundError:  # gone since the listing
                    continue
                except OSError as exc:
                    tally.failed += 1
                    tally.problem(f"could not look at {entry.path}: {exc.strerror or exc}")
                    continue
                kind = stat.S_IFMT(info.st_mode)
                if kind in (stat.S_IFREG, stat.S_IFLNK) and info.st_mtime < cutoff:
                    yield entry.path


def sweep_batch(files: Iterator[str], size: int, root_real: str, tally: Tally) -> bool:
    """Take up to `size` more files from the listing and delete them (in a worker thread);
    False when the listing is exhausted."""
    batch = list(islice(files, size))
    for path in batch:
        remove(path, path, root_real, tally)
    return len(batch) == size and not tally.gate.closed


async def in_thread(batch: asyncio.Future[T], tally: Tally) -> T:
    """The result of `batch`, a worker thread's disk work. Cancelled meanwhile, the job closes
    its gate (waiting at most for one unlink under way) and the cancellation goes through; the
    thread, which cannot be interrupted, deletes nothing more and stops at its next file. The
    shield keeps `batch` itself running, so that its end can still be seen (and an error it
    raises is marked retrieved rather than logged as lost)."""
    try:
        return await asyncio.shield(batch)
    except asyncio.CancelledError:
        await tally.gate.close()
        raise


async def _sweep(
    ctx: JobContext, name: str, task: FileTaskConfig, directory: Path, tally: Tally
) -> None:
    # Walked from its real path, so no path below it has a `..` or a symlink in its parents.
    root_real = await asyncio.to_thread(real_directory, name, "directory", directory)
    cutoff = time.time() - (task.older_than or 0.0)
    files = old_files(root_real, task.pattern, cutoff, task.recursive, tally)
    batch: asyncio.Future[bool] | None = None
    try:
        while True:
            batch = asyncio.ensure_future(
                asyncio.to_thread(sweep_batch, files, task.batch_size, root_real, tally)
            )
            if not await in_thread(batch, tally):
                break
            tally.log_problems(ctx, name)
    finally:
        # The listing is closed where no thread is inside it: a cancelled job's thread may
        # still be (a generator cannot be closed while it runs), so then once it has finished.
        if batch is None or batch.done():
            files.close()
        else:
            batch.add_done_callback(lambda _: files.close())


# -- a query cleanup ---------------------------------------------------------------------------

AFTER = object()  # placeholders for values bound batch by batch
IDS = object()


def remove_rows(rows: list[asyncpg.Record], root_real: str, tally: Tally) -> list[Any]:
    """Unlink the files of a batch of rows (in a worker thread); the ids whose file is gone."""
    gone = []
    for row in rows:
        if tally.gate.closed:  # the job has ended
            break
        path = row["path"]
        if not isinstance(path, str) or not path:
            tally.refuse(f"(row id {row['id']!r}: no path)", "the query returned no path")
            continue
        # Relative to the root, or absolute (then it must still resolve inside the root).
        if remove(os.path.join(root_real, path), path, root_real, tally):
            gone.append(row["id"])
    return gone


async def _query_cleanup(
    ctx: JobContext, name: str, task: FileTaskConfig, dsn: str, tally: Tally
) -> dict[str, Any]:
    assert task.query is not None and task.delete_statement is not None and task.root is not None
    root_real = await asyncio.to_thread(real_directory, name, "root", task.root)
    values: dict[str, Any] = {**task.params, "batch_size": task.batch_size}
    query = task.query.strip().rstrip(";").rstrip()
    # The user's query, paged by id (keyset): the first page, then the pages after the last id
    # seen. The newline keeps a trailing -- comment from swallowing the closing parenthesis.
    page = f"SELECT id, path FROM (\n{query}\n) AS orphan"
    first_sql = f"{page} ORDER BY id LIMIT :batch_size"
    next_sql = f"{page} WHERE id > :after_id ORDER BY id LIMIT :batch_size"
    conn = await asyncpg.connect(
        dsn,
        server_settings={
            "application_name": f"stoker files.cleanup {name}"[:63],
            "statement_timeout": str(int(task.statement_timeout * 1000)),
        },
    )
    rows_deleted = batches = 0
    try:
        first, first_args = await _prepare(conn, name, "query", first_sql, values)
        following, next_args = await _prepare(
            conn, name, "query", next_sql, {**values, "after_id": AFTER}
        )
        delete, delete_args = await _prepare(
            conn, name, "delete_statement", task.delete_statement, {**values, "ids": IDS}
        )
        after: Any = None
        while True:
            if batches == 0:
                rows = await _execute(name, "query", first, first_args)
            else:
                args = [after if a is AFTER else a for a in next_args]
                rows = await _execute(name, "query", following, args)
            if not rows:
                break
            batches += 1
            gone = await in_thread(
                asyncio.ensure_future(asyncio.to_thread(remove_rows, rows, root_real, tally)), tally
            )
            if gone and not tally.dry_run:
                args = [gone if a is IDS else a for a in delete_args]
                await _execute(name, "delete_statement", delete, args)
                rows_deleted += rows_touched(delete.get_statusmsg())
            tally.log_problems(ctx, name)
            after = rows[-1]["id"]
            if len(rows) < task.batch_size or after is None:
                break
    finally:
        await conn.close()
    return {"rows": rows_deleted, "batches": batches}


async def _prepare(
    conn: asyncpg.Connection, name: str, what: str, statement: str, values: dict[str, Any]
) -> tuple[Any, list[Any]]:
    """A prepared statement with its `:name` placeholders bound (as in sql.batch), and its
    arguments typed as PostgreSQL asks (values from the environment arrive as text)."""
    sql, args = bind(statement, values)
    try:
        prepared = await conn.prepare(sql)
    except (asyncpg.SyntaxOrAccessError, asyncpg.DataError) as exc:
        hint = ""
        if what == "query" and isinstance(exc, asyncpg.UndefinedColumnError):
            hint = " (the query must return columns named id and path)"
        raise PermanentJobError(
            f"task {name!r}: {what}: {type(exc).__name__}: {exc}{hint}"
        ) from exc
    types = prepared.get_parameters()
    if len(types) != len(args):
        raise PermanentJobError(
            f"task {name!r}: {what} has {len(types)} parameters but {len(args)} placeholders "
            "were bound; write parameters only as :name"
        )
    for value, type_ in zip(args, types, strict=True):
        if value is IDS and type_.kind != "array":
            raise PermanentJobError(
                f"task {name!r}: delete_statement must take :ids as an array of the ids, "
                f"e.g. WHERE id = ANY(:ids), not as a {type_.name}"
            )
    if what == "delete_statement" and IDS not in args:
        raise PermanentJobError(f"task {name!r}: delete_statement must use :ids in its SQL")
    label = f"task {name!r}"
    return prepared, [coerce(label, v, t.name) for v, t in zip(args, types, strict=True)]


async def _execute(name: str, what: str, prepared: Any, args: list[Any]) -> list[asyncpg.Record]:
    try:
        rows: list[asyncpg.Record] = await prepared.fetch(*args)
    except asyncpg.QueryCanceledError as exc:  # statement_timeout: try again later
        raise RuntimeError(f"task {name!r}: {what} timed out: {exc}") from exc
    except (
        asyncpg.SyntaxOrAccessError,
        asyncpg.DataError,
        asyncpg.IntegrityConstraintViolationError,
    ) as exc:
        raise PermanentJobError(f"task {name!r}: {what}: {type(exc).__name__}: {exc}") from exc
    return rows
