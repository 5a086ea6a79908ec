-- Stoker 018: an insert in a REPEATABLE READ or SERIALIZABLE transaction always sends its
-- NOTIFY. The trigger reads stoker.waiting with the transaction's snapshot, which such a
-- producer took at its first statement: a pool that registered after that (and looked at the
-- queue before the insert) was invisible to it, and the pool's look for transactions in flight
-- missed the producer too if it had no transaction id yet. Its job then waited for the idle
-- sweep. READ COMMITTED, the default, takes a new snapshot for the trigger's query and keeps
-- sending a NOTIFY only when a pool waits.

CREATE OR REPLACE FUNCTION stoker.notify_jobs() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    r record;
    everyone boolean := current_setting('transaction_isolation') <> 'read committed';
BEGIN
    IF NOT everyone AND NOT EXISTS (SELECT 1 FROM stoker.waiting WHERE expires_at > now()) THEN
        RETURN NULL;
    END IF;
    FOR r IN
        SELECT n.queue, min(n.run_at) AS first_run
          FROM new_jobs n
         WHERE n.state = 'queued'
           AND (everyone OR EXISTS (SELECT 1 FROM stoker.waiting w
                                     WHERE w.queue = n.queue AND w.expires_at > now()))
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
