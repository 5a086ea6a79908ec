"""Waiting on several asyncio events at once, with an optional time limit."""

from __future__ import annotations

import asyncio
import contextlib


async def wait_any(*events: asyncio.Event, seconds: float | None = None) -> None:
    """Return as soon as any of `events` is set, or after `seconds` (None: no limit)."""
    if any(e.is_set() for e in events):
        return
    if len(events) == 1:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await events[0].wait()
        return
    waiters = [asyncio.ensure_future(e.wait()) for e in events]
    try:
        await asyncio.wait(waiters, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waiters:
            w.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*waiters, return_exceptions=True)
