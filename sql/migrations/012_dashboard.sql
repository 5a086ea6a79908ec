-- Stoker 012: what the dashboard (issue 15) needs beyond the jobs and the ledger: who did what
-- (an audit log of every action), which daemons are alive, and schedules paused from the
-- dashboard so that every daemon obeys.

-- Every action taken through the dashboard or the admin API: by whom (the role of the session
-- and the address it came from; never a token), what, on what, when.
CREATE TABLE stoker.audit_log (
    id      bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at      timestamptz NOT NULL DEFAULT now(),
    role    text        NOT NULL,
    address text,
    action  text        NOT NULL,
    target  text,
    details jsonb       NOT NULL DEFAULT '{}'
);
CREATE INDEX audit_log_at_idx ON stoker.audit_log (at DESC);

-- One row per running daemon, written at start and by its heartbeat, removed at a clean stop;
-- a row not seen for a while belongs to a daemon that died (and is pruned later).
CREATE TABLE stoker.workers (
    worker     text        PRIMARY KEY,
    host       text        NOT NULL,
    pid        integer     NOT NULL,
    queues     text[]      NOT NULL,
    version    text        NOT NULL,
    started_at timestamptz NOT NULL DEFAULT now(),
    seen_at    timestamptz NOT NULL DEFAULT now()
);

-- A schedule paused by an operator: the leader fires none of its ticks while paused_at is set,
-- whatever the configuration says, and starts afresh from the resume.
ALTER TABLE stoker.schedule_state
    ADD COLUMN paused_at timestamptz,
    ADD COLUMN paused_by text;
