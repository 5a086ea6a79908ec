"""The composition root: builds everything from Settings, owns start-up and shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import os
import signal
from datetime import datetime
from functools import partial

import asyncpg
from aiohttp import web

from daemon.alerts.evaluator import Evaluator, serve_alert_queue
from daemon.config import Settings
from daemon.cron.leader import Leader
from daemon.cron.schedules import prune_ticks
from daemon.cron.timer import Scheduler
from daemon.engine.listener import Listener
from daemon.engine.loopwatch import LoopWatch
from daemon.engine.maintenance import (
    heartbeat_loop,
    maintenance_loop,
    prune_rate_starts,
    purge_loop,
    vacuum_loop,
)
from daemon.engine.outcomes import AlongRefused, Completer, Rider, RiderFn
from daemon.engine.pool import QueuePool
from daemon.engine.registry import REGISTRY, Registry
from daemon.engine.resources import Resources
from daemon.engine.waiting import IdleSweep
from daemon.errors import ConfigError, StokerError
from daemon.events import wait_any
from daemon.observe.metrics import Metrics
from daemon.observe.systemd import Notifier
from daemon.operate import throughput, workers
from daemon.operate.limits import MismatchWatch, configured_limits, daemon_text, served_limits
from daemon.store import queries
from daemon.store.clock import DbClock
from daemon.store.db import (
    COMMAND_TIMEOUT,
    CONNECT_ERRORS,
    DB_ERRORS,
    close_quietly,
    connect,
    create_pool,
    describe_failure,
    pooling_problem,
    probe_pooling,
)
from daemon.store.migrations import ReadOnlyServer, migrate, pending_migrations, read_only
from daemon.web.server import HealthState, HttpServer, build_app, loop_lag_probe, sample_database

log = logging.getLogger("stoker")

FLUSH_AT_EXIT_TIMEOUT = 10.0
# Seconds between looks for a writable server while the one found is a standby: a failover's
# promotion takes a second or two, and each look is one connection.
READ_ONLY_RETRY = 1.0


class PoolFloorFilter(logging.Filter):
    """asyncpg's pool logs each failed try to reopen its minimum connection with a traceback,
    every second of an outage (a failover): one line with the error, scrubbed, is enough."""

    def __init__(self, dsn: str) -> None:
        super().__init__()
        self._dsn = dsn

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[1] is not None:
            failure = describe_failure(self._dsn, record.exc_info[1])
            record.msg = f"{record.getMessage()}: {failure}"
            record.args = None
            record.exc_info = record.exc_text = None
        return True


class StartupError(StokerError):
    """The daemon cannot start: the message says why and what to do."""


class Runtime:
    def __init__(self, settings: Settings, registry: Registry = REGISTRY) -> None:
        serve_alert_queue(settings)  # alert messages and pings: a queue of their own
        pool_log = logging.getLogger("asyncpg.pool")
        for old in [f for f in pool_log.filters if isinstance(f, PoolFloorFilter)]:
            pool_log.removeFilter(old)  # one per process, however many runtimes a test builds
        pool_log.addFilter(PoolFloorFilter(settings.database_url))
        self.settings = settings
        self.registry = registry
        self.stopping = asyncio.Event()
        # Set once running jobs are drained and their outcomes written: heartbeats go on
        # until then, or another daemon would rescue jobs that are still running here.
        self.finished = asyncio.Event()
        self.stop_deadline: float | None = None
        self.clock = DbClock()
        self.pools: dict[str, QueuePool] = {}
        self.resources = Resources()
        self.listener: Listener | None = None
        # database_url goes through a transaction pooler (found at start, see _check_pooling)
        self.pooled = False
        self.completers: list[Completer] = []  # the second: see QueuePool's lanes
        self.db: asyncpg.Pool | None = None
        self._cancel_checks: set[asyncio.Task[None]] = set()
        self.leader: Leader | None = None
        self.scheduler: Scheduler | None = None
        self.alerts: Evaluator | None = None
        self.metrics = Metrics(settings.queues, registry.kinds())
        self.health = HealthState(draining=self.stopping.is_set)
        self.notifier = Notifier()
        self.http: HttpServer | None = None
        self.me = workers.Worker(
            settings.worker_id,
            list(settings.queues),
            limits=served_limits(settings.queues),
            gone_after_s=workers.gone_after(settings.lease_seconds),
        )
        me = {"worker": self.me.worker, "host": self.me.host, "pid": self.me.pid}
        self.limits_watch = MismatchWatch(daemon_text(me), served_limits(settings.queues))
        self._announced = False
        self.read_only: str | None = None  # why the pool's server takes no writes, if it does not

    # -- wiring ----------------------------------------------------------------------------

    def _on_notify(self, queue: str, due_at: float | None) -> None:
        pool = self.pools.get(queue)
        if pool is not None:
            pool.wake(due_at, by_notify=True)

    def _on_cancel(self, job_id: int) -> None:
        """A cancel request for a job (stoker.cancel): the pool running it here stops it."""
        for pool in self.pools.values():
            if pool.cancel(job_id):
                return

    def _on_cancel_notified(self, job_id: int) -> None:
        """A NOTIFY on stoker_cancel for a job running here. Any role that can connect may
        send one, so the request is read from the job's row (where stoker.cancel puts it)
        before the job is stopped; the heartbeat reads it there anyway."""
        if self.db is None or not any(p.runs(job_id) for p in self.pools.values()):
            return
        task = asyncio.get_running_loop().create_task(self._confirm_cancel(self.db, job_id))
        self._cancel_checks.add(task)
        task.add_done_callback(self._cancel_checks.discard)

    async def _confirm_cancel(self, db: asyncpg.Pool, job_id: int) -> None:
        try:
            requested = await db.fetchval(queries.CANCEL_REQUESTED, job_id)
        except DB_ERRORS as exc:
            log.warning(
                "job %s: cannot read its cancel request (%s); the heartbeat will", job_id, exc
            )
            return
        if requested:
            self._on_cancel(job_id)
        else:
            log.warning(
                "job %s: a stoker_cancel notification without a cancel request; ignored", job_id
            )

    def _wake_all(self) -> None:
        for pool in self.pools.values():
            pool.registration_lost()
            pool.wake()
        self._announce()

    def _announce(self) -> None:
        """READY=1 once migrated, pools up and (unless poll-only) the listener connected."""
        if self._announced:
            return
        self._announced = True
        queues = ", ".join(f"{n}({p.config.concurrency})" for n, p in self.pools.items())
        self.notifier.ready(f"serving {queues}")
        log.info(
            "ready: worker %s serving queues %s with handlers %s",
            self.settings.worker_id,
            queues,
            ", ".join(self.registry.kinds()) or "none",
        )

    def _on_requeued(self, queue: str, run_at: datetime) -> None:
        pool = self.pools.get(queue)
        if pool is not None:
            pool.note_requeued(run_at)

    def _rider(self, queue: str) -> QueuePool | None:
        """The pool whose claims may ride along with its outcome writes: one with a global
        concurrency limit (see Completer)."""
        pool = self.pools.get(queue)
        return pool if pool is not None and pool.config.global_concurrency is not None else None

    def _second_rider(self, queue: str) -> Rider | None:
        """The same, for the second completer: the pool's second lane."""
        pool = self.pools.get(queue)
        return pool.second_lane if pool is not None else None

    def _on_released(self, queue: str) -> None:
        pool = self.pools.get(queue)
        if pool is not None:
            pool.released()

    def _schedules_changed(self) -> None:
        if self.scheduler is not None:
            self.scheduler.schedules_changed()

    def _running_ids(self) -> list[int]:
        ids = [job_id for pool in self.pools.values() for job_id in pool.running_ids()]
        for completer in self.completers:
            ids.extend(completer.buffered_ids())  # still active until written
        return ids

    def request_stop(self) -> None:
        if not self.stopping.is_set():
            log.info("shutdown requested: claiming stops, running jobs may finish")
            self.stop_deadline = loop_time() + self.settings.shutdown_timeout
            self.stopping.set()
            self.notifier.stopping("draining: waiting for running jobs")
            for pool in self.pools.values():
                pool.stop_claiming()

    # -- life cycle ------------------------------------------------------------------------

    async def _check_pooling(self) -> None:
        """Refuse, before anything reports ready, a setup a transaction pooler breaks."""
        s = self.settings
        named = (
            ("database_url", "database_url / DATABASE_URL", s.database_url),
            ("listen_dsn", "listen_dsn / STOKER_LISTEN_DSN", s.listen_dsn),
        )
        for name, where, dsn in named:
            if dsn is None:
                continue
            try:
                pooling = await probe_pooling(dsn, statement_cache_size=s.statement_cache_size)
            except CONNECT_ERRORS as exc:
                if name == "listen_dsn":
                    # As before this check: the listener keeps trying to connect, and the
                    # pools poll meanwhile; a listen_dsn down at start does not stop the daemon.
                    log.warning("listen_dsn not checked: %s", describe_failure(dsn, exc))
                    continue
                raise StartupError(
                    f"cannot connect to the database at {describe_failure(dsn, exc)} "
                    f"(check {where} and that PostgreSQL is running)"
                ) from exc
            if name == "listen_dsn":
                if pooling.transaction:
                    raise StartupError(
                        "listen_dsn goes through a transaction pooler: it must be a direct "
                        "PostgreSQL connection (LISTEN, the cron leader's lock and migrations "
                        "need a session of their own)"
                    )
                continue
            self.pooled = pooling.transaction
            problem = pooling_problem(
                pooling,
                statement_cache_size=s.statement_cache_size,
                has_listen_dsn=s.listen_dsn is not None,
                poll_only=s.poll_only,
                run_scheduler=s.run_scheduler,
                migrate_on_start=s.migrate_on_start,
            )
            if problem:
                raise StartupError(problem)

    async def _connect(self) -> asyncpg.Pool:
        s = self.settings
        await self._check_pooling()
        try:
            return await create_pool(
                s.database_url,
                max_size=s.db_pool_size,
                statement_cache_size=s.statement_cache_size,
                application_name=f"stoker {s.worker_id}"[:63],
            )
        except CONNECT_ERRORS as exc:
            raise StartupError(
                f"cannot connect to the database at {describe_failure(s.database_url, exc)} "
                "(check database_url / DATABASE_URL and that PostgreSQL is running)"
            ) from exc

    async def _prepare_schema(self, db: asyncpg.Pool) -> None:
        s = self.settings
        async with db.acquire() as conn:
            reason = await read_only(conn)
        if reason is not None:
            raise ReadOnlyServer(reason)
        if s.migrate_on_start and self.pooled and s.listen_dsn:
            # The migration lock is a session lock: through a transaction pooler it would be
            # taken on one server session and released on another, or never.
            conn = await connect(s.listen_dsn, application_name="stoker migrate")
            try:
                await migrate(conn)
            finally:
                await close_quietly(conn)
            return
        async with db.acquire() as conn:
            if s.migrate_on_start:
                await migrate(conn)
            elif await pending_migrations(conn):
                raise StartupError(
                    "the database schema is not current and migrate_on_start is off: "
                    "run `stoker migrate` first"
                )

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        try:
            db = await self._connect_writable()
            if db is not None:
                self.db = db
                try:
                    await self._serve(db)
                finally:
                    await db.close()
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
        log.info("stopped")
        return 0

    async def _connect_writable(self) -> asyncpg.Pool | None:
        """A pool on a server that takes writes, with the schema current; None if the daemon
        is stopped while the only server found is a standby. Each try connects afresh, so
        that a multi-host DATABASE_URL finds the new primary once one is promoted."""
        said: str | None = None
        while True:
            db = await self._connect()
            try:
                await self._prepare_schema(db)
                if said is not None:
                    log.info("the database takes writes now: starting")
                return db
            except ReadOnlyServer as exc:
                await db.close()
                if str(exc) != said:  # one line per server found, not one per try
                    log.warning(
                        "%s; not starting: looking again every %.0fs (point DATABASE_URL at the "
                        "primary, or list every host with target_session_attrs=read-write)",
                        exc,
                        READ_ONLY_RETRY,
                    )
                said = str(exc)
            except BaseException:
                await db.close()
                raise
            await wait_any(self.stopping, seconds=READ_ONLY_RETRY)
            if self.stopping.is_set():
                return None

    async def _watch_writable(self, db: asyncpg.Pool) -> None:
        """Says once when the pool's server turns read-only (a failover behind a single host
        name, default_transaction_read_only) and drops the pool's connections, so that a
        multi-host URL reconnects them to the new primary; /ready fails meanwhile."""
        while not self.stopping.is_set():
            await wait_any(self.stopping, seconds=self.settings.rescue_interval)
            if self.stopping.is_set():
                return
            try:
                async with asyncio.timeout(COMMAND_TIMEOUT), db.acquire() as conn:
                    reason = await read_only(conn)
            except DB_ERRORS:
                continue  # a server that is down: the pools and the readiness probe say so
            if reason is not None:
                db.expire_connections()
            if reason != self.read_only:
                if reason is not None:
                    log.warning("%s: claims and writes fail until a primary answers", reason)
                else:
                    log.info("the database takes writes again")
                self.read_only = self.health.read_only = reason

    async def _serve(self, db: asyncpg.Pool) -> None:
        s = self.settings
        urgent = frozenset(
            name
            for name, q in s.queues.items()
            if q.global_concurrency is not None or q.key_concurrency is not None
        )
        riders: list[RiderFn] = [self._rider]
        if any(q.global_concurrency is not None for q in s.queues.values()):
            riders.append(self._second_rider)
        along_refused = AlongRefused()
        self.completers = [
            Completer(
                db,
                worker_id=s.worker_id,
                flush_interval=s.flush_interval,
                flush_max=s.flush_max,
                on_requeued=self._on_requeued,
                on_released=self._on_released,
                rider=rider,
                urgent_queues=urgent,
                along_refused=along_refused,
            )
            for rider in riders
        ]
        completer = self.completers[0]
        second = self.completers[1] if len(self.completers) > 1 else None
        for name, config in s.queues.items():
            self.pools[name] = QueuePool(
                name,
                config,
                db=db,
                registry=self.registry,
                completer=completer,
                second_completer=second,
                worker_id=s.worker_id,
                lease_seconds=s.lease_seconds,
                stopping=self.stopping,
                clock=self.clock,
                metrics=self.metrics,
                adaptive_notify=not s.poll_only,
                resources=self.resources,
                cancel_grace=s.cancel_grace if config.cancel_grace is None else config.cancel_grace,
            )
        await self.clock.sync(db)
        self._wire_metrics(db)
        self.health.db = db
        try:
            peers = await workers.register(db, self.me)
        except DB_ERRORS as exc:
            log.warning("cannot write this daemon into stoker.workers: %s", exc)
        else:
            self._compare_limits(peers)
        if s.http.enabled:
            app = build_app(
                s.http, self.health, self.metrics, self._admin_app(db), self._dashboard_app(db)
            )
            self.http = HttpServer(app, s.http)
            try:
                await self.http.start()
            except OSError as exc:
                raise StartupError(str(exc)) from exc
        for hook in self.registry.startup_hooks:
            await hook(s)
        try:
            await self.resources.open(self.registry.resources, s)
            await self._run_tasks(db)
        finally:
            await self.resources.close()
            for hook in self.registry.shutdown_hooks:
                try:
                    await hook(s)
                except Exception:  # one resource failing to close must not keep others open
                    log.exception("shutdown hook %s failed", getattr(hook, "__qualname__", hook))
            if self.http is not None:
                await self.http.stop()
            self.notifier.close()

    def _admin_app(self, db: asyncpg.Pool) -> web.Application | None:
        token = self.settings.http.admin_token
        if not token:
            return None  # the admin API is off without a token
        from daemon.web.admin import create_admin_app

        return create_admin_app(
            db=db,
            settings=self.settings,
            token=token,
            max_body_bytes=self.settings.http.max_body_bytes,
        )

    def _dashboard_app(self, db: asyncpg.Pool) -> web.Application | None:
        if not self.settings.http.admin_token:
            return None  # the dashboard is off without a token, like the admin API
        from daemon.web.dashboard import create_dashboard_app

        return create_dashboard_app(
            db=db, settings=self.settings, sample=lambda: self.health.queue_sample
        )

    def _wire_metrics(self, db: asyncpg.Pool) -> None:
        completers = self.completers
        snap = self.metrics.snapshot
        snap.running = lambda: {n: (len(p.running), p.free_slots) for n, p in self.pools.items()}
        snap.leader = lambda: self.leader is not None and self.leader.is_leader
        snap.listener_reconnects = lambda: self.listener.reconnects if self.listener else 0
        snap.discarded = lambda: sum(c.discarded for c in completers)
        snap.parked = lambda: sum(c.parked for c in completers)
        snap.lost = lambda: sum(c.lost for c in completers)
        snap.db_pool = lambda: (db.get_size(), db.get_size() - db.get_idle_size())
        snap.schedules = lambda: dict(self.scheduler.stats) if self.scheduler else {}
        snap.skipped_by_reason = lambda: (
            dict(self.scheduler.skipped_by_reason) if self.scheduler else {}
        )
        snap.limits = configured_limits(self.settings.queues)
        snap.limited = lambda: {n: p.held_back for n, p in self.pools.items() if p.held_back}
        snap.limits_mismatch = self.limits_watch.mismatched

    async def _beat(self, db: asyncpg.Pool) -> None:
        """The registry's "still here", and a look at the daemons started since: one deployed
        later with other limits is noticed by those already running."""
        self._compare_limits(await workers.seen(db, self.me))

    def _compare_limits(self, peers: list[asyncpg.Record]) -> None:
        # Only a warning rides on it: a row it cannot read (written by some other version)
        # must not stop the start, nor the heartbeat that renews the running jobs' leases.
        try:
            self.limits_watch.note(peers)
        except Exception:
            log.exception("cannot compare this daemon's queue limits with the other daemons'")

    async def _run_tasks(self, db: asyncpg.Pool) -> None:
        watch = LoopWatch(
            threshold=self.settings.lease_seconds / 3, lease_seconds=self.settings.lease_seconds
        )
        watch.start()
        try:
            await self._run_task_group(db)
        finally:
            watch.stop()

    async def _run_task_group(self, db: asyncpg.Pool) -> None:
        s = self.settings
        async with asyncio.TaskGroup() as tg:
            completer_tasks = {
                tg.create_task(c.run(), name=f"stoker-completer-{i}")
                for i, c in enumerate(self.completers)
            }
            background = [
                tg.create_task(
                    heartbeat_loop(
                        db,
                        worker_id=s.worker_id,
                        lease_seconds=s.lease_seconds,
                        running_ids=self._running_ids,
                        stopping=self.finished,
                        on_beat=partial(self._beat, db),
                        on_cancel=self._on_cancel,
                    ),
                    name="stoker-heartbeat",
                ),
                tg.create_task(
                    maintenance_loop(
                        db,
                        rescue_interval=s.rescue_interval,
                        stopping=self.stopping,
                        clock=self.clock,
                    ),
                    name="stoker-maintenance",
                ),
                tg.create_task(
                    purge_loop(
                        db,
                        retention_seconds=s.history_retention_days * 86_400,
                        stopping=self.stopping,
                        also=[
                            partial(prune_ticks, keep_days=s.ledger_retention_days),
                            workers.prune,
                            prune_rate_starts,
                        ],
                    ),
                    name="stoker-purge",
                ),
            ]
            if s.vacuum_after_claims:
                background.append(
                    tg.create_task(
                        vacuum_loop(
                            db,
                            after_claims=s.vacuum_after_claims,
                            claimed=lambda: sum(p.claimed_total for p in self.pools.values()),
                            stopping=self.stopping,
                        ),
                        name="stoker-vacuum",
                    )
                )
            if s.run_scheduler:
                self.leader = Leader(
                    s.listen_dsn or s.database_url,
                    worker_id=s.worker_id,
                    retry=s.leader_retry,
                    stopping=self.stopping,
                )
                self.scheduler = Scheduler(
                    s.schedules,
                    leader=self.leader,
                    clock=self.clock,
                    stopping=self.stopping,
                    served_queues=set(s.queues),
                )
                background.append(tg.create_task(self.leader.run(), name="stoker-leader"))
                background.append(tg.create_task(self.scheduler.run(), name="stoker-scheduler"))
                self.alerts = Evaluator(
                    s.alerts,
                    db=db,
                    leader=self.leader,
                    stopping=self.stopping,
                    configured=s.schedules,
                    queues=list(s.queues),
                )
                background.append(tg.create_task(self.alerts.run(), name="stoker-alerts"))
                leader = self.leader
                background.append(
                    tg.create_task(
                        throughput.record_loop(
                            db, is_leader=lambda: leader.is_leader, stopping=self.stopping
                        ),
                        name="stoker-throughput",
                    )
                )
            if not s.poll_only:
                self.listener = Listener(
                    s.listen_dsn or s.database_url,
                    on_notify=self._on_notify,
                    on_connected=self._wake_all,
                    probe_interval=s.listener_probe_interval,
                    stopping=self.finished,  # up until the drain ends, so /ready tells one story
                    statement_cache_size=s.statement_cache_size,
                    on_schedules_changed=self._schedules_changed,
                    on_cancel=self._on_cancel_notified,
                )
                background.append(tg.create_task(self.listener.run(), name="stoker-listener"))
                for pool in self.pools.values():
                    pool.lender = self.listener
                sweep = IdleSweep(
                    list(self.pools.values()),
                    db=db,
                    worker_id=s.worker_id,
                    stopping=self.stopping,
                )
                background.append(tg.create_task(sweep.run(), name="stoker-idle-sweep"))
            else:
                self._announce()
            self.health.listener_up = lambda: (
                s.poll_only or bool(self.listener and self.listener.connected)
            )
            background += [
                tg.create_task(loop_lag_probe(self.health, self.finished), name="stoker-lag"),
                tg.create_task(self._watch_writable(db), name="stoker-writable"),
                tg.create_task(
                    sample_database(
                        self.health,
                        self.metrics,
                        self.finished,
                        s.http.depth_sample_interval,
                        schedules=s.schedules,
                        queues=s.queues,
                    ),
                    name="stoker-sampler",
                ),
                tg.create_task(self.notifier.watchdog(self.finished), name="stoker-watchdog"),
            ]
            claimers = [
                tg.create_task(pool.run(), name=f"stoker-pool-{name}")
                for name, pool in self.pools.items()
            ]
            await self.stopping.wait()
            deadline = self.stop_deadline or loop_time()
            # Each ends at its next step, unless a statement hangs (a half-open connection):
            # then at the shutdown deadline, cancelled. A claim cut off that way may have
            # claimed jobs on the server; their leases expire and they run again.
            _, hung = await asyncio.wait(claimers, timeout=max(0.0, deadline - loop_time()))
            for task in hung:
                task.cancel()
            if hung:
                await asyncio.wait(hung)
            await asyncio.gather(*(pool.drain(deadline) for pool in self.pools.values()))
            for completer in self.completers:
                await completer.close()
            flush_until = loop_time() + FLUSH_AT_EXIT_TIMEOUT
            while True:
                _, unwritten = await asyncio.wait(
                    completer_tasks, timeout=max(0.0, flush_until - loop_time())
                )
                # The last write of one completer may still hand an outcome to another that
                # has ended (a claim along at the shutdown, adopting a job whose earlier
                # outcome the other keeps): that one writes again.
                late = [c for c in self.completers if c.buffered]
                if unwritten or not late or loop_time() >= flush_until:
                    break
                completer_tasks = {tg.create_task(c.run(), name="stoker-completer") for c in late}
            if unwritten or late:
                log.error(
                    "could not write %d job outcomes before exit; those jobs will be rescued "
                    "when their leases expire and run again",
                    sum(c.buffered for c in self.completers),
                )
                for task in unwritten:
                    task.cancel()
            with contextlib.suppress(*DB_ERRORS):
                # Jobs handed back are due now: let other daemons know.
                await db.execute(queries.NOTIFY_QUEUES, list(self.pools))
                await db.execute(queries.UNREGISTER_WORKER, s.worker_id)
            self.finished.set()
            await asyncio.gather(*background)
            with contextlib.suppress(*DB_ERRORS):
                await workers.unregister(db, s.worker_id)  # after the last heartbeat


def setup_django(settings: Settings) -> None:
    """With `django_settings`: Django set up before handler_modules are imported (they may
    use its models), and the handler of django.tasks jobs registered."""
    if settings.django_settings is None:
        return
    try:
        import django
    except ImportError:
        raise ConfigError(
            "django_settings is set but Django is not installed: pip install 'stoker[django]'"
        ) from None
    os.environ["DJANGO_SETTINGS_MODULE"] = settings.django_settings
    try:
        django.setup()
    except Exception as exc:
        raise ConfigError(
            f"django_settings: cannot set up Django with {settings.django_settings!r}: "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    django_handler = importlib.import_module("daemon.contrib.django.handler")
    try:
        django_handler.import_tasks_modules()
    except Exception as exc:
        raise ConfigError(
            f"django_settings: an installed app's tasks module does not import: "
            f"{type(exc).__name__}: {exc}"
        ) from exc


def loop_time() -> float:
    return asyncio.get_running_loop().time()
