-- Stoker 022 (issue 17): a queue held back by its global concurrency limit claims in the same
-- transaction that writes its outcomes.
--
-- A slot of the limit is taken until the job's outcome is written, so a queue whose jobs fill
-- the limit drains in a serial cycle: claim, run, write the outcomes, and only then claim
-- again. Writing the outcomes and making the next claim in one round trip and one commit takes
-- a round trip, a commit and a wake-up of the pool out of every turn of that cycle.
--
-- The outcome part is the daemon's write of succeeded outcomes (COMPLETE_SUCCEEDED in
-- daemon/store/queries.py), fenced the same way: only rows whose attempt and worker are still
-- the ones given leave stoker.jobs. Keep the two alike; tests/test_limits.py compares the
-- history rows both write. The claim is stoker.claim_limited itself, a statement after the
-- outcomes, so the slots they freed are free to it (and, being plpgsql under READ COMMITTED,
-- it sees what other daemons committed meanwhile). It refuses other isolation levels as
-- claim_limited does, and the daemon then writes its outcomes without a claim.
--
-- Rows: the written outcomes first (done_id, done_queue; the rest NULL), then the claim's rows
-- as stoker.claim_limited returns them (done_id NULL).
CREATE FUNCTION stoker.complete_and_claim(
    p_ids           bigint[],
    p_attempts      integer[],
    p_results       text[],
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
) RETURNS TABLE (done_id bigint, done_queue text, id bigint, kind text, payload text,
                 meta text, attempts integer, max_attempts integer, run_at timestamptz,
                 started_at timestamptz, blocked text, retry_at timestamptz,
                 concurrency_key text)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
BEGIN
    RETURN QUERY
    WITH finished AS (
        DELETE FROM stoker.jobs j
         WHERE j.id = ANY(p_ids) AND j.worker = p_worker
           AND j.attempts = p_attempts[array_position(p_ids, j.id)]
           AND j.state IN ('active', 'queued')
        RETURNING j.*, array_position(p_ids, j.id) AS pos
    ),
    moved AS (
        INSERT INTO stoker.job_history (id, queue, kind, payload, meta, priority, state,
                                        run_at, attempts, max_attempts, unique_key, worker,
                                        last_error, errors, result, progress, created_at,
                                        started_at, concurrency_key)
        SELECT f.id, f.queue, f.kind, f.payload, f.meta, f.priority, 'succeeded', f.run_at,
               f.attempts, f.max_attempts, f.unique_key, f.worker, f.last_error, f.errors,
               (p_results[f.pos])::jsonb, f.progress, f.created_at, f.started_at,
               f.concurrency_key
          FROM finished f
        RETURNING stoker.job_history.id AS hid, stoker.job_history.queue AS hqueue
    )
    SELECT m.hid, m.hqueue, NULL::bigint, NULL::text, NULL::text, NULL::text, NULL::integer,
           NULL::integer, NULL::timestamptz, NULL::timestamptz, NULL::text, NULL::timestamptz,
           NULL::text
      FROM moved m;

    RETURN QUERY
    SELECT NULL::bigint, NULL::text, c.id, c.kind, c.payload, c.meta, c.attempts,
           c.max_attempts, c.run_at, c.started_at, c.blocked, c.retry_at, c.concurrency_key
      FROM stoker.claim_limited(p_queue, p_wanted, p_worker, p_lease_s, p_stop_waiting,
                                p_global_limit, p_key_limit, p_rate_limit, p_rate_window_s,
                                p_rate_by_key, p_after_key) c;
END
$$;
