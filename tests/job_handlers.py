"""Handlers the tests' daemon processes load (handler_modules = ["tests.job_handlers"])."""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict

from daemon import (
    JobContext,
    PermanentJobError,
    RetryJob,
    Settings,
    handler,
    handler_config,
    resource,
)


class Flaky(BaseModel):
    succeed_on: int = 3


@handler("test.flaky", payload=Flaky)
async def flaky(ctx: JobContext, payload: Flaky) -> dict[str, int]:
    if ctx.attempt < payload.succeed_on:
        raise ConnectionError(f"transient failure on attempt {ctx.attempt}")
    return {"attempt": ctx.attempt}


@handler("test.fail")
async def always_fails(ctx: JobContext, payload: object) -> None:
    raise ValueError(f"boom on attempt {ctx.attempt}")


@handler("test.permanent")
async def permanent(ctx: JobContext, payload: object) -> None:
    raise PermanentJobError("the order does not exist")


class RetryLater(BaseModel):
    delay: float


@handler("test.retry_later", payload=RetryLater, max_attempts=2)
async def retry_later(ctx: JobContext, payload: RetryLater) -> None:
    if ctx.attempt == 1:
        raise RetryJob("not ready yet", delay=payload.delay)


class Sleep(BaseModel):
    seconds: float
    first_attempt_only: bool = False


@handler("test.sleep", payload=Sleep)
async def sleep(ctx: JobContext, payload: Sleep) -> dict[str, int]:
    if not payload.first_attempt_only or ctx.attempt == 1:
        await ctx.progress(10, "sleeping")
        await asyncio.sleep(payload.seconds)
    return {"attempt": ctx.attempt}


class Record(BaseModel):
    seconds: float = 0.0
    label: str = ""
    nul_result: bool = False  # a result PostgreSQL refuses (jsonb holds no NUL)


@handler("test.record", payload=Record)
async def record(ctx: JobContext, payload: Record) -> dict[str, str] | None:
    """Appends one line per run to $STOKER_TEST_EVENTS: id, queue, label, start, end."""
    start = time.monotonic()
    if payload.seconds:
        await asyncio.sleep(payload.seconds)
    line = json.dumps(
        {
            "id": ctx.id,
            "queue": ctx.queue,
            "label": payload.label,
            "start": start,
            "end": time.monotonic(),
        }
    )
    with open(os.environ["STOKER_TEST_EVENTS"], "a", encoding="utf-8") as fh:
        fh.write(line + "\n")
    return {"text": "a\x00b"} if payload.nul_result else None


class Poison(BaseModel):
    mode: str


@handler("test.poison", payload=Poison, max_attempts=1)
async def poison(ctx: JobContext, payload: Poison) -> object:
    """Values PostgreSQL cannot store, to prove one bad outcome blocks nothing else."""
    if payload.mode == "nan-result":
        return {"value": float("nan")}
    if payload.mode == "nul-in-result":
        return {"text": "a\x00b"}
    if payload.mode == "nul-in-error":
        raise ValueError("bad\x00byte")
    if payload.mode == "nan-delay":
        raise RetryJob("later", delay=float("nan"))
    raise AssertionError(payload.mode)


@handler("test.block_loop")
async def block_loop(ctx: JobContext, payload: Sleep) -> None:
    """A badly written handler that blocks the event loop (what /health must notice)."""
    with open(os.environ["STOKER_TEST_EVENTS"], "a", encoding="utf-8") as fh:
        fh.write(json.dumps({"id": ctx.id, "label": "blocking"}) + "\n")
    time.sleep(Sleep.model_validate(payload).seconds)


class NeedsFile(BaseModel):
    path: str


@handler("test.needs_file", payload=NeedsFile)
async def needs_file(ctx: JobContext, payload: NeedsFile) -> str:
    """Fails until the file exists: an operator fixes the cause, then retries the job."""
    if not os.path.exists(payload.path):
        raise FileNotFoundError(payload.path)
    return "found"


class Big(BaseModel):
    chars: int


@handler("test.big_result", payload=Big, max_attempts=1)
async def big_result(ctx: JobContext, payload: Big) -> dict[str, str]:
    """A result larger than anyone should store: the engine caps it before encoding it all."""
    return {"text": "x" * payload.chars}


class GreeterConfig(BaseModel):
    """[handlers.greeter] in a test daemon's configuration."""

    model_config = ConfigDict(extra="forbid")
    greeting: str = "hello"
    times: int = 1


@dataclass(frozen=True)
class Greeter:
    text: str


@resource(Greeter)
@asynccontextmanager
async def greeter(settings: Settings) -> AsyncIterator[Greeter]:
    """A resource of the shape to copy: its own configuration section, opened once."""
    config = handler_config(settings, "greeter", GreeterConfig)
    yield Greeter(" ".join([config.greeting] * config.times))


@handler("test.greet")
async def greet(ctx: JobContext, payload: object) -> str:
    return ctx.resource(Greeter).text


class Cancellable(BaseModel):
    seconds: float = 60.0
    watch: bool = True  # False: ignore ctx.cancelled (interrupted after cancel_grace)


def _event(fields: dict[str, object]) -> None:
    with open(os.environ["STOKER_TEST_EVENTS"], "a", encoding="utf-8") as fh:
        fh.write(json.dumps(fields) + "\n")


@handler("test.cancellable", payload=Cancellable)
async def cancellable(ctx: JobContext, payload: Cancellable) -> dict[str, object]:
    """Runs `seconds`; one watching ctx.cancelled stops as soon as it is set and returns; one
    that ignores it is interrupted. Appends start / stopped / interrupted events."""
    _event({"id": ctx.id, "event": "start", "worker": ctx.worker, "at": time.time()})
    try:
        if payload.watch:
            try:
                await asyncio.wait_for(ctx.cancelled.wait(), payload.seconds)
            except TimeoutError:
                return {"stopped": False}
            _event({"id": ctx.id, "event": "stopped", "at": time.time()})
            return {"stopped": True}
        await asyncio.sleep(payload.seconds)
        return {"stopped": False}
    except asyncio.CancelledError:
        _event({"id": ctx.id, "event": "interrupted", "at": time.time()})
        raise
