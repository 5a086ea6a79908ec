"""Buffers job outcomes and writes them in batches: one statement per flush."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime

import asyncpg

from daemon import queries
from daemon.db import DB_ERRORS

log = logging.getLogger("stoker.outcomes")


@dataclass(frozen=True, slots=True)
class Outcome:
    job_id: int
    attempt: int
    queue: str
    outcome: str  # succeeded | failed | retry | handback
    result: str | None = None  # JSON text
    error: str | None = None
    traceback: str | None = None
    delay: float = 0.0


FINISHED = frozenset({"succeeded", "failed"})

RequeuedFn = Callable[[str, datetime], None]


class Completer:
    """One per daemon. `add` never waits; the flusher task writes what has accumulated."""

    def __init__(
        self,
        db: asyncpg.Pool,
        *,
        worker_id: str,
        flush_interval: float,
        flush_max: int,
        on_requeued: RequeuedFn,
    ) -> None:
        self._db = db
        self._worker_id = worker_id
        self._flush_interval = flush_interval
        self._flush_max = flush_max
        self._on_requeued = on_requeued
        self._buffer: list[Outcome] = []
        self._pending = asyncio.Event()
        self._closing = False
        self.discarded = 0  # outcomes whose lease had been taken over (fenced out)
        self.written = 0

    def add(self, outcome: Outcome) -> None:
        self._buffer.append(outcome)
        self._pending.set()

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    def buffered_ids(self) -> list[int]:
        return [o.job_id for o in self._buffer]

    async def run(self) -> None:
        """Flush until close() is called and the buffer is empty."""
        delay = 0.05
        while True:
            if not self._buffer:
                if self._closing:
                    return
                await self._pending.wait()
                self._pending.clear()
                if self._flush_interval and not self._closing:
                    # A short window lets outcomes of jobs finishing together share a write.
                    await asyncio.sleep(self._flush_interval)
                continue
            batch = self._buffer[: self._flush_max]
            try:
                # Shielded: a cancellation must not lose a job's final state.
                await asyncio.shield(self._write(batch))
            except asyncpg.DataError as exc:
                # A value PostgreSQL refuses must not block every other outcome behind it.
                log.warning(
                    "a batch of %d outcomes was refused (%s); writing one by one", len(batch), exc
                )
                await asyncio.shield(self._write_each(batch))
            except DB_ERRORS as exc:
                log.warning(
                    "cannot write %d job outcomes (%s); retrying in %.2fs", len(batch), exc, delay
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
                continue
            delay = 0.05
            del self._buffer[: len(batch)]

    async def _write_each(self, batch: list[Outcome]) -> None:
        """Write outcomes singly; one PostgreSQL refuses is recorded without the bad value."""
        for outcome in batch:
            try:
                await self._write([outcome])
            except asyncpg.DataError as exc:
                salvaged = _salvage(outcome, exc)
                try:
                    await self._write([salvaged])
                except asyncpg.DataError:
                    log.exception(
                        "job %s: outcome cannot be recorded; it will run again when its "
                        "lease expires",
                        outcome.job_id,
                        extra={"job_id": outcome.job_id, "queue": outcome.queue},
                    )

    async def close(self) -> None:
        self._closing = True
        self._pending.set()

    async def _write(self, batch: list[Outcome]) -> None:
        if all(o.outcome == "succeeded" for o in batch):
            rows = await self._db.fetch(
                queries.COMPLETE_SUCCEEDED,
                [o.job_id for o in batch],
                [o.attempt for o in batch],
                [o.result for o in batch],
                self._worker_id,
            )
        else:
            rows = await self._write_mixed(batch)
        self._account(batch, rows)

    async def _write_mixed(self, batch: list[Outcome]) -> list[asyncpg.Record]:
        done = [o for o in batch if o.outcome in FINISHED]
        again = [o for o in batch if o.outcome not in FINISHED]
        rows: list[asyncpg.Record] = await self._db.fetch(
            queries.COMPLETE,
            [o.job_id for o in done],
            [o.attempt for o in done],
            [o.outcome for o in done],
            [o.result for o in done],
            [o.error for o in done],
            [o.traceback for o in done],
            [o.job_id for o in again],
            [o.attempt for o in again],
            [o.outcome for o in again],
            [o.error for o in again],
            [o.traceback for o in again],
            [o.delay for o in again],
            self._worker_id,
        )
        return rows

    def _account(self, batch: list[Outcome], rows: list[asyncpg.Record]) -> None:
        self.written += len(rows)
        if len(rows) != len(batch):
            seen = {row["id"] for row in rows}
            for o in batch:
                if o.job_id not in seen:
                    self.discarded += 1
                    log.warning(
                        "outcome %s of job %s attempt %s discarded: its lease expired and the "
                        "job was handed to another attempt",
                        o.outcome,
                        o.job_id,
                        o.attempt,
                        extra={"job_id": o.job_id, "queue": o.queue, "attempt": o.attempt},
                    )
        for row in rows:
            if row["run_at"] is not None:
                self._on_requeued(row["queue"], row["run_at"])


def _salvage(outcome: Outcome, exc: Exception) -> Outcome:
    note = f"PostgreSQL refused part of this job's outcome: {exc}"
    if outcome.outcome == "succeeded":
        return replace(outcome, result=json.dumps({"unrecorded_result": note}))
    return replace(outcome, error=note, traceback=None, delay=min(outcome.delay, 3600.0))
