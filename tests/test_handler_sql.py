"""sql.batch with a real daemon on a real table: batches until done, parameters bound as
values, payload overrides only for declared parameters, clear failures."""

from __future__ import annotations

from typing import Any

import asyncpg
import pytest

from daemon.errors import PermanentJobError
from handlers.params import bind
from tests.conftest import DaemonFactory, finished

AUDIT_PURGE = """
[sql_tasks.audit_purge]
statement = '''
DELETE FROM audit_logs WHERE id IN (
    SELECT id FROM audit_logs
     WHERE created_at < now() - make_interval(days => :retention_days)
       AND note <> 'keep: it''s :retention_days'
     LIMIT :batch_size)
'''
batch_size = 1000
pause = 0
params = { retention_days = 30 }
description = "audit logs older than retention_days"
"""


async def run(db: asyncpg.Connection, payload: dict[str, Any]) -> asyncpg.Record:
    job_id = await db.fetchval("SELECT stoker.enqueue('default', 'sql.batch', $1)", payload)
    return await finished(db, job_id)


@pytest.fixture
async def audit_logs(db: asyncpg.Connection) -> asyncpg.Connection:
    await db.execute(
        """CREATE TABLE audit_logs (id serial PRIMARY KEY, created_at timestamptz NOT NULL,
                                    note text NOT NULL DEFAULT '')"""
    )
    await db.execute(
        """INSERT INTO audit_logs (created_at)
           SELECT now() - make_interval(days => CASE WHEN i <= 25000 THEN 40 ELSE 10 END)
             FROM generate_series(1, 25500) AS i"""
    )
    return db


async def test_deletes_in_batches_until_done(
    daemons: DaemonFactory, audit_logs: asyncpg.Connection
) -> None:
    await daemons.start(AUDIT_PURGE)
    row = await run(audit_logs, {"task": "audit_purge"})
    assert row["state"] == "succeeded", row["last_error"]
    assert row["result"]["rows"] == 25000
    assert row["result"]["batches"] == 26  # 25 full batches, then one that finds nothing
    assert await audit_logs.fetchval("SELECT count(*) FROM audit_logs") == 500  # unexpired


async def test_payload_overrides_a_declared_parameter_only(
    daemons: DaemonFactory, audit_logs: asyncpg.Connection
) -> None:
    await daemons.start(AUDIT_PURGE)
    row = await run(audit_logs, {"task": "audit_purge", "params": {"table": "users"}})
    assert row["state"] == "failed"
    assert "params: sql task 'audit_purge' has no parameter 'table'" in row["last_error"]
    sneaky = {"task": "audit_purge", "statement": "DROP TABLE audit_logs"}
    row = await run(audit_logs, sneaky)
    assert row["state"] == "failed"
    assert "statement: Extra inputs are not permitted" in row["last_error"]
    assert await audit_logs.fetchval("SELECT count(*) FROM audit_logs") == 25500  # ran nothing
    row = await run(audit_logs, {"task": "audit_purge", "params": {"retention_days": 5}})
    assert row["state"] == "succeeded", row["last_error"]
    assert row["result"]["rows"] == 25500


async def test_unknown_task_and_broken_statement_fail_clearly(
    daemons: DaemonFactory, db: asyncpg.Connection
) -> None:
    await daemons.start(
        AUDIT_PURGE
        + """
[sql_tasks.broken]
statement = "DELETE FROM no_such_table WHERE id < :batch_size"
"""
    )
    row = await run(db, {"task": "nope"})
    assert row["state"] == "failed"
    assert row["last_error"] == (
        "PermanentJobError: task: 'nope' is not configured (known: audit_purge, broken); "
        "see [sql_tasks]"
    )
    row = await run(db, {"task": "broken"})
    assert row["state"] == "failed"
    assert row["attempts"] == 1
    assert 'relation "no_such_table" does not exist' in row["last_error"]


def test_placeholders_become_parameters_and_leave_casts_and_strings_alone() -> None:
    sql, args = bind(
        "SELECT :a::int, ':a', \"col:a\", :b, :a WHERE x = 'it''s :b'",
        {"a": 1, "b": "two", "batch_size": 10},
    )
    assert sql == "SELECT $1::int, ':a', \"col:a\", $2, $1 WHERE x = 'it''s :b'"
    assert args == [1, "two"]
    with pytest.raises(PermanentJobError, match="uses :c, which is not a declared parameter"):
        bind("SELECT :c", {"batch_size": 1})


async def test_a_parameter_from_the_environment_is_bound_with_the_right_type(
    daemons: DaemonFactory, audit_logs: asyncpg.Connection
) -> None:
    # Environment values are text; the statement wants an integer number of days.
    await daemons.start(AUDIT_PURGE, STOKER_SQL_TASKS__AUDIT_PURGE__PARAMS__RETENTION_DAYS="5")
    row = await run(audit_logs, {"task": "audit_purge"})
    assert row["state"] == "succeeded", row["last_error"]
    assert row["result"]["rows"] == 25500


def test_placeholders_in_comments_and_dollar_quotes_are_left_alone() -> None:
    sql, args = bind(
        "SELECT :a -- :b\n, $$ :b $$, $t$ :b $t$, E'it\\'s :b', /* :b */ :a::int",
        {"a": 1, "b": 2, "batch_size": 10},
    )
    assert sql == "SELECT $1 -- :b\n, $$ :b $$, $t$ :b $t$, E'it\\'s :b', /* :b */ $1::int"
    assert args == [1]
