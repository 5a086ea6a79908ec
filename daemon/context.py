"""JobContext: what a handler knows about the job it runs."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from dataclasses import dataclass, field
from datetime import datetime
from functools import cached_property
from typing import Any, TypeVar, cast

import asyncpg

ProgressWriter = Callable[[int, int, str], Awaitable[None]]
T = TypeVar("T")


class JobLogger(logging.LoggerAdapter[logging.Logger]):
    """Every line carries job id, queue, kind and attempt."""

    def process(self, msg: Any, kwargs: MutableMapping[str, Any]) -> tuple[Any, Any]:
        extra = dict(self.extra or {})
        extra.update(kwargs.get("extra") or {})
        kwargs["extra"] = extra
        return msg, kwargs


@dataclass
class JobContext:
    id: int
    queue: str
    kind: str
    attempt: int
    max_attempts: int
    meta: dict[str, Any]
    run_at: datetime
    worker: str
    _progress_writer: ProgressWriter = field(repr=False)
    _db: asyncpg.Pool | None = field(default=None, repr=False)
    _resources: Mapping[type[Any], object] = field(default_factory=dict, repr=False)

    @property
    def db(self) -> asyncpg.Pool:
        """The daemon's own connection pool, for handlers that need the database: hold a
        connection only as long as the work needs it (claims and outcomes share the pool)."""
        if self._db is None:
            raise RuntimeError("ctx.db is set by the daemon; this context was made elsewhere")
        return self._db

    def resource(self, kind: type[T]) -> T:
        """The daemon's one `kind`, opened at start-up by the factory registered with
        `@daemon.resource(kind)` and closed after the last job."""
        try:
            return cast(T, self._resources[kind])
        except KeyError:
            raise RuntimeError(
                f"no resource of type {kind.__name__} is open: register a factory with "
                f"@daemon.resource({kind.__name__}) in a module listed in handler_modules"
            ) from None

    @cached_property
    def cancelled(self) -> asyncio.Event:
        """Set when someone cancels this job (`stoker jobs cancel`, the admin API, the
        dashboard, `SELECT stoker.cancel(id)`). A handler may watch it to stop cleanly; past
        the queue's `cancel_grace` seconds its task is cancelled. Whatever it returns once
        this is set, the job ends `cancelled` (a result it returns is kept)."""
        return asyncio.Event()

    @cached_property
    def log(self) -> JobLogger:
        """A logger whose lines carry the job's id, queue, kind and attempt (made on first use:
        most handlers never log)."""
        return JobLogger(
            logging.getLogger("stoker.job"),
            {"job_id": self.id, "queue": self.queue, "kind": self.kind, "attempt": self.attempt},
        )

    @property
    def is_last_attempt(self) -> bool:
        return self.attempt >= self.max_attempts

    async def progress(self, percent: float, message: str = "") -> None:
        """Record progress (0-100) on the job row, visible in `stoker jobs show`."""
        pct = max(0.0, min(100.0, float(percent)))
        await self._progress_writer(
            self.id, self.attempt, json.dumps({"percent": pct, "message": message})
        )
