-- Stoker 003: pausing queues. A paused queue claims nothing on any daemon until resumed.

CREATE TABLE stoker.queues (
    name       text        PRIMARY KEY CHECK (name ~ '^[A-Za-z0-9_.:-]{1,128}$'),
    paused     boolean     NOT NULL DEFAULT false,
    updated_at timestamptz NOT NULL DEFAULT now()
);

-- Resuming must wake the daemons at once: pools of a paused queue sit idle.
CREATE FUNCTION stoker.notify_queues() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('stoker_jobs', name) FROM new_queues WHERE NOT paused;
    RETURN NULL;
END
$$;

CREATE TRIGGER queues_notify_insert AFTER INSERT ON stoker.queues
    REFERENCING NEW TABLE AS new_queues
    FOR EACH STATEMENT EXECUTE FUNCTION stoker.notify_queues();
CREATE TRIGGER queues_notify_update AFTER UPDATE ON stoker.queues
    REFERENCING NEW TABLE AS new_queues
    FOR EACH STATEMENT EXECUTE FUNCTION stoker.notify_queues();
