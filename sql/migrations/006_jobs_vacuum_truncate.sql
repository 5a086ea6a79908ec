-- Stoker 006: vacuums of stoker.jobs (autovacuum's too) never give empty tail pages back to
-- the operating system. Doing so takes an ACCESS EXCLUSIVE lock on the table, and every claim
-- and outcome write queued behind the vacuum waiting for it; a queue table refills those pages
-- within seconds anyway.

ALTER TABLE stoker.jobs SET (vacuum_truncate = false);
