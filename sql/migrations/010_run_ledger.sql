-- Stoker 010: the run ledger (issue 14) — one row per tick of every schedule, and per run by
-- hand, with what became of its job, kept for ledger_retention_days independently of
-- stoker.job_history; the incidents of the alert rules; a ping URL per schedule.

-- stoker.schedule_ticks was the fence (one row per schedule and tick, ever); it becomes the
-- ledger. A run by hand is a row too: outcome 'manual', its tick the moment it was asked for,
-- `reason` saying by whom (cli, api: ...). `caught_up`: fired late, by a catch-up after an
-- outage. The job's end is copied here when it finishes (the trigger below), so the row keeps
-- it after the job's history is purged.
ALTER TABLE stoker.schedule_ticks DROP CONSTRAINT schedule_ticks_outcome_check;
ALTER TABLE stoker.schedule_ticks ADD CONSTRAINT schedule_ticks_outcome_check
    CHECK (outcome IN ('fired', 'skipped_overlap', 'skipped_catch_up', 'manual'));
ALTER TABLE stoker.schedule_ticks
    ADD COLUMN reason      text,
    ADD COLUMN caught_up   boolean     NOT NULL DEFAULT false,
    ADD COLUMN state       text,
    ADD COLUMN started_at  timestamptz,
    ADD COLUMN finished_at timestamptz,
    ADD COLUMN error       text,
    ADD COLUMN result      jsonb;

CREATE INDEX schedule_ticks_job_idx ON stoker.schedule_ticks (job_id) WHERE job_id IS NOT NULL;
-- The history of one schedule, newest first (stoker schedules history, the runs API).
CREATE INDEX schedule_ticks_schedule_tick_idx ON stoker.schedule_ticks (schedule, tick DESC);

-- A finished job of a schedule writes its end into its ledger row, in the statement that moves
-- it into history: one statement-level trigger per batch of outcomes, which looks only at the
-- rows of that statement (a transition table) and touches the ledger only for jobs a schedule
-- made. Errors are kept to their first 2,000 characters and results to 2,000 characters of
-- JSON (a larger one is summarised by its size).
CREATE FUNCTION stoker.ledger_record_finished() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    UPDATE stoker.schedule_ticks t
       SET state = f.state::text,
           started_at = f.started_at,
           finished_at = f.finished_at,
           error = left(f.last_error, 2000),
           result = CASE
               WHEN f.result IS NULL THEN NULL
               WHEN length(f.result::text) <= 2000 THEN f.result
               ELSE jsonb_build_object('summary', 'result of ' || length(f.result::text)
                                                  || ' characters, not kept in the ledger')
           END
      FROM finished f
     WHERE t.job_id = f.id AND f.meta ? 'schedule';
    RETURN NULL;
END
$$;

CREATE TRIGGER job_history_ledger AFTER INSERT ON stoker.job_history
    REFERENCING NEW TABLE AS finished
    FOR EACH STATEMENT EXECUTE FUNCTION stoker.ledger_record_finished();

-- The healthchecks.io / Cronitor convention: a URL Stoker calls (GET) when a run succeeds, so
-- that an outside service notices when Stoker itself stops. For schedules made at run time.
ALTER TABLE stoker.schedules ADD COLUMN ping_url text
    CONSTRAINT schedules_ping_url_must_be_http CHECK (ping_url ~ '^https?://');

-- Alert incidents: one row per rule and subject (a kind, a schedule, a queue) while its
-- condition lasts, and after, until pruned. The leader evaluates the rules; this row is what a
-- new leader finds, so a leader change neither repeats an incident's message nor forgets it.
CREATE TABLE stoker.alert_incidents (
    id              bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    rule            text        NOT NULL,
    event           text        NOT NULL,
    subject         text        NOT NULL,
    opened_at       timestamptz NOT NULL DEFAULT now(),
    closed_at       timestamptz,
    -- occurrences since it opened, and how many of them a message has told already
    count           integer     NOT NULL DEFAULT 1,
    reported        integer     NOT NULL DEFAULT 0,
    last_message_at timestamptz,
    -- what the rule last saw: the newest job id counted, the tick found late, ...
    cursor          jsonb       NOT NULL DEFAULT '{}',
    details         jsonb       NOT NULL DEFAULT '{}'
);
CREATE UNIQUE INDEX alert_incidents_open_idx ON stoker.alert_incidents (rule, subject)
    WHERE closed_at IS NULL;
CREATE INDEX alert_incidents_closed_idx ON stoker.alert_incidents (closed_at)
    WHERE closed_at IS NOT NULL;

-- Where each rule left off reading finished jobs (job ids only grow), across leader changes.
CREATE TABLE stoker.alert_cursors (
    rule       text        PRIMARY KEY,
    position   jsonb       NOT NULL DEFAULT '{}',
    updated_at timestamptz NOT NULL DEFAULT now()
);
