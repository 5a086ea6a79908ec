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

-- The claim order, now with the key last: in a key-limited queue, the search for jobs without
-- a key checks it in the index and skips keyed jobs without reading their rows (the order, and
-- the plain claim's plan, are unchanged: id is unique).
DROP INDEX stoker.jobs_fetch_idx;
CREATE INDEX jobs_fetch_idx ON stoker.jobs (queue, priority DESC, run_at, id, concurrency_key)
    WHERE state = 'queued';

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

-- The starts of a rate-limited queue, one row per claim and key, on the database's clock: a sliding window
-- counts them exactly (a bucket would let twice the limit through across a boundary). `key` is
-- the job's concurrency key for a limit per key, '' for the queue's own window. A claim deletes
-- the rows that have left its window.
CREATE TABLE stoker.rate_starts (
    queue  text        NOT NULL,
    key    text        NOT NULL,
    at     timestamptz NOT NULL,
    starts integer     NOT NULL CHECK (starts > 0)  -- a claim's jobs of one key start at once
) WITH (autovacuum_vacuum_scale_factor = 0.01, autovacuum_vacuum_threshold = 1000);
CREATE INDEX rate_starts_idx ON stoker.rate_starts (queue, key, at);

-- The SQL API gains the key (a new argument at the end: calls by position still work). The
-- function is created anew: a DBA who restricted EXECUTE on it grants it again.
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
    p_rate_by_key   boolean,
    p_after_key     text
) RETURNS TABLE (id bigint, kind text, payload text, meta text, attempts integer,
                 max_attempts integer, run_at timestamptz, started_at timestamptz,
                 blocked text, retry_at timestamptz, concurrency_key text)
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
    -- The counts below must see what other claims committed while this one waited for the
    -- lock: only READ COMMITTED takes a new snapshot per statement.
    IF current_setting('transaction_isolation') <> 'read committed' THEN
        RAISE EXCEPTION 'stoker.claim_limited needs READ COMMITTED isolation, not %',
            current_setting('transaction_isolation')
            USING ERRCODE = 'feature_not_supported',
                  HINT = 'run it in its own READ COMMITTED transaction: the limits count '
                         'the claims other daemons committed meanwhile';
    END IF;
    IF p_stop_waiting THEN
        DELETE FROM stoker.waiting w WHERE w.queue = p_queue AND w.worker = p_worker;
    END IF;
    IF EXISTS (SELECT 1 FROM stoker.queues pq WHERE pq.name = p_queue AND pq.paused) THEN
        RETURN;
    END IF;
    -- 'lmts': the limits' lock space (the alerts use 'alrt').
    PERFORM pg_advisory_xact_lock(1819112563, hashtext(p_queue));
    IF current_setting('synchronous_commit') = 'off' THEN
        PERFORM set_config('synchronous_commit', 'on', true);  -- see above: durable
    END IF;
    v_t := clock_timestamp();
    IF p_global_limit IS NOT NULL THEN
        SELECT count(*) INTO v_n FROM stoker.jobs j
         WHERE j.queue = p_queue AND j.state = 'active';
        -- A claim that takes what is left of the limit is held back by it too: its pool then
        -- waits for a slot instead of claiming again at once for nothing.
        IF p_global_limit - v_n <= v_room THEN
            v_room := p_global_limit - v_n;
            v_why := 'global';
        END IF;
    END IF;
    IF p_rate_limit IS NOT NULL THEN
        -- A start exactly one window ago still counts: no closed window of that length holds
        -- more than the limit.
        DELETE FROM stoker.rate_starts s WHERE s.queue = p_queue AND s.at < v_t - v_window;
        IF NOT p_rate_by_key THEN
            SELECT coalesce(sum(s.starts), 0), min(s.at) INTO v_n, v_oldest
              FROM stoker.rate_starts s
             WHERE s.queue = p_queue AND s.key = '';
            IF p_rate_limit - v_n <= v_room THEN
                v_room := p_rate_limit - v_n;
                v_why := 'rate';
                v_again := v_oldest + v_window;
            END IF;
        END IF;
    END IF;
    IF v_room <= 0 THEN
        RETURN QUERY SELECT NULL::bigint, NULL::text, NULL::text, NULL::text, NULL::integer,
                            NULL::integer, NULL::timestamptz, NULL::timestamptz, v_why, v_again,
                            NULL::text;
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
            INSERT INTO stoker.rate_starts (queue, key, at, starts)
            SELECT p_queue, '', min(c.started_at), count(*) FROM claimed c
             WHERE p_rate_limit IS NOT NULL HAVING count(*) > 0
        )
        SELECT c.id, c.kind, c.payload, c.meta, c.attempts, c.max_attempts, c.run_at,
               c.started_at, NULL::text, NULL::timestamptz, NULL::text
          FROM claimed c;
        GET DIAGNOSTICS v_got = ROW_COUNT;
    ELSE
        v_null := v_room;
        IF p_rate_limit IS NOT NULL AND p_rate_by_key THEN
            SELECT coalesce(sum(s.starts), 0) INTO v_n FROM stoker.rate_starts s
             WHERE s.queue = p_queue AND s.key = '';
            v_null := least(v_null, p_rate_limit - v_n);
        END IF;
        -- The keys with waiting jobs, one descent of jobs_key_fetch_idx each, in turn from
        -- the key after p_after_key (this daemon's last), round to the start: each key that
        -- has room gives its next due jobs, until the claim has enough. A long backlog of one
        -- key, or many keys, costs a claim only the keys it passes; and no key waits for more
        -- than a turn. The last row says whether some key is at its limit.
        RETURN QUERY
        WITH RECURSIVE clock AS MATERIALIZED (SELECT clock_timestamp() AS t),
        after_keys AS (
            (SELECT j.concurrency_key AS k FROM stoker.jobs j
              WHERE j.queue = p_queue AND j.state = 'queued' AND j.concurrency_key IS NOT NULL
                AND (p_after_key IS NULL OR j.concurrency_key > p_after_key)
              ORDER BY j.concurrency_key LIMIT 1)
            UNION ALL
            SELECT (SELECT j.concurrency_key FROM stoker.jobs j
                     WHERE j.queue = p_queue AND j.state = 'queued'
                       AND j.concurrency_key IS NOT NULL AND j.concurrency_key > a.k
                     ORDER BY j.concurrency_key LIMIT 1)
              FROM after_keys a WHERE a.k IS NOT NULL
        ),
        before_keys AS (
            (SELECT j.concurrency_key AS k FROM stoker.jobs j
              WHERE p_after_key IS NOT NULL AND j.queue = p_queue AND j.state = 'queued'
                AND j.concurrency_key IS NOT NULL AND j.concurrency_key <= p_after_key
              ORDER BY j.concurrency_key LIMIT 1)
            UNION ALL
            SELECT (SELECT j.concurrency_key FROM stoker.jobs j
                     WHERE j.queue = p_queue AND j.state = 'queued'
                       AND j.concurrency_key IS NOT NULL AND j.concurrency_key > b.k
                       AND j.concurrency_key <= p_after_key
                     ORDER BY j.concurrency_key LIMIT 1)
              FROM before_keys b WHERE b.k IS NOT NULL
        ),
        busy AS MATERIALIZED (
            SELECT j.concurrency_key AS k, count(*)::integer AS n FROM stoker.jobs j
             WHERE p_key_limit IS NOT NULL AND j.queue = p_queue AND j.state = 'active'
               AND j.concurrency_key IS NOT NULL
             GROUP BY j.concurrency_key
        ),
        rated AS MATERIALIZED (
            SELECT s.key AS k, sum(s.starts)::integer AS n, min(s.at) AS oldest
              FROM stoker.rate_starts s
             WHERE p_rate_by_key AND p_rate_limit IS NOT NULL AND s.queue = p_queue
               AND s.at >= (SELECT clock.t FROM clock) - v_window
             GROUP BY s.key
        ),
        turn AS (
            SELECT a.k, 1 AS lap FROM after_keys a WHERE a.k IS NOT NULL
            UNION ALL
            SELECT b.k, 2 AS lap FROM before_keys b WHERE b.k IS NOT NULL
        ),
        keyed AS (
            SELECT c.id, c.priority, c.run_at FROM turn
              LEFT JOIN busy b ON b.k = turn.k
              LEFT JOIN rated r ON r.k = turn.k
             CROSS JOIN LATERAL (
                SELECT least(p_key_limit - coalesce(b.n, 0),
                             CASE WHEN p_rate_by_key THEN p_rate_limit - coalesce(r.n, 0)
                             END) AS room) rm
             CROSS JOIN LATERAL (
                SELECT j.id, j.priority, j.run_at FROM stoker.jobs j
                 WHERE j.queue = p_queue AND j.state = 'queued' AND j.concurrency_key = turn.k
                   AND j.run_at <= v_t
                 ORDER BY j.priority DESC, j.run_at, j.id
                 LIMIT greatest(least(rm.room, v_room), 0)) c
             WHERE rm.room > 0
             LIMIT v_room
        ),
        candidates AS (
            SELECT kd.id, kd.priority, kd.run_at FROM keyed kd
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
            INSERT INTO stoker.rate_starts (queue, key, at, starts)
            SELECT p_queue, CASE WHEN p_rate_by_key THEN coalesce(c.concurrency_key, '')
                                 ELSE '' END, c.started_at, count(*)
              FROM claimed c WHERE p_rate_limit IS NOT NULL
             GROUP BY 2, 3
        )
        SELECT c.id, c.kind, c.payload, c.meta, c.attempts, c.max_attempts, c.run_at,
               c.started_at, NULL::text, NULL::timestamptz, c.concurrency_key
          FROM claimed c
        UNION ALL
        SELECT NULL::bigint, NULL::text, NULL::text, NULL::text, NULL::integer, NULL::integer,
               NULL::timestamptz, NULL::timestamptz,
               CASE WHEN EXISTS (SELECT 1 FROM busy b WHERE b.n >= p_key_limit)
                      OR EXISTS (SELECT 1 FROM rated r WHERE r.n >= p_rate_limit)
                    THEN 'key' END,
               (SELECT min(r.oldest) + v_window FROM rated r WHERE r.n >= p_rate_limit),
               NULL::text;
        GET DIAGNOSTICS v_got = ROW_COUNT;
        v_got := v_got - 1;
    END IF;
    IF v_why IS NOT NULL AND v_got >= v_room THEN
        RETURN QUERY SELECT NULL::bigint, NULL::text, NULL::text, NULL::text, NULL::integer,
                            NULL::integer, NULL::timestamptz, NULL::timestamptz, v_why, v_again,
                            NULL::text;
    END IF;
END
$$;
