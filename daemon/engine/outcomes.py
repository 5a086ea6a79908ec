"""Buffers job outcomes and writes them in batches: one statement per flush."""

from __future__ import annotations

import asyncio
import json
import logging
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any, Literal, Protocol

import asyncpg

from daemon.store import queries
from daemon.store.errors import ConnectionUnavailable, is_transient

log = logging.getLogger("stoker.outcomes")


# What became of an attempt: finished (succeeded, failed, cancelled: the job moves to history) or
# back to its queue (retry after `delay`; handback: the shutdown interrupted it, the attempt not
# counted). A requeue of a job with a cancel request ends it cancelled instead (see COMPLETE).
OutcomeKind = Literal["succeeded", "failed", "cancelled", "retry", "handback"]


# Not frozen: a frozen dataclass sets each field through object.__setattr__, which was a tenth
# of the pool's own time per job in a drain; outcomes are replaced (dataclasses.replace), never
# changed in place.
@dataclass(slots=True)
class Outcome:
    job_id: int
    attempt: int
    queue: str
    outcome: OutcomeKind
    result: str | None = None  # JSON text
    error: str | None = None
    traceback: str | None = None
    delay: float = 0.0
    timed_out: bool = False  # the handler ran past its timeout (retry or failed)


FINISHED: frozenset[OutcomeKind] = frozenset({"succeeded", "failed", "cancelled"})

RequeuedFn = Callable[[str, datetime], None]
ReleasedFn = Callable[[str], None]


class Rider(Protocol):
    """A pool whose next claim may ride along with a write of its queue's outcomes."""

    def claim_along(self) -> tuple[object, ...] | None:
        """CLAIM_LIMITED's arguments for a claim made with the next write, or None. Once
        given, `claimed_along` is called exactly once."""
        ...

    def claimed_along(self, rows: list[asyncpg.Record] | None) -> None:
        """What the claim found (rows as stoker.finish_and_claim returns them after its
        first), or None: it was not made, and the pool claims by itself."""
        ...


RiderFn = Callable[[str], Rider | None]


class AlongRefused:
    """Set once the database refuses every claim along (see ALONG_UNAVAILABLE); shared by a
    daemon's completers, so that it is said once and none of them tries again."""

    __slots__ = ("refused",)

    def __init__(self) -> None:
        self.refused = False


class Completer:
    """One per daemon, and a second for the second lane of queues with a global limit (see
    QueuePool). `add` never waits; the flusher task writes what has accumulated.

    Every outcome ends written, parked or (last resort) logged as lost, and none blocks the
    others: an error of the connection or the server's state retries the same outcomes
    unchanged; an error of the outcomes themselves (a value, a constraint, a permission, a
    trigger) halves the batch until the refused outcomes stand alone, where a refused value is
    replaced by a note saying why, and an outcome history refuses for good (a taken id, a
    permission, a DBA's trigger) is parked in stoker.jobs as finished, never to run again."""

    def __init__(
        self,
        db: asyncpg.Pool,
        *,
        worker_id: str,
        flush_interval: float,
        flush_max: int,
        on_requeued: RequeuedFn,
        on_released: ReleasedFn | None = None,
        urgent_queues: frozenset[str] = frozenset(),
        rider: RiderFn | None = None,
        along_refused: AlongRefused | None = None,
    ) -> None:
        self._db = db
        self._worker_id = worker_id
        self._flush_interval = flush_interval
        self._flush_max = flush_max
        self._on_requeued = on_requeued
        self._on_released = on_released
        # Queues with a global or key concurrency limit: a slot is taken until the outcome is
        # written, so their outcomes skip the batching window (it halved a limited drain).
        self._urgent_queues = urgent_queues
        self._urgent = False
        # A queue held back by its global limit claims with the write of its outcomes: a slot
        # is free only once its outcome is written, so the limit's jobs drain in a serial
        # cycle, and this takes a round trip and a commit out of each turn.
        self._rider = rider
        self._along: tuple[Rider, list[asyncpg.Record]] | None = None  # to hand over
        # The database cannot claim along: never try again.
        self._along_refused = along_refused if along_refused is not None else AlongRefused()
        self._buffer: list[Outcome] = []
        self._pending = asyncio.Event()
        self._closing = False
        self._writing = 0  # outcomes at the head of the buffer in a write right now
        # job id -> attempt: finished outcomes in a write when this worker claimed the job
        # again; that write is fenced out, and the outcome is then written for the new claim.
        self._adoptions: dict[int, int] = {}
        # Finished outcomes recently fenced out, for a re-claim this worker learns of later.
        self._fenced: OrderedDict[int, Outcome] = OrderedDict()
        # Set while outcomes get written; cleared by a failed write until everything buffered
        # then is written, so that pools wait for the backlog before they claim again (a job
        # re-claimed meanwhile would fence its own buffered outcome out and run again).
        self.settled = asyncio.Event()
        self.settled.set()
        self._backlog = 0
        self.discarded = 0  # outcomes whose lease had been taken over (fenced out)
        self.written = 0
        self.parked = 0  # finished outcomes history refused, kept in stoker.jobs
        self.lost = 0  # outcomes nothing could record: their jobs run again

    def add(self, outcome: Outcome) -> None:
        self._buffer.append(outcome)
        if outcome.queue in self._urgent_queues:
            self._urgent = True
        self._pending.set()

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    def buffered_for(self, queue: str) -> int:
        """Outcomes of `queue` not yet written (those in a write right now included)."""
        return sum(1 for o in self._buffer if o.queue == queue)

    def buffered_ids(self) -> list[int]:
        return [o.job_id for o in self._buffer]

    def adopt(self, job_id: int, attempt: int) -> bool:
        """This worker claimed `job_id` again as `attempt` (its lease had lapsed: the database
        was away, or the loop blocked) while an outcome of an earlier attempt was not yet
        written: that outcome answers for the new claim, which must not run. True if so.

        Written against the old attempt it would be fenced out and the job would run twice.
        A finished outcome in a write right now is certainly fenced out (the claim found the
        row still there), so it is written again for the new attempt once that write returns;
        a requeue in a write may have landed before the claim, so that claim runs."""
        for i in range(len(self._buffer) - 1, self._writing - 1, -1):
            o = self._buffer[i]
            if o.job_id == job_id and o.attempt < attempt:
                self._buffer[i] = replace(o, attempt=attempt)
                return self._adopted(o, attempt)
        for o in self._buffer[: self._writing]:
            if o.job_id == job_id and o.attempt < attempt and o.outcome in FINISHED:
                self._adoptions[job_id] = attempt
                return self._adopted(o, attempt)
        fenced = self._fenced.get(job_id)
        if fenced is not None and fenced.attempt < attempt:
            del self._fenced[job_id]
            self.discarded -= 1
            self.add(replace(fenced, attempt=attempt))
            return self._adopted(fenced, attempt)
        return False

    def _adopted(self, o: Outcome, attempt: int) -> bool:
        log.warning(
            "job %s claimed again (attempt %s) while attempt %s's outcome was not yet "
            "written; that outcome answers for the new claim and the job is not run again",
            o.job_id,
            attempt,
            o.attempt,
            extra={"job_id": o.job_id, "queue": o.queue, "attempt": attempt},
        )
        return True

    async def run(self) -> None:
        """Flush until close() is called and the buffer is empty. Never raises: losing this
        task would take every buffered outcome with it."""
        delay = 0.05
        failures = 0
        while True:
            if not self._buffer:
                self._backlog = 0
                self.settled.set()
                if self._closing:
                    return
                await self._pending.wait()
                self._pending.clear()
                urgent, self._urgent = self._urgent, False
                if self._flush_interval and not self._closing and not urgent:
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
                left = self._writing
                self._writing = 0
                if not is_transient(exc):  # _write_split lets only those out: a bug of ours
                    log.exception(
                        "outcomes of jobs %s not recorded", [o.job_id for o in batch[-left:]]
                    )
                    self.lost += left
                    self._taken(left)
                    continue
                failures += 1
                if self.settled.is_set():
                    self._backlog = len(self._buffer)
                    self.settled.clear()
                log.warning(
                    "cannot write %d job outcomes (%s); retrying in %.2fs",
                    left,
                    _one_line(exc),
                    delay,
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
                continue
            self._writing = 0
            failures = 0
            delay = 0.05

    def _taken(self, count: int) -> None:
        """`count` outcomes at the head of the buffer are done with."""
        del self._buffer[:count]
        self._writing = max(0, self._writing - count)
        if not self.settled.is_set():
            self._backlog -= count
            if self._backlog <= 0:
                self.settled.set()

    def _rotate(self, exc: Exception) -> None:
        """A single outcome keeps failing with an error taken for the connection's while the
        database answers: retry it after the others instead of in front of them."""
        o = self._buffer.pop(0)
        self._buffer.append(o)
        self._writing = max(0, self._writing - 1)
        if not self.settled.is_set():
            self._backlog -= 1  # pools need not wait for it
            if self._backlog <= 0:
                self.settled.set()
        log.warning(
            "job %s: writing its outcome keeps failing (%s) while the database answers; "
            "retrying it after the others",
            o.job_id,
            _one_line(exc),
            extra=_fields(o),
        )

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
        """After repeated failures, does the database answer? Then a batch that keeps failing
        is split, and a single outcome that does goes to the back, so no outcome that keeps
        failing for a reason we took for the connection's holds up the others."""
        try:
            await self._db.fetchval("SELECT 1", timeout=5)
        except Exception:  # still unreachable: the failures were the connection's
            return False
        return True

    async def _write_split(self, batch: list[Outcome], *, stuck: bool, top: bool = False) -> None:
        """Write `batch`, the head of the buffer, and take it off the buffer. A batch that
        PostgreSQL refuses is halved until the refused outcomes stand alone; what was written
        is off the buffer at once, so a lost connection halfway repeats nothing. Raises only
        transient errors, to be retried unchanged (a batch is halved on those too when
        `stuck`); never drops or rewrites an outcome for a transient error."""
        try:
            await self._write(batch, along=True)
        except Exception as exc:
            # A claim along that committed before the failure still reaches its pool.
            self._hand_over()
            transient = is_transient(exc)
            if len(batch) == 1:
                if transient and stuck:
                    self._rotate(exc)
                    return
                if transient:
                    raise
                await self._write_one(batch[0], exc)
                self._taken(1)
                return
            if transient and not stuck:
                raise
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
        self._taken(len(batch))
        self._hand_over()

    def _hand_over(self) -> None:
        """Start what a claim made with the write found, once the written outcomes are off the
        buffer: a job it claimed again is then matched against what is still to be written
        (see adopt), never against what was."""
        along, self._along = self._along, None
        if along is not None:
            rider, rows = along
            rider.claimed_along(rows)

    async def _write_one(self, outcome: Outcome, refused: Exception) -> None:
        """One outcome PostgreSQL refused for itself: write it with the refused value replaced
        by a note; if it refuses that too, park a finished job in stoker.jobs; else log it as
        lost. Raises only transient errors, to be retried unchanged."""
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
            if is_transient(exc):
                raise
            refused = exc
        if outcome.outcome in FINISHED:
            try:
                await self._park(outcome, refused)
                return
            except Exception as exc:
                if is_transient(exc):
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

    async def _write(self, batch: list[Outcome], *, along: bool = False) -> None:
        """Write `batch`. `along`: a pool of the batch's queues held back by its global limit
        may claim in the same statement (its rows are handed over by _hand_over)."""
        # Acquiring is apart from the statement: failing to connect is always worth a retry,
        # whatever the error says (a database refusing connections is not a refused outcome).
        try:
            conn = await self._db.acquire()
        except Exception as exc:
            raise ConnectionUnavailable(_one_line(exc)) from exc
        rows: list[asyncpg.Record] = []
        written: list[int] | None = None  # the ids a write along answers with
        try:
            succeeded = all(o.outcome == "succeeded" for o in batch)
            ride = self._ride(batch) if along and succeeded else None
            if ride is not None:
                written = await self._write_along(conn, batch, *ride)
            if written is None and succeeded:
                rows = await conn.fetch(
                    queries.COMPLETE_SUCCEEDED,
                    [o.job_id for o in batch],
                    [o.attempt for o in batch],
                    [o.result for o in batch],
                    self._worker_id,
                )
            elif written is None:
                rows = await self._write_mixed(conn, batch)
        finally:
            await self._db.release(conn)
        if written is not None:
            assert ride is not None
            self._account_finished(batch, written, claimed_for=ride[0])
            return
        self._account(batch, rows)
        cancelled = [row["id"] for row in rows if row.get("cancelled_here")]
        if cancelled:
            await self._move_cancelled(cancelled)

    def _ride(self, batch: list[Outcome]) -> tuple[Rider, tuple[object, ...]] | None:
        if self._rider is None or self._along_refused.refused:
            return None
        for queue in dict.fromkeys(o.queue for o in batch):
            rider = self._rider(queue)
            args = rider.claim_along() if rider is not None else None
            if rider is not None and args is not None:
                return rider, args
        return None

    async def _write_along(
        self,
        conn: asyncpg.Connection,
        batch: list[Outcome],
        rider: Rider,
        args: tuple[object, ...],
    ) -> list[int] | None:
        """The outcomes and the rider's claim in one statement: the ids of the outcomes
        written, or None if PostgreSQL refused it (the claim may be what it refused: a
        REPEATABLE READ default, say), and the outcomes are then written alone. A transient
        error is raised, the claim left to the pool."""
        try:
            rows = await conn.fetch(
                queries.FINISH_AND_CLAIM,
                [o.job_id for o in batch],
                [o.attempt for o in batch],
                [o.result for o in batch],
                *args,
            )
        except Exception as exc:
            rider.claimed_along(None)
            if is_transient(exc):
                raise
            if isinstance(exc, ALONG_UNAVAILABLE):
                # Every statement along would fail the same way: one warning, then none.
                if self._along_refused.refused:
                    return None  # another completer said so meanwhile
                self._along_refused.refused = True
                log.warning(
                    "outcomes of limited queues are written without their next claim from now "
                    "on (%s); their pools claim by themselves, a round trip more each",
                    _one_line(exc),
                )
            return None
        self._along = (rider, rows[1:])
        done: list[int] = rows[0]["done_ids"]
        return done

    async def _move_cancelled(self, ids: list[int]) -> None:
        """Requeues that a cancel request turned into 'cancelled' in stoker.jobs go on to
        history now; what this cannot move, the maintenance moves like a parked outcome."""
        for job_id in ids:
            try:
                await self._db.fetch(queries.MOVE_PARKED, job_id)
            except Exception as exc:  # never fail the write that is already done
                log.warning(
                    "job %s: cancelled, but not yet moved to history (%s); the maintenance "
                    "moves it",
                    job_id,
                    _one_line(exc),
                )

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

    def _account(self, batch: list[Outcome], rows: list[Any]) -> None:
        # A batch holds one outcome per job (see _next_batch): rows match outcomes by id.
        self.written += len(rows)
        if len(rows) != len(batch):
            seen = {row["id"] for row in rows}
            for o in batch:
                if o.job_id not in seen:
                    self._fenced_out(o)
        for row in rows:
            if row["run_at"] is not None:
                self._on_requeued(row["queue"], row["run_at"])
        if self._on_released is not None:
            for queue in {row["queue"] for row in rows}:
                self._on_released(queue)

    def _account_finished(self, batch: list[Outcome], ids: list[int], claimed_for: Rider) -> None:
        """_account for a write along, which answered with the ids of the outcomes it wrote.
        The pool it claimed for is not told of the slots they freed: its claim saw them."""
        self.written += len(ids)
        written = batch
        if len(ids) != len(batch):
            seen = set(ids)
            written = [o for o in batch if o.job_id in seen]
            for o in batch:
                if o.job_id not in seen:
                    self._fenced_out(o)
        if self._on_released is not None and self._rider is not None:
            for queue in {o.queue for o in written}:
                if self._rider(queue) is not claimed_for:
                    self._on_released(queue)

    def _fenced_out(self, o: Outcome) -> None:
        adopted = self._adoptions.pop(o.job_id, None)
        if adopted is not None and adopted > o.attempt:
            self.add(replace(o, attempt=adopted))  # this worker's new claim of the job
            return
        self.discarded += 1
        log.warning(
            "outcome %s of job %s attempt %s discarded: its lease expired and the job was "
            "handed to another attempt",
            o.outcome,
            o.job_id,
            o.attempt,
            extra=_fields(o),
        )
        if o.outcome in FINISHED:
            self._fenced[o.job_id] = o
            if len(self._fenced) > FENCED_KEPT:
                self._fenced.popitem(last=False)


# Errors of the statement along itself, not of the outcomes it writes (a missing migration, a
# revoked EXECUTE, an isolation level claim_limited refuses): they would recur on every write.
ALONG_UNAVAILABLE = (
    asyncpg.UndefinedFunctionError,
    asyncpg.InsufficientPrivilegeError,
    asyncpg.FeatureNotSupportedError,
)

# Consecutive failures after which a database that answers makes a batch that keeps failing
# split, and a single outcome that does go to the back (see Completer._reachable).
STUCK_AFTER = 5
ERROR_IN_NOTE = 2000
FENCED_KEPT = 10_000


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:ERROR_IN_NOTE]


def _fields(o: Outcome) -> dict[str, object]:
    return {"job_id": o.job_id, "queue": o.queue, "attempt": o.attempt}


def _salvage(outcome: Outcome, exc: Exception) -> Outcome:
    note = f"PostgreSQL refused part of this job's outcome: {_one_line(exc)}"
    if outcome.outcome == "succeeded" or (
        outcome.outcome == "cancelled" and outcome.result is not None
    ):
        return replace(outcome, result=json.dumps({"unrecorded_result": note}))
    return replace(outcome, error=note, traceback=None, delay=min(outcome.delay, 3600.0))
