-- Stoker 002: cron schedules created at run time, per-schedule state, and the tick fence.

-- User schedules. Schedules from the configuration file are not stored here; both kinds share
-- schedule_state and schedule_ticks by name (a config schedule wins a name clash).
CREATE TABLE stoker.schedules (
    name         text        PRIMARY KEY CHECK (name ~ '^[a-z0-9][a-z0-9_.:-]{0,127}$'),
    cron         text        NOT NULL,
    timezone     text        NOT NULL DEFAULT 'UTC',
    kind         text        NOT NULL CHECK (kind <> '' AND length(kind) <= 200),
    queue        text        NOT NULL DEFAULT 'default' CHECK (queue ~ '^[A-Za-z0-9_.:-]{1,128}$'),
    payload      jsonb       NOT NULL DEFAULT '{}',
    meta         jsonb       NOT NULL DEFAULT '{}',
    enabled      boolean     NOT NULL DEFAULT true,
    catch_up     text        NOT NULL DEFAULT 'latest' CHECK (catch_up IN ('skip', 'latest', 'all')),
    max_catch_up integer     NOT NULL DEFAULT 10 CHECK (max_catch_up BETWEEN 1 AND 1000),
    overlap      text        NOT NULL DEFAULT 'skip' CHECK (overlap IN ('skip', 'allow')),
    description  text        NOT NULL DEFAULT '',
    created_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now()
);

-- Any change reaches the leader at once.
CREATE FUNCTION stoker.notify_schedules() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('stoker_schedules', '');
    RETURN NULL;
END
$$;

CREATE TRIGGER schedules_notify AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON stoker.schedules
    FOR EACH STATEMENT EXECUTE FUNCTION stoker.notify_schedules();

-- What the leader knows of each schedule, persisted so that a new leader carries on from the
-- last recorded tick (never from a look-back over the wall clock).
CREATE TABLE stoker.schedule_state (
    name           text        PRIMARY KEY,
    last_tick      timestamptz,
    last_job_id    bigint,
    last_fired_at  timestamptz,
    fired          bigint      NOT NULL DEFAULT 0,
    skipped        bigint      NOT NULL DEFAULT 0,
    last_skipped   timestamptz,
    updated_at     timestamptz NOT NULL DEFAULT now()
);

-- The second fence: one row per (schedule, tick). Even two processes that both believe they
-- lead cannot enqueue the same tick twice. Pruned after a few days.
CREATE TABLE stoker.schedule_ticks (
    schedule   text        NOT NULL,
    tick       timestamptz NOT NULL,
    outcome    text        NOT NULL CHECK (outcome IN ('fired', 'skipped_overlap')),
    job_id     bigint,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (schedule, tick)
);
CREATE INDEX schedule_ticks_created_idx ON stoker.schedule_ticks (created_at);
