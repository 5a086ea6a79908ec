"""Where a draining daemon spends its time: py-spy samples one `stoker run` draining N no-op
jobs and this prints the functions with the most samples, by own time and inclusive.

    make bench-profile                 # installs py-spy into .venv (bench only), 100,000 jobs
    .venv/bin/python -m bench.profile --jobs 200000 --top 40

uvloop's C event loop (socket reads and writes, callbacks) shows as `Runner.run`; samples
taken while the process waits in epoll are not counted (py-spy's default, without --idle).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import asyncpg

from bench import stoker
from bench.common import fresh_database, server_dsn, settle, wait_for

LINE_NUMBER = re.compile(r":\d+\)$")


def summarise(raw: Path, top: int) -> str:
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        frames = [LINE_NUMBER.sub(")", f) for f in stack.split(";")]
        # Import-time frames are start-up, not the drain.
        if any("importlib._bootstrap" in f for f in frames):
            continue
        n = int(count)
        total += n
        own[frames[-1]] += n
        for frame in set(frames):
            inclusive[frame] += n
    out = [f"{total} samples (start-up imports left out)", "", "own time:"]
    out += [f"  {100 * n / total:5.1f}%  {f}" for f, n in own.most_common(top)]
    out += ["", "inclusive:"]
    out += [f"  {100 * n / total:5.1f}%  {f}" for f, n in inclusive.most_common(top)]
    return "\n".join(out)


async def profile(jobs: int, raw: Path, extra: str = "") -> float:
    spy = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")
    if spy is None:
        sys.exit("py-spy is not installed: run `make bench-profile`")
    admin, cluster = server_dsn()
    try:
        async with fresh_database(admin) as dsn:
            conn = await asyncpg.connect(dsn)
            try:
                await stoker.fill(conn, jobs)
                await settle(conn, "stoker.jobs")
                async with stoker.daemon(dsn, extra=extra) as proc:
                    recorder = subprocess.Popen(
                        [
                            *(spy, "record", "--pid", str(proc.pid), "--rate", "250"),
                            *("--format", "raw", "--output", str(raw), "--nonblocking"),
                        ],
                        stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL,
                    )
                    try:
                        await asyncio.sleep(1.0)  # py-spy attaches; the daemon waits at 2 s polls
                        await conn.execute("SELECT pg_notify('stoker_jobs', 'bench')")
                        await wait_for(f"drain of {jobs:,}", lambda: stoker.drained(conn))
                    finally:
                        os.kill(recorder.pid, signal.SIGINT)  # py-spy writes its file on SIGINT
                        recorder.wait(timeout=60)
                return await stoker.drain_rate(conn, jobs)
            finally:
                await conn.close()
    finally:
        if cluster is not None:
            cluster.stop()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.profile")
    parser.add_argument("--jobs", type=int, default=100_000)
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument(
        "--extra",
        default="",
        help='more keys of the queue\'s section, e.g. "global_concurrency = 100"',
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "profile.txt"
        rate = asyncio.run(profile(args.jobs, raw, args.extra))
        print(f"drained {args.jobs:,} no-op jobs at {rate:,.0f} jobs/s under py-spy (250 Hz)\n")
        print(summarise(raw, args.top))


if __name__ == "__main__":
    main()
