"""The alert loop: while this process leads, every evaluate_interval, each rule is evaluated in
a transaction of its own (incidents, cursor and message jobs together), and schedules' runs
that succeeded are pinged (ping_url). Only the leader evaluates; a transaction-level advisory
try-lock per rule keeps two processes that briefly both believe they lead from evaluating the
same rule at once, and since all state is in the database, the next leader carries on."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from datetime import datetime
from typing import Any

import asyncpg

from daemon.alerts import queries
from daemon.alerts.incidents import RuleRun, as_dict
from daemon.alerts.rules import EVALUATORS, Context, ScheduleInfo
from daemon.config import BackoffConfig, QueueConfig, ScheduleConfig, Settings
from daemon.config.alerts import AlertsConfig
from daemon.cron.cronspec import CronSpec
from daemon.cron.leader import Leader
from daemon.events import wait_any
from daemon.store.db import DB_ERRORS

log = logging.getLogger("stoker.alerts")

LOCK_KEY = int.from_bytes(b"alrt", "big", signed=True)
PING_RULE = "(ping)"  # the ping cursor's name in stoker.alert_cursors: no rule can be called so
PING_KIND = "schedule.ping"
PING_ATTEMPTS = 3
KEEP_CLOSED_DAYS = 30
PRUNE_EVERY = 3600.0
# The events whose rules read the schedules.
SCHEDULE_EVENTS = frozenset({"schedule_failing", "schedule_late", "schedule_slow"})


def alert_queue(settings: Settings) -> QueueConfig | None:
    """The internal queue's settings when this daemon should serve it (any rule, a configured
    ping_url, or serve_queue), unless [queues.NAME] configures it already; else None."""
    alerts = settings.alerts
    pinging = any(s.ping_url for s in settings.schedules.values())
    if not (alerts.in_use or pinging) or alerts.queue in settings.queues:
        return None
    return QueueConfig(
        concurrency=alerts.concurrency,
        max_attempts=alerts.max_attempts,
        timeout=60.0,
        poll_interval=5.0,
        backoff=BackoffConfig(base=2.0, cap=300.0, jitter=0.2),
    )


def serve_alert_queue(settings: Settings) -> None:
    """Add the internal queue to the queues this daemon serves, when it should."""
    config = alert_queue(settings)
    if config is not None:
        settings.queues[settings.alerts.queue] = config


class Evaluator:
    def __init__(
        self,
        config: AlertsConfig,
        *,
        db: asyncpg.Pool,
        leader: Leader,
        stopping: asyncio.Event,
        configured: dict[str, ScheduleConfig],
        queues: list[str],
    ) -> None:
        self.config = config
        self._db = db
        self._leader = leader
        self._stopping = stopping
        self._configured = configured
        self._queues = queues
        self._lead_since: datetime | None = None
        self._next_prune = 0.0
        self._warned: set[str] = set()
        # stoker.schedules as last read, read again only when it changed since the snapshot
        # of the last look; parsed cron expressions by (cron, timezone), None for one that
        # does not parse.
        self._snapshot: str | None = None
        self._rows: list[asyncpg.Record] = []
        self._specs: dict[tuple[str, str], CronSpec | None] = {}
        self._infos: dict[str, ScheduleInfo] | None = None
        self._needs_schedules = any(r.event in SCHEDULE_EVENTS for r in config.rules.values())
        self.passes = 0
        self.messages = 0

    async def run(self) -> None:
        while not self._stopping.is_set():
            if not self._leader.is_leader:
                self._lead_since = None
                await wait_any(self._stopping, seconds=self.config.evaluate_interval)
                continue
            try:
                await self.run_pass()
            except DB_ERRORS as exc:
                log.warning("alerts: database error (%s); trying again", exc)
            except Exception:  # a bug must not stop the daemon: say so and carry on
                log.exception("alerts: evaluation failed")
            await wait_any(self._stopping, seconds=self.config.evaluate_interval)

    async def run_pass(self) -> None:
        async with self._db.acquire() as conn:
            if self._lead_since is None:
                # Once a lead: an idle daemon's every statement counts (#16: at most 5 a
                # second for a daemon with nothing to do), and the rules only change with a
                # restart.
                self._lead_since = await conn.fetchval(queries.NOW)
                log.info(
                    "alerts: evaluating %d rule(s) every %gs",
                    len(self.config.rules),
                    self.config.evaluate_interval,
                )
                # Incidents of rules removed or renamed since: closed, without a message.
                await conn.execute(queries.CLOSE_ORPHANS, list(self.config.rules))
            pinged = await self._read_schedules(conn)
            ctx = Context(self._schedule_infos(), self._queues, self._lead_since)
            for name, rule in self.config.rules.items():
                if not self._leader.is_leader or self._stopping.is_set():
                    return
                try:
                    await self._evaluate(conn, name, rule, ctx)
                except DB_ERRORS:
                    raise
                except Exception:
                    log.exception("alerts: rule %s could not be evaluated", name)
            await self._ping(conn, pinged)
            if time.monotonic() >= self._next_prune:
                self._next_prune = time.monotonic() + PRUNE_EVERY
                await conn.execute(queries.PRUNE_INCIDENTS, KEEP_CLOSED_DAYS)
        self.passes += 1

    async def _evaluate(self, conn: asyncpg.Connection, name: str, rule: Any, ctx: Context) -> None:
        async with conn.transaction():
            if not await conn.fetchval(queries.TRY_LOCK_RULE, LOCK_KEY, name):
                return  # another process evaluates it right now
            now: datetime = await conn.fetchval(queries.NOW)
            run = await RuleRun.load(conn, now, name, rule, self.config)
            await EVALUATORS[rule.event](run, ctx)
            await run.digest("occurrences")
            await run.save_cursor()
        for doc in run.sent:
            self.messages += 1
            log.info(
                "alert %s (rule %s, incident %s): %s",
                doc["event"],
                name,
                doc["incident_id"],
                doc["text"],
            )

    async def _read_schedules(self, conn: asyncpg.Connection) -> list[str]:
        """Read stoker.schedules again when it changed; return the schedules with a ping_url."""
        look = await conn.fetchrow(queries.SCHEDULES_CHANGED, self._snapshot)
        if look["changed"]:
            # Read after the look: a change in between is seen again by the next one.
            self._rows = list(await conn.fetch(queries.DB_SCHEDULES))
            self._infos = None
        self._snapshot = look["snapshot"]
        urls = {r["name"]: r["ping_url"] for r in self._rows}
        urls.update((name, cfg.ping_url) for name, cfg in self._configured.items())
        return sorted(name for name, url in urls.items() if url)

    def _schedule_infos(self) -> dict[str, ScheduleInfo]:
        """The schedules the rules watch, their cron expressions parsed once (none when no rule
        watches schedules)."""
        if not self._needs_schedules:
            return {}
        if self._infos is not None:
            return self._infos
        specs: dict[tuple[str, str], CronSpec | None] = {}
        found: dict[str, ScheduleInfo] = {}
        for row in self._rows:
            spec = self._spec(specs, row["cron"], row["timezone"])
            if spec is None:
                continue  # the leader's log names it
            found[row["name"]] = ScheduleInfo(
                row["name"], spec, row["queue"], row["enabled"], row["ping_url"], row["started"]
            )
        for name, cfg in self._configured.items():  # the configuration wins
            spec = self._spec(specs, cfg.cron, cfg.timezone)
            if spec is not None:
                found[name] = ScheduleInfo(name, spec, cfg.queue, cfg.enabled, cfg.ping_url, None)
        self._specs = specs  # only the expressions in use: the cache stays as big as the list
        self._infos = found
        return found

    def _spec(
        self, specs: dict[tuple[str, str], CronSpec | None], cron: str, timezone: str
    ) -> CronSpec | None:
        key = (cron, timezone)
        if key not in specs:
            if key in self._specs:
                specs[key] = self._specs[key]
            else:
                try:
                    specs[key] = CronSpec(cron, timezone)
                except ValueError:
                    specs[key] = None
        return specs[key]

    async def _ping(self, conn: asyncpg.Connection, pinged: list[str]) -> None:
        """A `schedule.ping` job for each schedule run with a ping_url that succeeded since the
        last pass; the URL itself stays in the configuration, never in a job."""
        if not pinged:
            return
        if self.config.queue not in self._queues and PING_RULE not in self._warned:
            self._warned.add(PING_RULE)
            log.warning(
                "alerts: schedules have a ping_url but this daemon does not serve queue %s: "
                "set [alerts] serve_queue = true on the daemons",
                self.config.queue,
            )
        async with conn.transaction():
            if not await conn.fetchval(queries.TRY_LOCK_RULE, LOCK_KEY, PING_RULE):
                return
            now: datetime = await conn.fetchval(queries.NOW)
            marks = as_dict(await conn.fetchval(queries.CURSOR, PING_RULE))
            after = [datetime.fromisoformat(marks[n]) if n in marks else now for n in pinged]
            for n, at in zip(pinged, after, strict=True):
                marks.setdefault(n, at.isoformat())
            for r in await conn.fetch(queries.SUCCEEDED_RUNS, pinged, after):
                await conn.fetchval(
                    queries.ENQUEUE_MESSAGE,
                    self.config.queue,
                    PING_KIND,
                    json.dumps(
                        {
                            "schedule": r["schedule"],
                            "tick": r["tick"].isoformat(),
                            "job_id": r["job_id"],
                        }
                    ),
                    PING_ATTEMPTS,
                    json.dumps({"ping": r["schedule"]}),
                )
                marks[r["schedule"]] = r["tick"].isoformat()
            for name in set(marks) - set(pinged):
                del marks[name]
            await conn.execute(queries.SAVE_CURSOR, PING_RULE, json.dumps(marks))
