"""Handlers for benchmarks: loaded by the daemon under test via handler_modules."""

from __future__ import annotations

import time
from typing import Any

from daemon import JobContext, handler


@handler("bench.stamp")
async def stamp(ctx: JobContext, payload: Any) -> dict[str, float]:
    """Records the wall-clock instant the handler started, for latency measurement."""
    return {"started": time.time()}
