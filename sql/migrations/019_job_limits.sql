-- Stoker 019: limits that hold across daemons (issue 17): a queue's global concurrency, a
-- concurrency per key, and rate limits, all enforced inside the claim.
--
-- What runs is counted from the truth: a job runs while its row is 'active'. Nothing keeps a
-- counter that a stale worker could release twice (Solid Queue's bug): the outcome write, a
-- hand-back and the lease rescue release a slot simply by moving the row out of 'active', so a
-- killed daemon's slots come back when the rescue takes its expired leases. Claims of a limited
-- queue take one lock per queue for their transaction, so each sees every claim committed
-- before it; a queue without limits never takes it and claims as before.

-- A job's concurrency key: an organisation, a customer, an external account.
ALTER TABLE stoker.jobs ADD COLUMN concurrency_key text
    CONSTRAINT jobs_concurrency_key_check
    CHECK (concurrency_key <> '' AND length(concurrency_key) <= 200);
ALTER TABLE stoker.job_history ADD COLUMN concurrency_key text;

-- The running jobs of a queue (and of each key), counted by every limited claim. It replaces
-- the lease index: the lease rescue reads all active rows of it, which are few (at most the
-- daemons' total concurrency), so a queue without limits pays for no extra index.
DROP INDEX stoker.jobs_lease_idx;
CREATE INDEX jobs_active_idx ON stoker.jobs (queue, concurrency_key, lease_expires_at)
    WHERE state = 'active';
-- The waiting jobs of each key, in claim order: a key-limited claim finds each key's next
-- jobs with one descent per key, so one key's long backlog delays no other key. Jobs without
-- a key are not in it, so producers that use no keys pay nothing for it.
CREATE INDEX jobs_key_fetch_idx ON stoker.jobs (queue, concurrency_key, priority DESC, run_at, id)
    WHERE state = 'queued' AND concurrency_key IS NOT NULL;

-- The starts of a rate-limited queue, one row each, on the database's clock: a sliding window
-- counts them exactly (a bucket would let twice the limit through across a boundary). `key` is
-- the job's concurrency key for a limit per key, '' for the queue's own window. A claim deletes
-- the rows that have left its window.
CREATE TABLE stoker.rate_starts (
    queue text        NOT NULL,
    key   text        NOT NULL,
    at    timestamptz NOT NULL
) WITH (autovacuum_vacuum_scale_factor = 0.01, autovacuum_vacuum_threshold = 1000);
CREATE INDEX rate_starts_idx ON stoker.rate_starts (queue, key, at);

-- The SQL API gains the key (a new argument at the end: calls by position still work).
DROP FUNCTION stoker.enqueue(text, text, jsonb, timestamptz, integer, text, integer, jsonb);
CREATE FUNCTION stoker.enqueue(
    queue           text,
    kind            text,
    payload         jsonb       DEFAULT '{}',
    run_at          timestamptz DEFAULT NULL,
    priority        integer     DEFAULT 0,
    unique_key      text        DEFAULT NULL,
    max_attempts    integer     DEFAULT NULL,
    meta            jsonb       DEFAULT '{}',
    concurrency_key text        DEFAULT NULL
) RETURNS bigint
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    new_id bigint;
BEGIN
    IF enqueue.unique_key IS NULL THEN
        INSERT INTO stoker.jobs AS j (queue, kind, payload, run_at, priority, max_attempts, meta,
                                      concurrency_key)
        VALUES (enqueue.queue, enqueue.kind, coalesce(enqueue.payload, '{}'),
                coalesce(enqueue.run_at, now()), coalesce(enqueue.priority, 0),
                enqueue.max_attempts, coalesce(enqueue.meta, '{}'), enqueue.concurrency_key)
        RETURNING j.id INTO new_id;
        RETURN new_id;
    END IF;
    LOOP
        INSERT INTO stoker.jobs AS j (queue, kind, payload, run_at, priority, unique_key,
                                      max_attempts, meta, concurrency_key)
        VALUES (enqueue.queue, enqueue.kind, coalesce(enqueue.payload, '{}'),
                coalesce(enqueue.run_at, now()), coalesce(enqueue.priority, 0),
                enqueue.unique_key, enqueue.max_attempts, coalesce(enqueue.meta, '{}'),
                enqueue.concurrency_key)
        ON CONFLICT (unique_key) WHERE unique_key IS NOT NULL DO NOTHING
        RETURNING j.id INTO new_id;
        IF new_id IS NOT NULL THEN
            RETURN new_id;
        END IF;
        SELECT j.id INTO new_id FROM stoker.jobs j WHERE j.unique_key = enqueue.unique_key;
        IF new_id IS NOT NULL THEN
            RETURN new_id;
        END IF;
        -- The holder finished between our INSERT and SELECT: insert again.
    END LOOP;
END
$$;

-- One place to look up any job, live or finished; now with its key and any cancel request.
CREATE OR REPLACE VIEW stoker.all_jobs AS
    SELECT id, queue, kind, payload, meta, priority, state, run_at, attempts, max_attempts,
           unique_key, worker, lease_expires_at, last_error, errors, result, progress,
           created_at, started_at, NULL::timestamptz AS finished_at,
           concurrency_key, cancel_requested_at, cancel_requested_by
      FROM stoker.jobs
    UNION ALL
    SELECT id, queue, kind, payload, meta, priority, state, run_at, attempts, max_attempts,
           unique_key, worker, NULL::timestamptz, last_error, errors, result, progress,
           created_at, started_at, finished_at,
           concurrency_key, NULL::timestamptz, NULL::text
      FROM stoker.job_history;

-- stoker.cancel as in 017, keeping the key in history.
CREATE OR REPLACE FUNCTION stoker.cancel(job_id bigint, requested_by text DEFAULT NULL)
RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    who text := coalesce(nullif(requested_by, ''), 'sql:' || session_user);
    found_state text;
BEGIN
    FOR look IN 1..10 LOOP
        WITH gone AS (
            DELETE FROM stoker.jobs j WHERE j.id = job_id AND j.state = 'queued' RETURNING j.*
        )
        INSERT INTO stoker.job_history (id, queue, kind, payload, meta, priority, state, run_at,
                                        attempts, max_attempts, unique_key, worker, last_error,
                                        errors, result, progress, created_at, started_at,
                                        concurrency_key)
        SELECT id, queue, kind, payload, meta, priority, 'cancelled', run_at, attempts,
               max_attempts, unique_key, worker, stoker.cancel_note(who, now()), errors, result,
               progress, created_at, started_at, concurrency_key
          FROM gone;
        IF FOUND THEN
            RETURN 'cancelled';
        END IF;
        UPDATE stoker.jobs j
           SET cancel_requested_at = coalesce(j.cancel_requested_at, now()),
               cancel_requested_by = coalesce(j.cancel_requested_by, who),
               updated_at = now()
         WHERE j.id = job_id AND j.state = 'active';
        IF FOUND THEN
            PERFORM pg_notify('stoker_cancel', job_id::text);
            RETURN 'requested';
        END IF;
        SELECT h.state::text INTO found_state FROM stoker.job_history h WHERE h.id = job_id;
        IF FOUND THEN
            RETURN 'already ' || found_state;
        END IF;
        SELECT j.state::text INTO found_state FROM stoker.jobs j WHERE j.id = job_id;
        IF NOT FOUND THEN
            RETURN 'not found';
        END IF;
        IF found_state NOT IN ('queued', 'active') THEN
            RETURN 'already ' || found_state;
        END IF;
    END LOOP;
    RAISE EXCEPTION 'job % keeps changing state; try again', job_id
        USING ERRCODE = 'serialization_failure';
END
$$;

-- The claim of a queue with limits: at most p_wanted due jobs of queue p_queue, fewer if a
-- limit says so:
--   p_global_limit  at most this many of the queue's jobs active at once, across all daemons;
--   p_key_limit     at most this many active per concurrency_key (jobs without a key: no limit
--                   of their own); a saturated key's jobs wait without holding up other keys;
--   p_rate_limit    at most this many starts in any p_rate_window_s seconds, for the queue, or
--                   per key when p_rate_by_key (jobs without a key share one window).
-- Returns the claimed jobs (the columns of the plain claim), and, when a limit held jobs back,
-- a row with id NULL saying which ('global', 'rate', 'key') and, for a rate limit, when a start
-- leaves the window (retry_at). Rows with id NULL and blocked NULL mean nothing.
--
-- One claim of a queue at a time (a transaction-level advisory lock): each statement after it
-- takes a new snapshot, which sees every claim committed before, so no limit is exceeded
-- however many daemons claim. A claimed job's started_at (and its start in a rate window) is
-- the clock read after the snapshot that counted the running jobs: a job released in time for
-- that count finished before it, so finished_at and started_at never overlap beyond a limit. The claim commits durably (not synchronous_commit off like the
-- plain claim): a claim lost in a crash would put a running job back in the queue, and its
-- second run would go over the limit.
CREATE FUNCTION stoker.claim_limited(
    p_queue         text,
    p_wanted        integer,
    p_worker        text,
    p_lease_s       float8,
    p_stop_waiting  boolean,
    p_global_limit  integer,
    p_key_limit     integer,
    p_rate_limit    integer,
    p_rate_window_s float8,
    p_rate_by_key   boolean
) RETURNS TABLE (id bigint, kind text, payload text, meta text, attempts integer,
                 max_attempts integer, run_at timestamptz, started_at timestamptz,
                 blocked text, retry_at timestamptz)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    v_t        timestamptz;
    v_room     integer := p_wanted;
    v_null     integer;
    v_n        integer;
    v_oldest   timestamptz;
    v_why      text;
    v_again    timestamptz;
    v_got      integer;
    v_window   interval := make_interval(secs => coalesce(p_rate_window_s, 0));
    v_keyed    boolean := p_key_limit IS NOT NULL OR (p_rate_limit IS NOT NULL AND p_rate_by_key);
BEGIN
    IF p_stop_waiting THEN
        DELETE FROM stoker.waiting w WHERE w.queue = p_queue AND w.worker = p_worker;
    END IF;
    IF EXISTS (SELECT 1 FROM stoker.queues pq WHERE pq.name = p_queue AND pq.paused) THEN
        RETURN;
    END IF;
    -- 'lmts': the limits' lock space (the alerts use 'alrt').
    PERFORM pg_advisory_xact_lock(1819112563, hashtext(p_queue));
    v_t := clock_timestamp();
    IF p_global_limit IS NOT NULL THEN
        SELECT count(*) INTO v_n FROM stoker.jobs j
         WHERE j.queue = p_queue AND j.state = 'active';
        IF p_global_limit - v_n < v_room THEN
            v_room := p_global_limit - v_n;
            v_why := 'global';
        END IF;
    END IF;
    IF p_rate_limit IS NOT NULL THEN
        -- A start exactly one window ago still counts: no closed window of that length holds
        -- more than the limit.
        DELETE FROM stoker.rate_starts s WHERE s.queue = p_queue AND s.at < v_t - v_window;
        IF NOT p_rate_by_key THEN
            SELECT count(*), min(s.at) INTO v_n, v_oldest FROM stoker.rate_starts s
             WHERE s.queue = p_queue AND s.key = '';
            IF p_rate_limit - v_n < v_room THEN
                v_room := p_rate_limit - v_n;
                v_why := 'rate';
                v_again := v_oldest + v_window;
            END IF;
        END IF;
    END IF;
    IF v_room <= 0 THEN
        RETURN QUERY SELECT NULL::bigint, NULL::text, NULL::text, NULL::text, NULL::integer,
                            NULL::integer, NULL::timestamptz, NULL::timestamptz, v_why, v_again;
        RETURN;
    END IF;

    IF NOT v_keyed THEN
        RETURN QUERY
        WITH RECURSIVE priorities AS (
            (SELECT j.priority FROM stoker.jobs j
              WHERE j.queue = p_queue AND j.state = 'queued'
              ORDER BY j.priority DESC LIMIT 1)
            UNION ALL
            SELECT (SELECT j.priority FROM stoker.jobs j
                     WHERE j.queue = p_queue AND j.state = 'queued' AND j.priority < p.priority
                     ORDER BY j.priority DESC LIMIT 1)
              FROM priorities p WHERE p.priority IS NOT NULL
        ),
        clock AS MATERIALIZED (SELECT clock_timestamp() AS t),
        next AS (
            SELECT due.id FROM priorities p
             CROSS JOIN LATERAL (
                SELECT j.id FROM stoker.jobs j
                 WHERE j.queue = p_queue AND j.state = 'queued' AND j.priority = p.priority
                   AND j.run_at <= v_t
                 ORDER BY j.run_at, j.id
                 LIMIT v_room
                 FOR UPDATE SKIP LOCKED) due
             WHERE p.priority IS NOT NULL
             LIMIT v_room
        ),
        claimed AS (
            UPDATE stoker.jobs j
               SET state = 'active', attempts = j.attempts + 1, worker = p_worker,
                   lease_expires_at = clock.t + make_interval(secs => p_lease_s),
                   started_at = clock.t, updated_at = clock.t
              FROM next, clock
             WHERE j.id = next.id
            RETURNING j.id, j.kind, j.payload::text AS payload, j.meta::text AS meta, j.attempts,
                      j.max_attempts, j.run_at, j.started_at
        ),
        counted AS (
            INSERT INTO stoker.rate_starts (queue, key, at)
            SELECT p_queue, '', c.started_at FROM claimed c WHERE p_rate_limit IS NOT NULL
        )
        SELECT c.id, c.kind, c.payload, c.meta, c.attempts, c.max_attempts, c.run_at,
               c.started_at, NULL::text, NULL::timestamptz
          FROM claimed c;
        GET DIAGNOSTICS v_got = ROW_COUNT;
    ELSE
        v_null := v_room;
        IF p_rate_limit IS NOT NULL AND p_rate_by_key THEN
            SELECT count(*) INTO v_n FROM stoker.rate_starts s
             WHERE s.queue = p_queue AND s.key = '';
            v_null := least(v_null, p_rate_limit - v_n);
        END IF;
        -- Each key with waiting jobs, found by one descent of jobs_key_fetch_idx per key, gets
        -- the room its limits leave; the picks of all keys then go in priority and run_at
        -- order. The last row says whether some key was held back.
        RETURN QUERY
        WITH RECURSIVE clock AS MATERIALIZED (SELECT clock_timestamp() AS t),
        keys AS (
            (SELECT j.concurrency_key AS k FROM stoker.jobs j
              WHERE j.queue = p_queue AND j.state = 'queued' AND j.concurrency_key IS NOT NULL
              ORDER BY j.concurrency_key LIMIT 1)
            UNION ALL
            SELECT (SELECT j.concurrency_key FROM stoker.jobs j
                     WHERE j.queue = p_queue AND j.state = 'queued'
                       AND j.concurrency_key IS NOT NULL AND j.concurrency_key > keys.k
                     ORDER BY j.concurrency_key LIMIT 1)
              FROM keys WHERE keys.k IS NOT NULL
        ),
        busy AS (
            SELECT j.concurrency_key AS k, count(*) AS n FROM stoker.jobs j
             WHERE p_key_limit IS NOT NULL AND j.queue = p_queue AND j.state = 'active'
               AND j.concurrency_key IS NOT NULL
             GROUP BY j.concurrency_key
        ),
        rated AS (
            SELECT s.key AS k, count(*) AS n, min(s.at) AS oldest FROM stoker.rate_starts s
             WHERE p_rate_by_key AND p_rate_limit IS NOT NULL AND s.queue = p_queue
               AND s.at >= (SELECT clock.t FROM clock) - v_window
             GROUP BY s.key
        ),
        rooms AS (
            SELECT keys.k,
                   least(p_key_limit - coalesce(b.n, 0)::integer,
                         CASE WHEN p_rate_by_key
                              THEN p_rate_limit - coalesce(r.n, 0)::integer END) AS room,
                   CASE WHEN p_rate_by_key AND p_rate_limit - coalesce(r.n, 0) <= 0
                        THEN r.oldest + v_window END AS again
              FROM keys
              LEFT JOIN busy b ON b.k = keys.k
              LEFT JOIN rated r ON r.k = keys.k
             WHERE keys.k IS NOT NULL
        ),
        candidates AS (
            SELECT c.id, c.priority, c.run_at FROM rooms r
             CROSS JOIN LATERAL (
                SELECT j.id, j.priority, j.run_at FROM stoker.jobs j
                 WHERE j.queue = p_queue AND j.state = 'queued' AND j.concurrency_key = r.k
                   AND j.run_at <= v_t
                 ORDER BY j.priority DESC, j.run_at, j.id
                 LIMIT least(r.room, v_room)) c
             WHERE r.room > 0
            UNION ALL
            (SELECT j.id, j.priority, j.run_at FROM stoker.jobs j
              WHERE v_null > 0 AND j.queue = p_queue AND j.state = 'queued'
                AND j.concurrency_key IS NULL AND j.run_at <= v_t
              ORDER BY j.priority DESC, j.run_at, j.id
              LIMIT greatest(v_null, 0))
        ),
        picked AS (
            SELECT cd.id FROM candidates cd ORDER BY cd.priority DESC, cd.run_at, cd.id
             LIMIT v_room
        ),
        next AS (
            SELECT j.id FROM stoker.jobs j
             WHERE j.id IN (SELECT picked.id FROM picked) AND j.state = 'queued'
               FOR UPDATE SKIP LOCKED
        ),
        claimed AS (
            UPDATE stoker.jobs j
               SET state = 'active', attempts = j.attempts + 1, worker = p_worker,
                   lease_expires_at = clock.t + make_interval(secs => p_lease_s),
                   started_at = clock.t, updated_at = clock.t
              FROM next, clock
             WHERE j.id = next.id
            RETURNING j.id, j.kind, j.payload::text AS payload, j.meta::text AS meta, j.attempts,
                      j.max_attempts, j.run_at, j.started_at, j.concurrency_key
        ),
        counted AS (
            INSERT INTO stoker.rate_starts (queue, key, at)
            SELECT p_queue, CASE WHEN p_rate_by_key THEN coalesce(c.concurrency_key, '')
                                 ELSE '' END, c.started_at
              FROM claimed c WHERE p_rate_limit IS NOT NULL
        )
        SELECT c.id, c.kind, c.payload, c.meta, c.attempts, c.max_attempts, c.run_at,
               c.started_at, NULL::text, NULL::timestamptz
          FROM claimed c
        UNION ALL
        SELECT NULL::bigint, NULL::text, NULL::text, NULL::text, NULL::integer, NULL::integer,
               NULL::timestamptz, NULL::timestamptz,
               CASE WHEN EXISTS (SELECT 1 FROM rooms r WHERE r.room <= 0) THEN 'key' END,
               (SELECT min(r.again) FROM rooms r WHERE r.room <= 0);
        GET DIAGNOSTICS v_got = ROW_COUNT;
        v_got := v_got - 1;
    END IF;
    IF v_why IS NOT NULL AND v_got >= v_room THEN
        RETURN QUERY SELECT NULL::bigint, NULL::text, NULL::text, NULL::text, NULL::integer,
                            NULL::integer, NULL::timestamptz, NULL::timestamptz, v_why, v_again;
    END IF;
END
$$;
