"""Buffers job outcomes and writes them in batches: one statement per flush."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime

import asyncpg

from daemon import queries

log = logging.getLogger("stoker.outcomes")


@dataclass(frozen=True, slots=True)
class Outcome:
    job_id: int
    attempt: int
    queue: str
    outcome: str  # succeeded | failed | retry | handback
    result: str | None = None  # JSON text
    error: str | None = None
    traceback: str | None = None
    delay: float = 0.0


FINISHED = frozenset({"succeeded", "failed"})

RequeuedFn = Callable[[str, datetime], None]


class Completer:
    """One per daemon. `add` never waits; the flusher task writes what has accumulated.

    Every outcome ends written, parked or (last resort) logged as lost, never retried forever:
    a connection or transient error retries the same outcomes unchanged; anything else that
    PostgreSQL refuses halves the batch until the refused outcomes stand alone, where a refused
    value is replaced by a note saying why, and an outcome history refuses for good (a taken
    id, a permission, a DBA's trigger) is parked in stoker.jobs as finished, never to run
    again."""

    def __init__(
        self,
        db: asyncpg.Pool,
        *,
        worker_id: str,
        flush_interval: float,
        flush_max: int,
        on_requeued: RequeuedFn,
    ) -> None:
        self._db = db
        self._worker_id = worker_id
        self._flush_interval = flush_interval
        self._flush_max = flush_max
        self._on_requeued = on_requeued
        self._buffer: list[Outcome] = []
        self._pending = asyncio.Event()
        self._closing = False
        self._writing = 0  # outcomes at the head of the buffer in a write right now
        # Set while outcomes get written; cleared by a transient failure, so that pools wait
        # for the backlog before they claim again (a re-claimed job would fence its own
        # buffered outcome out and run a second time).
        self.settled = asyncio.Event()
        self.settled.set()
        self.discarded = 0  # outcomes whose lease had been taken over (fenced out)
        self.written = 0
        self.parked = 0  # finished outcomes history refused, kept in stoker.jobs
        self.lost = 0  # outcomes nothing could record: their jobs run again

    def add(self, outcome: Outcome) -> None:
        self._buffer.append(outcome)
        self._pending.set()

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    def buffered_ids(self) -> list[int]:
        return [o.job_id for o in self._buffer]

    def adopt(self, job_id: int, attempt: int) -> bool:
        """This worker claimed `job_id` again as `attempt` while an outcome of an earlier
        attempt still waits here: that outcome now answers for the new claim (written against
        the old attempt it would be fenced out, and the job would run again). True if so."""
        # Not one in a write right now: that write is fenced against the old attempt.
        for i in range(self._writing, len(self._buffer)):
            o = self._buffer[i]
            if o.job_id == job_id and o.attempt < attempt:
                self._buffer[i] = replace(o, attempt=attempt)
                log.warning(
                    "job %s claimed again (attempt %s) while attempt %s's outcome was still "
                    "unwritten; that outcome is kept and the job is not run again",
                    job_id,
                    attempt,
                    o.attempt,
                    extra={"job_id": job_id, "queue": o.queue, "attempt": attempt},
                )
                return True
        return False

    async def run(self) -> None:
        """Flush until close() is called and the buffer is empty. Never raises: losing this
        task would take every buffered outcome with it."""
        delay = 0.05
        failures = 0
        while True:
            if not self._buffer:
                self.settled.set()
                if self._closing:
                    return
                await self._pending.wait()
                self._pending.clear()
                if self._flush_interval and not self._closing:
                    # A short window lets outcomes of jobs finishing together share a write.
                    await asyncio.sleep(self._flush_interval)
                continue
            batch = self._next_batch()
            stuck = failures >= STUCK_AFTER and await self._reachable()
            self._writing = len(batch)
            try:
                # Shielded: a cancellation must not lose a job's final state.
                await asyncio.shield(self._write_split(batch, stuck=stuck, top=True))
            except Exception as exc:
                self._writing = 0
                if not is_transient(exc):  # _write_split lets only those out: a bug of ours
                    log.exception("outcomes of jobs %s not recorded", [o.job_id for o in batch])
                    self.lost += len(batch)
                    del self._buffer[: len(batch)]
                    continue
                failures += 1
                self.settled.clear()
                log.warning(
                    "cannot write %d job outcomes (%s); retrying in %.2fs",
                    len(batch),
                    _one_line(exc),
                    delay,
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
                continue
            self._writing = 0
            failures = 0
            delay = 0.05
            self.settled.set()

    def _next_batch(self) -> list[Outcome]:
        """The head of the buffer, up to flush_max, cut before a second outcome of the same job
        (the write matches outcomes to rows by id)."""
        batch = self._buffer[: self._flush_max]
        if len(batch) > 1:
            seen: set[int] = set()
            for i, o in enumerate(batch):
                if o.job_id in seen:
                    return batch[:i]
                seen.add(o.job_id)
        return batch

    async def _reachable(self) -> bool:
        """After repeated 'transient' failures, is the database in fact reachable? Then the
        error is the outcomes' own and retrying them unchanged would wedge everything behind."""
        try:
            await self._db.fetchval("SELECT 1", timeout=5)
        except Exception:  # still unreachable: the failures were the connection's
            return False
        return True

    async def _write_split(self, batch: list[Outcome], *, stuck: bool, top: bool = False) -> None:
        """Write `batch`, the head of the buffer, and take it off the buffer. A batch that
        PostgreSQL refuses is halved until the refused outcomes stand alone; what was written
        is off the buffer at once, so a lost connection halfway repeats nothing. Raises only
        transient errors (unless `stuck`), to be retried unchanged."""
        try:
            await self._write(batch)
        except Exception as exc:
            if is_transient(exc) and not stuck:
                raise
            if len(batch) == 1:
                await self._write_one(batch[0], exc, stuck=stuck)
                del self._buffer[:1]
                return
            if top:
                log.warning(
                    "a batch of %d outcomes was refused (%s); writing it in smaller batches",
                    len(batch),
                    _one_line(exc),
                )
            half = len(batch) // 2
            await self._write_split(batch[:half], stuck=stuck)
            await self._write_split(batch[half:], stuck=stuck)
            return
        del self._buffer[: len(batch)]

    async def _write_one(self, outcome: Outcome, refused: Exception, *, stuck: bool) -> None:
        """One outcome PostgreSQL refused: write it with the refused value replaced by a note;
        if it refuses that too, park a finished job in stoker.jobs; else log it as lost.
        Raises only transient errors (unless `stuck`), to be retried unchanged."""
        try:
            await self._write([_salvage(outcome, refused)])
            log.warning(
                "job %s: PostgreSQL refused its outcome (%s); recorded with a note instead",
                outcome.job_id,
                _one_line(refused),
                extra=_fields(outcome),
            )
            return
        except Exception as exc:
            if is_transient(exc) and not stuck:
                raise
            refused = exc
        if outcome.outcome in FINISHED:
            try:
                await self._park(outcome, refused)
                return
            except Exception as exc:
                if is_transient(exc) and not stuck:
                    raise
                refused = exc
        self.lost += 1
        log.error(
            "job %s: outcome %s of attempt %s cannot be recorded (%s); the job runs again "
            "once its lease expires",
            outcome.job_id,
            outcome.outcome,
            outcome.attempt,
            _one_line(refused),
            extra=_fields(outcome),
        )

    async def _park(self, outcome: Outcome, refused: Exception) -> None:
        note = (
            f"outcome {outcome.outcome} of attempt {outcome.attempt} could not be moved to "
            f"stoker.job_history: {_one_line(refused)}"
        )
        if outcome.error:
            note = f"{outcome.error[:ERROR_IN_NOTE]} ({note})"
        async with self._db.acquire() as conn:
            row = await conn.fetchrow(
                queries.PARK,
                outcome.job_id,
                outcome.attempt,
                self._worker_id,
                outcome.outcome,
                note,
            )
        if row is None:
            self.discarded += 1
            return
        self.parked += 1
        log.error(
            "job %s: %s; it stays in stoker.jobs with state %s and will not run again",
            outcome.job_id,
            note,
            outcome.outcome,
            extra=_fields(outcome),
        )

    async def close(self) -> None:
        self._closing = True
        self._pending.set()

    async def _write(self, batch: list[Outcome]) -> None:
        # Acquiring is apart from the statement: failing to connect is always worth a retry,
        # whatever the error says (a database refusing connections is not a refused outcome).
        try:
            conn = await self._db.acquire()
        except Exception as exc:
            raise ConnectionUnavailable(_one_line(exc)) from exc
        try:
            if all(o.outcome == "succeeded" for o in batch):
                rows = await conn.fetch(
                    queries.COMPLETE_SUCCEEDED,
                    [o.job_id for o in batch],
                    [o.attempt for o in batch],
                    [o.result for o in batch],
                    self._worker_id,
                )
            else:
                rows = await self._write_mixed(conn, batch)
        finally:
            await self._db.release(conn)
        self._account(batch, rows)

    async def _write_mixed(
        self, conn: asyncpg.Connection, batch: list[Outcome]
    ) -> list[asyncpg.Record]:
        done = [o for o in batch if o.outcome in FINISHED]
        again = [o for o in batch if o.outcome not in FINISHED]
        rows: list[asyncpg.Record] = await conn.fetch(
            queries.COMPLETE,
            [o.job_id for o in done],
            [o.attempt for o in done],
            [o.outcome for o in done],
            [o.result for o in done],
            [o.error for o in done],
            [o.traceback for o in done],
            [o.job_id for o in again],
            [o.attempt for o in again],
            [o.outcome for o in again],
            [o.error for o in again],
            [o.traceback for o in again],
            [o.delay for o in again],
            self._worker_id,
        )
        return rows

    def _account(self, batch: list[Outcome], rows: list[asyncpg.Record]) -> None:
        # A batch holds one outcome per job (see _next_batch): rows match outcomes by id.
        self.written += len(rows)
        if len(rows) != len(batch):
            seen = {row["id"] for row in rows}
            for o in batch:
                if o.job_id not in seen:
                    self.discarded += 1
                    log.warning(
                        "outcome %s of job %s attempt %s discarded: its lease expired and the "
                        "job was handed to another attempt",
                        o.outcome,
                        o.job_id,
                        o.attempt,
                        extra=_fields(o),
                    )
        for row in rows:
            if row["run_at"] is not None:
                self._on_requeued(row["queue"], row["run_at"])


class ConnectionUnavailable(Exception):
    """No connection to write with: always transient."""


# Consecutive 'transient' failures after which a reachable database means the error is the
# outcome's own (an error class we took for transient), not the connection's.
STUCK_AFTER = 5
ERROR_IN_NOTE = 2000

_TRANSIENT_SQLSTATES = frozenset({"40001", "40P01"})


def is_transient(exc: BaseException) -> bool:
    """Worth retrying unchanged: the connection or the server's state, not the outcome.
    SQLSTATE classes 08 (connection), 53 (insufficient resources), 57P (shutdown, restart),
    serialization failures and deadlocks; lost connections and time-outs on our side."""
    if isinstance(exc, asyncpg.PostgresError):
        state = exc.sqlstate or ""
        return state[:2] in ("08", "53") or state[:3] == "57P" or state in _TRANSIENT_SQLSTATES
    if isinstance(exc, ValueError):  # asyncpg's client-side DataError: a value it cannot encode
        return False
    return isinstance(
        exc,
        (
            ConnectionUnavailable,
            OSError,
            TimeoutError,
            asyncpg.InterfaceError,
            asyncpg.InternalClientError,
        ),
    )


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:ERROR_IN_NOTE]


def _fields(o: Outcome) -> dict[str, object]:
    return {"job_id": o.job_id, "queue": o.queue, "attempt": o.attempt}


def _salvage(outcome: Outcome, exc: Exception) -> Outcome:
    note = f"PostgreSQL refused part of this job's outcome: {_one_line(exc)}"
    if outcome.outcome == "succeeded":
        return replace(outcome, result=json.dumps({"unrecorded_result": note}))
    return replace(outcome, error=note, traceback=None, delay=min(outcome.delay, 3600.0))
