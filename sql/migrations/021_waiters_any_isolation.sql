-- Stoker 021: wait_for hears the end of a job ended by a REPEATABLE READ or SERIALIZABLE
-- transaction too (review of issue 18).
--
-- The announce trigger (020) reads stoker.job_waiters with the finishing statement's snapshot.
-- Under READ COMMITTED that snapshot is new, and a waiter that registered after it still finds
-- the end through its look at the job's row (which waits for this transaction's row lock).
-- Under REPEATABLE READ or SERIALIZABLE the snapshot is the transaction's first: a waiter that
-- registered and looked (the job still queued) after it, before this statement ended the job,
-- is invisible here and was never told. Locks are not read through a snapshot: every waiter
-- holds a shared session advisory lock while it waits (key 'stokwait'), and such a transaction
-- tries that lock exclusively. Held by a waiter: it notifies '*' and every waiter looks again.
-- Free: it keeps the lock until it ends, so a waiter arriving meanwhile waits for its commit
-- before it registers and looks, and then sees the end. READ COMMITTED, the daemon's own
-- writes, keeps 020's probe and pays nothing new.
CREATE OR REPLACE FUNCTION stoker.announce_finished() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF current_setting('transaction_isolation') <> 'read committed' THEN
        IF NOT pg_try_advisory_xact_lock(8319396919015205236) THEN
            PERFORM pg_notify('stoker_done', '*');
        END IF;
        RETURN NULL;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM stoker.job_waiters) THEN
        RETURN NULL;
    END IF;
    -- One notification per job: a payload has a size limit, a batch of ids does not.
    PERFORM pg_notify('stoker_done', w.job_id::text)
       FROM (SELECT DISTINCT job_id FROM stoker.job_waiters) w
      WHERE EXISTS (SELECT 1 FROM stoker.job_history h WHERE h.id = w.job_id);
    RETURN NULL;
END
$$;
