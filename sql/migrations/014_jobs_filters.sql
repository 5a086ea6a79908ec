-- Stoker 014: the dashboard's jobs list filtered by state = failed or cancelled, newest first
-- (keyset on id). job_history_failed_idx is (queue, id): without a queue it cannot give failed
-- jobs in id order, and the primary key would walk millions of succeeded rows to find a page of
-- rare failures. This partial index holds only failed and cancelled rows, so the hot path (a
-- job that succeeds, moved into history) never touches it; only failures and cancellations,
-- which are few, pay one small B-tree insertion. Other filters (queue, kind, meta, error text)
-- are not indexed: the dashboard reads a bounded window of the newest rows for them.
CREATE INDEX job_history_unhappy_id_idx ON stoker.job_history (id)
    WHERE state IN ('failed', 'cancelled');
