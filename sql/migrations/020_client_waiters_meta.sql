-- Stoker 020 (issue 18): waiting for one job's end from any Python app (daemon.client.wait_for),
-- and listing jobs by meta containment (an organisation's, a user's jobs).

-- Who waits for which job. A NOTIFY on every finished job would make every producer's and
-- worker's commit take the database-wide notify lock; so a finished job is announced only while
-- someone waits for it. UNLOGGED: waiters are sessions, which a crash ends anyway. A waiter
-- whose session died without deleting its row is removed by the next waiter (backend_pid gone).
CREATE UNLOGGED TABLE stoker.job_waiters (
    job_id      bigint      NOT NULL,
    backend_pid integer     NOT NULL DEFAULT pg_backend_pid(),
    since       timestamptz NOT NULL DEFAULT now()
) WITH (autovacuum_vacuum_scale_factor = 0.01, autovacuum_vacuum_threshold = 100);
CREATE INDEX job_waiters_job_idx ON stoker.job_waiters (job_id);

-- Every path by which a job ends inserts it into stoker.job_history (the outcome write, the
-- move of a parked outcome, stoker.cancel, an operator's bulk cancel): one statement-level
-- trigger sees them all. With no waiter, which is the usual case, it costs one probe of an
-- empty table per statement (a batch of outcomes is one statement), and no NOTIFY. No
-- transition table: capturing every finished row for it would cost the drain even when
-- nobody waits. With waiters, it announces each waiter's job that is in history, as this
-- statement sees it (its own rows included); a job that finished earlier is announced again,
-- which a waiter, having found it finished already, ignores.
-- A waiter that registered after this statement's snapshot was taken is not seen here; it does
-- not miss the end: its look at the job's state waits on the row lock this transaction holds
-- on the job's deleted stoker.jobs row (see daemon/client/waiting.py).
CREATE FUNCTION stoker.announce_finished() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM stoker.job_waiters) THEN
        RETURN NULL;
    END IF;
    -- One notification per job: a payload has a size limit, a batch of ids does not.
    PERFORM pg_notify('stoker_done', w.job_id::text)
       FROM (SELECT DISTINCT job_id FROM stoker.job_waiters) w
      WHERE EXISTS (SELECT 1 FROM stoker.job_history h WHERE h.id = w.job_id);
    RETURN NULL;
END
$$;

CREATE TRIGGER job_history_announce AFTER INSERT ON stoker.job_history
    FOR EACH STATEMENT EXECUTE FUNCTION stoker.announce_finished();

-- Jobs by meta containment (meta @> '{"org": "org_123"}'), live and finished. jsonb_path_ops
-- indexes one hash per path-and-value, smaller and faster for @> than the default opclass.
-- Partial: jobs without meta (most producers' jobs, and every job of the drain benchmark) add
-- nothing to it; a query must say `meta <> '{}'` for the planner to use it (an @> of a
-- non-empty object implies it).
CREATE INDEX jobs_meta_idx ON stoker.jobs USING gin (meta jsonb_path_ops)
    WHERE meta <> '{}'::jsonb;
CREATE INDEX job_history_meta_idx ON stoker.job_history USING gin (meta jsonb_path_ops)
    WHERE meta <> '{}'::jsonb;
