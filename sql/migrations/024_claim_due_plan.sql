-- Stoker 024 (issue 17): a limited claim without keys plans once, not at every call.
--
-- A queue held back by its global limit drains in a serial cycle (see 022), and PostgreSQL
-- planned the claim statement anew at every turn: plpgsql's plan cache keeps a generic plan
-- only if it looks as cheap as the custom ones, and this statement's did not (a LIMIT whose
-- value it cannot see is taken for a tenth of the table, so the claimed ids were joined to
-- the table with a hash of all of it). Planning took 0.26 ms of each turn's 1.9 ms (measured
-- with pg_stat_statements.track_planning in a drain of 100 jobs a turn).
--
-- The claim of jobs without keys moves to stoker.claim_due, whose statement finds its rows
-- by id (= ANY of the ids it locked: the plan is the same whatever the count), and which
-- uses the generic plan always. Nothing else changes: claim_limited takes the lock, counts
-- and returns as before, and calls it where it ran the statement itself.

-- At most p_room due jobs of p_queue, in claim order (priority, then run_at, then id), due
-- at p_due; their starts counted in stoker.rate_starts when p_count_starts. Called by
-- stoker.claim_limited, which holds the queue's lock and has counted the room.
CREATE FUNCTION stoker.claim_due(
    p_queue        text,
    p_room         integer,
    p_worker       text,
    p_lease_s      float8,
    p_due          timestamptz,
    p_count_starts boolean
) RETURNS TABLE (id bigint, kind text, payload text, meta text, attempts integer,
                 max_attempts integer, run_at timestamptz, started_at timestamptz)
LANGUAGE plpgsql
SET plan_cache_mode = force_generic_plan
AS $$
#variable_conflict use_column
BEGIN
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
               AND j.run_at <= p_due
             ORDER BY j.run_at, j.id
             LIMIT p_room
             FOR UPDATE SKIP LOCKED) due
         WHERE p.priority IS NOT NULL
         LIMIT p_room
    ),
    claimed AS (
        UPDATE stoker.jobs j
           SET state = 'active', attempts = j.attempts + 1, worker = p_worker,
               lease_expires_at = clock.t + make_interval(secs => p_lease_s),
               started_at = clock.t, updated_at = clock.t
          FROM clock
         WHERE j.id = ANY (ARRAY(SELECT next.id FROM next))
        RETURNING j.id, j.kind, j.payload::text AS payload, j.meta::text AS meta, j.attempts,
                  j.max_attempts, j.run_at, j.started_at
    ),
    counted AS (
        INSERT INTO stoker.rate_starts (queue, key, at, starts)
        SELECT p_queue, '', min(c.started_at), count(*) FROM claimed c
         WHERE p_count_starts HAVING count(*) > 0
    )
    SELECT c.id, c.kind, c.payload, c.meta, c.attempts, c.max_attempts, c.run_at, c.started_at
      FROM claimed c;
END
$$;

-- stoker.claim_limited as in 019, the claim without keys now stoker.claim_due's.
CREATE OR REPLACE FUNCTION stoker.claim_limited(
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
        SELECT d.id, d.kind, d.payload, d.meta, d.attempts, d.max_attempts, d.run_at,
               d.started_at, NULL::text, NULL::timestamptz, NULL::text
          FROM stoker.claim_due(p_queue, v_room, p_worker, p_lease_s, v_t,
                                p_rate_limit IS NOT NULL) d;
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
