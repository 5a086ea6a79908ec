"""The alerts room's SQL. Values are always $n parameters; JSON goes in as text ($n::text::jsonb)
so that these statements work on any connection, with or without the jsonb codec."""

from __future__ import annotations

# Only one evaluation of a rule at a time across all daemons (two processes that briefly both
# believe they lead): a transaction-level try-lock, never a wait inside a statement.
TRY_LOCK_RULE = """
SELECT pg_try_advisory_xact_lock($1, hashtext($2))
"""

NOW = "SELECT now()"

CURSOR = """
SELECT position FROM stoker.alert_cursors WHERE rule = $1
"""

SAVE_CURSOR = """
INSERT INTO stoker.alert_cursors (rule, position) VALUES ($1, $2::text::jsonb)
ON CONFLICT (rule) DO UPDATE SET position = excluded.position, updated_at = now()
"""

OPEN_INCIDENTS = """
SELECT * FROM stoker.alert_incidents WHERE rule = $1 AND closed_at IS NULL ORDER BY id
"""

OPEN_INCIDENT = """
INSERT INTO stoker.alert_incidents
       (rule, event, subject, count, reported, last_message_at, cursor, details)
VALUES ($1, $2, $3, $4, $4, now(), $5::text::jsonb, $6::text::jsonb)
ON CONFLICT (rule, subject) WHERE closed_at IS NULL DO NOTHING
RETURNING id, opened_at
"""

UPDATE_INCIDENT = """
UPDATE stoker.alert_incidents
   SET count = $2, reported = $3, last_message_at = $4, cursor = $5::text::jsonb,
       details = $6::text::jsonb
 WHERE id = $1 AND closed_at IS NULL
"""

CLOSE_INCIDENT = """
UPDATE stoker.alert_incidents
   SET closed_at = now(), count = $2, reported = $2, last_message_at = now(),
       cursor = $3::text::jsonb, details = $4::text::jsonb
 WHERE id = $1 AND closed_at IS NULL
"""

# Closed incidents are kept this many days for `stoker alerts --all`, then dropped.
PRUNE_INCIDENTS = """
DELETE FROM stoker.alert_incidents WHERE closed_at < now() - make_interval(days => $1)
"""

# One message to one destination: a job like any other, on the internal queue.
ENQUEUE_MESSAGE = """
SELECT stoker.enqueue(queue => $1, kind => $2, payload => $3::text::jsonb,
                      max_attempts => $4, meta => $5::text::jsonb)
"""

# -- job_failed --------------------------------------------------------------------------------
# Jobs failed for good since $1 (finished_at, read through history's BRIN index), and failed
# jobs parked in stoker.jobs (`parked`: read by updated_at, which the maintenance bumps each time
# history refuses them again, so the rule keeps their ids), never the alert queue's own jobs
# ($2) nor the kinds of the alerts' messages and pings ($3).
FAILED_SINCE = """
SELECT id, queue, kind, attempts, last_error, finished_at, false AS parked
  FROM stoker.job_history
 WHERE finished_at > $1 AND state = 'failed' AND queue <> $2 AND kind <> ALL($3::text[])
UNION ALL
SELECT id, queue, kind, attempts, last_error, updated_at, true
  FROM stoker.jobs
 WHERE state = 'failed' AND updated_at > $1 AND queue <> $2 AND kind <> ALL($3::text[])
ORDER BY finished_at, id
"""

# Of the parked failures counted ($1), those no longer parked: moved on to history (with the
# finished_at history gave them), or gone (retried, deleted; finished_at null).
PARKED_GONE = """
SELECT p.id, h.finished_at
  FROM unnest($1::bigint[]) AS p(id)
  LEFT JOIN stoker.job_history h ON h.id = p.id
 WHERE NOT EXISTS (SELECT 1 FROM stoker.jobs j WHERE j.id = p.id AND j.state = 'failed')
"""

# Of the kinds $2, the newest job that succeeded after $1 on the queues $3 (all when empty) but
# the alert queue ($4): the incident's kind works again.
SUCCEEDED_SINCE = """
SELECT DISTINCT ON (kind) kind, id AS job_id, finished_at AS at
  FROM stoker.job_history
 WHERE finished_at > $1 AND state = 'succeeded' AND kind = ANY($2::text[])
   AND (cardinality($3::text[]) = 0 OR queue = ANY($3::text[])) AND queue <> $4
 ORDER BY kind, finished_at DESC, id DESC
"""

# -- schedules -----------------------------------------------------------------------------------
# Changes whenever a row of stoker.schedules is inserted, updated or deleted (xmin catches a
# transaction that commits after a newer updated_at was seen): the list is read again only then.
# Whether stoker.schedules changed since snapshot $1 (NULL: not read yet): a row written or a
# name deleted by a transaction $1 did not see (migration 016), found through indexes (ORDER BY
# ... LIMIT 1: an EXISTS was planned as a scan of every row); and this statement's snapshot, for
# the next pass.
SCHEDULES_CHANGED = """
SELECT pg_current_snapshot()::text AS snapshot,
       $1::text IS NULL
       OR coalesce((SELECT true FROM stoker.schedules s
                     WHERE s.changed_xid >= pg_snapshot_xmin($1::text::pg_snapshot)
                       AND NOT pg_visible_in_snapshot(s.changed_xid, $1::text::pg_snapshot)
                     ORDER BY s.changed_xid LIMIT 1), false)
       OR coalesce((SELECT true FROM stoker.schedule_deletions d
                     WHERE d.xid >= pg_snapshot_xmin($1::text::pg_snapshot)
                       AND NOT pg_visible_in_snapshot(d.xid, $1::text::pg_snapshot)
                     ORDER BY d.xid LIMIT 1), false) AS changed
"""

DB_SCHEDULES = """
SELECT name, cron, timezone, queue, enabled, ping_url,
       coalesce(timetable_changed_at, created_at) AS started
  FROM stoker.schedules
"""

SCHEDULE_STATE = """
SELECT name, last_tick, last_job_id FROM stoker.schedule_state WHERE name = ANY($1::text[])
"""

# The newest $2 finished runs (fired or manual) of each schedule $1, newest first.
RECENT_RUNS = """
SELECT s.name AS schedule, r.tick, r.job_id, r.state, r.error, r.finished_at
  FROM unnest($1::text[]) AS s(name)
 CROSS JOIN LATERAL (
       SELECT t.tick, t.job_id, t.state, t.error, t.finished_at
         FROM stoker.schedule_ticks t
        WHERE t.schedule = s.name AND t.state IS NOT NULL
          AND t.outcome IN ('fired', 'manual')
        ORDER BY t.tick DESC
        LIMIT $2) r
 ORDER BY s.name, r.tick DESC
"""

# Runs not started yet: jobs still queued (never attempted) of each schedule's newest $2 ticks up
# to now() - $3 seconds (a tick skipped as overlapping names the run it waited for), and of its
# last fired job; with the tick that fired each, whether its queue is paused, and when the run was
# due: its tick, or later when it was put back to run (`stoker jobs retry`, a job handed back at
# shutdown), so that a run is late only $3 seconds after it could start.
LATE_RUNS = """
WITH candidates AS (
    SELECT s.name AS schedule, r.job_id
      FROM unnest($1::text[]) AS s(name)
     CROSS JOIN LATERAL (
           SELECT t.job_id FROM stoker.schedule_ticks t
            WHERE t.schedule = s.name AND t.tick <= now() - make_interval(secs => $3)
            ORDER BY t.tick DESC LIMIT $2) r
     WHERE r.job_id IS NOT NULL
    UNION
    SELECT name, last_job_id FROM stoker.schedule_state
     WHERE name = ANY($1::text[]) AND last_job_id IS NOT NULL)
SELECT c.schedule, f.tick, greatest(f.tick, j.run_at) AS due, c.job_id, j.queue,
       coalesce(q.paused, false) AS paused
  FROM candidates c
  JOIN stoker.jobs j ON j.id = c.job_id AND j.state = 'queued' AND j.attempts = 0
  JOIN stoker.schedule_ticks f ON f.job_id = c.job_id AND f.schedule = c.schedule
                              AND f.outcome IN ('fired', 'manual')
  LEFT JOIN stoker.queues q ON q.name = j.queue
 WHERE greatest(f.tick, j.run_at) <= now() - make_interval(secs => $3)
 ORDER BY c.schedule, f.tick
"""

# Whether these jobs ($1) are still waiting to start.
STILL_QUEUED = """
SELECT id FROM stoker.jobs WHERE id = ANY($1::bigint[]) AND state = 'queued'
"""

# Ticks passed over by the catch-up policy, recorded since $1 (with a margin: a leader's
# transaction may commit a little after its now()).
MISSED_SINCE = """
SELECT schedule, tick FROM stoker.schedule_ticks
 WHERE outcome = 'skipped_catch_up' AND created_at > $1 AND schedule = ANY($2::text[])
 ORDER BY schedule, tick
"""

# Runs of schedules going longer than $2 seconds: active jobs with a schedule in their meta.
SLOW_RUNS = """
SELECT id, queue, kind, attempts, started_at, meta->>'schedule' AS schedule,
       extract(epoch FROM now() - started_at) AS running_s
  FROM stoker.jobs
 WHERE state = 'active' AND meta ? 'schedule' AND started_at < now() - make_interval(secs => $1)
 ORDER BY started_at
"""

JOB_STATES = """
SELECT id, state::text AS state, started_at, finished_at
  FROM stoker.all_jobs WHERE id = ANY($1::bigint[])
"""

# -- queue_backlog -------------------------------------------------------------------------------
OLDEST_DUE = """
SELECT queue, extract(epoch FROM now() - min(run_at)) AS waited_s, count(*) AS due
  FROM stoker.jobs
 WHERE state = 'queued' AND run_at <= now() AND queue = ANY($1::text[])
 GROUP BY queue
"""

# -- ping_url ------------------------------------------------------------------------------------
# Each schedule's newest succeeded run after its cursor ($2, parallel to the names $1).
SUCCEEDED_RUNS = """
SELECT s.name AS schedule, r.tick, r.job_id
  FROM unnest($1::text[], $2::timestamptz[]) AS s(name, after)
 CROSS JOIN LATERAL (
       SELECT t.tick, t.job_id FROM stoker.schedule_ticks t
        WHERE t.schedule = s.name AND t.tick > s.after AND t.state = 'succeeded'
        ORDER BY t.tick DESC LIMIT 1) r
"""

# -- operator ------------------------------------------------------------------------------------
INCIDENTS = """
SELECT id, rule, event, subject, opened_at, closed_at, count, reported, last_message_at,
       details::text AS details
  FROM stoker.alert_incidents
 WHERE closed_at IS NULL OR $1
 ORDER BY closed_at IS NULL DESC, opened_at DESC
 LIMIT $2
"""

# Incidents of rules no longer configured (removed, renamed): closed without a message.
CLOSE_ORPHANS = """
UPDATE stoker.alert_incidents SET closed_at = now()
 WHERE closed_at IS NULL AND rule <> ALL($1::text[])
"""

JOB_OUTCOME = """
SELECT id, state::text AS state, attempts, last_error, result::text AS result
  FROM stoker.all_jobs WHERE id = $1
"""
