"""Notices, from a thread of its own, when something blocks the event loop, and names it.

Leases are renewed from the event loop. A handler that blocks it (synchronous I/O, a long
computation) for longer than `lease_seconds` stops the renewals, and another daemon rescues
and runs every job of this one a second time. Nothing inside the loop can see that happen
while it happens, so a thread watches a heartbeat the loop sets, and says which job's task
held the loop and for how long."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import Any

log = logging.getLogger("stoker.loopwatch")

MAX_BEAT = 1.0  # how often, at most, the loop proves it turns (a quarter of the threshold)


class LoopWatch:
    def __init__(self, *, threshold: float, lease_seconds: float) -> None:
        self._threshold = threshold
        self._beat_every = min(MAX_BEAT, threshold / 4)
        self._lease = lease_seconds
        self._last = time.monotonic()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None
        self.stalls = 0

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._beat()
        self._thread = threading.Thread(target=self._watch, name="stoker-loopwatch", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._timer is not None:
            self._timer.cancel()
        if self._thread is not None:
            self._thread.join(timeout=2)

    def _beat(self) -> None:
        self._last = time.monotonic()
        assert self._loop is not None
        self._timer = self._loop.call_later(self._beat_every, self._beat)

    def _watch(self) -> None:
        stalled_since: float | None = None
        culprit = ""
        while not self._stop.wait(self._beat_every):
            last = self._last
            blocked = time.monotonic() - last
            if stalled_since is None and blocked > self._threshold:
                stalled_since = last
                culprit = self._culprit()
                log.warning(
                    "the event loop has been blocked for %.1fs by %s; leases are renewed from "
                    "the loop, and past lease_seconds (%gs) other daemons run this daemon's "
                    "jobs again: run blocking code with asyncio.to_thread",
                    blocked,
                    culprit,
                    self._lease,
                )
            elif stalled_since is not None and last > stalled_since:
                self.stalls += 1
                log.error(
                    "the event loop was blocked for %.1fs by %s%s",
                    last - stalled_since,
                    culprit,
                    "; leases may have expired and its jobs may run again elsewhere"
                    if last - stalled_since > self._lease
                    else "",
                )
                stalled_since = None

    def _culprit(self) -> str:
        """The job whose task runs on the loop right now, if it is a job's."""
        loop = self._loop
        if loop is None:
            return "unknown code"
        try:
            task = asyncio.current_task(loop)
        except RuntimeError:
            return "unknown code"
        if task is None:
            return "code outside any task (a callback)"
        return describe_task(task)


def describe_task(task: asyncio.Task[Any]) -> str:
    """'job 42 (kind 'x', handler m.f, queue 'q')' for a pool's job task, else the task."""
    frame = getattr(task.get_coro(), "cr_frame", None)
    job = frame.f_locals.get("job") if frame is not None else None
    if job is None or not hasattr(job, "kind"):
        return f"task {task.get_name()}"
    handler = getattr(job, "handler", None)
    func = getattr(handler, "func", None)
    where = f"{func.__module__}.{func.__qualname__}" if func is not None else "no handler"
    return f"job {job.id} (kind {job.kind!r}, handler {where}, attempt {job.attempt})"
