"""Small built-in handlers: `noop` (benchmarks, smoke tests) and `log` (see a job run)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict

from daemon import JobContext, handler


@handler("noop")
async def noop(ctx: JobContext, payload: Any) -> None:
    """Does nothing: measures the engine's own cost per job."""


class LogPayload(BaseModel):
    model_config = ConfigDict(extra="forbid")
    message: str


@handler("log", payload=LogPayload)
async def log_message(ctx: JobContext, payload: LogPayload) -> dict[str, str]:
    """Writes `message` to the daemon's log and keeps it as the job's result."""
    ctx.log.info("log job: %s", payload.message)
    return {"logged": payload.message}
