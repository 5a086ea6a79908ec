-- Stoker 016: cron at scale (issue 16) — the leader reads only the schedules changed since it
-- last looked, and learns which were deleted, instead of reading every row again.

-- The transaction that last wrote each row (insert or update). The leader keeps the snapshot
-- of its last read: a row whose changed_xid that snapshot did not see has changed since, and
-- a transaction that committed late (after a newer one) is still caught, which updated_at
-- (the moment a transaction began) cannot promise. Rows from before this migration were read
-- by every leader's first load: '1' is older than any snapshot.
ALTER TABLE stoker.schedules ADD COLUMN changed_xid xid8 NOT NULL DEFAULT '1';
ALTER TABLE stoker.schedules ALTER COLUMN changed_xid SET DEFAULT pg_current_xact_id();
CREATE INDEX schedules_changed_xid_idx ON stoker.schedules (changed_xid);

-- Deleted schedules, by the transaction that deleted them, read like changed rows; NULL: the
-- table was truncated (the leader reads everything again). Pruned by the leader after a day.
CREATE TABLE stoker.schedule_deletions (
    name       text,
    xid        xid8        NOT NULL DEFAULT pg_current_xact_id(),
    deleted_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX schedule_deletions_xid_idx ON stoker.schedule_deletions (xid);
CREATE INDEX schedule_deletions_deleted_at_idx ON stoker.schedule_deletions (deleted_at);

-- Every written row carries its transaction, whatever the statement set; a renamed row leaves
-- its old name behind as a deletion.
CREATE FUNCTION stoker.schedules_mark_changed() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    NEW.changed_xid := pg_current_xact_id();
    IF TG_OP = 'UPDATE' AND NEW.name IS DISTINCT FROM OLD.name THEN
        INSERT INTO stoker.schedule_deletions (name) VALUES (OLD.name);
    END IF;
    RETURN NEW;
END
$$;

CREATE TRIGGER schedules_mark_changed BEFORE INSERT OR UPDATE ON stoker.schedules
    FOR EACH ROW EXECUTE FUNCTION stoker.schedules_mark_changed();

CREATE FUNCTION stoker.schedules_record_deleted() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO stoker.schedule_deletions (name) SELECT name FROM gone;
    RETURN NULL;
END
$$;

CREATE TRIGGER schedules_record_deleted AFTER DELETE ON stoker.schedules
    REFERENCING OLD TABLE AS gone
    FOR EACH STATEMENT EXECUTE FUNCTION stoker.schedules_record_deleted();

CREATE FUNCTION stoker.schedules_record_truncated() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO stoker.schedule_deletions (name) VALUES (NULL);
    RETURN NULL;
END
$$;

CREATE TRIGGER schedules_record_truncated AFTER TRUNCATE ON stoker.schedules
    FOR EACH STATEMENT EXECUTE FUNCTION stoker.schedules_record_truncated();

-- The paused schedules, read by the leader at each look for changes without a scan of every
-- schedule's state.
CREATE INDEX schedule_state_paused_idx ON stoker.schedule_state (name) WHERE paused_at IS NOT NULL;
