"""Jobs as an operator sees them: listed, shown, retried, cancelled."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import asyncpg

from daemon.operate.errors import Conflict, NotFound
from daemon.store import queries

State = Literal["queued", "active", "succeeded", "failed", "cancelled"]
STATES: tuple[State, ...] = ("queued", "active", "succeeded", "failed", "cancelled")


# -- by meta: an organisation's, a user's jobs ----------------------------------------------

META_KEY_MAX = 200
META_VALUE_MAX = 1000

# Jobs whose meta holds every key=value of $6 (a JSON object of strings), live and finished,
# found through the partial GIN indexes of migration 020 (jobs_meta_idx, job_history_meta_idx).
# `meta <> '{}'` is their predicate, written out for the planner to prove; an object that
# contains a non-empty one is never empty, so it drops nothing.
_META_WHERE = """
 WHERE meta @> $6::text::jsonb AND meta <> '{}'::jsonb
   AND ($1::text IS NULL OR state::text = $1)
   AND ($2::text IS NULL OR queue = $2)
   AND ($3::text IS NULL OR kind = $3)
   AND ($4::bigint IS NULL OR id < $4)
"""
LIST_BY_META = f"""
SELECT {queries.JOB_COLUMNS} FROM stoker.all_jobs {_META_WHERE}
 ORDER BY id DESC
 LIMIT $5
"""
COUNT_BY_META = f"SELECT count(*) FROM stoker.all_jobs {_META_WHERE} AND $5::int IS NULL"


def meta_filter(pairs: Iterable[tuple[str, str]], *, field: str = "meta") -> dict[str, str]:
    """key=value pairs as the containment object, or ValueError naming `field` (the CLI's
    --meta, the API's meta.KEY) and the key. Values are matched as JSON strings."""
    wanted: dict[str, str] = {}
    for key, value in pairs:
        if not key:
            raise ValueError(f"{field}: the key is empty; write KEY=VALUE, e.g. org=org_123")
        where = f"{field} {key[:40]!r}"
        if len(key) > META_KEY_MAX or len(value) > META_VALUE_MAX:
            raise ValueError(
                f"{where}: keys are at most {META_KEY_MAX} characters, values {META_VALUE_MAX}"
            )
        if "\x00" in key or "\x00" in value:
            raise ValueError(f"{where}: NUL characters cannot be stored in jsonb")
        if key in wanted and wanted[key] != value:
            raise ValueError(f"{where}: given twice with different values (no job has both)")
        wanted[key] = value
    return wanted


def meta_pair(text: str) -> tuple[str, str]:
    """'org=org_123' -> ('org', 'org_123'); ValueError without '='."""
    key, eq, value = text.partition("=")
    if not eq:
        raise ValueError(f"{text!r} is not KEY=VALUE, e.g. org=org_123")
    return key, value


async def list_jobs(
    conn: asyncpg.Connection,
    *,
    state: str | None = None,
    queue: str | None = None,
    kind: str | None = None,
    before: int | None = None,
    limit: int,
    meta: Mapping[str, str] | None = None,
) -> list[asyncpg.Record]:
    """Newest first; `before` an id, for the next page; `meta` keeps the jobs whose meta has
    each of its key=value (served by an index: an organisation's jobs among millions)."""
    if meta:
        by_meta: list[asyncpg.Record] = await conn.fetch(
            LIST_BY_META, state, queue, kind, before, limit, json.dumps(dict(meta))
        )
        return by_meta
    rows: list[asyncpg.Record] = await conn.fetch(
        queries.LIST_JOBS, state, queue, kind, before, limit
    )
    return rows


async def count_jobs(
    conn: asyncpg.Connection,
    meta: Mapping[str, str],
    *,
    state: str | None = None,
    queue: str | None = None,
    kind: str | None = None,
) -> int:
    """How many jobs, live and finished, have each key=value of `meta` (non-empty)."""
    if not meta:
        raise ValueError("meta: count needs at least one KEY=VALUE")
    n: int = await conn.fetchval(
        COUNT_BY_META, state, queue, kind, None, None, json.dumps(dict(meta))
    )
    return n


async def get_job(conn: asyncpg.Connection, job_id: int) -> asyncpg.Record:
    row: asyncpg.Record | None = await conn.fetchrow(queries.GET_JOB, job_id)
    if row is None:
        raise NotFound(f"no job with id {job_id}", id=job_id)
    return row


async def retry_jobs(
    conn: asyncpg.Connection,
    ids: Sequence[int],
    *,
    all_failed: bool = False,
    queue: str | None = None,
) -> list[asyncpg.Record]:
    """Failed or cancelled jobs (`ids`, or every failed one, of `queue` if given) run again,
    and delayed queued ones of `ids` run now; daemons are told. Returns (id, queue) of each."""
    async with conn.transaction():
        rows: list[asyncpg.Record] = await conn.fetch(
            queries.RETRY_JOBS, list(ids), all_failed, queue
        )
        queues = sorted({r["queue"] for r in rows})
        await conn.execute(queries.NOTIFY_QUEUES, queues)
    return rows


async def retry_job(conn: asyncpg.Connection, job_id: int) -> None:
    """Retry one job, or say why it cannot be."""
    if await retry_jobs(conn, [job_id]):
        return
    job = await get_job(conn, job_id)
    state = job["state"]
    if state == "active":
        why = f"job {job_id} is running on {job['worker']}"
    elif state == "queued":
        why = f"job {job_id} is already queued to run now"
    elif state == "succeeded":
        why = f"job {job_id} succeeded; only failed or cancelled jobs can be retried"
    else:
        why = f"job {job_id} is {state}, but a live job holds its unique_key"
    raise Conflict(why, id=job_id, state=state)


async def cancel_job(conn: asyncpg.Connection, job_id: int, *, by: str) -> str:
    """Cancel a job (stoker.cancel), or say why it cannot be: 'cancelled' (it was queued: it
    is in history now) or 'requested' (it is running: its daemon stops it within a second
    or so, and it ends cancelled). `by` (who asks) is kept in the job's last_error. A job that
    already finished is a Conflict; no such job, NotFound."""
    answer: str = await conn.fetchval(queries.CANCEL_JOB, job_id, by)
    if answer in ("cancelled", "requested"):
        return answer
    if answer == "not found":
        raise NotFound(f"no job with id {job_id}", id=job_id)
    state = answer.removeprefix("already ")
    raise Conflict(f"job {job_id} is already {state}", id=job_id, state=state)


# -- the dashboard's search: filters, bounded reads, bulk actions -----------------------------

# A page of a filtered list reads at most this many of the newest rows (from `before`), live and
# history together, in id order through an index; the filters no index serves (queue, kind, a
# meta key, error text) are applied to those rows only. A page that finds fewer matches than it
# shows continues from the oldest row it read: every page costs the same, however large the
# tables, and nothing ever counts them.
SCAN_ROWS = 20_000
# A bulk action over a whole filter touches at most this many jobs, found by at most
# BULK_SCAN_PAGES reads of SCAN_ROWS rows, and acts on them in batches of BULK_BATCH.
BULK_MAX = 1_000
BULK_SCAN_PAGES = 5
BULK_BATCH = 100

# Parked outcomes too, and a cancelled job on its way to history (see COMPLETE).
LIVE_STATES = frozenset({"queued", "active", "succeeded", "failed", "cancelled"})
HISTORY_STATES = frozenset({"succeeded", "failed", "cancelled"})
NEWEST = 2**63 - 1

_SCAN_COLUMNS = "id, queue, kind, meta, last_error"
LIST_COLUMNS = """id, queue, kind, meta, state::text AS state, run_at, attempts, max_attempts,
worker, left(last_error, 300) AS last_error, progress, created_at, started_at, finished_at"""

_MATCH = """
matched AS (
    SELECT id FROM scanned
     WHERE ($3::text IS NULL OR queue = $3)
       AND ($4::text IS NULL OR kind = $4)
       AND ($5::text IS NULL OR CASE WHEN $6::text = '' THEN meta ? $5 ELSE meta ->> $5 = $6 END)
       AND ($7::text IS NULL OR last_error ILIKE $7)
     ORDER BY id DESC
     LIMIT $8
)
SELECT (SELECT count(*) FROM scanned) AS scanned, (SELECT min(id) FROM scanned) AS floor,
       ARRAY(SELECT id FROM matched ORDER BY id DESC) AS ids
"""

_ROWS = f"""
SELECT {LIST_COLUMNS} FROM stoker.all_jobs WHERE id = ANY($1::bigint[]) ORDER BY id DESC
"""

_CANCEL_JOBS = """
WITH gone AS (
    DELETE FROM stoker.jobs WHERE id = ANY($1::bigint[]) AND state = 'queued' RETURNING *
)
INSERT INTO stoker.job_history (id, queue, kind, payload, meta, priority, state, run_at, attempts,
                                max_attempts, unique_key, worker, last_error, errors, result,
                                progress, created_at, started_at, concurrency_key)
SELECT id, queue, kind, payload, meta, priority, 'cancelled', run_at, attempts, max_attempts,
       unique_key, worker, 'cancelled by an operator', errors, result, progress, created_at,
       started_at, concurrency_key
  FROM gone
RETURNING id, queue
"""


@dataclass(frozen=True)
class JobFilter:
    """What the jobs list is narrowed to; each None (or empty) means any."""

    states: tuple[State, ...] = ()
    queue: str | None = None
    kind: str | None = None
    meta_key: str | None = None
    meta_value: str | None = None
    error: str | None = None

    @property
    def bounded(self) -> bool:
        """Whether a filter no index serves is set: then a page reads SCAN_ROWS rows."""
        return bool(self.queue or self.kind or self.meta_key or self.error)

    def narrowed(self, states: Sequence[State]) -> JobFilter:
        """The same filter, keeping only `states` (of its own, or all of them when it has
        none)."""
        keep = tuple(s for s in (self.states or STATES) if s in states)
        return JobFilter(keep, self.queue, self.kind, self.meta_key, self.meta_value, self.error)


@dataclass(frozen=True)
class JobPage:
    jobs: list[asyncpg.Record]
    next_before: int | None  # the `before` of the next (older) page, if there may be one
    scanned: int  # rows read
    floor: int | None  # the oldest id read
    bounded: bool


def _state_clause(states: Sequence[str]) -> str:
    # Literals, not parameters: a partial index is used only when the planner sees that the
    # query's states fall within its predicate, which a generic plan's $n never shows.
    return "state IN (" + ", ".join(f"'{s}'" for s in states) + ")"


def _scan_sql(states: Sequence[State]) -> str | None:
    """The newest $2 rows below id $1 of the tables that can hold `states` (all: any)."""
    wanted = set(states or STATES)
    if not wanted <= set(STATES):
        raise ValueError(f"unknown job state in {sorted(wanted)}")
    parts = []
    for table, holds in (("stoker.jobs", LIVE_STATES), ("stoker.job_history", HISTORY_STATES)):
        here = sorted(wanted & holds)
        if not here:
            continue
        where = "" if set(here) == holds else f" AND {_state_clause(here)}"
        parts.append(
            f"(SELECT {_SCAN_COLUMNS} FROM {table} WHERE id < $1{where} ORDER BY id DESC LIMIT $2)"
        )
    if not parts:
        return None
    union = "\n UNION ALL\n ".join(parts)
    return (
        f"WITH scanned AS MATERIALIZED (\n SELECT * FROM (\n {union}\n ) u "
        f"ORDER BY id DESC LIMIT $2\n),{_MATCH}"
    )


def _like(text: str) -> str:
    escaped = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"


async def _matching(
    conn: asyncpg.Connection, f: JobFilter, *, before: int | None, limit: int, scan: int
) -> tuple[list[int], int, int | None]:
    sql = _scan_sql(f.states)
    if sql is None:
        return [], 0, None
    row = await conn.fetchrow(
        sql,
        before or NEWEST,
        scan if f.bounded else limit,
        f.queue or None,
        f.kind or None,
        f.meta_key or None,
        f.meta_value or "",
        _like(f.error) if f.error else None,
        limit,
    )
    assert row is not None
    return list(row["ids"]), row["scanned"], row["floor"]


async def search_jobs(
    conn: asyncpg.Connection,
    f: JobFilter,
    *,
    before: int | None = None,
    limit: int = 50,
    scan: int = SCAN_ROWS,
) -> JobPage:
    """Newest first, below id `before`: reads at most `limit` rows when only states are
    filtered (an index gives them in order), else at most `scan` rows, which it filters."""
    ids, scanned, floor = await _matching(conn, f, before=before, limit=limit, scan=scan)
    rows: list[asyncpg.Record] = await conn.fetch(_ROWS, ids) if ids else []
    if len(ids) >= limit:
        next_before: int | None = ids[-1]
    elif f.bounded and scanned >= scan and floor is not None:
        next_before = floor
    else:
        next_before = None
    return JobPage(rows, next_before, scanned, floor, f.bounded)


async def matching_ids(
    conn: asyncpg.Connection,
    f: JobFilter,
    *,
    most: int = BULK_MAX,
    pages: int = BULK_SCAN_PAGES,
    scan: int = SCAN_ROWS,
) -> list[int]:
    """The ids of at most `most` jobs matching `f`, newest first, found in at most `pages`
    bounded reads."""
    found: list[int] = []
    before: int | None = None
    for _ in range(pages):
        ids, scanned, floor = await _matching(
            conn, f, before=before, limit=most - len(found), scan=scan
        )
        found.extend(ids)
        if len(found) >= most:
            break
        if not f.bounded or scanned < scan or floor is None:
            break  # an unbounded read already gave all it had; or the tables ran out
        before = floor
    return found


async def cancel_jobs(conn: asyncpg.Connection, ids: Sequence[int]) -> list[asyncpg.Record]:
    """Queued jobs of `ids` become cancelled (into history); others are left as they are.
    Returns (id, queue) of each job cancelled."""
    rows: list[asyncpg.Record] = await conn.fetch(_CANCEL_JOBS, list(ids))
    return rows


@dataclass(frozen=True)
class BulkOutcome:
    touched: list[int]  # ids the action changed
    skipped: list[int]  # ids it looked at but left (running, already queued, ...)


async def retry_many(conn: asyncpg.Connection, ids: Sequence[int]) -> BulkOutcome:
    """retry_jobs in batches of BULK_BATCH, each its own transaction."""
    done: list[int] = []
    for start in range(0, len(ids), BULK_BATCH):
        batch = ids[start : start + BULK_BATCH]
        done.extend(r["id"] for r in await retry_jobs(conn, batch))
    kept = set(done)
    return BulkOutcome(done, [i for i in ids if i not in kept])


async def cancel_many(conn: asyncpg.Connection, ids: Sequence[int]) -> BulkOutcome:
    """cancel_jobs in batches of BULK_BATCH, each its own statement."""
    done: list[int] = []
    for start in range(0, len(ids), BULK_BATCH):
        done.extend(r["id"] for r in await cancel_jobs(conn, ids[start : start + BULK_BATCH]))
    kept = set(done)
    return BulkOutcome(done, [i for i in ids if i not in kept])


RETRYABLE: tuple[State, ...] = ("failed", "cancelled")
CANCELLABLE: tuple[State, ...] = ("queued",)  # in bulk: queued jobs only
CANCELLABLE_ONE: tuple[State, ...] = ("queued", "active")  # one job: a running one too
