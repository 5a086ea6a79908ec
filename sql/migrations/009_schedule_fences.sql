-- Stoker 009: cron cursors that survive leader changes, edits and re-enabling (issue 11).

-- skip_grace: with catch_up = 'skip', a tick at most this many seconds late still fires (a
-- leader change or a restarted lead loop is always shorter); older ones are skipped, and
-- recorded as such.
-- timetable_changed_at: when the row's ticks last changed meaning (cron or timezone edited, or
-- enabled again); the leader never fires a tick from before it. NULL means since created_at.
-- Any other edit (payload, queue, ...) keeps the schedule's place, so that an edit landing at
-- tick time cannot drop that tick.
ALTER TABLE stoker.schedules
    ADD COLUMN skip_grace double precision NOT NULL DEFAULT 60
        CONSTRAINT schedules_skip_grace_must_not_be_negative CHECK (skip_grace >= 0),
    ADD COLUMN timetable_changed_at timestamptz;

-- Until now every edit moved the catch-up point to updated_at; keep that for existing rows.
UPDATE stoker.schedules SET timetable_changed_at = updated_at WHERE updated_at > created_at;

-- updated_at was left to whoever wrote the row; nothing maintained it.
CREATE FUNCTION stoker.schedules_touch() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    NEW.updated_at := now();
    IF NEW.cron IS DISTINCT FROM OLD.cron
       OR NEW.timezone IS DISTINCT FROM OLD.timezone
       OR (NEW.enabled AND NOT OLD.enabled) THEN
        NEW.timetable_changed_at := now();
    END IF;
    RETURN NEW;
END
$$;

CREATE TRIGGER schedules_touch BEFORE UPDATE ON stoker.schedules
    FOR EACH ROW EXECUTE FUNCTION stoker.schedules_touch();

-- A payload or meta that is not an object used to become {} without a word. Rows written before
-- this migration are not re-checked here (the migration must not fail on them); the leader
-- refuses them with an error naming the row, and the constraint is validated when none is left.
ALTER TABLE stoker.schedules
    ADD CONSTRAINT schedules_payload_must_be_a_json_object
        CHECK (jsonb_typeof(payload) = 'object') NOT VALID,
    ADD CONSTRAINT schedules_meta_must_be_a_json_object
        CHECK (jsonb_typeof(meta) = 'object') NOT VALID;

DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM stoker.schedules
                WHERE jsonb_typeof(payload) <> 'object' OR jsonb_typeof(meta) <> 'object') THEN
        RAISE WARNING 'stoker.schedules has rows whose payload or meta is not a JSON object; '
            'the scheduler ignores them until they are fixed';
    ELSE
        ALTER TABLE stoker.schedules VALIDATE CONSTRAINT schedules_payload_must_be_a_json_object;
        ALTER TABLE stoker.schedules VALIDATE CONSTRAINT schedules_meta_must_be_a_json_object;
    END IF;
END
$$;

-- Every tick the leader considered leaves a row: fired, skipped because the previous run still
-- went (overlap), or passed over by the catch-up policy (too late for 'skip', older than the
-- newest for 'latest', beyond max_catch_up for 'all').
ALTER TABLE stoker.schedule_ticks DROP CONSTRAINT schedule_ticks_outcome_check;
ALTER TABLE stoker.schedule_ticks ADD CONSTRAINT schedule_ticks_outcome_check
    CHECK (outcome IN ('fired', 'skipped_overlap', 'skipped_catch_up'));

-- The timetable (cron, timezone, enabled) each schedule's cursor was kept for. A configured
-- schedule has no row to carry timetable_changed_at: when its timetable differs from this (it
-- was re-enabled through the environment, or its expression edited), it starts afresh from now
-- instead of catching up on ticks it was never meant to fire.
ALTER TABLE stoker.schedule_state ADD COLUMN timetable text;
