"""The pool's own Python per job, without a database: start 100 claimed no-op jobs, let them
run, hand their outcomes to a completer that only keeps them; the median time per 100.

    .venv/bin/python -m bench.jobcost [--cycles 3000] [--no-metrics]

This is the daemon's side of a global limit's serial cycle (the database's side is the
statement that writes the outcomes and claims along), so a change to the per-job path
(QueuePool._start and _execute, JobRunner.run, Outcome, the metrics) can be measured here in
seconds, run after run, before a drain confirms it.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from datetime import UTC, datetime

import uvloop

import handlers.basic  # noqa: F401  (registers the no-op handler)
from daemon.config import QueueConfig
from daemon.engine.jobrun import ClaimedJob
from daemon.engine.outcomes import Completer, Outcome
from daemon.engine.pool import QueuePool
from daemon.engine.registry import REGISTRY
from daemon.observe.metrics import Metrics
from daemon.store.clock import DbClock

BATCH = 100


class KeepingCompleter(Completer):
    """Keeps outcomes instead of writing them."""

    def __init__(self) -> None:
        self.kept: list[Outcome] = []
        self.settled = asyncio.Event()
        self.settled.set()

    def add(self, outcome: Outcome) -> None:
        self.kept.append(outcome)

    def adopt(self, job_id: int, attempt: int) -> bool:
        return False


async def per_batch(cycles: int, metrics: bool) -> float:
    completer = KeepingCompleter()
    pool = QueuePool(
        "bench",
        QueueConfig(concurrency=2 * BATCH, global_concurrency=BATCH),
        db=None,  # never used: no claims, no writes
        registry=REGISTRY,
        completer=completer,
        worker_id="bench",
        lease_seconds=60,
        stopping=asyncio.Event(),
        clock=DbClock(),
        metrics=Metrics(["bench"], ["noop"]) if metrics else None,
    )
    pool._loop = asyncio.get_running_loop()  # set by run(), which this does not call
    now = datetime.now(UTC)
    times: list[float] = []
    next_id = 0
    for _ in range(cycles):
        jobs = []
        for _ in range(BATCH):
            next_id += 1
            jobs.append(ClaimedJob(next_id, "noop", "{}", "{}", 1, None, now, now))
        started = time.perf_counter()
        pool._start(jobs)
        while pool.running:
            await asyncio.sleep(0)
        times.append(time.perf_counter() - started)
        assert len(completer.kept) == BATCH
        completer.kept.clear()
    return statistics.median(times[cycles // 5 :])  # past the warm-up


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.jobcost")
    parser.add_argument("--cycles", type=int, default=3000)
    parser.add_argument("--no-metrics", action="store_true", help="without the job metrics")
    args = parser.parse_args()
    seconds = uvloop.run(per_batch(args.cycles, not args.no_metrics))
    print(f"{seconds * 1000:.3f} ms per {BATCH} no-op jobs started, run and handed over")


if __name__ == "__main__":
    main()
