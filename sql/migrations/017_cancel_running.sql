-- Stoker 017: cancelling a running job (issue 17).
--
-- A cancel request is two columns set on the active row, under its row lock, so that it and the
-- daemon's outcome write (which deletes or requeues that row, fenced by worker and attempt) are
-- ordered by PostgreSQL: whichever commits first, the other sees it, and the job ends in exactly
-- one final state. The daemon running the job learns of the request by a NOTIFY on channel
-- stoker_cancel (payload: the job id), or at the latest from its next lease renewal.
ALTER TABLE stoker.jobs ADD COLUMN cancel_requested_at timestamptz;
ALTER TABLE stoker.jobs ADD COLUMN cancel_requested_by text;

-- A retry, a hand-back or a lease rescue of a job with a cancel request does not requeue it:
-- the row becomes 'cancelled' in place (one statement, fenced like the requeue it replaces)
-- and is moved on to history at once, or by the maintenance like a parked outcome.
ALTER TABLE stoker.jobs DROP CONSTRAINT jobs_state_check;
ALTER TABLE stoker.jobs ADD CONSTRAINT jobs_state_check
    CHECK (state IN ('queued', 'active', 'succeeded', 'failed', 'cancelled'));
DROP INDEX stoker.jobs_parked_idx;
CREATE INDEX jobs_parked_idx ON stoker.jobs (id) WHERE state IN ('succeeded', 'failed', 'cancelled');

-- What a cancelled job's last_error says: who and when.
CREATE FUNCTION stoker.cancel_note(requested_by text, requested_at timestamptz) RETURNS text
LANGUAGE sql STABLE AS $$
    SELECT 'cancelled by ' || coalesce(requested_by, 'an operator') || ' at '
           || to_char(coalesce(requested_at, now()) AT TIME ZONE 'UTC',
                      'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"')
$$;

-- Cancel job `job_id`, from any client:
--   'cancelled'          it was queued: it is in stoker.job_history as cancelled now;
--   'requested'          it is running: the daemon running it stops it (the handler sees
--                        ctx.cancelled, and is interrupted after cancel_grace seconds), and it
--                        ends cancelled, never retried;
--   'already <state>'    it had finished (succeeded, failed or cancelled): nothing changed;
--   'not found'          no such job.
-- `requested_by` is kept in the job's last_error (default: the session's user).
CREATE FUNCTION stoker.cancel(job_id bigint, requested_by text DEFAULT NULL) RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    who text := coalesce(nullif(requested_by, ''), 'sql:' || session_user);
    found_state text;
BEGIN
    -- A job can move between queued and active while we look (claimed, retried): each
    -- statement sees the latest committed row, so a few rounds always settle it.
    FOR look IN 1..10 LOOP
        WITH gone AS (
            DELETE FROM stoker.jobs j WHERE j.id = job_id AND j.state = 'queued' RETURNING j.*
        )
        INSERT INTO stoker.job_history (id, queue, kind, payload, meta, priority, state, run_at,
                                        attempts, max_attempts, unique_key, worker, last_error,
                                        errors, result, progress, created_at, started_at)
        SELECT id, queue, kind, payload, meta, priority, 'cancelled', run_at, attempts,
               max_attempts, unique_key, worker, stoker.cancel_note(who, now()), errors, result,
               progress, created_at, started_at
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
            RETURN 'already ' || found_state;  -- parked, or a cancel on its way to history
        END IF;
    END LOOP;
    RAISE EXCEPTION 'job % keeps changing state; try again', job_id
        USING ERRCODE = 'serialization_failure';
END
$$;
