-- Stoker 004: NOTIFY only when a daemon waits for the queue. A busy daemon keeps claiming
-- without wake-ups, so producers stop paying for a NOTIFY (which serialises commits) while
-- nobody needs one. An idle pool registers here before its last empty fetch; rows expire, so a
-- killed daemon's rows stop costing anything.

CREATE UNLOGGED TABLE stoker.waiting (
    queue      text        NOT NULL,
    worker     text        NOT NULL,
    expires_at timestamptz NOT NULL,
    PRIMARY KEY (queue, worker)
);

CREATE OR REPLACE FUNCTION stoker.notify_jobs() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    r record;
BEGIN
    FOR r IN
        SELECT n.queue, min(n.run_at) AS first_run
          FROM new_jobs n
         WHERE n.state = 'queued'
           AND EXISTS (SELECT 1 FROM stoker.waiting w
                        WHERE w.queue = n.queue AND w.expires_at > now())
         GROUP BY n.queue
    LOOP
        IF r.first_run <= now() THEN
            PERFORM pg_notify('stoker_jobs', r.queue);
        ELSE
            PERFORM pg_notify('stoker_jobs', r.queue || ' ' || extract(epoch FROM r.first_run)::text);
        END IF;
    END LOOP;
    RETURN NULL;
END
$$;
