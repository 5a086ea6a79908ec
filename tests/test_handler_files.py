"""files.cleanup with a real daemon on real files and real tables: old temporary files swept
(recursively or not), orphaned uploads deleted with their rows page by page, files that cannot
be deleted kept with their rows, paths that escape the root refused and named, dry runs that
touch nothing, and clear failures."""

from __future__ import annotations

import asyncio
import datetime as dt
import fnmatch
import inspect
import os
import re
import threading
import time
from collections.abc import Generator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from pydantic import ValidationError

import handlers.files
from daemon import JobContext, PermanentJobError
from daemon.config import FileTaskConfig
from handlers.files import Cleanup, FileTasks, Gate, Tally, cleanup, real_directory, refusal, remove
from tests.conftest import DaemonFactory, eventually, finished

HOURS = 3600.0


def make(path: Path, age: float = 0.0) -> Path:
    """A file `age` seconds old (by modification time)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(path.name, encoding="utf-8")
    if age:
        when = time.time() - age
        os.utime(path, (when, when))
    return path


def link(path: Path, target: Path, age: float = 0.0) -> Path:
    """A symlink, itself `age` seconds old."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.symlink_to(target)
    if age:
        when = time.time() - age
        os.utime(path, (when, when), follow_symlinks=False)
    return path


def present(*paths: Path) -> list[bool]:
    return [os.path.lexists(p) for p in paths]


async def run(db: asyncpg.Connection, payload: dict[str, Any]) -> asyncpg.Record:
    job_id = await db.fetchval("SELECT stoker.enqueue('default', 'files.cleanup', $1)", payload)
    return await finished(db, job_id)


async def succeeded(db: asyncpg.Connection, payload: dict[str, Any]) -> dict[str, Any]:
    row = await run(db, payload)
    assert row["state"] == "succeeded", row["last_error"]
    result: dict[str, Any] = row["result"]
    return result


# -- a directory sweep -------------------------------------------------------------------------


async def test_a_sweep_deletes_old_matching_files_only_and_refuses_escaping_links(
    daemons: DaemonFactory, db: asyncpg.Connection, tmp_path: Path
) -> None:
    scratch, outside = tmp_path / "scratch", tmp_path / "outside"
    old = [make(scratch / f"old{i}.tmp", age=2 * HOURS) for i in range(5)]
    new = make(scratch / "new.tmp", age=0.5 * HOURS)
    other = make(scratch / "old.keep", age=2 * HOURS)  # old, but not *.tmp
    nested = [make(scratch / "sub/old.tmp", 2 * HOURS), make(scratch / "sub/a/b.tmp", 2 * HOURS)]
    nested_new = make(scratch / "sub/new.tmp")
    secret = make(outside / "secret.tmp", age=2 * HOURS)
    escape = link(scratch / "escape.tmp", secret, age=2 * HOURS)  # an old link leading outside
    alias = link(scratch / "alias.tmp", new, age=2 * HOURS)  # an old link to a file inside
    behind = make(outside / "dir/old.tmp", age=2 * HOURS)
    link(scratch / "linked", outside / "dir")  # a symlinked directory: never entered
    link(scratch / "sub/linked.tmp", outside / "dir")  # matches, old, but leads outside
    os.utime(scratch / "sub/linked.tmp", (0, 0), follow_symlinks=False)
    daemon = await daemons.start(
        f"""
        [file_tasks.tmp_flat]
        directory = "{scratch}"
        pattern = "*.tmp"
        older_than = "1h"
        batch_size = 2

        [file_tasks.tmp_deep]
        directory = "{scratch}"
        pattern = "*.tmp"
        older_than = 3600
        recursive = true
        """
    )
    real = os.path.realpath(scratch)

    dry = await succeeded(db, {"task": "tmp_deep", "dry_run": True})
    assert dry["dry_run"] is True
    assert (dry["deleted"], dry["would_delete"], dry["failed"]) == (0, 5 + 2 + 1, 2)
    assert sorted(dry["refused"]) == [f"{real}/escape.tmp", f"{real}/sub/linked.tmp"]
    assert f"{real}/alias.tmp" in dry["sample"]
    assert all(present(*old, new, other, *nested, nested_new, escape, alias, secret, behind))

    flat = await succeeded(db, {"task": "tmp_flat"})
    assert (flat["deleted"], flat["missing"], flat["failed"]) == (5 + 1, 0, 1)  # + the alias
    assert flat["refused"] == [f"{real}/escape.tmp"]
    assert flat["dry_run"] is False and "would_delete" not in flat
    assert present(*old, alias) == [False] * 6
    assert all(present(new, other, *nested, nested_new, escape, secret, behind))

    deep = await succeeded(db, {"task": "tmp_deep"})
    assert (deep["deleted"], deep["missing"], deep["failed"]) == (2, 0, 2)
    assert present(*nested) == [False, False]
    assert all(present(new, other, nested_new, escape, secret, behind, scratch / "sub/a"))
    log = daemon.log()
    assert f"refused {real}/escape.tmp: resolves to {os.path.realpath(secret)}, outside" in log
    assert "file task tmp_deep: 2 files deleted, 0 missing, 2 failed (2 refused)" in log


# -- a query cleanup ---------------------------------------------------------------------------

ORPHANS = """
[file_tasks.orphans]
query = '''
SELECT f.id, f.path FROM uploaded_files f
 WHERE f.uploaded_at < now() - make_interval(hours => :grace_hours)
   AND NOT EXISTS (SELECT 1 FROM users u WHERE u.avatar_id = f.id)  -- unreferenced
'''
delete_statement = "DELETE FROM uploaded_files WHERE id = ANY(:ids) AND path IS NOT NULL"
params = {{ grace_hours = 24 }}
root = "{root}"
batch_size = 3
"""


@pytest.fixture
async def uploads(db: asyncpg.Connection) -> asyncpg.Connection:
    await db.execute(
        """CREATE TABLE uploaded_files (
               id serial PRIMARY KEY, path text,
               uploaded_at timestamptz NOT NULL DEFAULT now() - interval '3 days');
           CREATE TABLE users (id serial PRIMARY KEY, name text NOT NULL,
                               avatar_id int REFERENCES uploaded_files (id))"""
    )
    return db


async def add(db: asyncpg.Connection, path: str, *, fresh: bool = False) -> int:
    sql = "INSERT INTO uploaded_files (path) VALUES ($1) RETURNING id"
    if fresh:
        sql = "INSERT INTO uploaded_files (path, uploaded_at) VALUES ($1, now()) RETURNING id"
    file_id: int = await db.fetchval(sql, path)
    return file_id


async def test_orphaned_files_are_deleted_with_their_rows_page_by_page(
    daemons: DaemonFactory, uploads: asyncpg.Connection, tmp_path: Path
) -> None:
    db, root, outside = uploads, tmp_path / "uploads", tmp_path / "outside"
    ada, bob = make(root / "avatars/ada.png"), make(root / "avatars/bob.png")
    for name, avatar in (("ada", "avatars/ada.png"), ("bob", "avatars/bob.png")):
        await db.execute(
            "INSERT INTO users (name, avatar_id) VALUES ($1, $2)", name, await add(db, avatar)
        )
    orphans = [make(root / f"orphans/{i}.png") for i in range(7)]
    secret, beside = make(outside / "secret.txt"), make(tmp_path / "beside.txt")
    make(root / "adir.png/inner.txt")  # a directory where a file should be
    link(root / "evil.png", secret)  # leads outside the root
    link(root / "alias.png", ada)  # leads inside: the link goes, ada.png stays
    fresh = make(root / "fresh.png")  # unreferenced, but uploaded just now
    kept_ids = {
        await add(db, "adir.png"),
        await add(db, "../beside.txt"),
        await add(db, "evil.png"),
    }
    for file in orphans[:3]:
        await add(db, str(file.relative_to(root)))
    await add(db, str(root / "abs.png"))  # absolute, inside the root
    make(root / "abs.png")
    await add(db, "gone.png")  # its file is already gone: only the row goes
    await add(db, "alias.png")
    for file in orphans[3:]:
        await add(db, str(file.relative_to(root)))
    await add(db, "fresh.png", fresh=True)
    total = await db.fetchval("SELECT count(*) FROM uploaded_files")
    assert total == 2 + 3 + 3 + 1 + 1 + 1 + 4 + 1
    # A value from the environment is text; make_interval wants an integer.
    daemon = await daemons.start(
        ORPHANS.format(root=root), STOKER_FILE_TASKS__ORPHANS__PARAMS__GRACE_HOURS="1"
    )
    everything = [ada, bob, *orphans, root / "abs.png", root / "alias.png", secret, beside, fresh]

    dry = await succeeded(db, {"task": "orphans", "dry_run": True})
    assert (dry["deleted"], dry["would_delete"], dry["missing"], dry["failed"]) == (0, 9, 1, 3)
    assert dry["refused"] == ["../beside.txt", "evil.png"]
    assert (dry["rows"], dry["batches"]) == (0, 5)  # 13 orphans, 3 a page
    assert all(present(*everything))
    assert await db.fetchval("SELECT count(*) FROM uploaded_files") == total

    result = await succeeded(db, {"task": "orphans"})
    assert (result["deleted"], result["missing"], result["failed"]) == (9, 1, 3)
    assert result["refused"] == ["../beside.txt", "evil.png"]
    assert (result["rows"], result["batches"]) == (10, 5)
    assert present(*orphans, root / "abs.png", root / "alias.png") == [False] * 9
    assert all(present(ada, bob, secret, beside, fresh, root / "adir.png/inner.txt"))
    left = {r["path"] for r in await db.fetch("SELECT path FROM uploaded_files")}
    assert left == {"avatars/ada.png", "avatars/bob.png", "fresh.png"} | {
        "adir.png",
        "../beside.txt",
        "evil.png",
    }
    assert kept_ids <= {r["id"] for r in await db.fetch("SELECT id FROM uploaded_files")}
    log = daemon.log()
    assert "refused ../beside.txt: has a .. component" in log
    assert "refused evil.png: resolves to" in log
    assert "could not delete adir.png: Is a directory" in log

    again = await succeeded(db, {"task": "orphans"})  # idempotent: only the failures remain
    assert (again["deleted"], again["missing"], again["failed"], again["rows"]) == (0, 0, 3, 0)


# -- configuration and failures ----------------------------------------------------------------


async def test_bad_tasks_and_payloads_fail_clearly_and_delete_nothing(
    daemons: DaemonFactory, uploads: asyncpg.Connection, tmp_path: Path
) -> None:
    db, root = uploads, tmp_path / "uploads"
    kept = make(root / "a.png", age=2 * HOURS)
    await add(db, "a.png")
    await daemons.start(
        f"""
        [file_tasks.careful]
        directory = "{root}"
        older_than = "1h"
        dry_run = true

        [file_tasks.nowhere]
        directory = "{tmp_path / "no-such-dir"}"
        older_than = "1h"

        [file_tasks.scalar_ids]
        query = "SELECT id, path FROM uploaded_files"
        delete_statement = "DELETE FROM uploaded_files WHERE id IN (:ids)"
        root = "{root}"

        [file_tasks.no_path]
        query = "SELECT id, path AS file FROM uploaded_files"
        delete_statement = "DELETE FROM uploaded_files WHERE id = ANY(:ids)"
        root = "{root}"
        """
    )
    row = await run(db, {"task": "nope"})
    assert row["state"] == "failed"
    assert row["last_error"] == (
        "PermanentJobError: task: 'nope' is not configured "
        "(known: careful, no_path, nowhere, scalar_ids); see [file_tasks]"
    )
    row = await run(db, {"task": "careful", "directory": "/"})
    assert row["state"] == "failed"
    assert "directory: Extra inputs are not permitted" in row["last_error"]
    row = await run(db, {"task": "nowhere"})
    assert (row["state"], row["attempts"]) == ("failed", 1)
    assert f"directory '{tmp_path / 'no-such-dir'}' does not exist" in row["last_error"]
    row = await run(db, {"task": "scalar_ids"})
    assert (row["state"], row["attempts"]) == ("failed", 1)
    assert "delete_statement must take :ids as an array" in row["last_error"]
    row = await run(db, {"task": "no_path"})
    assert (row["state"], row["attempts"]) == ("failed", 1)
    assert "must return columns named id and path" in row["last_error"]
    # Configured as a dry run: a payload cannot turn that off.
    result = await succeeded(db, {"task": "careful", "dry_run": False})
    assert (result["dry_run"], result["would_delete"], result["deleted"]) == (True, 1, 0)
    assert kept.exists()
    assert await db.fetchval("SELECT count(*) FROM uploaded_files") == 1


def test_paths_must_stay_inside_the_root(tmp_path: Path) -> None:
    root = tmp_path / "root"
    make(root / "sub/file.txt")
    make(tmp_path / "outside.txt")
    link(root / "in", root / "sub/file.txt")
    link(root / "out", tmp_path / "outside.txt")
    link(root / "subdir-out", tmp_path)
    real = os.path.realpath(root)
    assert refusal(real, f"{real}/sub/file.txt") is None
    assert refusal(real, f"{real}/in") is None  # unlinked as the link itself
    assert refusal(real, f"{real}/not-there-yet") is None
    assert refusal(real, f"{real}/sub/../sub/file.txt") == "has a .. component"
    assert "outside" in str(refusal(real, f"{real}/out"))
    assert "outside" in str(refusal(real, f"{real}/subdir-out/outside.txt"))
    assert "outside" in str(refusal(real, f"{real}-sibling/file.txt"))  # not a prefix match
    assert refusal(real, f"{real}/") == f"is {real} itself"
    assert "not a usable path" in str(refusal(real, f"{real}/nul\x00byte"))


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"directory": "", "older_than": 60}, "directory '.' must be an absolute path"),
        ({"directory": "tmp/uploads", "older_than": 60}, "must be an absolute path"),
        ({"directory": "/", "older_than": 60, "recursive": True}, "below the filesystem root"),
        ({"directory": "//tmp/..", "older_than": 60}, "'//tmp/..' is the filesystem root"),
        (
            {"directory": "/srv/cache/../uploads", "older_than": 60},
            r"directory '/srv/cache/../uploads' has a \.\. component: write the path without",
        ),
        (
            {"query": "SELECT 1", "delete_statement": ":ids", "root": "/srv/../../srv"},
            "root '/srv/../../srv' has a .. component",
        ),
        ({"directory": "/tmp", "older_than": 60, "pattern": "a/*.tmp"}, "cannot contain /"),
        (
            {"query": "SELECT 1", "delete_statement": ":ids", "root": "/srv", "older_than": 60},
            "older_than: only for a directory sweep",
        ),
        (
            {"query": "SELECT 1", "delete_statement": ":ids", "root": "/srv", "pattern": "*"},
            "pattern: only for a directory sweep",
        ),
    ],
)
def test_a_task_names_what_it_may_delete_unambiguously(
    fields: dict[str, Any], expected: str
) -> None:
    with pytest.raises(ValidationError, match=expected):
        FileTaskConfig.model_validate(fields)
    assert FileTaskConfig.model_validate({"directory": "/tmp", "older_than": "24h"}).older_than


def test_a_directory_resolving_to_the_filesystem_root_is_refused(tmp_path: Path) -> None:
    (tmp_path / "uploads").symlink_to("/")
    expected = f"directory '{tmp_path / 'uploads'}' resolves to /, the filesystem root"
    with pytest.raises(PermanentJobError, match=re.escape(expected)):
        real_directory("sweep", "directory", tmp_path / "uploads")
    assert real_directory("sweep", "directory", tmp_path) == os.path.realpath(tmp_path)


def test_the_database_url_is_not_in_a_repr() -> None:
    assert "s3cret" not in repr(FileTasks({}, "postgresql://app:s3cret@db/app"))


# -- cancellation ------------------------------------------------------------------------------


async def _no_progress(job: int, attempt: int, progress: str) -> None:
    return None


def context(configured: FileTasks) -> JobContext:
    return JobContext(
        id=1,
        queue="default",
        kind="files.cleanup",
        attempt=1,
        max_attempts=3,
        meta={},
        run_at=dt.datetime.now(dt.UTC),
        worker="test",
        _progress_writer=_no_progress,
        _db=None,
        _resources={FileTasks: configured},
    )


class Hold:
    """A place in a worker thread that waits, the first time it is reached, until released."""

    def __init__(self) -> None:
        self.reached, self.released, self.first = threading.Event(), threading.Event(), True

    def __call__(self) -> None:
        if self.first:
            self.first = False
            self.reached.set()
            self.released.wait(30)


async def cancelled_while_held(
    job: asyncio.Task[Any], hold: Hold, thread_done: threading.Event
) -> None:
    """Cancel `job` while its thread waits at `hold`: the job ends cancelled at once, and the
    thread, let go, then finishes."""
    try:
        assert await asyncio.to_thread(hold.reached.wait, 30)
        job.cancel()
        done, _ = await asyncio.wait({job}, timeout=10)
        assert done and job.cancelled()
    finally:
        hold.released.set()
    assert await asyncio.to_thread(thread_done.wait, 30)


async def test_a_cancelled_sweep_deletes_nothing_after_it_has_ended(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    old = [make(tmp_path / "scratch" / f"old{i}.tmp", age=2 * HOURS) for i in range(4)]
    hold, thread_done, listings = Hold(), threading.Event(), []
    real_files, real_batch = handlers.files.old_files, handlers.files.sweep_batch

    class Matching:
        @staticmethod
        def fnmatchcase(name: str, pattern: str) -> bool:
            hold()  # the first file: the thread is inside the listing when the job is cancelled
            return fnmatch.fnmatchcase(name, pattern)

    def files(*args: Any) -> Generator[str, None, None]:
        listings.append(real_files(*args))
        return listings[-1]

    def batch(*args: Any) -> bool:
        try:
            return real_batch(*args)
        finally:
            thread_done.set()

    monkeypatch.setattr("handlers.files.fnmatch", Matching)
    monkeypatch.setattr(handlers.files, "old_files", files)
    monkeypatch.setattr(handlers.files, "sweep_batch", batch)
    task = FileTaskConfig(directory=tmp_path / "scratch", older_than=60, pattern="*.tmp")
    configured = FileTasks({"sweep": task}, "postgresql://unused/x")
    job = asyncio.create_task(cleanup(context(configured), Cleanup(task="sweep")))
    await cancelled_while_held(job, hold, thread_done)
    assert all(present(*old))  # the thread, let go after the job ended, unlinked nothing

    async def closed() -> bool:  # the listing, once the thread has left it
        return inspect.getgeneratorstate(listings[0]) == inspect.GEN_CLOSED

    await eventually(closed)


async def test_a_cancelled_query_cleanup_unlinks_nothing_after_it_has_ended(
    uploads: asyncpg.Connection, dsn: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    db, root = uploads, tmp_path / "uploads"
    kept = [make(root / f"{i}.png") for i in range(3)]
    for i in range(3):
        await add(db, f"{i}.png")
    hold, thread_done = Hold(), threading.Event()
    real_refusal, real_rows = handlers.files.refusal, handlers.files.remove_rows

    def refusing(root_real: str, candidate: str) -> str | None:
        hold()  # the first file, just before its unlink
        return real_refusal(root_real, candidate)

    def rows(*args: Any) -> list[Any]:
        try:
            return real_rows(*args)
        finally:
            thread_done.set()

    monkeypatch.setattr(handlers.files, "refusal", refusing)
    monkeypatch.setattr(handlers.files, "remove_rows", rows)
    task = FileTaskConfig.model_validate(
        {
            "query": "SELECT id, path FROM uploaded_files",
            "delete_statement": "DELETE FROM uploaded_files WHERE id = ANY(:ids)",
            "root": root,
        }
    )
    job = asyncio.create_task(cleanup(context(FileTasks({"o": task}, dsn)), Cleanup(task="o")))
    await cancelled_while_held(job, hold, thread_done)
    assert all(present(*kept))
    assert await db.fetchval("SELECT count(*) FROM uploaded_files") == 3


async def test_a_closing_gate_waits_for_the_unlink_under_way(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    files = [make(tmp_path / f"{i}.tmp") for i in range(2)]
    hold, real_unlink = Hold(), os.unlink

    def unlinking(path: str) -> None:
        if path == str(files[0]):
            hold()
        real_unlink(path)

    monkeypatch.setattr("handlers.files.os.unlink", unlinking)
    gate = Gate()
    under_way = asyncio.ensure_future(asyncio.to_thread(gate.unlink, str(files[0])))
    assert await asyncio.to_thread(hold.reached.wait, 30)
    closing = asyncio.create_task(gate.close())
    await asyncio.sleep(0.05)
    closing.cancel()  # cancelled again while it waits: it keeps waiting (one unlink is bounded)
    await asyncio.sleep(0.05)
    assert not closing.done() and not gate.closed
    hold.released.set()
    await asyncio.wait_for(closing, 10)
    assert gate.closed and await under_way is True and not files[0].exists()
    assert gate.unlink(str(files[1])) is False and files[1].exists()
    tally = Tally(dry_run=False, gate=gate)
    assert remove(str(files[1]), "1.tmp", str(tmp_path), tally) is False
    assert (tally.deleted, tally.failed, files[1].exists()) == (0, 0, True)
