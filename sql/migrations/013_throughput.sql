-- Stoker 013: jobs finished per minute and queue, for the dashboard's rates and charts. The
-- leader fills it once a minute from job_history's BRIN-indexed finished_at, a bounded range of
-- closed minutes at a time, so that no page ever counts over history.
CREATE TABLE stoker.throughput (
    minute    timestamptz NOT NULL,
    queue     text        NOT NULL,
    completed integer     NOT NULL DEFAULT 0,
    failed    integer     NOT NULL DEFAULT 0,
    PRIMARY KEY (minute, queue)
);
