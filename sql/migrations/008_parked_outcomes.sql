-- Stoker 008: outcomes that history refuses for good are parked.
--
-- A finished job whose move to stoker.job_history PostgreSQL refuses for good (its id is taken
-- there, a permission is missing, a trigger says no) stays in stoker.jobs with state
-- 'succeeded' or 'failed' and the reason in last_error: never claimed (not 'queued'), never
-- rescued (not 'active'), visible in stoker.all_jobs. Before, such an outcome was retried
-- forever and wedged every outcome behind it.
ALTER TABLE stoker.jobs DROP CONSTRAINT jobs_state_check;
ALTER TABLE stoker.jobs ADD CONSTRAINT jobs_state_check
    CHECK (state IN ('queued', 'active', 'succeeded', 'failed'));
-- The maintenance tries to move parked jobs on to history (after the cause is fixed); empty
-- in a healthy system, so it costs nothing.
CREATE INDEX jobs_parked_idx ON stoker.jobs (id) WHERE state IN ('succeeded', 'failed');
