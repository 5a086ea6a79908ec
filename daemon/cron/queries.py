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
SELECT name, last_tick, timetable FROM stoker.schedule_state
"""

SAVE_CURSOR = """
INSERT INTO stoker.schedule_state (name, last_tick, timetable) VALUES ($1, $2, $3)
ON CONFLICT (name) DO UPDATE SET last_tick = greatest(
    stoker.schedule_state.last_tick, excluded.last_tick),
    timetable = coalesce(excluded.timetable, stoker.schedule_state.timetable),
    updated_at = now()
"""

FINGERPRINT = """
SELECT count(*), max(updated_at), sum(xmin::text::bigint) FROM stoker.schedules
"""

RECORD_SKIPPED = """
WITH new AS (
    INSERT INTO stoker.schedule_ticks (schedule, tick, outcome)
    SELECT $1, t, $3 FROM unnest($2::timestamptz[]) AS t
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
# process or another that believed it led.
CLAIM_TICK = """
INSERT INTO stoker.schedule_ticks (schedule, tick, outcome)
VALUES ($1, $2, 'fired') ON CONFLICT DO NOTHING RETURNING true
"""

PREVIOUS_RUN_GOING = """
SELECT j.id FROM stoker.schedule_state s
 JOIN stoker.jobs j ON j.id = s.last_job_id
WHERE s.name = $1 AND j.state IN ('queued', 'active')
"""

TICK_SKIPPED_OVERLAP = """
UPDATE stoker.schedule_ticks SET outcome = 'skipped_overlap', job_id = $3
WHERE schedule = $1 AND tick = $2
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
     (SELECT t.tick FROM stoker.schedule_ticks t WHERE t.schedule = s.name
       ORDER BY t.tick DESC LIMIT 1) AS recorded_tick
FROM stoker.schedule_state s
LEFT JOIN stoker.all_jobs j ON j.id = s.last_job_id
"""

SAVE_SCHEDULE = """
INSERT INTO stoker.schedules (name, cron, timezone, kind, queue, payload, meta,
                              enabled, catch_up, max_catch_up, overlap, description,
                              skip_grace)
VALUES ($1, $2, $3, $4, $5, $6::text::jsonb, $7::text::jsonb, $8, $9, $10, $11, $12,
        $13)
ON CONFLICT (name) DO UPDATE SET cron = excluded.cron, timezone = excluded.timezone,
    kind = excluded.kind, queue = excluded.queue, payload = excluded.payload,
    meta = excluded.meta, enabled = excluded.enabled, catch_up = excluded.catch_up,
    max_catch_up = excluded.max_catch_up, overlap = excluded.overlap,
    description = excluded.description, skip_grace = excluded.skip_grace
"""

DELETE_SCHEDULE = """
DELETE FROM stoker.schedules WHERE name = $1
"""
