"""What each event means, read from the database: one function per event, each given one
evaluation of a rule (RuleRun) to open, count and close its incidents in.

- job_failed: jobs failed for good, read by finished_at since the rule's cursor (with a margin
  for transactions that commit a little after their now(), and the ids already counted within
  it; failed jobs parked in stoker.jobs are counted once, by id, until they reach history),
  grouped by kind. Recovery: a job of that kind, on a queue the rule watches, succeeds after the
  last failure, or no failure for `recover_after` (default an hour: a kind that stopped running
  at all).
- schedule_failing: a schedule's newest `alert_after_failures` finished runs all failed (the
  run ledger, newest first). Recovery: its newest finished run succeeded (a later tick's, or the
  failed run retried by hand).
- schedule_late: a run's job still waits, never attempted, `grace` after its tick, or after it
  was put back to run when later (a paused queue, no daemon serving it, a deep backlog) ->
  schedule_late; ticks passed over by the catch-up policy, or due by more than `grace` and not
  handled by the leader at all -> schedule_missed. Recovery: nothing late, and the schedule's
  newest run has started.
- schedule_slow: a schedule's run still active past `max_duration`, once per run. Recovery:
  that run ended.
- queue_backlog: a queue's oldest due job has waited longer than `max_wait`. Recovery: it is
  back under."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from daemon.alerts import queries
from daemon.alerts.incidents import DELIVER_KIND, Incident, RuleRun, first_line, span, utc
from daemon.cron.cronspec import CronSpec

# Outcomes are written by transactions that may commit a little after their now(): reads by
# time look this far back again, and skip what they counted already.
OVERLAP = timedelta(seconds=10)
# The alerts' own jobs (besides the alert queue's): never alerted about, or they would alert about
# themselves.
OWN_KINDS = (DELIVER_KIND, "schedule.ping")
# How many of a schedule's newest ticks the late check looks through.
LATE_LOOKBACK = 50


@dataclass(frozen=True)
class ScheduleInfo:
    name: str
    spec: CronSpec
    queue: str
    enabled: bool
    ping_url: str | None
    started: datetime | None  # db schedules: no tick before this is expected


@dataclass
class Context:
    schedules: dict[str, ScheduleInfo]
    queues: list[str]  # what queue_backlog watches when a rule names none
    lead_since: datetime  # when this process started leading: no tick before is "missed"


def _when(value: Any) -> datetime | None:
    return datetime.fromisoformat(value) if isinstance(value, str) else None


def _selected(run: RuleRun, ctx: Context, *, enabled_only: bool = True) -> list[str]:
    wanted = set(run.rule.schedules)
    return sorted(
        name
        for name, info in ctx.schedules.items()
        if (not wanted or name in wanted) and (info.enabled or not enabled_only)
    )


# -- job_failed --------------------------------------------------------------------------------


async def job_failed(run: RuleRun, ctx: Context) -> None:
    since = _when(run.cursor.get("since"))
    seen: dict[str, str] = dict(run.cursor.get("seen") or {})
    parked: set[int] = set(run.cursor.get("parked") or [])
    next_since = run.now - OVERLAP
    if since is None:  # a new rule: failures from now on
        run.cursor = {"since": run.now.isoformat(), "seen": {}, "parked": []}
        return
    rows = await run.conn.fetch(queries.FAILED_SINCE, since, run.config.queue, list(OWN_KINDS))
    queues, kinds = set(run.rule.queues), set(run.rule.kinds)
    fresh = []
    for r in rows:
        if str(r["id"]) in seen or r["id"] in parked:
            continue  # counted already (a parked one is read again until it leaves stoker.jobs)
        if (queues and r["queue"] not in queues) or (kinds and r["kind"] not in kinds):
            continue
        fresh.append(r)
        if r["parked"]:
            parked.add(r["id"])
        else:
            seen[str(r["id"])] = r["finished_at"].isoformat()
    if parked:
        # Parked failures moved on to history are read there once more (a new finished_at):
        # `seen` skips them from now on; those gone otherwise (retried, deleted) are let go.
        for r in await run.conn.fetch(queries.PARKED_GONE, sorted(parked)):
            parked.discard(r["id"])
            if r["finished_at"] is not None:
                seen[str(r["id"])] = r["finished_at"].isoformat()
    by_kind: dict[str, list[Any]] = {}
    for r in fresh:
        by_kind.setdefault(r["kind"], []).append(r)
    # Recovery of the incidents open before this pass (a success after the last failure, else a
    # quiet period), read from this pass's `since`, or from the `since` of the pass that last
    # counted failures of the kind: a success between that pass and this one is not forgotten.
    open_kinds = list(run.incidents)
    for kind, failures in by_kind.items():
        await _count_failures(run, kind, failures, since)
    if open_kinds:
        await _recover(run, open_kinds, since, set(by_kind))
    run.cursor = {
        "since": max(since, next_since).isoformat(),
        "seen": {k: v for k, v in seen.items() if datetime.fromisoformat(v) > next_since},
        "parked": sorted(parked),
    }


async def _recover(
    run: RuleRun, open_kinds: list[str], since: datetime, failed_now: set[str]
) -> None:
    marks = [_when(run.incidents[k].cursor.get("successes_from")) for k in open_kinds]
    start = min([since, *(m for m in marks if m is not None)])
    succeeded = {
        r["kind"]: r
        for r in await run.conn.fetch(
            queries.SUCCEEDED_SINCE, start, open_kinds, list(run.rule.queues), run.config.queue
        )
    }
    for kind in open_kinds:
        incident = run.incidents[kind]
        last = _when(incident.cursor.get("last_failure_at")) or incident.opened_at
        ok = succeeded.get(kind)
        if ok is not None and ok["at"] > last:
            await run.close(
                incident,
                f"{kind} works again: job {ok['job_id']} succeeded, after "
                f"{incident.count} failure{'s' if incident.count != 1 else ''} for good "
                f"since {utc(incident.opened_at)}",
            )
        elif (run.now - last).total_seconds() >= run.rule.quiet:
            await run.close(
                incident,
                f"no job of {kind} has failed for {span(run.rule.quiet)}; closing the "
                f"incident after {incident.count} failures",
            )
        elif kind not in failed_now and "successes_from" in incident.cursor:
            del incident.cursor["successes_from"]  # read once more from there: enough
            incident.touched = True


async def _count_failures(run: RuleRun, kind: str, failures: list[Any], since: datetime) -> None:
    last = failures[-1]
    details = {
        "kind": kind,
        "queue": last["queue"],
        "job_id": last["id"],
        "attempt": last["attempts"],
        "error": first_line(last["last_error"]),
        "what": f"failures of {kind}",
        "latest": f"job {last['id']}: {first_line(last['last_error'])}",
    }
    last_at = max(r["finished_at"] for r in failures).isoformat()
    incident = run.incidents.get(kind)
    if incident is not None:
        run.add(incident, len(failures), **details)
        incident.cursor.update(last_failure_at=last_at, successes_from=since.isoformat())
        return
    first = failures[0]
    details.update(
        queue=first["queue"],
        job_id=first["id"],
        attempt=first["attempts"],
        error=first_line(first["last_error"]),
    )
    attempts = first["attempts"]
    text = (
        f"job {first['id']} ({kind} on queue {first['queue']}) failed for good after "
        f"{attempts} attempt{'s' if attempts != 1 else ''}: {first_line(first['last_error'])}"
    )
    if len(failures) > 1:
        text += f" (and {len(failures) - 1} more failures of {kind})"
    await run.open(
        "job_failed",
        kind,
        text,
        count=len(failures),
        cursor={"last_failure_at": last_at, "successes_from": since.isoformat()},
        details=details,
    )


# -- schedule_failing --------------------------------------------------------------------------


async def schedule_failing(run: RuleRun, ctx: Context) -> None:
    names = _selected(run, ctx, enabled_only=False)
    needed = run.rule.failures
    rows = await run.conn.fetch(queries.RECENT_RUNS, names, max(needed, 20))
    runs: dict[str, list[Any]] = {}
    for r in rows:
        runs.setdefault(r["schedule"], []).append(r)
    for name in names:
        recent = runs.get(name, [])
        if not recent:
            continue
        newest = recent[0]
        incident = run.incidents.get(name)
        if incident is None:
            streak = 0
            for r in recent:
                if r["state"] != "failed":
                    break
                streak += 1
            if streak >= needed:
                await run.open(
                    "schedule_failing",
                    name,
                    f"schedule {name} failed {streak} times in a row; last run: job "
                    f"{newest['job_id']} (tick {utc(newest['tick'])}): "
                    f"{first_line(newest['error'])}",
                    count=streak,
                    cursor={"tick": newest["tick"].isoformat()},
                    details=_run_details(name, newest),
                )
            continue
        seen = _when(incident.cursor.get("tick")) or incident.opened_at
        later = [r for r in recent if r["tick"] > seen]
        failed = [r for r in later if r["state"] == "failed"]
        # The newest run succeeded: a later tick's, or the failed run itself retried by hand
        # (`stoker jobs retry`: the same ledger row, a tick already counted).
        if newest["state"] == "succeeded":
            incident.count += len(failed)
            incident.cursor["tick"] = max(seen, newest["tick"]).isoformat()
            await run.close(
                incident,
                f"schedule {name} succeeded again (job {newest['job_id']}, tick "
                f"{utc(newest['tick'])}) after {incident.count} failed runs",
                job_id=newest["job_id"],
                error=None,
            )
        elif failed:
            incident.cursor["tick"] = later[0]["tick"].isoformat()
            run.add(incident, len(failed), **_run_details(name, failed[0]))


def _run_details(name: str, r: Any) -> dict[str, Any]:
    return {
        "schedule": name,
        "job_id": r["job_id"],
        "error": first_line(r["error"]),
        "what": f"failed runs of schedule {name}",
        "latest": f"job {r['job_id']}: {first_line(r['error'])}",
    }


# -- schedule_late (late and missed) -----------------------------------------------------------


async def schedule_late(run: RuleRun, ctx: Context) -> None:
    names = _selected(run, ctx)
    grace = run.rule.late_after
    late: dict[str, Any] = {}
    for r in await run.conn.fetch(queries.LATE_RUNS, names, LATE_LOOKBACK, grace):
        late.setdefault(r["schedule"], r)  # the oldest tick waiting
    missed = await _missed(run, ctx, names, grace)
    state = {r["name"]: r for r in await run.conn.fetch(queries.SCHEDULE_STATE, names)}
    for name in names:
        incident = run.incidents.get(name)
        if name in late:
            r = late[name]
            if incident is None:
                waited = (run.now - r["due"]).total_seconds()
                why = (
                    f"; queue {r['queue']} is paused"
                    if r["paused"]
                    else f"; is a daemon serving queue {r['queue']}, or is its backlog deep?"
                )
                await run.open(
                    "schedule_late",
                    name,
                    f"schedule {name} is late: the run of tick {utc(r['tick'])} (job "
                    f"{r['job_id']}) has not started {span(waited)} after "
                    + ("its tick" if r["due"] == r["tick"] else f"it was due ({utc(r['due'])})")
                    + f" (grace {span(grace)}){why}",
                    cursor={"job_id": r["job_id"], "tick": r["tick"].isoformat()},
                    details={
                        "schedule": name,
                        "queue": r["queue"],
                        "job_id": r["job_id"],
                        "what": f"late runs of schedule {name}",
                    },
                )
            continue
        if name in missed:
            ticks, why = missed[name]
            if incident is None:
                text = (
                    f"schedule {name} missed {len(ticks)} tick{'s' if len(ticks) != 1 else ''} "
                    f"({utc(ticks[0])}"
                    + (f" to {utc(ticks[-1])}" if len(ticks) > 1 else "")
                    + f"): {why}"
                )
                await run.open(
                    "schedule_missed",
                    name,
                    text,
                    count=len(ticks),
                    cursor={"tick": ticks[-1].isoformat()},
                    details={
                        "schedule": name,
                        "queue": ctx.schedules[name].queue,
                        "what": f"missed ticks of schedule {name}",
                        "latest": f"tick {utc(ticks[-1])}: {why}",
                    },
                )
            else:
                incident.cursor["tick"] = ticks[-1].isoformat()
                run.add(incident, len(ticks), latest=f"tick {utc(ticks[-1])}: {why}")
            continue
        if incident is not None:
            await _maybe_on_time(run, incident, state.get(name))
    for name in list(run.incidents):
        if name not in ctx.schedules or not ctx.schedules[name].enabled:
            await run.close(run.incidents[name], f"schedule {name} is disabled or gone")


async def _maybe_on_time(run: RuleRun, incident: Incident, state: Any) -> None:
    """Close when the schedule's newest run is no longer waiting (and, after missed ticks, a
    tick after them has fired)."""
    if state is None or state["last_job_id"] is None:
        return
    ids = [state["last_job_id"], incident.cursor.get("job_id") or 0]
    if await run.conn.fetch(queries.STILL_QUEUED, ids):
        return
    seen = _when(incident.cursor.get("tick"))
    if incident.event == "schedule_missed" and (
        seen is None or state["last_tick"] is None or state["last_tick"] <= seen
    ):
        return
    name = incident.subject
    await run.close(
        incident,
        f"schedule {name} runs on time again (job {state['last_job_id']}, tick "
        f"{utc(state['last_tick'])})",
        job_id=state["last_job_id"],
    )


async def _missed(
    run: RuleRun, ctx: Context, names: list[str], grace: float
) -> dict[str, tuple[list[datetime], str]]:
    """Per schedule, ticks that will never run: passed over by the catch-up policy (recorded by
    the leader), or due more than `grace` ago and not handled at all (the leader is not firing
    the schedule). Each tick is counted once, by a per-schedule mark in the cursor."""
    marks: dict[str, str] = dict(run.cursor.get("missed") or {})
    since = _when(run.cursor.get("since"))
    run.cursor["since"] = run.now.isoformat()
    found: dict[str, tuple[list[datetime], str]] = {}
    if since is not None:
        for r in await run.conn.fetch(queries.MISSED_SINCE, since - OVERLAP, names):
            mark = _when(marks.get(r["schedule"]))
            if mark is None or r["tick"] > mark:
                ticks, _ = found.setdefault(
                    r["schedule"],
                    ([], "passed over by the catch-up policy (no leader fired them in time)"),
                )
                ticks.append(r["tick"])
    states = {r["name"]: r for r in await run.conn.fetch(queries.SCHEDULE_STATE, names)}
    upto = run.now - timedelta(seconds=grace)
    for name in names:
        st = states.get(name)
        if name in found or st is None or st["last_tick"] is None:
            continue
        info = ctx.schedules[name]
        start = max(
            t for t in (st["last_tick"], info.started, ctx.lead_since, _when(marks.get(name))) if t
        )
        if start >= upto:
            continue
        overdue = info.spec.latest_ticks(start, upto, 1)
        if overdue:
            found[name] = (
                overdue,
                f"due more than {span(grace)} ago and not fired (the leader does not fire "
                "this schedule: see its log)",
            )
    for name, (ticks, _) in found.items():
        marks[name] = max(ticks).isoformat()
    run.cursor["missed"] = marks
    return found


# -- schedule_slow ------------------------------------------------------------------------------


async def schedule_slow(run: RuleRun, ctx: Context) -> None:
    assert run.rule.max_duration is not None  # the configuration requires it
    limit = run.rule.max_duration
    wanted = set(_selected(run, ctx, enabled_only=False))
    slow: dict[str, Any] = {}
    for r in await run.conn.fetch(queries.SLOW_RUNS, limit):
        if r["schedule"] in wanted:
            slow.setdefault(r["schedule"], r)  # the longest-running
    for name, incident in list(run.incidents.items()):
        job_id = incident.cursor.get("job_id")
        current = slow.get(name)
        if current is not None and current["id"] == job_id:
            continue
        rows = await run.conn.fetch(queries.JOB_STATES, [job_id or 0])
        job = rows[0] if rows else None
        if job is not None and job["state"] == "active" and current is None:
            continue  # its meta lost the schedule? still running: keep it open
        took = ""
        if job is not None and job["started_at"] and job["finished_at"]:
            took = f" after {span((job['finished_at'] - job['started_at']).total_seconds())}"
        ended = job["state"] if job is not None else "gone"
        await run.close(
            incident,
            f"schedule {name}: the slow run (job {job_id}) ended ({ended}){took}",
        )
    for name, r in slow.items():
        if name in run.incidents:
            continue
        await run.open(
            "schedule_slow",
            name,
            f"schedule {name}: its run (job {r['id']}) has been running for "
            f"{span(float(r['running_s']))}, past max_duration {span(limit)}",
            cursor={"job_id": r["id"]},
            details={
                "schedule": name,
                "queue": r["queue"],
                "kind": r["kind"],
                "job_id": r["id"],
                "attempt": r["attempts"],
                "what": f"slow runs of schedule {name}",
            },
        )


# -- queue_backlog ------------------------------------------------------------------------------


async def queue_backlog(run: RuleRun, ctx: Context) -> None:
    assert run.rule.max_wait is not None  # the configuration requires it
    limit = run.rule.max_wait
    queues = sorted(set(run.rule.queues or ctx.queues) - {run.config.queue})
    rows = {r["queue"]: r for r in await run.conn.fetch(queries.OLDEST_DUE, queues)}
    for queue in queues:
        r = rows.get(queue)
        waited = float(r["waited_s"]) if r is not None else 0.0
        incident = run.incidents.get(queue)
        if waited > limit and incident is None:
            await run.open(
                "queue_backlog",
                queue,
                f"queue {queue}: the oldest due job has waited {span(waited)} (max_wait "
                f"{span(limit)}); {r['due'] if r else 0} jobs are due",
                details={"queue": queue, "what": f"backlog reports of queue {queue}"},
            )
        elif waited <= limit and incident is not None:
            await run.close(
                incident,
                f"queue {queue} is back under max_wait {span(limit)}: the oldest due job has "
                f"waited {span(waited)}",
            )


EVALUATORS: dict[str, Callable[[RuleRun, Context], Awaitable[None]]] = {
    "job_failed": job_failed,
    "schedule_failing": schedule_failing,
    "schedule_late": schedule_late,
    "schedule_slow": schedule_slow,
    "queue_backlog": queue_backlog,
}
