"""`stoker schedules add` sets every option a schedule has (ping URL and skip grace too), and
refuses a bad one naming it without repeating a secret; the ledger shows no error for a run
that succeeded after a failed attempt."""

from __future__ import annotations

import asyncpg

from tests.conftest import stoker_cli


async def test_schedules_add_sets_the_ping_url_and_skip_grace(
    dsn: str, db: asyncpg.Connection
) -> None:
    out = stoker_cli(
        dsn, "schedules", "add", "nightly", "--cron", "0 2 * * *", "--kind", "log",
        "--catch-up", "skip", "--skip-grace", "5m", "--ping-url", "https://hc-ping.com/abc",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    row = await db.fetchrow(
        "SELECT ping_url, skip_grace FROM stoker.schedules WHERE name = 'nightly'"
    )
    assert (row["ping_url"], row["skip_grace"]) == ("https://hc-ping.com/abc", 300.0)


async def test_a_bad_option_is_named_and_a_token_is_not_repeated(dsn: str) -> None:
    out = stoker_cli(
        dsn, "schedules", "add", "nightly", "--cron", "0 2 * * *", "--kind", "log",
        "--skip-grace", "soon",
    )  # fmt: skip
    assert out.returncode == 2 and "--skip-grace" in out.stderr and "soon" in out.stderr
    out = stoker_cli(
        dsn, "schedules", "add", "nightly", "--cron", "0 2 * * *", "--kind", "log",
        "--ping-url", "hc-ping.com/SECRET-TOKEN",
    )  # fmt: skip
    assert out.returncode != 0 and "ping_url" in out.stderr
    assert "SECRET-TOKEN" not in out.stderr and "Traceback" not in out.stderr


async def test_a_run_that_succeeded_after_a_failed_attempt_shows_no_error_in_the_ledger(
    db: asyncpg.Connection,
) -> None:
    await db.execute(
        """INSERT INTO stoker.schedule_ticks (schedule, tick, outcome, job_id)
           VALUES ('nightly', '2026-11-30T02:00:00Z', 'fired', -7),
                  ('nightly', '2026-12-01T02:00:00Z', 'fired', -8)"""
    )
    await db.execute(
        """INSERT INTO stoker.job_history (id, queue, kind, payload, meta, priority, state,
               run_at, attempts, last_error, errors, created_at, started_at, finished_at)
           VALUES (-7, 'default', 'x', '{}', '{"schedule": "nightly"}', 0, 'succeeded',
                   now(), 2, 'ConnectionError: first attempt', '[]', now(), now(), now()),
                  (-8, 'default', 'x', '{}', '{"schedule": "nightly"}', 0, 'failed',
                   now(), 3, 'ValueError: bad row 12', '[]', now(), now(), now())"""
    )
    rows = await db.fetch(
        "SELECT job_id, state, error FROM stoker.schedule_ticks WHERE schedule = 'nightly' "
        "ORDER BY job_id"
    )
    assert [tuple(r) for r in rows] == [
        (-8, "failed", "ValueError: bad row 12"),
        (-7, "succeeded", None),
    ]
