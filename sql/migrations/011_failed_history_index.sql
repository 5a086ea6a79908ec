-- Stoker 011: the job_failed alert rule reads the jobs that failed for good since its last
-- look, by finish time; failures are few, so a partial index keeps that read small however
-- many jobs succeed around them.
CREATE INDEX job_history_failed_finished_idx ON stoker.job_history (finished_at)
    WHERE state = 'failed';
