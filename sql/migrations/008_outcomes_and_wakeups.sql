-- Stoker 008: outcomes that history refuses are parked, and no wake-up is lost at commit.
--
-- 1. A finished job whose move to stoker.job_history PostgreSQL refuses for good (its id is
--    taken there, a permission is missing, a trigger says no) stays in stoker.jobs with state
--    'succeeded' or 'failed' and the reason in last_error: never claimed (not 'queued'), never
--    rescued (not 'active'), visible in stoker.all_jobs. Before, such an outcome was retried
--    forever and wedged every outcome behind it.
ALTER TABLE stoker.jobs DROP CONSTRAINT jobs_state_check;
ALTER TABLE stoker.jobs ADD CONSTRAINT jobs_state_check
    CHECK (state IN ('queued', 'active', 'succeeded', 'failed'));
-- The maintenance tries to move parked jobs on to history (after the cause is fixed); empty
-- in a healthy system, so it costs nothing.
CREATE INDEX jobs_parked_idx ON stoker.jobs (id) WHERE state IN ('succeeded', 'failed');

-- 2. The trigger decided at INSERT time whether a daemon waits; a transaction that inserted
--    while every pool was busy and committed after one went idle sent no NOTIFY, and its job
--    waited a whole poll interval. Now each statement first takes a shared advisory lock on
--    its queue's bucket, held until the transaction ends, and only then looks for a waiting
--    pool. A pool that registers as waiting then tries that lock exclusively: held means a
--    transaction that may not have seen the registration is still open, and the pool looks
--    again shortly; free means every such transaction has ended, and its jobs are visible to
--    the pool's next claim. Transactions that are not READ COMMITTED see the table as of
--    their start, so they always notify.
CREATE OR REPLACE FUNCTION stoker.notify_jobs() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    r record;
    always boolean := current_setting('transaction_isolation') <> 'read committed';
BEGIN
    FOR r IN
        SELECT n.queue, min(n.run_at) AS first_run
          FROM new_jobs n
         WHERE n.state = 'queued'
         GROUP BY n.queue
    LOOP
        PERFORM pg_advisory_xact_lock_shared(1398033239, hashtext(r.queue) & 255);
        IF always OR EXISTS (SELECT 1 FROM stoker.waiting w
                              WHERE w.queue = r.queue AND w.expires_at > now()) THEN
            IF r.first_run <= now() THEN
                PERFORM pg_notify('stoker_jobs', r.queue);
            ELSE
                PERFORM pg_notify('stoker_jobs',
                                  r.queue || ' ' || extract(epoch FROM r.first_run)::text);
            END IF;
        END IF;
    END LOOP;
    RETURN NULL;
END
$$;
