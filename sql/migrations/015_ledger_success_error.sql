-- Stoker 015: a run that succeeded after a failed attempt (or after `stoker jobs retry`)
-- showed that earlier attempt's error in the ledger; a succeeded run has no error there (its
-- job keeps every attempt's error in `errors`).
CREATE OR REPLACE FUNCTION stoker.ledger_record_finished() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    UPDATE stoker.schedule_ticks t
       SET state = f.state::text,
           started_at = f.started_at,
           finished_at = f.finished_at,
           error = CASE WHEN f.state = 'succeeded' THEN NULL ELSE left(f.last_error, 2000) END,
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
