-- Stoker 007: a cheaper enqueue for producers that insert one job per transaction.
-- 1. stoker.enqueue without a unique_key is a plain INSERT. ON CONFLICT makes every insert
--    speculative (an extra check and WAL record per row) even when the row has no key to
--    conflict on.
-- 2. The NOTIFY trigger returns at once when no daemon waits for any queue (all busy), before
--    it reads the statement's new rows.

CREATE OR REPLACE FUNCTION stoker.enqueue(
    queue        text,
    kind         text,
    payload      jsonb       DEFAULT '{}',
    run_at       timestamptz DEFAULT NULL,
    priority     integer     DEFAULT 0,
    unique_key   text        DEFAULT NULL,
    max_attempts integer     DEFAULT NULL,
    meta         jsonb       DEFAULT '{}'
) RETURNS bigint
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    new_id bigint;
BEGIN
    IF enqueue.unique_key IS NULL THEN
        INSERT INTO stoker.jobs AS j (queue, kind, payload, run_at, priority, max_attempts, meta)
        VALUES (enqueue.queue, enqueue.kind, coalesce(enqueue.payload, '{}'),
                coalesce(enqueue.run_at, now()), coalesce(enqueue.priority, 0),
                enqueue.max_attempts, coalesce(enqueue.meta, '{}'))
        RETURNING j.id INTO new_id;
        RETURN new_id;
    END IF;
    LOOP
        INSERT INTO stoker.jobs AS j (queue, kind, payload, run_at, priority, unique_key,
                                      max_attempts, meta)
        VALUES (enqueue.queue, enqueue.kind, coalesce(enqueue.payload, '{}'),
                coalesce(enqueue.run_at, now()), coalesce(enqueue.priority, 0),
                enqueue.unique_key, enqueue.max_attempts, coalesce(enqueue.meta, '{}'))
        ON CONFLICT (unique_key) WHERE unique_key IS NOT NULL DO NOTHING
        RETURNING j.id INTO new_id;
        IF new_id IS NOT NULL THEN
            RETURN new_id;
        END IF;
        SELECT j.id INTO new_id FROM stoker.jobs j WHERE j.unique_key = enqueue.unique_key;
        IF new_id IS NOT NULL THEN
            RETURN new_id;
        END IF;
        -- The holder finished between our INSERT and SELECT: insert again.
    END LOOP;
END
$$;

CREATE OR REPLACE FUNCTION stoker.notify_jobs() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    r record;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM stoker.waiting WHERE expires_at > now()) THEN
        RETURN NULL;
    END IF;
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
