"""The cron room's SQL: schedules, their state and the tick fence. Values are always $n
parameters. Jobs are enqueued like any producer's: INSERT INTO stoker.jobs (the ticks of a
batch, FIRE_MANY) or stoker.enqueue (a run by hand, store.queries)."""

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

# -- reading stoker.schedules at scale: pages, and only what changed since the last read -------
# A read keeps the snapshot of its first statement: the next look asks for the rows written by
# transactions that snapshot did not see (changed_xid, migration 016). A row read later than
# that snapshot in a newer version is read again at the next look: harmless.

SNAPSHOT = "SELECT pg_current_snapshot()::text"

# A page of stoker.schedules after name $1 (NULL: from the start), $2 rows.
SCHEDULES_PAGE = """
SELECT * FROM stoker.schedules WHERE $1::text IS NULL OR name > $1 ORDER BY name LIMIT $2
"""

SCHEDULES_NAMED = """
SELECT * FROM stoker.schedules WHERE name = ANY($1::text[]) ORDER BY name
"""

CURSORS_PAGE = """
SELECT name, last_tick, timetable, paused_at FROM stoker.schedule_state
 WHERE $1::text IS NULL OR name > $1 ORDER BY name LIMIT $2
"""

CURSORS_OF = """
SELECT name, last_tick, timetable, paused_at FROM stoker.schedule_state WHERE name = ANY($1)
"""

# A look for changes since snapshot $1, in one statement (one a CHANGE_CHECK when nothing
# changed): its own snapshot; the names written by transactions $1 did not see (inserted or
# updated since; in changed_xid order, so that the plan walks schedules_changed_xid_idx from the
# snapshot's xmin rather than scanning every row); the names deleted since (a NULL: the table
# was truncated; a name there again is among the changed ones); every paused schedule and since
# when.
CHANGES = """
SELECT pg_current_snapshot()::text AS snapshot,
       ARRAY(SELECT s.name FROM stoker.schedules s
              WHERE s.changed_xid >= pg_snapshot_xmin($1::text::pg_snapshot)
                AND NOT pg_visible_in_snapshot(s.changed_xid, $1::text::pg_snapshot)
              ORDER BY s.changed_xid) AS changed,
       ARRAY(SELECT d.name FROM stoker.schedule_deletions d
              WHERE d.xid >= pg_snapshot_xmin($1::text::pg_snapshot)
                AND NOT pg_visible_in_snapshot(d.xid, $1::text::pg_snapshot)
              ORDER BY d.xid) AS deleted,
       ARRAY(SELECT p.name FROM stoker.schedule_state p
              WHERE p.paused_at IS NOT NULL ORDER BY p.name) AS paused,
       ARRAY(SELECT p.paused_at FROM stoker.schedule_state p
              WHERE p.paused_at IS NOT NULL ORDER BY p.name) AS paused_at
"""

PRUNE_DELETIONS = """
DELETE FROM stoker.schedule_deletions WHERE deleted_at < now() - interval '1 day'
"""

# $1 names, $2 last ticks, $3 timetables: where each schedule carries on (never moved back).
SAVE_CURSORS = """
INSERT INTO stoker.schedule_state AS s (name, last_tick, timetable)
SELECT * FROM unnest($1::text[], $2::timestamptz[], $3::text[])
ON CONFLICT (name) DO UPDATE SET last_tick = greatest(s.last_tick, excluded.last_tick),
    timetable = coalesce(excluded.timetable, s.timetable),
    updated_at = now()
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


# -- firing many ticks in one transaction (firing.py) -------------------------------------------

# The state rows of schedules $1, locked in name order (two leaders firing overlapping batches
# wait for each other rather than deadlock): whether each is paused, and its previous run if
# that is still queued or active (overlap = skip).
LOCK_FOR_FIRE = """
SELECT s.name, s.paused_at IS NOT NULL AS paused,
       j.id AS running_id, j.state::text AS running_state
  FROM stoker.schedule_state s
  LEFT JOIN stoker.jobs j ON j.id = s.last_job_id AND j.state IN ('queued', 'active')
 WHERE s.name = ANY($1::text[])
 ORDER BY s.name
   FOR NO KEY UPDATE OF s
"""

# One statement for a batch of ticks: the fence rows ($1-$6: schedule, tick, outcome,
# caught_up, reason, job_id; a fired tick gets its job's id from the jobs' sequence), a job for
# each fired tick whose fence row this statement inserted ($7-$13: schedule, tick, queue, kind,
# payload, unique key, meta), and each schedule's counters and cursor. Returns the fence rows
# inserted; `enqueued` false: a job holds the tick's unique key already (firing.py).
FIRE_MANY = """
WITH claimed AS (
    INSERT INTO stoker.schedule_ticks AS t (schedule, tick, outcome, caught_up, reason, job_id)
    SELECT u.schedule, u.tick, u.outcome, u.caught_up, u.reason,
           CASE WHEN u.outcome = 'fired'
                THEN nextval(pg_get_serial_sequence('stoker.jobs', 'id')) ELSE u.job_id END
      FROM unnest($1::text[], $2::timestamptz[], $3::text[], $4::boolean[], $5::text[],
                  $6::bigint[]) AS u(schedule, tick, outcome, caught_up, reason, job_id)
    ON CONFLICT DO NOTHING
    RETURNING t.schedule, t.tick, t.outcome, t.job_id),
enqueued AS (
    INSERT INTO stoker.jobs (id, queue, kind, payload, priority, unique_key, max_attempts, meta)
    SELECT c.job_id, u.queue, u.kind, u.payload::jsonb, 0, u.unique_key, NULL, u.meta::jsonb
      FROM unnest($7::text[], $8::timestamptz[], $9::text[], $10::text[], $11::text[],
                  $12::text[], $13::text[])
           AS u(schedule, tick, queue, kind, payload, unique_key, meta)
      JOIN claimed c ON c.schedule = u.schedule AND c.tick = u.tick AND c.outcome = 'fired'
    ON CONFLICT (unique_key) WHERE unique_key IS NOT NULL DO NOTHING
    RETURNING id),
counted AS (
    INSERT INTO stoker.schedule_state AS s (name, last_tick, last_job_id, last_fired_at, fired,
                                           skipped, last_skipped)
    SELECT c.schedule, max(c.tick),
           (array_agg(c.job_id ORDER BY c.tick DESC) FILTER (WHERE c.outcome = 'fired'))[1],
           CASE WHEN bool_or(c.outcome = 'fired') THEN now() END,
           count(*) FILTER (WHERE c.outcome = 'fired'),
           count(*) FILTER (WHERE c.outcome <> 'fired'),
           max(c.tick) FILTER (WHERE c.outcome <> 'fired')
      FROM claimed c GROUP BY c.schedule
    ON CONFLICT (name) DO UPDATE SET
        last_tick = greatest(s.last_tick, excluded.last_tick),
        last_job_id = coalesce(excluded.last_job_id, s.last_job_id),
        last_fired_at = coalesce(excluded.last_fired_at, s.last_fired_at),
        fired = s.fired + excluded.fired,
        skipped = s.skipped + excluded.skipped,
        last_skipped = greatest(s.last_skipped, excluded.last_skipped),
        updated_at = now()
    RETURNING 1)
SELECT c.schedule, c.tick, c.outcome, c.job_id, e.id IS NOT NULL AS enqueued
  FROM claimed c LEFT JOIN enqueued e ON e.id = c.job_id
"""

# Schedule $1's last job was to be $2, whose tick's unique key job $3 held: it is $3.
REPLACE_LAST_JOB = """
UPDATE stoker.schedule_state SET last_job_id = $3 WHERE name = $1 AND last_job_id = $2
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

# How many rows stoker.schedules holds, as the planner's statistics estimate it (no scan): how
# large a slice the metrics sampler reads.
SCHEDULES_ESTIMATE = """
SELECT greatest(reltuples, 0)::bigint FROM pg_class WHERE oid = 'stoker.schedules'::regclass
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
# also the rows of stoker.schedules not among them (with its timetable): those after name $3
# (NULL: from the first), at most $4 of them (NULL: all); rows in name order.
HEALTH = f"""
WITH s AS (
    SELECT n.name, NULL::text AS cron, NULL::text AS timezone, NULL::boolean AS enabled,
           NULL::timestamptz AS timetable_changed_at
      FROM unnest($1::text[]) AS n(name)
    UNION ALL
    (SELECT d.name, d.cron, d.timezone, d.enabled,
            coalesce(d.timetable_changed_at, d.created_at)
       FROM stoker.schedules d
      WHERE $2 AND d.name <> ALL($1::text[]) AND ($3::text IS NULL OR d.name > $3)
      ORDER BY d.name LIMIT $4)
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
 ORDER BY s.name
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
