"""Daemons serving one queue with different limits (issue 17's limits travel with each claim,
so the one that holds depends on who claims), with real daemons and a real PostgreSQL: the
later daemon warns at start, the earlier one at its next heartbeat, once; /api/v1/queues,
/metrics, `stoker status` and the dashboard's queues page show it; a daemon that stopped
cleanly no longer counts; daemons configured alike show nothing."""

from __future__ import annotations

import signal
import socket
from typing import Any

import aiohttp
import asyncpg

from tests.browser import ADMIN_TOKEN, http_port
from tests.conftest import DaemonFactory, DaemonProcess, eventually, stoker_cli
from tests.test_limits_visible import metric, sign_in

WARNING = "queue capped: limits differ across daemons"
HOST = socket.gethostname()  # the daemons run here
AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def config(worker: str, global_concurrency: int) -> str:
    # A short lease: a heartbeat every second.
    return f"""
worker_id = "{worker}"
lease_seconds = 3

[http]
admin_token = "{ADMIN_TOKEN}"
depth_sample_interval = 0.2

[queues.capped]
global_concurrency = {global_concurrency}
rate_limit = "100/1m"

[queues.plain]
concurrency = 2
"""


def warnings(daemon: DaemonProcess) -> list[str]:
    return [
        r["message"]
        for r in daemon.log_records()
        if r.get("level") == "warning" and WARNING in r["message"]
    ]


async def beat_after_now(db: asyncpg.Connection, worker: str) -> None:
    """Until `worker` has had a heartbeat that started after everything committed so far."""
    since = await db.fetchval("SELECT now()")

    async def beaten() -> bool:
        seen_at = await db.fetchval("SELECT seen_at FROM stoker.workers WHERE worker = $1", worker)
        return seen_at is not None and seen_at > since

    await eventually(beaten, 15)


async def api_queues(http: aiohttp.ClientSession, base: str) -> dict[str, dict[str, Any]]:
    async with http.get(f"{base}/api/v1/queues", headers=AUTH) as response:
        assert response.status == 200
        return {q["name"]: q for q in (await response.json())["queues"]}


async def mismatch_metric(http: aiohttp.ClientSession, base: str, queue: str) -> float | None:
    async with http.get(f"{base}/metrics") as response:
        page = await response.text()
    return metric(page, "stoker_queue_limits_mismatch", queue=queue)


def limits(global_concurrency: int) -> dict[str, Any]:
    return {
        "global_concurrency": global_concurrency,
        "key_concurrency": None,
        "rate_limit": "100/60s",
        "rate_limit_by_key": False,
    }


async def test_daemons_configured_apart_are_told_everywhere(
    daemons: DaemonFactory, db: asyncpg.Connection, dsn: str
) -> None:
    alpha = await daemons.start(config("alpha", 4))
    assert await db.fetchval("SELECT limits FROM stoker.workers WHERE worker = 'alpha'") == {
        "capped": limits(4),
        "plain": {
            "global_concurrency": None,
            "key_concurrency": None,
            "rate_limit": None,
            "rate_limit_by_key": False,
        },
    }
    beta = await daemons.start(config("beta", 10))

    # The later daemon says so at start, the earlier one at its next heartbeat: once each,
    # naming the other daemon, both values and the fix.
    assert len(warnings(beta)) == 1, beta.log()
    said = warnings(beta)[0]
    assert f"this daemon, beta (host {HOST}, pid {beta.pid}), has global_concurrency 10" in said
    assert f"alpha (host {HOST}, pid {alpha.pid}) has global_concurrency 4" in said
    assert "rate_limit" not in said  # only the limit that differs
    assert "configure every daemon serving queue capped with the same limits" in said
    await alpha.wait_log(WARNING, timeout=10)
    said = warnings(alpha)[0]
    assert f"this daemon, alpha (host {HOST}, pid {alpha.pid}), has global_concurrency 4" in said
    assert f"beta (host {HOST}, pid {beta.pid}) has global_concurrency 10" in said
    assert not any("queue plain" in r["message"] for r in alpha.log_records())
    # Not once a heartbeat.
    await beat_after_now(db, "alpha")
    await beat_after_now(db, "alpha")
    assert len(warnings(alpha)) == 1 and len(warnings(beta)) == 1

    base = f"http://127.0.0.1:{http_port(alpha.log())}"
    beta_base = f"http://127.0.0.1:{http_port(beta.log())}"
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
        queues = await api_queues(http, base)
        assert queues["capped"]["limits_mismatch"] == [
            {
                "limits": limits(4),
                "workers": [{"worker": "alpha", "host": HOST, "pid": alpha.pid}],
            },
            {
                "limits": limits(10),
                "workers": [{"worker": "beta", "host": HOST, "pid": beta.pid}],
            },
        ]
        assert queues["capped"]["limits"]["global_concurrency"] == 4  # as configured here
        assert queues["plain"]["limits_mismatch"] is None

        assert await mismatch_metric(http, base, "capped") == 1
        assert await mismatch_metric(http, beta_base, "capped") == 1
        assert await mismatch_metric(http, base, "plain") is None

        status = stoker_cli(dsn, "status", config=daemons.write_config(config("cli", 4), "c.toml"))
        assert status.returncode == 0, status.stderr
        lines = [line for line in status.stdout.splitlines() if "differ" in line]
        assert len(lines) == 1, status.stdout
        assert lines[0].startswith(
            "capped: limits differ across daemons: global_concurrency 4 on alpha (host "
        )
        assert f"pid {alpha.pid}); global_concurrency 10 on beta (host " in lines[0]
        assert lines[0].endswith(
            f"pid {beta.pid}); configure every daemon serving queue capped with the same limits"
        )
        # The mismatch is read from the daemons' rows, not from the CLI's configuration.
        assert "limits differ" in stoker_cli(dsn, "status").stdout

        cookie = await sign_in(http, base)
        async with http.get(f"{base}/dashboard/queues", headers=cookie) as response:
            assert response.status == 200
            html = await response.text()
        row = html.split('<tr data-queue="capped">', 1)[1].split("</tr>", 1)[0]
        assert "Limits differ across daemons" in row
        assert "global_concurrency 4 on alpha" in row and "global_concurrency 10 on beta" in row
        plain = html.split('<tr data-queue="plain">', 1)[1].split("</tr>", 1)[0]
        assert "differ" not in plain

        # A daemon that stopped cleanly left the registry: nothing differs any more.
        beta.proc.send_signal(signal.SIGTERM)
        assert await beta.wait_exit() == 0
        assert (await api_queues(http, base))["capped"]["limits_mismatch"] is None
        assert "differ" not in stoker_cli(dsn, "status").stdout
        await alpha.wait_log("the live daemons serving it agree on its limits again", timeout=10)
        assert await mismatch_metric(http, base, "capped") == 0


async def test_daemons_configured_alike_say_nothing(
    daemons: DaemonFactory, db: asyncpg.Connection, dsn: str
) -> None:
    alpha = await daemons.start(config("alpha", 4))
    beta = await daemons.start(config("beta", 4))
    await beat_after_now(db, "alpha")  # alpha has looked since beta registered
    assert await db.fetchval("SELECT count(*) FROM stoker.workers") == 2
    assert warnings(alpha) == [] and warnings(beta) == []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
        for daemon in (alpha, beta):
            base = f"http://127.0.0.1:{http_port(daemon.log())}"
            assert await mismatch_metric(http, base, "capped") == 0
            assert await mismatch_metric(http, base, "plain") is None
            queues = await api_queues(http, base)
            assert queues["capped"]["limits_mismatch"] is None
    assert "differ" not in stoker_cli(dsn, "status").stdout
