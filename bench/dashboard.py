"""The dashboard on a big installation: 1,000,000 jobs queued and 10,000,000 in history, every
page's server time measured against a real daemon.

The database is built in a few big INSERT ... SELECT generate_series statements: queued jobs on
three queues (some due, some scheduled for later), history finished over the last week in
finished_at order (as a daemon appends it; one job in 50 failed), the per-minute throughput
the leader would have recorded over that week, some audit entries; then VACUUM ANALYZE. One
`stoker run` with an admin token then serves the dashboard (it serves a queue of its own, so
the backlog stays put); the bench signs in and requests each page of PAGES in turn.

Server time is the daemon's own `Server-Timing: app;dur=...` header (set by the dashboard's
security_headers middleware around the page handler: the handler's queries and rendering);
the client-measured time on loopback is in the note beside it."""

from __future__ import annotations

import statistics
import sys
import time

import aiohttp
import asyncpg

from bench.common import Row, fresh_database, log_text, pct, stoker_process, wait_for

ADMIN_TOKEN = "bench-dashboard-admin-token"
QUEUES = ("bench", "mail", "reports")
# Every dashboard page to time; {job} and {schedule} are filled in. A page answering 404 is
# not there (yet) and is left out. Add pages here as they land.
PAGES = (
    "/dashboard/",
    "/dashboard/queues",
    "/dashboard/audit",
    "/dashboard/jobs",
    "/dashboard/jobs?state=failed",
    "/dashboard/jobs?queue=mail&state=queued",
    # Filters no index serves: each page reads at most the newest 20,000 rows. The worst one
    # is failed jobs of a kind, failures being spread thinly through 10M history rows.
    "/dashboard/jobs?state=failed&kind=nope.never",
    "/dashboard/jobs?error=no+such+text+anywhere",
    "/dashboard/jobs?meta_key=org&meta_value=org_nobody",
    "/dashboard/jobs/{job}",
    "/dashboard/schedules",
    "/dashboard/schedules/{schedule}",
)
CONFIG = f"""
handler_modules = ["bench.handlers"]
log_level = "WARNING"
[http]
admin_token = "{ADMIN_TOKEN}"
[queues.dashboard]
concurrency = 2
[schedules.nightly]
cron = "0 3 * * *"
kind = "noop"
queue = "dashboard"
"""
WEEK_S = 7 * 86_400
CHUNK = 1_000_000
HISTORY_IDS = 1_000_000_000


async def build(dsn: str, queued: int, history: int) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        for start in range(0, queued, CHUNK):
            await conn.execute(
                """INSERT INTO stoker.jobs (queue, kind, payload, meta, run_at)
                   SELECT ($3::text[])[1 + i % 3], 'noop', jsonb_build_object('n', i),
                          jsonb_build_object('org', 'org_' || i % 1000),
                          now() + CASE WHEN i % 10 = 0 THEN interval '1 day'
                                       ELSE -make_interval(secs => i % 3600) END
                     FROM generate_series($1::bigint, $2::bigint) AS i""",
                start + 1,
                min(queued, start + CHUNK),
                list(QUEUES),
            )
        for start in range(0, history, CHUNK):
            # Oldest first: history is appended in finished_at order. Ids from HISTORY_IDS
            # up: no clash with the live jobs' identity.
            await conn.execute(
                """INSERT INTO stoker.job_history (id, queue, kind, payload, meta, priority,
                       state, run_at, attempts, errors, created_at, started_at, finished_at)
                   SELECT $6::bigint + i, ($4::text[])[1 + i % 3], 'noop',
                          jsonb_build_object('n', i),
                          jsonb_build_object('org', 'org_' || i % 1000), 0,
                          CASE WHEN i % 50 = 0 THEN 'failed' ELSE 'succeeded'
                          END::stoker.job_state,
                          t, CASE WHEN i % 50 = 0 THEN 3 ELSE 1 END,
                          CASE WHEN i % 50 = 0
                               THEN '[{"error": "ValueError: bench", "attempt": 3}]'::jsonb
                               ELSE '[]'::jsonb END,
                          t - interval '2 seconds', t - interval '1 second', t
                     FROM generate_series($1::bigint, $2::bigint) AS i,
                          LATERAL (SELECT now() - make_interval(
                              secs => $5::float8 * ($3::bigint - i) / $3::bigint)) AS x(t)""",
                start + 1,
                min(history, start + CHUNK),
                history,
                list(QUEUES),
                float(WEEK_S),
                HISTORY_IDS,
            )
        # What the leader would have recorded, minute by minute, over that week.
        await conn.execute(
            """INSERT INTO stoker.throughput (minute, queue, completed, failed)
               SELECT date_trunc('minute', finished_at), queue,
                      count(*) FILTER (WHERE state = 'succeeded'),
                      count(*) FILTER (WHERE state = 'failed')
                 FROM stoker.job_history GROUP BY 1, 2"""
        )
        await conn.execute(
            """INSERT INTO stoker.audit_log (at, role, address, action, target, details)
               SELECT now() - make_interval(mins => i), 'admin', '127.0.0.1', 'queue.pause',
                      ($1::text[])[1 + i % 3], '{}'
                 FROM generate_series(1, 10000) AS i""",
            list(QUEUES),
        )
        await conn.execute("VACUUM ANALYZE")
        await conn.execute("CHECKPOINT")
    finally:
        await conn.close()


async def time_pages(base: str, pages: list[str], requests: int) -> list[Row]:
    jar = aiohttp.CookieJar(unsafe=True)  # cookies for 127.0.0.1
    rows = []
    async with aiohttp.ClientSession(cookie_jar=jar) as http:
        async with http.post(f"{base}/dashboard/login", data={"token": ADMIN_TOKEN}) as r:
            assert r.status == 200 and r.url.path == "/dashboard/", (r.status, r.url)
        for path in pages:
            server: list[float] = []
            client: list[float] = []
            missing = False
            for i in range(requests + 3):  # three to warm up
                began = time.perf_counter()
                async with http.get(f"{base}{path}", allow_redirects=False) as r:
                    await r.read()
                    took = (time.perf_counter() - began) * 1000
                    if r.status == 404:
                        missing = True
                        break
                    assert r.status == 200, (path, r.status)
                    timing = r.headers["Server-Timing"]
                if i >= 3:
                    server.append(float(timing.split("dur=")[1]))
                    client.append(took)
            if missing:
                print(f"  dashboard {path}: not there (404), left out", file=sys.stderr)
                continue
            row = Row("dashboard", "stoker", path, "ms", server, higher_is_better=False)
            row.note = (
                f"p95 {pct(server, 95):.1f} ms; client median {statistics.median(client):.1f} ms"
            )
            print(
                f"  dashboard {path}: median {row.median:.1f} ms, {row.note}",
                file=sys.stderr,
                flush=True,
            )
            rows.append(row)
    return rows


async def dashboard(admin_dsn: str, queued: int, history: int, requests: int) -> list[Row]:
    async with fresh_database(admin_dsn) as dsn:
        began = time.monotonic()
        print(f"  dashboard: building {queued:,} queued, {history:,} history", file=sys.stderr)
        await build(dsn, queued, history)
        print(f"  dashboard: built in {time.monotonic() - began:.0f} s", file=sys.stderr)
        conn = await asyncpg.connect(dsn)
        try:
            job = await conn.fetchval(
                "SELECT id FROM stoker.job_history WHERE state = 'failed' ORDER BY id DESC LIMIT 1"
            )
        finally:
            await conn.close()
        async with stoker_process(
            "dashboard", CONFIG, dsn, ready="http listening on", timeout=60
        ) as proc:
            port = log_text("dashboard").split("http listening on ")[1].split()[0]
            base = f"http://{port}"
            jar = aiohttp.CookieJar(unsafe=True)
            async with aiohttp.ClientSession(cookie_jar=jar) as http:
                await http.post(f"{base}/dashboard/login", data={"token": ADMIN_TOKEN})

                async def sampled() -> bool:  # the first queue sample is in
                    async with http.get(f"{base}/dashboard/") as r:
                        return "sample-age" in await r.text()

                await wait_for("first queue sample", sampled, timeout=120, proc=proc)
            pages = [p.format(job=job, schedule="nightly") for p in PAGES]
            return await time_pages(base, pages, requests)
