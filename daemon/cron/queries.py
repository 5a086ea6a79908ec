"""The cron room's SQL: schedules, their state and the tick fence. Values are always $n
parameters. Jobs are enqueued through stoker.enqueue, like any producer (store.queries)."""

from __future__ import annotations

# Which session holds the leader's advisory lock: $1 its application-name prefix.
LEADER = """
SELECT application_name FROM pg_stat_activity
 WHERE application_name LIKE $1 || '%'
   AND pid IN (SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted)
 LIMIT 1
"""

SCHEDULES = """
SELECT * FROM stoker.schedules ORDER BY name
"""

CURSORS = """
SELECT name, last_tick, timetable, paused_at FROM stoker.schedule_state
"""

SAVE_CURSOR = """
INSERT INTO stoker.schedule_state (name, last_tick, timetable) VALUES ($1, $2, $3)
ON CONFLICT (name) DO UPDATE SET last_tick = greatest(
    stoker.schedule_state.last_tick, excluded.last_tick),
    timetable = coalesce(excluded.timetable, stoker.schedule_state.timetable),
    updated_at = now()
"""

# Also which schedules are paused, and since when (one row per schedule in schedule_state): a
# pause or resume whose NOTIFY did not arrive is noticed by the next comparison.
FINGERPRINT = """
SELECT count(*), max(updated_at), sum(xmin::text::bigint),
       (SELECT string_agg(p.name || '@' || p.paused_at::text, ',' ORDER BY p.name)
          FROM stoker.schedule_state p WHERE p.paused_at IS NOT NULL) AS paused
  FROM stoker.schedules
"""

# Whether schedule $1 is paused, in the transaction that fires one of its ticks: the row lock
# orders a fire and a pause, so that no tick is fired after a pause commits, by any leader.
PAUSED_FOR_FIRE = """
SELECT paused_at IS NOT NULL FROM stoker.schedule_state WHERE name = $1 FOR NO KEY UPDATE
"""

# Pause schedule $1 ($2 by whom); the moment is taken after the row lock, so that every tick
# fired before it is older. Returns the moment (the first pause's, if it was paused already).
PAUSE = """
INSERT INTO stoker.schedule_state (name, paused_at, paused_by)
VALUES ($1, clock_timestamp(), $2)
ON CONFLICT (name) DO UPDATE SET
    paused_at = coalesce(stoker.schedule_state.paused_at, clock_timestamp()),
    paused_by = CASE WHEN stoker.schedule_state.paused_at IS NULL THEN excluded.paused_by
                     ELSE stoker.schedule_state.paused_by END,
    updated_at = now()
RETURNING paused_at
"""

# Resume schedule $1: its cursor moves to now, so that no tick from while it was paused fires
# (like enabling it again); true if it was paused.
RESUME = """
UPDATE stoker.schedule_state SET paused_at = NULL, paused_by = NULL,
       last_tick = greatest(last_tick, clock_timestamp()), updated_at = now()
 WHERE name = $1 AND paused_at IS NOT NULL
RETURNING true
"""

NOTIFY_SCHEDULES = "SELECT pg_notify('stoker_schedules', '')"


# Ticks $2 of schedule $1 that will never fire, outcome $3, each with its reason ($4).
RECORD_SKIPPED = """
WITH new AS (
    INSERT INTO stoker.schedule_ticks (schedule, tick, outcome, reason)
    SELECT $1, t, $3, r FROM unnest($2::timestamptz[], $4::text[]) AS u(t, r)
    ON CONFLICT DO NOTHING RETURNING 1)
SELECT count(*) FROM new
"""

# $3 ticks of schedule $1 were skipped, the last at $2.
COUNT_SKIPPED = """
INSERT INTO stoker.schedule_state (name, last_tick, skipped, last_skipped)
VALUES ($1, $2, $3, $2)
ON CONFLICT (name) DO UPDATE SET
    last_tick = greatest(stoker.schedule_state.last_tick, excluded.last_tick),
    skipped = stoker.schedule_state.skipped + excluded.skipped,
    last_skipped = greatest(stoker.schedule_state.last_skipped,
                            excluded.last_skipped),
    updated_at = now()
"""

# The fence: one row per (schedule, tick) ever. A tick whose row exists was handled, by this
# process or another that believed it led. $3: fired late by a catch-up, $4 saying how late.
CLAIM_TICK = """
INSERT INTO stoker.schedule_ticks (schedule, tick, outcome, caught_up, reason)
VALUES ($1, $2, 'fired', $3, $4) ON CONFLICT DO NOTHING RETURNING true
"""

PREVIOUS_RUN_GOING = """
SELECT j.id, j.state::text AS state FROM stoker.schedule_state s
 JOIN stoker.jobs j ON j.id = s.last_job_id
WHERE s.name = $1 AND j.state IN ('queued', 'active')
"""

# job_id: the run still going ($3), named in the reason ($4) too. The ledger trigger copies that
# job's end into this row as well; readers take a run's end only from fired and manual rows.
TICK_SKIPPED_OVERLAP = """
UPDATE stoker.schedule_ticks SET outcome = 'skipped_overlap', caught_up = false, job_id = $3,
    reason = $4
WHERE schedule = $1 AND tick = $2
"""

NOW = "SELECT now()"

# A run by hand: a ledger row at the moment it was asked for ($2, never a whole second, so it
# never takes the place of a tick), which no fence of a tick ever meets.
RECORD_MANUAL = """
INSERT INTO stoker.schedule_ticks (schedule, tick, outcome, job_id, reason)
VALUES ($1, $2, 'manual', $3, $4) ON CONFLICT DO NOTHING RETURNING true
"""

TICK_JOB = """
UPDATE stoker.schedule_ticks SET job_id = $3 WHERE schedule = $1 AND tick = $2
"""

COUNT_FIRED = """
INSERT INTO stoker.schedule_state (name, last_tick, last_job_id, last_fired_at,
                                  fired)
VALUES ($1, $2, $3, now(), 1)
ON CONFLICT (name) DO UPDATE SET last_tick = greatest(
    stoker.schedule_state.last_tick, excluded.last_tick),
    last_job_id = excluded.last_job_id, last_fired_at = now(),
    fired = stoker.schedule_state.fired + 1, updated_at = now()
"""

LAST_JOB = """
INSERT INTO stoker.schedule_state (name, last_job_id) VALUES ($1, $2)
ON CONFLICT (name) DO UPDATE SET last_job_id = excluded.last_job_id,
    updated_at = now()
"""

PRUNE_TICKS = """
DELETE FROM stoker.schedule_ticks WHERE created_at < now() - make_interval(days => $1)
"""

STATUS = """
SELECT s.*, j.state::text AS job_state, j.started_at, j.finished_at,
     (SELECT t.tick FROM stoker.schedule_ticks t
       WHERE t.schedule = s.name AND t.outcome <> 'manual'
       ORDER BY t.tick DESC LIMIT 1) AS recorded_tick
FROM stoker.schedule_state s
LEFT JOIN stoker.all_jobs j ON j.id = s.last_job_id
"""

SAVE_SCHEDULE = """
INSERT INTO stoker.schedules (name, cron, timezone, kind, queue, payload, meta,
                              enabled, catch_up, max_catch_up, overlap, description,
                              skip_grace, ping_url)
VALUES ($1, $2, $3, $4, $5, $6::text::jsonb, $7::text::jsonb, $8, $9, $10, $11, $12,
        $13, $14)
ON CONFLICT (name) DO UPDATE SET cron = excluded.cron, timezone = excluded.timezone,
    kind = excluded.kind, queue = excluded.queue, payload = excluded.payload,
    meta = excluded.meta, enabled = excluded.enabled, catch_up = excluded.catch_up,
    max_catch_up = excluded.max_catch_up, overlap = excluded.overlap,
    description = excluded.description, skip_grace = excluded.skip_grace,
    ping_url = excluded.ping_url
"""

DELETE_SCHEDULE = """
DELETE FROM stoker.schedules WHERE name = $1
"""

# -- the run ledger: reading it ----------------------------------------------------------------

# A ledger row's run as it stands: a run (fired or by hand) is read from its job while the job
# is in stoker.jobs (queued, active, or a finished outcome parked there), else from what the
# ledger trigger copied when it finished, else (rows from before the ledger kept it) from
# stoker.job_history. Skipped and missed rows have no run: their job_id, if an old row has
# one, was the job that was still running.
_RUN_JOINS = """
  LEFT JOIN stoker.jobs j
         ON t.outcome IN ('fired', 'manual') AND j.id = t.job_id
  LEFT JOIN stoker.job_history h
         ON t.outcome IN ('fired', 'manual') AND t.state IS NULL AND j.id IS NULL
        AND h.id = t.job_id"""
_RUN = "t.outcome IN ('fired', 'manual')"
_STATE = f"CASE WHEN {_RUN} THEN coalesce(j.state::text, t.state, h.state::text) END"
_STARTED = (
    f"CASE WHEN NOT {_RUN} THEN NULL WHEN j.id IS NOT NULL THEN j.started_at "
    "ELSE coalesce(t.started_at, h.started_at) END"
)
_FINISHED = (
    f"CASE WHEN NOT {_RUN} THEN NULL "
    "WHEN j.id IS NOT NULL THEN CASE WHEN j.state IN ('succeeded', 'failed') THEN j.updated_at END "
    "ELSE coalesce(t.finished_at, h.finished_at) END"
)
_ERROR = (
    f"CASE WHEN NOT {_RUN} THEN NULL WHEN j.id IS NOT NULL THEN left(j.last_error, 2000) "
    "ELSE coalesce(t.error, left(h.last_error, 2000)) END"
)
_RESULT = (
    f"CASE WHEN NOT {_RUN} THEN NULL WHEN j.id IS NOT NULL THEN NULL "
    "ELSE coalesce(t.result, CASE WHEN length(h.result::text) <= 2000 THEN h.result END) END"
)

# One schedule's ledger, newest first: $2 a tick to page from (exclusive), $3 how many.
# Served by schedule_ticks_schedule_tick_idx.
HISTORY = f"""
SELECT t.tick, t.outcome, t.caught_up, t.reason,
       CASE WHEN {_RUN} THEN t.job_id END AS job_id,
       {_STATE} AS state, {_STARTED} AS started_at, {_FINISHED} AS finished_at,
       {_ERROR} AS error, {_RESULT} AS result
  FROM stoker.schedule_ticks t
  {_RUN_JOINS}
 WHERE t.schedule = $1 AND ($2::timestamptz IS NULL OR t.tick < $2)
 ORDER BY t.tick DESC
 LIMIT $3
"""

HAS_LEDGER = """
SELECT EXISTS (SELECT 1 FROM stoker.schedule_ticks WHERE schedule = $1)
"""

# How many ledger rows back the health of a schedule looks for its last success: a bound on
# what one sample reads for a schedule that has failed for a long time.
HEALTH_WINDOW = 10_000

# One ledger row of schedule s: the newest ($cond empty), or the newest before walk.tick.
_STEP = f"""
SELECT t.tick, t.outcome, {_STATE} AS state, {_FINISHED} AS finished_at
  FROM (SELECT * FROM stoker.schedule_ticks t
         WHERE t.schedule = s.name {{cond}} ORDER BY t.tick DESC LIMIT 1) t
  {_RUN_JOINS}"""

# HEALTH's estimated cost grows with the number of schedules past PostgreSQL's jit_above_cost,
# while it runs in milliseconds: compiling it (tens of milliseconds) would cost more than it.
NO_JIT = "SET LOCAL jit = off"

# Each schedule's health in one statement, for `stoker schedules`, the admin API and the
# metrics sampler: the last success, the failures since, the newest row's outcome, and the
# newest fired tick with its job. The ledger is walked from the newest row one index probe at a
# time (a recursive walk, so no plan can read a schedule's whole ledger and sort it) and the walk
# stops at the first success, or HEALTH_WINDOW rows back. $1 the schedules asked for; with $2
# also every row of stoker.schedules not among them (with its timetable).
HEALTH = f"""
WITH s AS (
    SELECT n.name, NULL::text AS cron, NULL::text AS timezone, NULL::boolean AS enabled,
           NULL::timestamptz AS timetable_changed_at
      FROM unnest($1::text[]) AS n(name)
    UNION ALL
    SELECT d.name, d.cron, d.timezone, d.enabled,
           coalesce(d.timetable_changed_at, d.created_at)
      FROM stoker.schedules d
     WHERE $2 AND d.name <> ALL($1::text[])
)
SELECT s.*, now() AS now, st.last_tick AS cursor, st.timetable AS saved_timetable,
       st.paused_at,
       walked.last_success, coalesce(walked.failures, 0) AS consecutive_failures,
       walked.newest_outcome,
       fired.tick AS fired_tick, fired.state AS fired_state, fired.started_at AS fired_started_at
  FROM s
  LEFT JOIN stoker.schedule_state st ON st.name = s.name
  LEFT JOIN LATERAL (
      WITH RECURSIVE walk AS (
          SELECT first.*, 1 AS depth FROM ({_STEP.format(cond="")}) first
          UNION ALL
          SELECT next.*, walk.depth + 1 FROM walk CROSS JOIN LATERAL (
              {_STEP.format(cond="AND t.tick < walk.tick")}) next
           WHERE walk.state IS DISTINCT FROM 'succeeded' AND walk.depth < {HEALTH_WINDOW}
      )
      SELECT max(finished_at) FILTER (WHERE state = 'succeeded') AS last_success,
             count(*) FILTER (WHERE state = 'failed') AS failures,
             (array_agg(outcome ORDER BY tick DESC))[1] AS newest_outcome
        FROM walk) walked ON true
  LEFT JOIN LATERAL (
      SELECT t.tick, j.state::text AS state, j.started_at
        FROM stoker.schedule_ticks t LEFT JOIN stoker.jobs j ON j.id = t.job_id
       WHERE t.schedule = s.name AND t.outcome = 'fired'
       ORDER BY t.tick DESC LIMIT 1) fired ON true
"""

# The newest $2 ledger rows of each schedule in $1, newest first: one probe of
# schedule_ticks_schedule_tick_idx per schedule (a LATERAL ... LIMIT), never a whole ledger;
# each run's state from its job as in HISTORY.
RECENT = f"""
SELECT s.name AS schedule, t.tick, t.outcome, t.caught_up, t.reason,
       CASE WHEN {_RUN} THEN t.job_id END AS job_id,
       {_STATE} AS state, {_STARTED} AS started_at, {_FINISHED} AS finished_at,
       {_ERROR} AS error, {_RESULT} AS result
  FROM unnest($1::text[]) AS s(name)
 CROSS JOIN LATERAL (
       SELECT * FROM stoker.schedule_ticks t
        WHERE t.schedule = s.name ORDER BY t.tick DESC LIMIT $2) t
  {_RUN_JOINS}
 ORDER BY s.name, t.tick DESC
"""
