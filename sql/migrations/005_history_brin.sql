-- Stoker 005: history's finished_at index as BRIN. Every finished job is one row appended to
-- stoker.job_history, so finished_at follows the physical order; a BRIN index answers the
-- retention purge (finished_at < cutoff) for a few pages of upkeep instead of a B-tree
-- insertion per job on the hot path.

DROP INDEX stoker.job_history_finished_idx;
CREATE INDEX job_history_finished_brin ON stoker.job_history
    USING brin (finished_at) WITH (autosummarize = on);
