"""sql.report with a real daemon, real tables and a real SMTP server (aiosmtpd): the rows reach
the delivered email through an email.send job enqueued in the report's transaction; nothing is
sent for an empty report that may be skipped; a broken query, or one that writes, fails at once
with PostgreSQL's message; a report run again after its email job was committed enqueues no
second one."""

from __future__ import annotations

import asyncio
import datetime as dt
import uuid
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import asyncpg
import pytest

from daemon import JobContext
from daemon.config import EmailConfig, ReportConfig
from daemon.errors import PermanentJobError
from daemon.store.db import init_connection
from handlers.email import Mailer
from handlers.params import coerce
from handlers.report import LOCK, Reports, RunReport, json_safe, run_report
from tests.conftest import REPO, DaemonFactory, eventually, finished
from tests.mailserver import Inbox, smtp_server

TEMPLATES = REPO / "deploy" / "templates"


@pytest.fixture
def inbox() -> Iterator[tuple[Inbox, int]]:
    with smtp_server() as server:
        yield server


def config(port: int, extra: str = "") -> str:
    return (
        f"""
[queues.default]
backoff = {{ base = 0.2, jitter = 0 }}
[queues.mail]
[email]
templates = "{TEMPLATES}"
smtp = {{ host = "127.0.0.1", port = {port}, starttls = false }}

[reports.low_stock_alert]
query = "SELECT id, title, stock FROM products WHERE stock <= :threshold ORDER BY stock, id"
params = {{ threshold = 5 }}
to = "ops@example.com, buyer@example.com"
template = "low_stock_alert"
skip_when_empty = true
email_queue = "mail"
description = "Products at or below their stock threshold"

[reports.daily_sales_report]
query = '''
SELECT count(*) AS orders, coalesce(sum(total), 0) AS total
  FROM orders
 WHERE status IN ('processing', 'shipped', 'delivered')
   AND created_at >= date_trunc('day', now())'''
to = ["sales@example.com"]
template = "daily_sales_report"
email_queue = "mail"

[reports.catalogue]
query = "SELECT id, title, price, added_on, sku FROM products WHERE price > :min_price ORDER BY id"
params = {{ min_price = "0.5" }}
to = ["buyer@example.com"]
subject = "{{{{ count }}}} products{{% if truncated %}} and more{{% endif %}} ({{{{ report }}}})"
max_rows = 2
email_queue = "mail"
description = "The catalogue"
"""
        + extra
    )


@pytest.fixture
async def shop(db: asyncpg.Connection) -> asyncpg.Connection:
    await db.execute(
        """
        CREATE TABLE products (id serial PRIMARY KEY, title text NOT NULL,
                               price numeric(10, 2) NOT NULL, stock integer NOT NULL,
                               added_on date NOT NULL, sku uuid NOT NULL);
        INSERT INTO products (title, price, stock, added_on, sku) VALUES
            ('Desk lamp', 19.90, 3, '2026-01-15', '6f1c1a9e-0000-4000-8000-000000000001'),
            ('Chair', 89.00, 12, '2026-02-01', '6f1c1a9e-0000-4000-8000-000000000002'),
            ('Pen & <ink>', 1.25, 0, '2026-03-10', '6f1c1a9e-0000-4000-8000-000000000003'),
            ('Notebook', 4.50, 5, '2026-03-11', '6f1c1a9e-0000-4000-8000-000000000004');
        CREATE TABLE orders (id serial PRIMARY KEY, status text NOT NULL,
                             total numeric(10, 2) NOT NULL,
                             created_at timestamptz NOT NULL DEFAULT now());
        INSERT INTO orders (status, total, created_at) VALUES
            ('processing', 10.00, now()), ('processing', 20.50, now()),
            ('shipped', 30.00, now()), ('delivered', 40.25, now()),
            ('pending', 1000.00, now()), ('cancelled', 2000.00, now()),
            ('delivered', 3000.00, now() - interval '2 days');
        """
    )
    return db


async def run(db: asyncpg.Connection, payload: dict[str, Any], **cols: Any) -> asyncpg.Record:
    job_id = await db.fetchval(
        "SELECT stoker.enqueue('default', 'sql.report', $1, max_attempts => $2)",
        payload,
        cols.get("max_attempts"),
    )
    return await finished(db, job_id)


async def delivered(db: asyncpg.Connection, box: Inbox, email_job_id: int) -> str:
    """Wait for the report's email job; return the plain text of the message it delivered."""
    row = await finished(db, email_job_id)
    assert row["state"] == "succeeded", row["last_error"]
    message = box.message(email_job_id)
    assert message is not None
    body = message.get_body(("plain",))
    assert body is not None
    text = body.get_content().replace("\r\n", "\n")  # SMTP's line ends
    return f"Subject: {message['Subject']}\nTo: {message['To']}\n\n{text}"


async def email_jobs(db: asyncpg.Connection) -> list[asyncpg.Record]:
    rows: list[asyncpg.Record] = await db.fetch(
        "SELECT * FROM stoker.all_jobs WHERE kind = 'email.send' ORDER BY id"
    )
    return rows


async def test_rows_are_rendered_into_the_delivered_email(
    inbox: tuple[Inbox, int], daemons: DaemonFactory, shop: asyncpg.Connection
) -> None:
    box, port = inbox
    await daemons.start(config(port))

    row = await run(shop, {"report": "low_stock_alert"})
    assert row["state"] == "succeeded", row["last_error"]
    email_id = row["result"]["email_job_id"]
    assert row["result"] == {
        "report": "low_stock_alert",
        "rows": 3,
        "truncated": False,
        "email_job_id": email_id,
        "skipped": False,
    }
    [job] = await email_jobs(shop)
    assert job["id"] == email_id
    assert job["queue"] == "mail"
    assert job["meta"] == {"report": "low_stock_alert", "report_job_id": row["id"]}
    context = job["payload"]["context"]
    assert context["columns"] == ["id", "title", "stock"]
    assert context["rows"][0] == {"id": 3, "title": "Pen & <ink>", "stock": 0}
    assert context["params"] == {"threshold": 5}
    text = await delivered(shop, box, email_id)
    assert "Subject: Low stock: 3 products at or below 5" in text
    assert "To: ops@example.com, buyer@example.com" in text
    assert "- #3 Pen & <ink>: 0 left\n- #1 Desk lamp: 3 left\n- #4 Notebook: 5 left\n" in text
    assert "Chair" not in text

    row = await run(shop, {"report": "daily_sales_report"})
    assert row["state"] == "succeeded", row["last_error"]
    assert row["result"]["rows"] == 1
    text = await delivered(shop, box, row["result"]["email_job_id"])
    assert "Subject: Sales today: 4 orders, 100.75" in text
    assert "Orders: 4\nTotal:  100.75" in text

    # The generic template, a configured subject, NUMERIC, DATE and UUID values, max_rows.
    row = await run(shop, {"report": "catalogue"})
    assert row["state"] == "succeeded", row["last_error"]
    assert row["result"]["rows"] == 2
    assert row["result"]["truncated"] is True
    text = await delivered(shop, box, row["result"]["email_job_id"])
    assert "Subject: 2 products and more (catalogue)" in text
    assert "The catalogue\n" in text
    assert "with min_price = 0.5." in text
    assert "id | title | price | added_on | sku\n" in text
    assert "1 | Desk lamp | 19.90 | 2026-01-15 | 6f1c1a9e-0000-4000-8000-000000000001\n" in text
    assert "2 | Chair | 89.00 | 2026-02-01 | 6f1c1a9e-0000-4000-8000-000000000002\n" in text
    assert "Pen" not in text
    assert "Only the first 2 rows are shown; the query returned more." in text
    message = box.message(row["result"]["email_job_id"])
    assert message is not None
    html = message.get_body(("html",))
    assert html is not None
    assert "<td>Desk lamp</td><td>19.90</td>" in html.get_content()
    assert len(box.messages) == 3


async def test_params_override_and_an_empty_report_is_skipped(
    inbox: tuple[Inbox, int], daemons: DaemonFactory, shop: asyncpg.Connection
) -> None:
    box, port = inbox
    await daemons.start(config(port))
    await shop.execute("UPDATE products SET stock = stock + 6")  # 6, 9, 11, 18

    row = await run(shop, {"report": "low_stock_alert"})
    assert row["state"] == "succeeded", row["last_error"]
    assert row["result"] == {
        "report": "low_stock_alert",
        "rows": 0,
        "truncated": False,
        "email_job_id": None,
        "skipped": True,
    }
    assert await email_jobs(shop) == []

    # Text, as from the environment or a JSON payload, is bound as the type the query needs.
    row = await run(shop, {"report": "low_stock_alert", "params": {"threshold": "9"}})
    assert row["state"] == "succeeded", row["last_error"]
    assert row["result"]["rows"] == 2
    [job] = await email_jobs(shop)
    assert job["payload"]["context"]["params"] == {"threshold": "9"}
    text = await delivered(shop, box, row["result"]["email_job_id"])
    assert "Subject: Low stock: 2 products at or below 9" in text
    assert "- #3 Pen & <ink>: 6 left\n- #1 Desk lamp: 9 left\n" in text
    assert len(box.messages) == 1

    for payload, error in (
        (
            {"report": "low_stock_alert", "params": {"table": "users"}},
            "PermanentJobError: params: report 'low_stock_alert' has no parameter 'table'; a "
            "payload may only give values for declared ones: threshold",
        ),
        (
            {"report": "nope"},
            "PermanentJobError: report: 'nope' is not configured (known: catalogue, "
            "daily_sales_report, low_stock_alert); see [reports]",
        ),
        (
            {"report": "low_stock_alert", "query": "DELETE FROM products"},
            "query: Extra inputs are not permitted",
        ),
        (
            {"report": "low_stock_alert", "params": {"threshold": "many"}},
            "parameter value 'many' is not a valid int4",
        ),
    ):
        row = await run(shop, payload, max_attempts=3)
        assert row["state"] == "failed"
        assert row["attempts"] == 1
        assert error in row["last_error"]
    assert len(await email_jobs(shop)) == 1
    assert await shop.fetchval("SELECT count(*) FROM products") == 4


FAILING = """
[reports.broken]
query = "SELECT id, title FROM no_such_table"
to = ["ops@example.com"]

[reports.slow]
query = "SELECT pg_sleep(5) AS slept"
statement_timeout = "200ms"
to = ["ops@example.com"]

[reports.wipe]
query = "WITH gone AS (DELETE FROM products RETURNING id) SELECT count(*) AS deleted FROM gone"
to = ["ops@example.com"]

[reports.delete]
query = "DELETE FROM products RETURNING id, title"
to = ["ops@example.com"]

[reports.unlock]
query = '''
SELECT set_config('transaction_read_only', 'off', true) AS unlocked,
       (SELECT count(*) FROM products) AS products'''
to = ["ops@example.com"]

[queues.tiny]
max_payload_bytes = 1024

[reports.huge]
query = "SELECT n, repeat('x', 100) AS filler FROM generate_series(1, 50) AS n"
to = ["ops@example.com"]
email_queue = "tiny"

[reports.bad_template]
query = "SELECT 1 AS one"
template = "low_stock_alert"
to = ["ops@example.com"]
"""


async def test_a_failing_query_or_one_that_writes_fails_with_postgresqls_message(
    inbox: tuple[Inbox, int], daemons: DaemonFactory, shop: asyncpg.Connection
) -> None:
    box, port = inbox
    await daemons.start(config(port, FAILING))

    row = await run(shop, {"report": "broken"}, max_attempts=3)
    assert row["state"] == "failed"
    assert row["attempts"] == 1
    assert row["last_error"] == (
        "PermanentJobError: report 'broken': UndefinedTableError: "
        'relation "no_such_table" does not exist'
    )

    for name, statement in (("wipe", "SELECT"), ("delete", "DELETE")):
        row = await run(shop, {"report": name}, max_attempts=3)
        assert row["state"] == "failed"
        assert row["attempts"] == 1
        assert row["last_error"] == (
            f"PermanentJobError: report {name!r}: ReadOnlySQLTransactionError: "
            f"cannot execute {statement} in a read-only transaction"
        )

    row = await run(shop, {"report": "unlock"}, max_attempts=3)
    assert row["state"] == "failed"
    assert row["attempts"] == 1
    assert (
        "cannot set transaction read-write mode inside a read-only transaction" in row["last_error"]
    )

    # A template that needs what the rows lack fails the report, not a doomed email job.
    row = await run(shop, {"report": "bad_template"}, max_attempts=3)
    assert row["state"] == "failed"
    assert row["attempts"] == 1
    assert "report 'bad_template': email: template 'low_stock_alert'" in row["last_error"]
    assert "has no attribute 'threshold'" in row["last_error"]

    # An email job its queue would refuse for its size.
    row = await run(shop, {"report": "huge"}, max_attempts=3)
    assert row["state"] == "failed"
    assert row["attempts"] == 1
    assert (
        "over max_payload_bytes (1024) of queue 'tiny'; lower max_rows (1000)"
        in (row["last_error"])
    )

    # A timeout may pass: it is retried.
    row = await run(shop, {"report": "slow"}, max_attempts=2)
    assert row["state"] == "failed"
    assert row["attempts"] == 2
    assert (
        "report 'slow' timed out: canceling statement due to statement timeout"
        in (row["last_error"])
    )

    assert await shop.fetchval("SELECT count(*) FROM products") == 4
    assert await email_jobs(shop) == []
    assert box.messages == []


async def run_again(db: asyncpg.Connection, job_id: int) -> asyncpg.Record:
    """What a daemon that died after the report's transaction committed, but before it wrote
    the report's outcome, leaves behind: the report job to run once more (its next attempt)."""
    attempts = await db.fetchval(
        """
        WITH done AS (DELETE FROM stoker.job_history WHERE id = $1 RETURNING *)
        INSERT INTO stoker.jobs (id, queue, kind, payload, meta, priority, attempts,
                                 max_attempts, created_at)
        SELECT id, queue, kind, payload, meta, priority, attempts, max_attempts, created_at
          FROM done
        RETURNING attempts
        """,
        job_id,
    )
    assert attempts is not None

    async def next_attempt() -> asyncpg.Record | None:
        row: asyncpg.Record | None = await db.fetchrow(
            "SELECT * FROM stoker.all_jobs WHERE id = $1 AND state = 'succeeded' AND attempts = $2",
            job_id,
            attempts + 1,
        )
        return row

    return await eventually(next_attempt)


async def test_a_report_run_again_enqueues_no_second_email(
    inbox: tuple[Inbox, int], daemons: DaemonFactory, shop: asyncpg.Connection
) -> None:
    box, port = inbox
    # The email queue is paused: the email job stays queued (live) at first.
    await shop.execute("INSERT INTO stoker.queues (name, paused) VALUES ('mail', true)")
    await daemons.start(config(port))
    row = await run(shop, {"report": "low_stock_alert"})
    assert row["state"] == "succeeded", row["last_error"]
    first = row["result"]
    [job] = await email_jobs(shop)
    assert job["state"] == "queued"
    assert first["email_job_id"] == job["id"]

    # Run again while its email job waits: the same one is found.
    await shop.execute("UPDATE products SET stock = 0")  # would be 4 rows now
    again = await run_again(shop, row["id"])
    assert again["result"] == first
    assert [j["id"] for j in await email_jobs(shop)] == [job["id"]]

    # The email is sent (its job moves to history, where no unique key could see it)...
    await shop.execute("UPDATE stoker.queues SET paused = false WHERE name = 'mail'")
    text = await delivered(shop, box, job["id"])
    assert "- #3 Pen & <ink>: 0 left\n- #1 Desk lamp: 3 left\n- #4 Notebook: 5 left\n" in text

    # ...and a run after that still finds it and sends nothing more.
    again = await run_again(shop, row["id"])
    assert again["result"] == first
    assert [j["id"] for j in await email_jobs(shop)] == [job["id"]]
    assert len(box.messages) == 1

    # A new report job is a new report.
    row = await run(shop, {"report": "low_stock_alert"})
    assert row["result"]["rows"] == 4
    assert row["result"]["email_job_id"] != job["id"]


def test_values_become_json_that_templates_can_show() -> None:
    moment = dt.datetime(2026, 11, 30, 18, 0, tzinfo=dt.UTC)
    assert json_safe(Decimal("1234.50"), "total") == "1234.50"
    assert json_safe(moment, "at") == "2026-11-30T18:00:00+00:00"
    assert json_safe(dt.date(2026, 11, 30), "day") == "2026-11-30"
    assert json_safe(uuid.UUID(int=1), "sku") == "00000000-0000-0000-0000-000000000001"
    assert json_safe(float("nan"), "x") == "nan"
    assert json_safe([Decimal("1.5"), None], "xs") == ["1.5", None]
    assert json_safe({"a": dt.date(2026, 1, 2)}, "doc") == {"a": "2026-01-02"}
    with pytest.raises(PermanentJobError, match=r"encode\(photo, 'hex'\) AS photo"):
        json_safe(b"\x89PNG", "photo")
    assert coerce("r", "2026-11-30", "date") == dt.date(2026, 11, 30)
    assert coerce("r", " 7 ", "int4") == 7
    assert coerce("r", "2.50", "numeric") == Decimal("2.50")
    assert coerce("r", "off", "bool") is False
    with pytest.raises(PermanentJobError, match="is not a valid bool"):
        coerce("r", "maybe", "bool")
    with pytest.raises(PermanentJobError, match="has no time zone"):
        coerce("r", "2026-11-30T18:00", "timestamptz")


# The attempts waiting for the report lock of job $1 (pg_locks shows a bigint advisory key as
# its high and low 32 bits in classid and objid, objsubid 1).
WAITING_FOR_REPORT_LOCK = """
WITH k AS (SELECT hashtextextended('stoker sql.report', $1::bigint) AS key)
SELECT count(*)
  FROM pg_locks, k
 WHERE locktype = 'advisory' AND NOT granted
   AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
   AND classid::bigint = (key >> 32) & 4294967295
   AND objid::bigint = key & 4294967295
   AND objsubid = 1
"""


async def test_two_attempts_at_once_enqueue_one_email(dsn: str, shop: asyncpg.Connection) -> None:
    """A worker whose lease ran out may still be running its attempt when the rescued job
    starts the next one: the second waits for the first's transaction, then finds its email.

    The test holds the report's lock itself until both attempts are seen waiting for it, so
    they certainly overlap; released, one of them takes it and the other waits again."""
    job_id = await shop.fetchval(
        "SELECT stoker.enqueue('default', 'sql.report', '{\"report\": \"low_stock_alert\"}')"
    )
    report = ReportConfig(
        query="SELECT id, title, stock FROM products WHERE stock <= :threshold",
        params={"threshold": 5},
        to=["ops@example.com"],
        template="low_stock_alert",
    )
    resources = {
        Reports: Reports({"low_stock_alert": report}),
        Mailer: Mailer(EmailConfig(templates=TEMPLATES)),
    }

    async def no_progress(job: int, attempt: int, progress: str) -> None:
        return None

    pool = await asyncpg.create_pool(dsn, min_size=2, max_size=2, init=init_connection)
    try:
        attempts = [
            JobContext(
                id=job_id,
                queue="default",
                kind="sql.report",
                attempt=attempt,
                max_attempts=3,
                meta={},
                run_at=dt.datetime.now(dt.UTC),
                worker=f"worker-{attempt}",
                _progress_writer=no_progress,
                _db=pool,
                _resources=resources,
            )
            for attempt in (1, 2)
        ]
        run = RunReport(report="low_stock_alert")
        async with shop.transaction():
            await shop.execute(LOCK, job_id)
            tasks = [asyncio.create_task(run_report(ctx, run)) for ctx in attempts]

            async def both_wait_or_done() -> str | None:
                if all(task.done() for task in tasks):  # they did not wait for the lock
                    return "done"
                waiting = await shop.fetchval(WAITING_FOR_REPORT_LOCK, job_id)
                return "waiting" if waiting == 2 else None

            try:
                seen = await eventually(both_wait_or_done, timeout=10)
            except BaseException:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                raise
        # Committed: the lock is free.
        first, second = await asyncio.gather(*tasks)
    finally:
        await pool.close()
    assert [j["id"] for j in await email_jobs(shop)] == [first["email_job_id"]]
    assert first == second
    assert first["rows"] == 3
    assert seen == "waiting"
