"""One pool per queue: claim in batches sized to free slots, start each job under the queue's
concurrency limit and its timeout (daemon.jobrun runs it), hand outcomes to the completer."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Mapping
from dataclasses import replace
from datetime import datetime
from typing import Any, Protocol

import asyncpg

from daemon.config import QueueConfig
from daemon.engine.jobrun import (
    ClaimedJob,
    Deadlines,
    JobRunner,
    current_traceback,
    job_fields,
    outcome_label,
)
from daemon.engine.outcomes import Completer, Outcome
from daemon.engine.registry import Registry
from daemon.events import wait_any
from daemon.observe.metrics import Metrics
from daemon.store import queries
from daemon.store.clock import DbClock
from daemon.store.db import DB_ERRORS

log = logging.getLogger("stoker.pool")

# How long a pool with a backlog waits for more free slots before claiming into few of them.
GATHER_WINDOW = 0.005
# Shortest sleep of an idle pool between timer-driven claims that found nothing.
MIN_IDLE = 0.01
# Longest: a due job the claim keeps missing (a row someone holds locked) is looked for again
# with doubling pauses up to this, a few claims a second rather than a hundred.
MAX_IDLE_FLOOR = 1.0
# A pool that starts waiting while a producer's transaction is still open looks again after
# this, doubling up to MAX_RECHECK, until that transaction has ended (see _wait_registered).
MIN_RECHECK = 0.005
MAX_RECHECK = 1.0
# How soon a pool whose claim found some jobs but fewer than it asked for claims again, rather
# than saying it waits (see run): a wake-up a stream of inserts does not pay for with NOTIFYs.
# The pause doubles while claims keep finding jobs, so that a fast stream is claimed in
# batches (each claim and each outcome write costs the database about as much for one job as
# for fifty, on the cores the producers need) at the price of up to LINGER_MAX of latency.
LINGER_MIN = 0.001
LINGER_MAX = 0.010
# The longest a claim lent the listener's connection may take: the connection delivered a
# NOTIFY a moment ago, but may have gone half-open since; the claim is then retried on the pool.
LENT_TIMEOUT = 5.0
# A registered pool's own timer: the idle sweep looks for it every poll interval; this only
# bounds the sleep should the sweep itself be stuck.
POLL_BY_SWEEP = 60.0
# A pool held back by a rate limit claims this long after a start leaves the window, so that
# the window the database counts has surely moved past it.
LIMIT_MARGIN = 0.002
# How long the shutdown waits for jobs cancelled at its deadline to end (handed back), unless
# their handlers ask for longer (stop_grace).
HANDBACK_WAIT = 5.0


class Lender(Protocol):
    """A connection lent for one statement (the listener's: see Listener.lend)."""

    def lend(self) -> asyncpg.Connection | None: ...

    def give_back(self) -> None: ...


class QueuePool:
    def __init__(
        self,
        name: str,
        config: QueueConfig,
        *,
        db: asyncpg.Pool,
        registry: Registry,
        completer: Completer,
        worker_id: str,
        lease_seconds: float,
        stopping: asyncio.Event,
        clock: DbClock,
        metrics: Metrics | None = None,
        adaptive_notify: bool = True,
        resources: Mapping[type[Any], object] | None = None,
        cancel_grace: float = 5.0,
        second_completer: Completer | None = None,
    ) -> None:
        self.name = name
        self._cancel_grace = cancel_grace
        self.config = config
        self._db = db
        self._registry = registry
        # The completers that write this pool's outcomes, by lane (ClaimedJob.lane). A queue
        # with a global limit has two: held back by the limit, each job's slot is taken
        # until its outcome is written, and the next claim rides along with that write (see
        # claim_along). With one writer the limit's jobs drain in a serial cycle, the
        # database idle while the jobs run and the jobs idle while it writes; with two lanes
        # of about half the limit each, one lane's jobs run while the other's write.
        self._lanes = [completer]
        if second_completer is not None and config.global_concurrency is not None:
            self._lanes.append(second_completer)
        self.second_lane = _Lane(self, 1) if len(self._lanes) > 1 else None
        self._worker_id = worker_id
        self._lease_seconds = lease_seconds
        self._stopping = stopping
        self._clock = clock
        self._metrics = metrics
        self._adaptive = adaptive_notify
        self._runner = JobRunner(
            name,
            config,
            db=db,
            registry=registry,
            worker_id=worker_id,
            resources=resources if resources is not None else {},
        )
        self._registered_at: float | None = None  # when this pool last said it waits
        self._generation = 0  # see `registration`
        # Keyed by (job id, attempt): if a lease was lost and this pool claims the same job
        # again, both attempts count against the limit until each ends.
        self.running: dict[tuple[int, int], asyncio.Task[None]] = {}
        self._jobs: dict[tuple[int, int], ClaimedJob] = {}  # the same keys: for cancel()
        # The stop_grace of running jobs whose handler has one (see drain).
        self._stop_grace: dict[tuple[int, int], float] = {}
        self._wake = asyncio.Event()
        self._fetch_needed = True
        self._hint_due: float | None = None
        self._slot_freed = asyncio.Event()
        self._handing_back = False
        self._out_of_reach = 0  # empty claims in a row while a due job was waiting
        self._linger = LINGER_MIN
        # job id -> the attempt this worker claimed again while an older attempt still ran
        # here: the older attempt's outcome answers for it.
        self._adopted: dict[int, int] = {}
        self.claimed_total = 0
        self.lender: Lender | None = None  # where a claim woken by a NOTIFY may run
        self._notified = False  # woken by a NOTIFY since the last claim
        self._row_may_exist = False  # our stoker.waiting row may exist (see registration_lost)
        # What held the last claim back (a limited queue: see _claim): "global", "rate", "key".
        self.held_back: frozenset[str] = frozenset()
        self._retry_at: float | None = None  # a rate limit's window frees a start then (epoch)
        self._key_cursor: str | None = None  # a key-limited claim goes on after this key
        self._read_committed = False  # limited claims set READ COMMITTED themselves
        self._waiting_for_limit = False  # in _wait_for_limit: the completer may claim for us
        self._claiming = 0  # the jobs this pool's own limited claim in flight may bring
        self._awaiting_along = False  # waiting for claims along to end before claiming
        self._counted_at = 0.0  # when a claim last counted the limit (epoch)
        # Set while no claim rides along with an outcome write (claim_along): the pool makes
        # none of its own meanwhile, or it could claim past its concurrency.
        self._along_done = asyncio.Event()
        self._along_done.set()
        self._along: dict[int, int] = {}  # lane -> the jobs its claim along may bring
        self._along_stops_waiting: dict[int, bool] = {}
        self._released_meanwhile = False  # see released

    # -- wake-ups -----------------------------------------------------------------------------

    def wake(self, due_at: float | None = None, *, by_notify: bool = False) -> None:
        """A job is due now (due_at None or past), or will be at epoch `due_at`. `by_notify`:
        the listener's connection just delivered this, so it is alive (see _claim)."""
        if due_at is None or due_at <= self._clock.now():
            self._fetch_needed = True
            self._notified = self._notified or by_notify
        else:
            self._hint_due = due_at if self._hint_due is None else min(self._hint_due, due_at)
        self._wake.set()

    def registration_lost(self) -> None:
        """stoker.waiting may have lost our row (it is unlogged: a crash or a failover empties
        it): register afresh, and look again until producers that missed it have ended. It may
        also still be there (only the listener's connection was lost): the next claim deletes
        it, or inserts would go on NOTIFYing a busy pool."""
        self._set_registered(None)
        self._row_may_exist = True

    def note_requeued(self, run_at: datetime) -> None:
        self.wake(run_at.timestamp())

    def released(self) -> None:
        """Outcomes of this queue's jobs were written here, by a write without a claim along:
        their slots are free in the database now. A limited queue's pool claims again at once
        (a claim in flight may be about to say a limit held it back); while a claim along of
        the other lane is in flight, once it is over (it may have counted before this write
        committed, and say the limit holds the pool back)."""
        if not self.config.limited:
            return
        if not self._along_done.is_set():
            self._released_meanwhile = True
            return
        self._fetch_needed = True
        self._wake.set()

    # -- saying that this pool waits (stoker.waiting) -------------------------------------------

    @property
    def registered(self) -> bool:
        """Does this pool's row in stoker.waiting make inserts NOTIFY it?"""
        return self._registered_at is not None

    @property
    def registration(self) -> int:
        """Changes whenever this pool registers or stops: the sweep renews a registration
        only if it is still the one it saw."""
        return self._generation

    def renewed(self, at: float) -> None:
        """The idle sweep extended our row, in a statement sent at monotonic time `at`."""
        self._registered_at = at

    def registration_lapsed(self, now: float | None = None) -> bool:
        """Not registered, or the registration may have expired (it lasts 3 poll intervals):
        producers may have committed meanwhile without a NOTIFY."""
        since = self._registered_at
        if since is None:
            return True
        return (
            now if now is not None else time.monotonic()
        ) - since > self.config.poll_interval * 2

    def _set_registered(self, at: float | None) -> None:
        self._registered_at = at
        self._generation += 1

    # -- the claim loop -----------------------------------------------------------------------

    @property
    def free_slots(self) -> int:
        return self.config.concurrency - len(self.running)

    async def run(self) -> None:
        """Claim while there is work; say we wait (stoker.waiting) only once a claim finds none.

        Every insert into a queue that a pool waits for sends a NOTIFY, and a commit that
        carries one holds a database-wide lock through its WAL flush: notifying commits cannot
        share a flush. So a pool that was woken stops waiting in its claim, and while its claims
        keep finding jobs it claims again after a pause (LINGER_MIN doubling to LINGER_MAX)
        instead of waiting: a stream of inserts then sends one NOTIFY (a few, from the commits
        racing the claim), not one per job. A claim that finds nothing registers again, so a
        trickle still wakes it at once."""
        self._loop = asyncio.get_running_loop()
        failures = 0
        while not self._stopping.is_set():
            free = self.free_slots
            if free <= 0:
                self._slot_freed.clear()
                await self._slot_freed.wait()
                continue
            if free < self._claim_floor and self.running:
                # A backlog and only a few free slots: let a few more jobs finish so that one
                # claim carries many jobs instead of one round trip per job.
                await self._gather_slots()
                if self._stopping.is_set():
                    break
                free = self.free_slots
            unsettled = self._unsettled()
            if unsettled is not None:
                # Outcomes could not be written (the database was away): write them before
                # claiming again. A lease may have lapsed meanwhile, and claiming such a job
                # here would fence out its buffered outcome and run it a second time.
                await wait_any(unsettled.settled, self._stopping)
                continue
            if not self._along_done.is_set():
                self._awaiting_along = True
                try:
                    await wait_any(self._along_done, self._stopping)
                finally:
                    self._awaiting_along = False
                continue
            want = min(free, self.config.batch_size)
            room = self._room_left()
            if room <= 0:
                # This daemon's own jobs hold the whole global limit: a claim would find no
                # room. They claim along as their outcomes are written, or free slots.
                self._fetch_needed = False
                self._counted_at = self._clock.now()
                await self._wait_for_limit()
                continue
            want = min(want, room)
            self._wake.clear()
            self._fetch_needed = False
            stop_waiting = self.registered or self._row_may_exist
            if self.registered:
                self._set_registered(None)  # before the claim, so the sweep cannot renew it
            try:
                jobs = await self._claim(want, stop_waiting=stop_waiting)
            except DB_ERRORS as exc:
                failures += 1
                pause = min(self.config.poll_interval, 0.1 * 2**failures)
                why = str(exc) or type(exc).__name__  # a timeout's message is empty
                log.warning("queue %s: claim failed (%s); retrying in %.1fs", self.name, why, pause)
                await wait_any(self._wake, seconds=pause)
                continue
            failures = 0
            if jobs:
                self._out_of_reach = 0
                if self.second_lane is not None and "global" in self.held_back:
                    for i, job in enumerate(jobs):
                        job.lane = i % 2  # the limit is full: its writes go in two lanes
                self._start(jobs)
            if self.held_back - {"key"}:
                # The queue's global concurrency or rate limit is reached: new jobs would not
                # help, so the pool does not say it waits. A slot comes back when an outcome
                # is written (here: `released`; elsewhere: the poll), a lease is rescued
                # (NOTIFY), or the rate window lets a start go (retry_at).
                await self._wait_for_limit()
                continue
            if jobs:
                if len(jobs) < want and self._adaptive:
                    # More may be on the way: look again shortly, still without waiting.
                    await wait_any(self._wake, seconds=self._linger)
                    self._linger = min(self._linger * 2, LINGER_MAX)
                continue  # a full claim: there may be more, claim again as soon as slots allow
            if not self._adaptive:
                await self._idle(claimed_nothing=True)
                continue
            try:
                await self._wait_registered()
            except DB_ERRORS as exc:
                log.warning("queue %s: cannot update its waiting mark (%s)", self.name, exc)
                # Registered or not, the look after it did not happen: poll on our own timer
                # until a claim (which deletes any row left) and a registration succeed.
                self.registration_lost()
                await self._idle(claimed_nothing=True)

    async def _wait_for_limit(self) -> None:
        self._waiting_for_limit = True
        try:
            while not self._stopping.is_set() and not self._fetch_needed:
                # Slots other daemons free are seen by the next claim: one a poll interval
                # after the last, unless a claim along counted the limit meanwhile. A claim
                # along meanwhile may also have moved retry_at.
                deadline = self._counted_at + self.config.poll_interval
                if self._retry_at is not None:
                    deadline = min(deadline, self._retry_at + LIMIT_MARGIN)
                remaining = deadline - self._clock.now()
                if remaining <= 0:
                    return
                self._wake.clear()
                await wait_any(self._wake, seconds=remaining)
        finally:
            self._waiting_for_limit = False

    def _room_left(self) -> int:
        """At most how many jobs of a global limit a claim could bring: the limit less this
        daemon's jobs of the queue still active in the database (running, or their outcomes
        not yet written). Jobs of other daemons only make it less."""
        limit = self.config.global_concurrency
        if limit is None:
            return self.config.batch_size
        held = len(self.running) + sum(c.buffered_for(self.name) for c in self._lanes)
        return limit - held

    def _unsettled(self) -> Completer | None:
        return next((c for c in self._lanes if not c.settled.is_set()), None)

    def claim_along(self, lane: int = 0) -> tuple[object, ...] | None:
        """The arguments of a claim the completer of `lane` makes in the statement that writes
        this queue's outcomes (Completer's rider), while the pool waits for its global limit.
        Then `claimed_along` gets what it found, and the pool claims nothing meanwhile."""
        if (
            lane in self._along
            # Also while the pool's own claim is in flight, or about to be made once the
            # other lane's claim along is over: writing these outcomes alone would free slots
            # that claim may not see, and the pool would claim again, and again.
            or not (self._waiting_for_limit or self._claiming or self._awaiting_along)
            or "global" not in self.held_back
            or self._read_committed  # its claims need a transaction of their own
            or self._stopping.is_set()
            or self._unsettled() is not None
        ):
            return None
        # Claims in flight (the other lane's, the pool's own) may bring as many as they asked.
        reserved = self._claiming + sum(self._along.values())
        want = min(self.free_slots - reserved, self.config.batch_size)
        if want <= 0:
            return None
        self._along[lane] = want
        self._along_done.clear()
        stops = self._along_stops_waiting[lane] = self._row_may_exist
        return self._limited_args(want, stop_waiting=stops)

    def claimed_along(self, rows: list[asyncpg.Record] | None, lane: int = 0) -> None:
        """The claim made with an outcome write: start what it found; None, it was not made.
        Still held back by a limit, the pool goes on waiting; else it claims again itself."""
        try:
            if rows is not None:
                stopped = self._along_stops_waiting.get(lane, False)
                jobs = self._took(rows, stopped_waiting=stopped, offset=1)
                for job in jobs:
                    job.lane = lane  # its outcome is written, and claims along, in this lane
                if jobs and self._stopping.is_set():
                    self._hand_back_along(jobs)
                elif jobs:
                    self._out_of_reach = 0
                    self._start(jobs)
            if rows is None or not self.held_back - {"key"}:
                self._fetch_needed = True
        except Exception:  # never leave the pool waiting on a claim that is over
            log.exception("queue %s: starting the jobs of a claim along failed", self.name)
            self._fetch_needed = True
        finally:
            self._along.pop(lane, None)
            self._along_stops_waiting.pop(lane, None)
            if not self._along:
                self._along_done.set()
                if self._released_meanwhile:
                    self._released_meanwhile = False
                    self._fetch_needed = True
            self._wake.set()

    def _hand_back_along(self, jobs: list[ClaimedJob]) -> None:
        """Jobs a claim along found once the daemon was stopping: this pool may have drained
        already, so they are handed back unstarted (their attempt not counted). The completer
        writes that before it ends: this runs inside its write."""
        for job in jobs:
            if job.attempt > 1 and self._claimed_again(job):
                continue  # an older attempt's outcome answers for it
            log.info(
                "job %s claimed while the daemon stops; handed back to the queue unstarted",
                job.id,
                extra=job_fields(job, self.name),
            )
            self._lanes[job.lane].add(Outcome(job.id, job.attempt, self.name, "handback"))

    async def _wait_registered(self) -> None:
        """After a claim that found nothing: say we wait, look once more, and sleep.

        The insert trigger looks for a waiting pool when a job is inserted, not when its
        transaction commits. A transaction that inserted before our registration committed
        and commits after our last look sends no NOTIFY. It had a transaction id by then, so
        it was among those in progress just after we registered (AFTER_REGISTERING): once none
        of them is (their jobs are visible to a look now, or rolled back), nothing is missed.
        Unrelated transactions are in that list too; they only make us look a few more times.
        Producers pay nothing for it."""
        self._linger = LINGER_MIN
        await self._register()
        # Registered *before* this last look, so that an insert committed after it finds us
        # registered and sends its NOTIFY.
        in_flight, next_due = await self._db.fetchrow(queries.AFTER_REGISTERING, self.name)
        if next_due is not None and next_due.timestamp() <= self._clock.now():
            # A due job the claim did not get: committed just after it, or locked by someone.
            # _idle looks again at once, then backs off; each look registers afresh.
            await self._idle(claimed_nothing=True, next_due=next_due, looked=True)
            return
        claimed_nothing = True
        recheck = MIN_RECHECK
        while in_flight:
            # Meanwhile a job may fall due (a delayed job's hint, a retry, one the last look
            # saw): claim it then, as _idle would, however long the in-flight ones last.
            due = self._hint_due
            if next_due is not None:
                due = min(due if due is not None else math.inf, next_due.timestamp())
            wait = recheck if due is None else min(recheck, due - self._clock.now())
            self._wake.clear()
            if wait > 0:
                await wait_any(self._wake, seconds=wait)
            if self._fetch_needed or self._stopping.is_set():
                return  # woken: claim now (it stops the registration and looks anyway)
            if due is not None and due <= self._clock.now():
                self._hint_due = None
                return
            in_flight = await self._db.fetchval(queries.STILL_IN_FLIGHT, in_flight)
            recheck = min(recheck * 2, MAX_RECHECK)
            if not in_flight:
                next_due = await self._db.fetchval(queries.NEXT_DUE, self.name)
                claimed_nothing = False  # a job due now was not there at our claim
        await self._idle(claimed_nothing=claimed_nothing, next_due=next_due, looked=True)

    async def _register(self) -> None:
        self._row_may_exist = True  # even if the reply is lost
        sent = time.monotonic()
        await self._db.execute(
            queries.REGISTER_WAITING, self.name, self._worker_id, self.config.poll_interval * 3
        )
        self._set_registered(sent)

    @property
    def _claim_floor(self) -> int:
        return max(1, min(self.config.batch_size, self.config.concurrency) // 2)

    async def _gather_slots(self) -> None:
        deadline = time.monotonic() + GATHER_WINDOW
        while self.free_slots < self._claim_floor and self.running:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self._stopping.is_set():
                return
            self._slot_freed.clear()
            await wait_any(self._slot_freed, seconds=remaining)

    async def _claim(self, limit: int, *, stop_waiting: bool) -> list[ClaimedJob]:
        if self.config.limited:
            return await self._claim_limited(limit, stop_waiting=stop_waiting)
        args = (self.name, limit, self._worker_id, self._lease_seconds)
        # Only a claim woken by a NOTIFY goes to the listener's connection: that connection
        # has just proved alive. Woken otherwise (the idle sweep, a reconnect), it may be
        # half-open, and a claim sent on it would hang until its timeout.
        lender = self.lender if stop_waiting and self._notified else None
        self._notified = False
        conn = lender.lend() if lender is not None else None
        if lender is not None and conn is not None:
            try:
                rows = await conn.fetch(queries.CLAIM_AND_STOP_WAITING, *args, timeout=LENT_TIMEOUT)
            finally:
                lender.give_back()
        else:
            sql = queries.CLAIM_AND_STOP_WAITING if stop_waiting else queries.CLAIM
            rows = await self._db.fetch(sql, *args)
        if stop_waiting:
            self._row_may_exist = False
        self.claimed_total += len(rows)
        # Positional: the columns of queries.CLAIM, in order.
        return [ClaimedJob(*r) for r in rows]

    async def _claim_limited(self, limit: int, *, stop_waiting: bool) -> list[ClaimedJob]:
        """The claim of a queue with limits, on the pool (a claim waits for the queue's limits
        lock, which the listener's connection must never do)."""
        args = self._limited_args(limit, stop_waiting=stop_waiting)
        self._claiming = limit
        try:
            try:
                rows = await self._fetch_limited(args)
            except asyncpg.FeatureNotSupportedError as exc:
                if self._read_committed or "READ COMMITTED" not in str(exc):
                    raise
                # The database or role sets another default isolation: limited claims then
                # run in transactions of their own, at the price of two more round trips each.
                log.warning(
                    "queue %s: the default transaction isolation is not READ COMMITTED; its "
                    "limited claims set it themselves",
                    self.name,
                )
                self._read_committed = True
                rows = await self._fetch_limited(args)
        finally:
            self._claiming = 0
        self._notified = False
        return self._took(rows, stopped_waiting=stop_waiting)

    def _limited_args(self, limit: int, *, stop_waiting: bool) -> tuple[object, ...]:
        c = self.config
        rate = c.rate_limit
        return (
            self.name,
            limit,
            self._worker_id,
            self._lease_seconds,
            stop_waiting,
            c.global_concurrency,
            c.key_concurrency,
            rate.count if rate is not None else None,
            rate.window if rate is not None else None,
            c.rate_limit_by_key,
            self._key_cursor,
        )

    def _took(
        self, rows: list[asyncpg.Record], *, stopped_waiting: bool, offset: int = 0
    ) -> list[ClaimedJob]:
        """The jobs of a limited claim's rows (stoker.claim_limited's columns from `offset`
        on), and what held it back."""
        if stopped_waiting:
            self._row_may_exist = False
        jobs: list[ClaimedJob] = []
        held: set[str] = set()
        retry_at: float | None = None
        keys: list[str] = []
        for r in rows:
            if r["id"] is not None:
                jobs.append(ClaimedJob(*tuple(r)[offset : offset + 8]))
                if r["concurrency_key"] is not None:
                    keys.append(r["concurrency_key"])
            elif r["blocked"] is not None:
                held.add(r["blocked"])
                if r["retry_at"] is not None:
                    at = r["retry_at"].timestamp()
                    retry_at = at if retry_at is None else min(retry_at, at)
        self.held_back = frozenset(held)
        self._retry_at = retry_at
        self._counted_at = self._clock.now()
        if keys:
            # The keys were served in turn from the cursor, round to the start: the next
            # claim goes on after the last of them in that order.
            cursor = self._key_cursor
            wrapped = [k for k in keys if cursor is not None and k <= cursor]
            self._key_cursor = max(wrapped or keys)
        self.claimed_total += len(jobs)
        return jobs

    async def _fetch_limited(self, args: tuple[object, ...]) -> list[asyncpg.Record]:
        if not self._read_committed:
            return list(await self._db.fetch(queries.CLAIM_LIMITED, *args))
        async with self._db.acquire() as conn, conn.transaction(isolation="read_committed"):
            return list(await conn.fetch(queries.CLAIM_LIMITED, *args))

    async def _idle(
        self, *, claimed_nothing: bool, next_due: datetime | None = None, looked: bool = False
    ) -> None:
        """Sleep until woken by NOTIFY, the earliest known run_at, or the poll interval.

        A registered pool has no timer of its own: the daemon's idle sweep (daemon.engine.
        waiting) renews its registration and looks at its queue every poll interval, in one
        statement for all idle pools, and wakes it if a job is due."""
        now = self._clock.now()
        deadline = now + (POLL_BY_SWEEP if self.registered else self.config.poll_interval)
        # After an empty claim, a timer wake-up waits at least a moment, so that a job whose
        # run_at is a hair away, or due but held by another worker's claim, or clocks that
        # disagree, cannot make the pool spin.
        floor = now + MIN_IDLE if claimed_nothing else now
        if not looked:
            try:
                next_due = await self._db.fetchval(queries.NEXT_DUE, self.name)
            except DB_ERRORS:
                next_due = None
        if next_due is not None and next_due.timestamp() <= now and "key" in self.held_back:
            # The due jobs may all be of keys at their limit: claiming again would find none.
            # A slot of theirs coming back wakes us (here: `released`; on another daemon: the
            # idle sweep's look), as do a new job and a rate window's end (below).
            next_due = None
        if self._retry_at is not None:
            deadline = min(deadline, self._retry_at + LIMIT_MARGIN)
            floor = min(floor, deadline)
        if next_due is not None:
            due = next_due.timestamp()
            if claimed_nothing and due <= now:
                # Due, yet the claim did not get it: it committed just after the claim, or
                # another worker's claim holds it, or a transaction has it locked. Look again
                # at once, then soon, but less often each time.
                self._out_of_reach = min(self._out_of_reach + 1, 9)
                if self._out_of_reach > 1:
                    floor = now + min(MAX_IDLE_FLOOR, MIN_IDLE * 2 ** (self._out_of_reach - 2))
                else:
                    floor = now
            else:
                self._out_of_reach = 0
            deadline = min(deadline, due)
        while not self._stopping.is_set():
            if self._hint_due is not None:
                deadline = min(deadline, self._hint_due)
                self._hint_due = None
            remaining = max(deadline, floor) - self._clock.now()
            if self._fetch_needed or remaining <= 0:
                return
            self._wake.clear()
            await wait_any(self._wake, seconds=remaining)

    # -- running jobs -------------------------------------------------------------------------

    def _start(self, jobs: list[ClaimedJob]) -> None:
        now = self._loop.time()
        groups: dict[float, Deadlines] = {}
        for job in jobs:
            if job.attempt > 1 and self._claimed_again(job):
                continue
            handler = self._registry.get(job.kind)
            timeout = (handler.timeout if handler is not None else None) or self.config.timeout
            group = groups.get(timeout)
            if group is None:
                group = groups[timeout] = Deadlines()
            job.handler, job.timeout, job.deadlines = handler, timeout, group
            key = (job.id, job.attempt)
            # Unnamed, and from the loop itself: naming a task per job cost 2% of the daemon's
            # CPU in a drain, asyncio.create_task's lookups 8% of the pool's own Python.
            task = self._loop.create_task(self._execute(job))
            self.running[key] = group.tasks[key] = task
            self._jobs[key] = job
            if handler is not None and handler.stop_grace is not None:
                self._stop_grace[key] = handler.stop_grace
        for timeout, group in groups.items():
            group.timer = self._loop.call_at(now + timeout, group)

    def _claimed_again(self, job: ClaimedJob) -> bool:
        """This worker lost the job's lease (the database was away, or the loop blocked) and
        claimed it again: if an older attempt is still running or its outcome still waits to
        be written, that attempt answers for this claim instead of a second run."""
        for attempt in range(job.attempt - 1, 0, -1):
            if (job.id, attempt) in self.running:
                self._adopted[job.id] = job.attempt
                log.warning(
                    "job %s claimed again (attempt %s) while attempt %s still runs here; "
                    "not starting it twice",
                    job.id,
                    job.attempt,
                    attempt,
                    extra=job_fields(job, self.name),
                )
                return True
        return any(c.adopt(job.id, job.attempt) for c in self._lanes)

    def _release(self, job: ClaimedJob) -> None:
        key = (job.id, job.attempt)
        self.running.pop(key, None)
        self._jobs.pop(key, None)
        if self._stop_grace:
            self._stop_grace.pop(key, None)
        if job.deadlines is not None:
            job.deadlines.done(key)
        self._slot_freed.set()

    def running_ids(self) -> list[int]:
        return [job_id for job_id, _ in self.running]

    def runs(self, job_id: int) -> bool:
        return any(key[0] == job_id for key in self._jobs)

    def cancel(self, job_id: int) -> bool:
        """Someone cancelled job `job_id` (stoker.cancel): if it runs here, its handler sees
        ctx.cancelled now and its task is cancelled after cancel_grace seconds. True if it
        runs here. Called again for the same job (NOTIFY, then a heartbeat) it does nothing."""
        found = False
        for key, job in list(self._jobs.items()):
            if key[0] != job_id:
                continue
            found = True
            if job.cancel_requested:
                continue
            job.cancel_requested = True
            if job.ctx is not None:
                job.ctx.cancelled.set()
            log.info(
                "job %s: cancel requested; its task is interrupted in %gs unless it ends",
                job_id,
                self._cancel_grace,
                extra=job_fields(job, self.name),
            )
            asyncio.get_running_loop().call_later(self._cancel_grace, self._interrupt, key, job)
        return found

    def _interrupt(self, key: tuple[int, int], job: ClaimedJob) -> None:
        task = self.running.get(key)
        if task is None or task.done() or self._jobs.get(key) is not job:
            return  # it ended within the grace
        log.warning(
            "job %s: still running %gs after its cancel request; interrupting it",
            job.id,
            self._cancel_grace,
            extra=job_fields(job, self.name),
        )
        job.interrupted = True
        task.cancel()

    async def _execute(self, job: ClaimedJob) -> None:
        outcome: Outcome | None = None
        started = time.monotonic()
        if self._metrics is not None:
            self._metrics.job_started(self.name, (job.started_at - job.run_at).total_seconds())
        try:
            outcome = await self._runner.run(job)
            if job.cancel_requested:
                outcome = self._runner.cancelled(job, outcome)
        except Exception:
            # A fault of ours, not the handler's (which _run_handler catches): record it
            # rather than leave the job to expire and run again.
            outcome = self._runner.fail(
                job, "internal error while running the job", current_traceback()
            )
        except asyncio.CancelledError:
            if self._handing_back:
                outcome = Outcome(job.id, job.attempt, self.name, "handback")
                log.warning(
                    "job %s did not finish before the shutdown deadline; handed back to the queue",
                    job.id,
                    extra=job_fields(job, self.name),
                )
            raise
        finally:
            self._release(job)
            if outcome is not None:
                if self._adopted and job.id in self._adopted:
                    outcome = replace(outcome, attempt=self._adopted.pop(job.id))
                self._lanes[job.lane].add(outcome)
                if self._metrics is not None:
                    self._metrics.job_ended(
                        self.name, job.kind, outcome_label(outcome), time.monotonic() - started
                    )

    # -- shutdown -----------------------------------------------------------------------------

    def stop_claiming(self) -> None:
        """Called once `stopping` is set: end every wait so the claim loop sees it."""
        self._wake.set()
        self._slot_freed.set()

    async def drain(self, deadline: float) -> None:
        """Let running jobs finish until `deadline` (loop time); hand the rest back."""
        tasks = list(self.running.values())
        if tasks:
            await asyncio.wait(
                tasks, timeout=max(0.0, deadline - asyncio.get_running_loop().time())
            )
        left = {key: t for key, t in self.running.items() if not t.done()}
        if left:
            self._handing_back = True
            for task in left.values():
                task.cancel()
            # A handler may need longer than 5 s to stop once cancelled (command.run stops
            # its process group: SIGTERM, then SIGKILL after kill_grace): wait for the
            # longest stop_grace among them. The wait ends as soon as they all have.
            grace = max([HANDBACK_WAIT, *(self._stop_grace.get(key, 0.0) for key in left)])
            await asyncio.wait(left.values(), timeout=grace)


class _Lane:
    """The second lane of a pool held back by its global limit: the Rider its second completer
    claims along for."""

    __slots__ = ("_lane", "_pool")

    def __init__(self, pool: QueuePool, lane: int) -> None:
        self._pool = pool
        self._lane = lane

    def claim_along(self) -> tuple[object, ...] | None:
        return self._pool.claim_along(self._lane)

    def claimed_along(self, rows: list[asyncpg.Record] | None) -> None:
        self._pool.claimed_along(rows, self._lane)
