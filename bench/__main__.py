"""Stoker's benchmarks, and the peers side by side: `python -m bench [SCENARIO ...] [--peers]`.

    make bench          # every scenario, Stoker only
    make bench-peers    # drain and latency with PgQueuer and Procrastinate in the same run

Scenarios (default: all):
    drain      N no-op jobs queued, then drained by one `stoker run` (also two processes, and
               one while /metrics and /ready are scraped 50 times a second); and #6's bare
               claim-and-delete loop in one and two processes, the machine's ceiling
    latency    jobs inserted one at a time into an idle worker: commit to handler start
    scale      drain rate with 10,000 vs 1,000,000 queued; claim time with an empty history
               vs 10,000,000 finished jobs, and with 1,000,000 jobs scheduled for later
    memory     resident memory of an idle daemon, and its peak while draining 1,000,000 jobs
    dashboard  every dashboard page's server time (median, p95) with 1,000,000 jobs queued and
               10,000,000 in history (--scale-jobs, --history; bench/dashboard.py)
    schedules  one leader with 10,000 `* * * * *` schedules in 50 zones (--schedules): per
               minute how many fired once and how soon, its CPU; 1,000 updates picked up
    keepup     #16 goal 1: eight pgbench producers, stoker.enqueue against a trigger-less INSERT,
               daemon keeping up and daemon busy; wait events, WAL flushes, top statements
    limits     #17's cost: a drain with no limits, with global_concurrency = 100, with
               key_concurrency over 1,000 keys, and with a rate limit it never reaches
    meta       #18: jobs by meta (an organisation's) among 1,000,000 finished ones, and what
               migration 020 (wait_for's trigger, the meta indexes) costs a drain
    idle       #16 goal 4: a daemon serving 50 idle queues: statements/s (pg_stat_statements),
               its CPU, and commit->start of single jobs into random ones of them

Every figure is the median of --runs runs (min-max beside it), runs of different systems
interleaved so that drift in the machine hits all alike. See bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
from collections.abc import Awaitable, Callable

import asyncpg

from bench import ceiling, peers, stoker
from bench import dashboard as dashboard_bench
from bench import idle as idle_bench
from bench import keepup as keepup_bench
from bench import meta as meta_bench
from bench import schedules as schedules_bench
from bench.common import Row, fresh_database, pct, print_table, server_dsn

SCENARIOS = (
    "drain",
    "latency",
    "scale",
    "memory",
    "dashboard",
    "schedules",
    "keepup",
    "idle",
    "limits",
    "meta",
)


def progress(row: Row) -> None:
    print(
        f"  {row.scenario} {row.system} {row.setting}: {row.figure(row.values[-1])} {row.unit}",
        file=sys.stderr,
        flush=True,
    )


async def interleaved(
    runs: int, plan: list[tuple[Row, Callable[[], Awaitable[float]]]]
) -> list[Row]:
    for _ in range(runs):
        for row, once in plan:
            row.values.append(await once())
            progress(row)
    return [row for row, _ in plan]


async def drain(admin: str, args: argparse.Namespace) -> list[Row]:
    jobs, conc, batch, deep_jobs = args.jobs, args.concurrency, args.batch_size, args.http_jobs
    setting = f"{jobs:,} jobs, conc {conc}, batch {batch}"
    one = Row("drain", "stoker", setting, "jobs/s")
    two = Row("drain", "stoker x2", f"two processes, {jobs:,} jobs", "jobs/s")
    deep = Row("drain", "stoker", f"{deep_jobs:,} jobs, no scraping", "jobs/s")
    deep_two = Row("drain", "stoker x2", f"two processes, {deep_jobs:,} jobs", "jobs/s")
    scraped = Row("drain", "stoker +http", f"{deep_jobs:,} jobs, /metrics+/ready 50/s", "jobs/s")
    bare = Row("drain", "bare loop", f"{args.bare_jobs:,} rows, 1 connection", "jobs/s")
    bare_two = Row("drain", "bare loop x2", f"two processes, {args.bare_jobs:,} rows", "jobs/s")
    # Cores the machine kept busy during each run of a row: how much room a second process had.
    busy: dict[int, list[float]] = {id(r): [] for r in (one, two, deep, deep_two, bare, bare_two)}

    def stoker_drain(row: Row, n: int, processes: int) -> Callable[[], Awaitable[float]]:
        return lambda: stoker.drain_once(
            admin, n, concurrency=conc, batch_size=batch, processes=processes, busy=busy[id(row)]
        )

    plan: list[tuple[Row, Callable[[], Awaitable[float]]]] = [
        (one, stoker_drain(one, jobs, 1)),
        (two, stoker_drain(two, jobs, 2)),
        # Longer drains as well: start-up weighs less, and scraping costs little per second,
        # so it is compared where the noise of a shared machine averages out.
        (deep, stoker_drain(deep, deep_jobs, 1)),
        (deep_two, stoker_drain(deep_two, deep_jobs, 2)),
        (
            scraped,
            lambda: stoker.drain_once(
                admin, deep_jobs, concurrency=conc, batch_size=batch, scrape_rate=50.0
            ),
        ),
        (bare, lambda: ceiling.drain_once(admin, args.bare_jobs, 1, busy[id(bare)])),
        (bare_two, lambda: ceiling.drain_once(admin, args.bare_jobs, 2, busy[id(bare_two)])),
    ]
    if args.peers:
        pjobs = args.procrastinate_jobs
        plan += [
            (
                Row("drain", "pgqueuer", f"{jobs:,} jobs, batch {b}", "jobs/s"),
                lambda b=b: peers.pgqueuer_drain_once(admin, jobs, b),  # type: ignore[misc]
            )
            for b in (10, 100)
        ]
        plan.append(
            (
                Row("drain", "procrastinate", f"{pjobs:,} jobs, conc 20", "jobs/s"),
                lambda: peers.procrastinate_drain_once(admin, pjobs, 20),
            )
        )
    rows = await interleaved(args.runs, plan)

    def paired(row: Row, against: Row) -> float:
        # Against the run of the same round: drift of the machine cancels out.
        return statistics.median(v / b for v, b in zip(row.values, against.values, strict=True))

    def cores(row: Row) -> float:
        return statistics.median(busy[id(row)])

    for multi, single in ((two, one), (deep_two, deep), (bare_two, bare)):
        goal = " (goal >= 1.5x)" if multi.system == "stoker x2" else ""
        multi.note = (
            f"{paired(multi, single):.2f}x one process, paired by round{goal}; cores busy "
            f"{cores(multi):.2f} of {os.cpu_count()}, one process {cores(single):.2f}"
        )
    for row in (one, deep):
        # What a second process can add at most: the cores one process leaves idle, if two
        # spend the same CPU per job (they do: the claims no longer contend).
        row.note = (
            f"cores busy {cores(row):.2f}: room for {(os.cpu_count() or 1) / cores(row):.2f}x"
        )
    scraped.note = f"{paired(scraped, deep):.0%} of no scraping, paired by round (goal >= 90%)"
    if args.peers:
        best = max(r.median for r in rows if r.system == "pgqueuer")
        one.note = f"{one.median / best:.2f}x PgQueuer's best (goal >= 2x); " + one.note
        for row in rows:
            if row.system in ("pgqueuer", "procrastinate"):
                row.note = f"stoker {one.median / row.median:.2f}x this"
    return rows


async def limits(admin: str, args: argparse.Namespace) -> list[Row]:
    """#17: what a limit costs a drain of no-op jobs, against no limit in the same round.
    Variants: (label, the queue's limits, keys to spread the jobs over; a negative number
    instead sets the daemon's concurrency)."""
    jobs, conc, batch = args.limit_jobs, args.concurrency, args.batch_size
    variants = [
        ("no limits, conc 200", "", 0),
        ("global_concurrency = 100, conc 200", "global_concurrency = 100", 0),
        ("no limits, conc 100 (as many in flight as the limit)", "", -100),
        ("key_concurrency = 1, 1,000 keys", "key_concurrency = 1", 1000),
        ('rate_limit = "1000000/1s" (never reached)', 'rate_limit = "1000000/1s"', 0),
    ]
    plan: list[tuple[Row, Callable[[], Awaitable[float]]]] = [
        (
            Row("limits", "stoker", f"{label}, {jobs:,} jobs", "jobs/s"),
            lambda extra=extra, keys=keys: stoker.drain_once(  # type: ignore[misc]
                admin,
                jobs,
                concurrency=-keys if keys < 0 else conc,
                batch_size=batch,
                extra=extra,
                keys=max(keys, 0),
            ),
        )
        for label, extra, keys in variants
    ]
    rows = await interleaved(args.runs, plan)
    free = rows[0]
    for row in rows[1:]:
        ratio = statistics.median(v / b for v, b in zip(row.values, free.values, strict=True))
        goal = " (goal >= 80%)" if "global" in row.setting else ""
        row.note = f"{ratio:.0%} of no limits, paired by round{goal}"
    return rows


async def latency(admin: str, args: argparse.Namespace) -> list[Row]:
    systems: list[tuple[str, Callable[[], Awaitable[tuple[list[float], list[float]]]]]] = [
        ("stoker", lambda: stoker.latency_once(admin, args.samples))
    ]
    if args.peers:
        systems.append(("pgqueuer", lambda: peers.pgqueuer_latency_once(admin, args.samples)))
    samples: dict[str, list[tuple[list[float], list[float]]]] = {name: [] for name, _ in systems}
    for _ in range(args.runs):
        for name, once in systems:
            samples[name].append(await once())
            print(f"  latency {name}: run done", file=sys.stderr, flush=True)
    rows = []
    for name, runs in samples.items():
        for label, index in (("commit->start", 0), ("send->start", 1)):
            for p in (50, 99):
                values = [pct(run[index], p) for run in runs]
                rows.append(
                    Row("latency", name, f"{label} p{p}, {args.samples} jobs", "ms", values)
                )
    if args.peers:
        for row in rows:
            if row.system == "stoker":
                peer = next(r for r in rows if r.system == "pgqueuer" and r.setting == row.setting)
                row.note = f"{row.median / peer.median:.2f}x PgQueuer's"
    for row in rows:
        if row.system == "stoker" and row.setting.startswith("commit->start"):
            goal = 1.5 if " p50" in row.setting else 3.0
            row.note = (row.note + "; " if row.note else "") + f"goal <= {goal} ms"
    return rows


async def scale(admin: str, args: argparse.Namespace, rss: list[float]) -> list[Row]:
    small = Row("scale", "stoker", "10,000 queued", "jobs/s")
    big = Row("scale", "stoker", f"{args.scale_jobs:,} queued", "jobs/s")
    await interleaved(
        args.runs,
        [
            (small, lambda: stoker.drain_once(admin, 10_000)),
            (big, lambda: stoker.drain_once(admin, args.scale_jobs, peak_rss=rss)),
        ],
    )
    big.note = f"{big.median / small.median:.0%} of the 10,000 rate (goal >= 85%)"
    empty = Row("scale", "stoker", "claim 100, empty history", "ms")
    full = Row("scale", "stoker", f"claim 100, {args.history:,} history", "ms")
    later = Row("scale", "stoker", f"claim 100, {args.scale_jobs:,} for later", "ms")
    async with fresh_database(admin) as bare, fresh_database(admin) as deep:
        conn = await asyncpg.connect(deep)
        try:
            print(f"  scale: writing {args.history:,} history rows", file=sys.stderr)
            await stoker.fill_history(conn, args.history)
            await conn.execute("VACUUM ANALYZE stoker.job_history")
        finally:
            await conn.close()
        await interleaved(
            args.runs,
            [
                (empty, lambda: stoker.claim_ms_once(bare)),
                (full, lambda: stoker.claim_ms_once(deep)),
                (later, lambda: stoker.claim_ms_once(bare, later=args.scale_jobs)),
            ],
        )
    full.note = f"{full.median / empty.median:.2f}x the empty-history claim"
    later.note = f"{later.median / empty.median:.2f}x the claim with none scheduled for later"
    return [small, big, empty, full, later]


async def memory(admin: str, args: argparse.Namespace, rss: list[float]) -> list[Row]:
    idle = Row("memory", "stoker", "idle", "MB", note="goal < 80 MB")
    await interleaved(args.runs, [(idle, lambda: stoker.idle_rss_once(admin))])
    rows = [idle]
    if not rss:  # the scale scenario did not run: drain the big backlog here
        for _ in range(args.runs):
            await stoker.drain_once(admin, args.scale_jobs, peak_rss=rss)
    rows.append(
        Row(
            "memory",
            "stoker",
            f"peak draining {args.scale_jobs:,}",
            "MB",
            list(rss),
            note="goal < 200 MB",
        )
    )
    return rows


async def main_async(args: argparse.Namespace) -> None:
    chosen = args.scenarios or list(SCENARIOS)
    if args.peers and not peers.installed():
        sys.exit("the peers are not installed: run `make bench-peers`")
    admin, cluster = server_dsn()
    rows: list[Row] = []
    rss: list[float] = []
    try:
        for name in SCENARIOS:
            if name not in chosen:
                continue
            print(f"{name}...", file=sys.stderr, flush=True)
            if name == "drain":
                rows += await drain(admin, args)
            elif name == "latency":
                rows += await latency(admin, args)
            elif name == "scale":
                rows += await scale(admin, args, rss)
            elif name == "memory":
                rows += await memory(admin, args, rss)
            elif name == "dashboard":
                rows += await dashboard_bench.dashboard(
                    admin, args.scale_jobs, args.history, args.dashboard_requests
                )
            elif name == "schedules":
                rows += await schedules_bench.schedules(
                    admin, args.schedules, args.schedule_minutes, args.schedule_runs
                )
            elif name == "keepup":
                rows += await keepup_bench.keepup(admin, args.runs, args.producer_seconds)
            elif name == "limits":
                rows += await limits(admin, args)
            elif name == "meta":
                rows += await meta_bench.meta(
                    admin,
                    args.runs,
                    args.meta_history,
                    args.limit_jobs,
                    args.concurrency,
                    args.batch_size,
                )
            elif name == "idle":
                rows += await idle_bench.idle(
                    admin, args.runs, args.idle_seconds, args.wake_samples
                )
    finally:
        if cluster is not None:
            cluster.stop()
    print_table(
        rows,
        f"medians of {args.runs} runs (min-max); rates from each system's own tables on the "
        "database clock",
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench", description=(__doc__ or "").splitlines()[0]
    )
    parser.add_argument(
        "scenarios",
        nargs="*",
        metavar="SCENARIO",
        help=f"any of {', '.join(SCENARIOS)} (default: all)",
    )
    parser.add_argument("--peers", action="store_true", help="PgQueuer and Procrastinate too")
    parser.add_argument("--runs", type=int, default=3, help="runs per figure (default 3)")
    parser.add_argument("--jobs", type=int, default=20_000, help="drain size (default 20,000)")
    parser.add_argument(
        "--http-jobs", type=int, default=100_000, help="drain size with and without scraping"
    )
    parser.add_argument(
        "--bare-jobs", type=int, default=300_000, help="rows for the bare claim-and-delete loop"
    )
    parser.add_argument(
        "--meta-history", type=int, default=1_000_000, help="meta scenario's history rows"
    )
    parser.add_argument("--concurrency", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument(
        "--limit-jobs", type=int, default=100_000, help="limits scenario's drain (default 100,000)"
    )
    parser.add_argument("--samples", type=int, default=200, help="latency samples per run")
    parser.add_argument("--producer-seconds", type=int, default=8)
    parser.add_argument("--scale-jobs", type=int, default=1_000_000)
    parser.add_argument("--history", type=int, default=10_000_000, help="history rows for scale")
    parser.add_argument(
        "--dashboard-requests", type=int, default=50, help="requests per dashboard page"
    )
    parser.add_argument(
        "--schedules", type=int, default=10_000, help="rows in stoker.schedules (default 10,000)"
    )
    parser.add_argument(
        "--schedule-minutes", type=int, default=5, help="minutes measured per run (default 5)"
    )
    parser.add_argument(
        "--schedule-runs", type=int, default=1, help="runs of the schedules scenario (default 1)"
    )
    parser.add_argument(
        "--idle-seconds", type=float, default=30.0, help="idle scenario's window (default 30)"
    )
    parser.add_argument(
        "--wake-samples", type=int, default=20, help="idle scenario's wake-ups a run (default 20)"
    )
    parser.add_argument(
        "--procrastinate-jobs",
        type=int,
        default=5_000,
        help="fewer: Procrastinate drains in the hundreds of jobs a second",
    )
    args = parser.parse_args()
    unknown = [s for s in args.scenarios if s not in SCENARIOS]
    if unknown:
        parser.error(f"unknown scenario {unknown[0]!r}: choose from {', '.join(SCENARIOS)}")
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
