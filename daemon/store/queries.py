"""Every SQL statement the engine runs, in one place. Values are always $n parameters;
JSON goes in as text and is cast in SQL, so the statements work on any asyncpg connection,
with or without our jsonb codec."""

from __future__ import annotations

# -- enqueue (public API) -----------------------------------------------------------------

ENQUEUE = """
SELECT stoker.enqueue($1, $2, $3::text::jsonb, $4, $5, $6, $7, $8::text::jsonb, $9)
"""

ENQUEUE_MANY = """
INSERT INTO stoker.jobs (queue, kind, payload, run_at, priority, unique_key, max_attempts, meta,
                         concurrency_key)
SELECT q, k, p::jsonb, coalesce(r, now()), pr, u, m, mt::jsonb, ck
  FROM unnest($1::text[], $2::text[], $3::text[], $4::timestamptz[], $5::smallint[],
              $6::text[], $7::int[], $8::text[], $9::text[]) AS t(q, k, p, r, pr, u, m, mt, ck)
ON CONFLICT (unique_key) WHERE unique_key IS NOT NULL DO NOTHING
RETURNING id
"""

# -- the hot path: claim, heartbeat, complete ------------------------------------------------


# The distinct priorities of a queue's waiting jobs, highest first, each found by one descent
# of the fetch index (a skip scan), none while the queue is paused. The claim and NEXT_DUE read
# the index one priority at a time, where `run_at <= now()` bounds the scan: read across
# priorities, jobs scheduled for later (delayed jobs, retries in backoff) sat in the index
# between the due ones, and 1,000,000 of them made every claim a 170 ms scan.
def _priorities(queue: str) -> str:
    """The CTE for the queue named by the SQL expression `queue` ($1, or a column)."""
    return f"""
priorities AS (
    (SELECT priority FROM stoker.jobs
      WHERE queue = {queue} AND state = 'queued'
        AND NOT EXISTS (SELECT 1 FROM stoker.queues pq WHERE pq.name = {queue} AND pq.paused)
      ORDER BY priority DESC LIMIT 1)
    UNION ALL
    SELECT (SELECT j.priority FROM stoker.jobs j
             WHERE j.queue = {queue} AND j.state = 'queued' AND j.priority < p.priority
             ORDER BY j.priority DESC LIMIT 1)
      FROM priorities p WHERE p.priority IS NOT NULL
)"""


# Claims at most $2 due jobs of queue $1, in priority order, skipping rows other workers hold.
# No ORDER BY on `next`: the nested loop yields the priorities in the CTE's order, highest
# first, and stops pulling (and locking) rows once it has $2; a sort would make it lock up to
# $2 rows of every priority.
def _claim(also: str = "") -> str:
    return (
        """
WITH RECURSIVE relaxed AS MATERIALIZED (SELECT set_config('synchronous_commit', 'off', true)),"""
        + _priorities("$1")
        + """,
next AS (
    SELECT due.id FROM priorities p
     CROSS JOIN LATERAL (
        SELECT id FROM stoker.jobs
         WHERE queue = $1 AND state = 'queued' AND priority = p.priority AND run_at <= now()
         ORDER BY run_at, id
         LIMIT $2
         FOR UPDATE SKIP LOCKED) due
     WHERE p.priority IS NOT NULL
     LIMIT $2
)"""
        + also
        + """
UPDATE stoker.jobs j
   SET state = 'active', attempts = j.attempts + 1, worker = $3,
       lease_expires_at = now() + make_interval(secs => $4), started_at = now(),
       updated_at = now()
  FROM next, relaxed
 WHERE j.id = next.id
RETURNING j.id, j.kind, j.payload::text, j.meta::text, j.attempts, j.max_attempts, j.run_at,
          j.started_at
"""
    )


CLAIM = _claim()

# The claim of a queue with limits (global_concurrency, key_concurrency, rate_limit): see
# stoker.claim_limited in sql/migrations/019_job_limits.sql. $1 queue, $2 how many, $3 worker,
# $4 lease seconds, $5 stop waiting, $6 global limit, $7 key limit, $8 rate limit's starts,
# $9 its window in seconds, $10 per key, $11 the key to go on after (keys are served in turn).
# The columns of CLAIM, then `blocked`, `retry_at` and the job's `concurrency_key`.
CLAIM_LIMITED = "SELECT * FROM stoker.claim_limited($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)"

# Succeeded outcomes written and the next claim of a queue held back by its global limit, in
# one round trip and one commit (025_finish_and_claim.sql): $1 ids, $2 attempts, $3 results,
# then CLAIM_LIMITED's arguments. The first row holds the ids written (done_ids), the claim's
# rows follow with done_ids NULL and CLAIM_LIMITED's columns.
FINISH_AND_CLAIM = (
    "SELECT * FROM stoker.finish_and_claim("
    "$1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)"
)

# The claim of a pool that was waiting, woken by a NOTIFY (or a look that found work): it
# stops saying it waits in the same statement, so that the producers of a burst that follows
# send no more NOTIFYs (each serialises commits: see QueuePool.run). A data-modifying CTE runs
# whether or not the query reads it.
CLAIM_AND_STOP_WAITING = _claim(
    """,
stop_waiting AS (DELETE FROM stoker.waiting WHERE queue = $1 AND worker = $3)"""
)

# An idle pool says it waits (so inserts NOTIFY it) when a claim found nothing; its claim says
# it no longer does.
REGISTER_WAITING = """
INSERT INTO stoker.waiting (queue, worker, expires_at)
VALUES ($1, $2, now() + make_interval(secs => $3))
ON CONFLICT (queue, worker) DO UPDATE SET expires_at = excluded.expires_at
"""

UNREGISTER_WORKER = "DELETE FROM stoker.waiting WHERE worker = $1"


def _next_due(queue: str) -> str:
    return f"""
SELECT min(first.run_at) AS next_due FROM priorities p
 CROSS JOIN LATERAL (
    SELECT run_at FROM stoker.jobs
     WHERE queue = {queue} AND state = 'queued' AND priority = p.priority
     ORDER BY run_at LIMIT 1) first
 WHERE p.priority IS NOT NULL"""


# The earliest run_at of a queue's waiting jobs: how long an idle pool may sleep. Past ones
# count too: a job can fall due between an empty claim and this query (clocks are never exactly
# in step), and leaving it out would let the pool sleep a whole poll interval past it.
NEXT_DUE = "WITH RECURSIVE" + _priorities("$1") + _next_due("$1")

# Right after a pool said it waits: the transactions in progress (see
# QueuePool._wait_registered) and its NEXT_DUE, in one round trip on one snapshot. Text, not
# xid8: asyncpg has no codec for xid8 arrays.
AFTER_REGISTERING = (
    "WITH RECURSIVE"
    + _priorities("$1")
    + """
SELECT (SELECT coalesce(array_agg(x::text), '{}')
          FROM pg_snapshot_xip(pg_current_snapshot()) AS x) AS in_flight,
       ("""
    + _next_due("$1")
    + """) AS next_due
"""
)

STILL_IN_FLIGHT = """
SELECT coalesce(array_agg(x), '{}') FROM unnest($1::text[]) AS x
 WHERE pg_xact_status(x::xid8) = 'in progress'
"""

# The one look of a daemon's idle pools every poll interval (daemon.engine.waiting): renews
# the waiting rows of queues $1 (each for $3 seconds; a row that is gone is not put back: its
# pool says it waits afresh) and gives each queue's NEXT_DUE, in the order of $1. It also
# deletes rows expired a minute ago (killed daemons'), which every insert's trigger reads.
SWEEP_WAITING = (
    """
WITH pruned AS (
    DELETE FROM stoker.waiting WHERE expires_at < now() - interval '1 minute'
),
renewed AS (
    UPDATE stoker.waiting w SET expires_at = now() + make_interval(secs => t.secs)
      FROM unnest($1::text[], $3::float8[]) AS t(queue, secs)
     WHERE w.queue = t.queue AND w.worker = $2
    RETURNING w.queue
)
SELECT q.name IN (SELECT queue FROM renewed) AS renewed, nd.next_due
  FROM unnest($1::text[]) WITH ORDINALITY AS q(name, i)
 CROSS JOIN LATERAL (
    WITH RECURSIVE"""
    + _priorities("q.name")
    + _next_due("q.name")
    + """) nd
 ORDER BY q.i
"""
)

# Renews leases without ever waiting for a row lock: a row locked right now is being completed
# (or rescued), and waiting for it while holding others deadlocked with the completion write.
# Returns the ids of the renewed jobs that have a cancel request: the poll behind the
# stoker_cancel NOTIFY, for a daemon whose listener missed it.
HEARTBEAT = """
WITH renewed AS (
    UPDATE stoker.jobs SET lease_expires_at = now() + make_interval(secs => $3)
     WHERE id IN (SELECT id FROM stoker.jobs
                   WHERE id = ANY($1::bigint[]) AND worker = $2 AND state = 'active'
                   FOR UPDATE SKIP LOCKED)
    RETURNING id, cancel_requested_at
)
SELECT id FROM renewed WHERE cancel_requested_at IS NOT NULL
"""

# Does running job $1 have a cancel request? (A NOTIFY on stoker_cancel is only a hint.)
CANCEL_REQUESTED = """
SELECT cancel_requested_at IS NOT NULL FROM stoker.jobs WHERE id = $1 AND state = 'active'
"""

PROGRESS = """
UPDATE stoker.jobs SET progress = $3::text::jsonb, updated_at = now()
 WHERE id = $1 AND attempts = $2 AND state = 'active'
"""


# Writes a batch of outcomes in one statement. Each outcome is fenced by the worker and the
# attempt it ran: a worker whose lease was rescued cannot overwrite a newer attempt's state
# (a new claim sets `worker` and bumps `attempts`). A rescue keeps `worker`, so an outcome
# that could not be written before the lease lapsed (a database outage) still lands on the
# rescued row as long as nobody has claimed it since. A batch holds one outcome per job.
# $1-$6 finish (succeeded | failed | cancelled: move to history); $7-$12 requeue (retry: queued
# after `delay` with the error kept | handback: queued now, the interrupted attempt not counted).
# A cancel request (stoker.cancel) on a row to be requeued turns the requeue into 'cancelled' in
# place (never retried; `cancelled_here`: the completer moves it to history at once): the SET is
# evaluated on the row as it is once locked, so a request that commits while this statement
# waits for the row is seen. A finished outcome keeps its state: a job that succeeded or failed
# for good before its daemon delivered the request ended so (the request came too late).
# Rows are found by `id = ANY(...)` on the primary key and matched to their outcome by array
# position. A join against unnest() let the planner, misled by the statistics of a churning
# table (`worker` is NULL in nearly every row it sampled), scan the whole table per outcome.
def _finished(worker: str) -> str:
    """Both outcome writes start here: the rows of ids $1 whose attempt is still the one in
    $2 and whose worker is `worker` leave stoker.jobs, each with its position in $1."""
    return f"""
WITH finished AS (
    DELETE FROM stoker.jobs j
     WHERE j.id = ANY($1::bigint[]) AND j.worker = {worker}
       AND j.attempts = ($2::int[])[array_position($1::bigint[], j.id)]
       AND j.state IN ('active', 'queued')
    RETURNING j.*, array_position($1::bigint[], j.id) AS pos
)"""


_INTO_HISTORY = """INSERT INTO stoker.job_history (id, queue, kind, payload, meta, priority, state,
                                run_at, attempts, max_attempts, unique_key, worker, last_error,
                                errors, result, progress, created_at, started_at,
                                concurrency_key)"""

COMPLETE = (
    _finished("$13")
    + """,
moved AS (
    """
    + _INTO_HISTORY
    + """
    SELECT id, queue, kind, payload, meta, priority, ($3::text[])[pos]::stoker.job_state,
           run_at, attempts, max_attempts, unique_key, worker,
           CASE ($3::text[])[pos]
                WHEN 'failed' THEN ($5::text[])[pos]
                WHEN 'cancelled' THEN stoker.cancel_note(cancel_requested_by, cancel_requested_at)
                ELSE last_error END,
           CASE WHEN ($3::text[])[pos] = 'failed'
                THEN stoker.push_error(errors, attempts, ($5::text[])[pos], ($6::text[])[pos])
                ELSE errors END,
           (($4::text[])[pos])::jsonb, progress, created_at, started_at, concurrency_key
      FROM finished
    RETURNING id, queue
),
requeued AS (
    UPDATE stoker.jobs j
       SET state = CASE WHEN j.cancel_requested_at IS NULL THEN 'queued'
                        ELSE 'cancelled' END::stoker.job_state,
           worker = CASE WHEN j.cancel_requested_at IS NULL THEN NULL ELSE j.worker END,
           lease_expires_at = NULL,
           run_at = CASE WHEN j.cancel_requested_at IS NULL THEN now() + make_interval(
               secs => ($12::float8[])[array_position($7::bigint[], j.id)]) ELSE j.run_at END,
           attempts = CASE WHEN ($9::text[])[array_position($7::bigint[], j.id)] = 'handback'
                            AND j.cancel_requested_at IS NULL
                           THEN j.attempts - 1 ELSE j.attempts END,
           last_error = CASE WHEN j.cancel_requested_at IS NOT NULL
                             THEN stoker.cancel_note(j.cancel_requested_by, j.cancel_requested_at)
                             WHEN ($9::text[])[array_position($7::bigint[], j.id)] = 'retry'
                             THEN ($10::text[])[array_position($7::bigint[], j.id)]
                             ELSE j.last_error END,
           errors = CASE WHEN ($9::text[])[array_position($7::bigint[], j.id)] = 'retry'
                         THEN stoker.push_error(
                             j.errors, j.attempts,
                             ($10::text[])[array_position($7::bigint[], j.id)],
                             ($11::text[])[array_position($7::bigint[], j.id)])
                         ELSE j.errors END,
           updated_at = now()
     WHERE j.id = ANY($7::bigint[]) AND j.worker = $13
       AND j.attempts = ($8::int[])[array_position($7::bigint[], j.id)]
       AND j.state IN ('active', 'queued')
    RETURNING j.id, j.queue, j.run_at, j.state
)
SELECT id, queue, NULL::timestamptz AS run_at, false AS cancelled_here FROM moved
UNION ALL
SELECT id, queue, CASE WHEN state = 'queued' THEN run_at END, state = 'cancelled' FROM requeued
"""
)

# The common case, a batch of successes only: COMPLETE without the failure and requeue parts,
# which are a third of its work in PostgreSQL and most of its parameters. $1 ids, $2 attempts,
# $3 results (JSON text or NULL), $4 worker.
COMPLETE_SUCCEEDED = (
    _finished("$4")
    + """
"""
    + _INTO_HISTORY
    + """
SELECT id, queue, kind, payload, meta, priority, 'succeeded', run_at, attempts, max_attempts,
       unique_key, worker, last_error, errors, (($3::text[])[pos])::jsonb, progress,
       created_at, started_at, concurrency_key
  FROM finished
RETURNING id, queue, NULL::timestamptz AS run_at
"""
)

# The last resort for a finished outcome that stoker.job_history refuses for good (its id is
# taken, a permission is missing, a trigger says no): the job stays in stoker.jobs, finished
# (never claimed, never rescued), with the reason in last_error. Fenced like COMPLETE. Its
# unique_key is let go (and kept in the note), as a finished job's is.
# $1 id, $2 attempt, $3 worker, $4 'succeeded' | 'failed', $5 the note.
PARK = """
UPDATE stoker.jobs j
   SET state = $4::text::stoker.job_state, lease_expires_at = NULL, unique_key = NULL,
       last_error = $5 || coalesce(' (unique_key was ' || j.unique_key || ')', ''),
       errors = stoker.push_error(j.errors, j.attempts, $5, NULL), updated_at = now()
 WHERE j.id = $1 AND j.attempts = $2 AND j.worker = $3 AND j.state IN ('active', 'queued')
RETURNING j.id
"""

# Parked jobs (PARK) the maintenance tries to move on to history, one statement each so that
# one still refused keeps none of the others back.
PARKED = """
SELECT id FROM stoker.jobs WHERE state IN ('succeeded', 'failed', 'cancelled')
 ORDER BY updated_at LIMIT $1
"""

# A parked job history still refuses goes to the back of the line.
PARKED_REFUSED = "UPDATE stoker.jobs SET updated_at = now() WHERE id = $1"

MOVE_PARKED = (
    """
WITH finished AS (
    DELETE FROM stoker.jobs WHERE id = $1 AND state IN ('succeeded', 'failed', 'cancelled')
    RETURNING *
)
"""
    + _INTO_HISTORY
    + """
SELECT id, queue, kind, payload, meta, priority, state, run_at, attempts, max_attempts,
       unique_key, worker, last_error, errors, result, progress, created_at, started_at,
       concurrency_key
  FROM finished
RETURNING id
"""
)

NOTIFY_QUEUES = "SELECT pg_notify('stoker_jobs', q) FROM unnest($1::text[]) AS q"

# -- maintenance ----------------------------------------------------------------------------

# Jobs whose worker stopped renewing the lease (killed, frozen, cut off) go back to the queue;
# one with a cancel request ends 'cancelled' in place instead (moved to history like a parked
# outcome), never run again.
# `worker` stays until the next claim: the outcome of a worker that was only cut off from the
# database may still land (see COMPLETE), and then the job does not run again.
RESCUE = """
WITH expired AS (
    SELECT id FROM stoker.jobs
     WHERE state = 'active' AND lease_expires_at < now()
     ORDER BY lease_expires_at
     LIMIT 1000
     FOR UPDATE SKIP LOCKED
)
UPDATE stoker.jobs j
   SET state = CASE WHEN j.cancel_requested_at IS NULL THEN 'queued'
                    ELSE 'cancelled' END::stoker.job_state,
       run_at = now(), lease_expires_at = NULL, updated_at = now(),
       last_error = CASE WHEN j.cancel_requested_at IS NOT NULL
                    THEN stoker.cancel_note(j.cancel_requested_by, j.cancel_requested_at)
                    ELSE 'lease expired: worker ' || coalesce(j.worker, '?')
                    || ' stopped renewing it (killed, or lost its database connection)' END,
       errors = stoker.push_error(j.errors, j.attempts, 'lease expired: worker '
                    || coalesce(j.worker, '?') || ' stopped renewing it', NULL)
  FROM expired
 WHERE j.id = expired.id
RETURNING j.id, j.queue, j.attempts, j.state = 'cancelled' AS cancelled
"""

# Starts older than the longest rate window (a day): a queue's own claims delete those of its
# window, but a queue whose rate limit was removed (or whose daemons are gone) never claims
# through stoker.claim_limited again, and its rows would stay.
PRUNE_RATE_STARTS = "DELETE FROM stoker.rate_starts WHERE at < now() - interval '25 hours'"

PURGE_HISTORY = """
DELETE FROM stoker.job_history
 WHERE id IN (SELECT id FROM stoker.job_history
               WHERE finished_at < now() - make_interval(secs => $1)
               LIMIT $2)
"""

# -- operator commands (CLI, admin API) -------------------------------------------------------

JOB_COLUMNS = """id, queue, kind, payload, meta, priority, state::text AS state, run_at, attempts,
max_attempts, unique_key, worker, lease_expires_at, last_error, errors, result, progress,
created_at, started_at, finished_at, concurrency_key, cancel_requested_at, cancel_requested_by"""

GET_JOB = f"SELECT {JOB_COLUMNS} FROM stoker.all_jobs WHERE id = $1"

# Newest first, filtered by $1 state, $2 queue, $3 kind (each NULL: any), before id $4.
LIST_JOBS = f"""
SELECT {JOB_COLUMNS} FROM stoker.all_jobs
 WHERE ($1::text IS NULL OR state::text = $1)
   AND ($2::text IS NULL OR queue = $2)
   AND ($3::text IS NULL OR kind = $3)
   AND ($4::bigint IS NULL OR id < $4)
 ORDER BY id DESC
 LIMIT $5
"""

# Failed or cancelled jobs come back from history as new attempts; queued jobs waiting out a
# backoff become due now. A job whose unique_key a live job holds stays in history (inserted
# first, deleted only once it is back). Returns the id and queue of each job retried.
RETRY_JOBS = """
WITH wanted AS (
    SELECT * FROM stoker.job_history h
     WHERE h.state IN ('failed', 'cancelled')
       AND (h.id = ANY($1::bigint[])
            OR ($2 AND h.state = 'failed' AND ($3::text IS NULL OR h.queue = $3)))
       FOR UPDATE
),
restored AS (
    INSERT INTO stoker.jobs (id, queue, kind, payload, meta, priority, state, run_at, attempts,
                             max_attempts, unique_key, last_error, errors, created_at,
                             concurrency_key)
    SELECT id, queue, kind, payload, meta, priority, 'queued', now(), 0, max_attempts,
           unique_key, last_error, errors, created_at, concurrency_key
      FROM wanted
    ON CONFLICT DO NOTHING
    RETURNING id, queue
),
removed AS (
    DELETE FROM stoker.job_history h USING restored r WHERE h.id = r.id
),
hurried AS (
    UPDATE stoker.jobs SET run_at = now(), updated_at = now()
     WHERE id = ANY($1::bigint[]) AND state = 'queued' AND run_at > now()
    RETURNING id, queue
)
SELECT id, queue FROM restored UNION ALL SELECT id, queue FROM hurried
"""

# A queued job goes to history as cancelled; a running one gets a cancel request (its daemon
# stops it); see stoker.cancel in sql/migrations/017_cancel_running.sql for the answers.
CANCEL_JOB = "SELECT stoker.cancel($1, $2)"

# Jobs in stoker.jobs per queue and state, with the age of each queue's oldest due job.
_LIVE_BY_STATE = """
SELECT queue, state::text AS state, count(*) AS jobs,
       extract(epoch FROM now() - min(run_at) FILTER (WHERE state = 'queued'
                                                      AND run_at <= now())) AS oldest_due_s
  FROM stoker.jobs GROUP BY queue, state
"""

# Everything, history included: for `stoker status` and the admin API, on demand.
QUEUE_STATUS = (
    _LIVE_BY_STATE
    + """UNION ALL
SELECT queue, state::text, count(*), NULL FROM stoker.job_history GROUP BY queue, state
ORDER BY queue, state
"""
)

# What the metrics sampler reads every few seconds in every daemon: the live jobs, and the
# failed ones kept in history (served by their partial index). Never a count of all history,
# which holds millions of succeeded jobs: scanning it that often was a load of its own and held
# a snapshot for seconds. Finished jobs are counted by stoker_jobs_completed_total instead.
QUEUE_DEPTH = (
    _LIVE_BY_STATE
    + """UNION ALL
SELECT queue, 'failed', count(*), NULL FROM stoker.job_history WHERE state = 'failed'
 GROUP BY queue
"""
)

# -- queues ------------------------------------------------------------------------------------

SET_PAUSED = """
INSERT INTO stoker.queues (name, paused) VALUES ($1, $2)
ON CONFLICT (name) DO UPDATE SET paused = excluded.paused, updated_at = now()
"""

PAUSED_QUEUES = "SELECT name FROM stoker.queues WHERE paused ORDER BY name"

# Every queue with a row, paused or not (PAUSED_QUEUES would miss resumed queues that have no
# jobs and no configuration).
QUEUE_ROWS = "SELECT name, paused FROM stoker.queues"
