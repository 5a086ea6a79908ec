"""Handler resources through the job context: opened once at start-up from their own
[handlers.NAME] section, read as ctx.resource(Kind); ctx.db for handlers that need the
database; examples load only when configured."""

from __future__ import annotations

import asyncpg

from tests.conftest import DaemonFactory, stoker_cli
from tests.test_daemon_engine import QUIET, finished, insert


async def test_a_resource_gets_its_own_configuration_section(
    daemons: DaemonFactory, db: asyncpg.Connection
) -> None:
    await daemons.start(QUIET + '\n[handlers.greeter]\ngreeting = "hi"\ntimes = 2\n')
    row = await finished(db, await insert(db, "test.greet"))
    assert (row["state"], row["result"]) == ("succeeded", "hi hi")


async def test_an_absent_section_is_the_models_defaults(
    daemons: DaemonFactory, db: asyncpg.Connection
) -> None:
    await daemons.start(QUIET)
    row = await finished(db, await insert(db, "test.greet"))
    assert row["result"] == "hello"


async def test_a_bad_section_stops_the_daemon_naming_the_key(
    daemons: DaemonFactory, db: asyncpg.Connection
) -> None:
    daemon = await daemons.start(
        QUIET + '\n[handlers.greeter]\ntimes = "many"\ncolour = "red"\n', wait_ready=False
    )
    assert await daemon.wait_exit() != 0
    log = daemon.log()
    assert "handlers.greeter.times: Input should be a valid integer" in log
    assert "handlers.greeter.colour: Extra inputs are not permitted" in log
    assert "Traceback" not in log


async def test_the_example_handler_loads_only_when_listed_and_uses_ctx_db(
    daemons: DaemonFactory, db: asyncpg.Connection
) -> None:
    await db.execute(
        """CREATE TABLE users (id int PRIMARY KEY, email text, name text);
           CREATE TABLE products (id int PRIMARY KEY, title text, price numeric, on_sale bool);
           CREATE TABLE wishlist_items (user_id int, product_id int);
           CREATE TABLE wishlist_sale_notices (user_id int, product_id int, day date,
                                               PRIMARY KEY (user_id, product_id, day));
           INSERT INTO users VALUES (1, 'ann@example.com', 'Ann');
           INSERT INTO products VALUES (7, 'Kettle', 19.90, true);
           INSERT INTO wishlist_items VALUES (1, 7);"""
    )
    plain = await daemons.start(QUIET)
    unknown = await finished(db, await insert(db, "wishlist.sale_check"))
    assert unknown["state"] == "failed"
    assert "no handler registered for kind 'wishlist.sale_check'" in unknown["last_error"]
    plain.proc.terminate()
    assert await plain.wait_exit() == 0

    await daemons.start(QUIET, STOKER_HANDLER_MODULES='["tests.job_handlers", "handlers.examples"]')
    row = await finished(db, await insert(db, "wishlist.sale_check"))
    assert (row["state"], row["result"]["notified"]) == ("succeeded", 1)
    email = await db.fetchrow("SELECT kind, payload FROM stoker.all_jobs WHERE kind = 'email.send'")
    assert email["payload"]["to"] == "ann@example.com"


def test_resource_appears_in_the_public_api(dsn: str) -> None:
    out = stoker_cli(dsn, "--help")
    assert out.returncode == 0
    import daemon

    assert {"resource", "handler_config"} <= set(daemon.__all__)
