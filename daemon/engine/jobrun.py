"""Running one claimed job: its handler under its timeout, and what became of it (an Outcome
for the completer: succeeded, retry after a backoff, or failed with the error kept)."""

from __future__ import annotations

import asyncio
import json
import logging
import traceback
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, overload

import asyncpg
from pydantic import ValidationError

from daemon.config import QueueConfig
from daemon.context import JobContext
from daemon.engine.outcomes import Outcome, OutcomeKind
from daemon.engine.payloads import cut, encode_capped, payload_too_large
from daemon.engine.registry import Handler, Registry
from daemon.engine.retry import retry_delay
from daemon.errors import PermanentJobError, RetryJob
from daemon.store import queries
from daemon.store.db import DB_ERRORS, as_json_text

log = logging.getLogger("stoker.pool")


@dataclass(slots=True)  # not frozen: a frozen dataclass costs a setattr call per field
class ClaimedJob:
    id: int
    kind: str
    payload: str  # JSON text, parsed by the handler's model in one pass
    meta: str  # JSON text
    attempt: int
    max_attempts: int | None
    run_at: datetime
    started_at: datetime
    # Set when the job starts, by the pool, which looks the handler up once:
    handler: Handler | None = None
    timeout: float = 0.0
    deadlines: Deadlines | None = None
    # Cancelling a running job (stoker.cancel): the pool sets `cancel_requested` (and the
    # context's `cancelled` event), then `interrupted` when it cancels the task after the grace.
    ctx: JobContext | None = None
    cancel_requested: bool = False
    interrupted: bool = False
    lane: int = 0  # which of the pool's completers writes its outcome


class Deadlines:
    """One timer for the jobs of a claim that share a timeout, cancelling those still running
    when it fires. A timer per job cost more than the rest of starting one (uvloop: ~3 us for
    call_at and cancel); the timer is cancelled when the group's last job ends."""

    __slots__ = ("expired", "tasks", "timer")

    def __init__(self) -> None:
        self.tasks: dict[tuple[int, int], asyncio.Task[None]] = {}
        self.expired: set[tuple[int, int]] = set()
        self.timer: asyncio.TimerHandle | None = None

    def __call__(self) -> None:
        for key, task in self.tasks.items():
            self.expired.add(key)
            task.cancel()

    def done(self, key: tuple[int, int]) -> None:
        self.tasks.pop(key, None)
        if not self.tasks and self.timer is not None:
            self.timer.cancel()


def describe_validation_error(kind: str, exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err.get("loc", ())) or "(payload)"
        parts.append(f"{loc}: {err.get('msg')}")
    return f"invalid payload for kind {kind!r}: " + "; ".join(parts)


class JobRunner:
    """One per queue: runs a claimed job's handler and turns how it ended into an Outcome."""

    def __init__(
        self,
        queue: str,
        config: QueueConfig,
        *,
        db: asyncpg.Pool,
        registry: Registry,
        worker_id: str,
        resources: Mapping[type[Any], object],
    ) -> None:
        self.name = queue
        self._resources = resources
        self._config = config
        self._db = db
        self._registry = registry
        self._worker_id = worker_id

    def cancelled(self, job: ClaimedJob, outcome: Outcome | None = None) -> Outcome:
        """A job with a cancel request ends cancelled, however its handler ended (a result
        it returned is kept)."""
        if outcome is not None and outcome.outcome == "cancelled":
            return outcome
        how = "interrupted after cancel_grace" if job.interrupted else "stopped"
        log.info("job %s cancelled (%s)", job.id, how, extra=job_fields(job, self.name))
        result = outcome.result if outcome is not None and outcome.outcome == "succeeded" else None
        return Outcome(job.id, job.attempt, self.name, "cancelled", result=result)

    async def run(self, job: ClaimedJob) -> Outcome:
        """Run the job's handler under its timeout; what became of it, as an Outcome (the
        caller makes that `cancelled` if the job has a cancel request: see `cancelled`)."""
        handler = job.handler
        if handler is None:
            known = ", ".join(self._registry.kinds()) or "none"
            return self.fail(job, f"no handler registered for kind {job.kind!r} (known: {known})")
        max_attempts = job.max_attempts or handler.max_attempts or self._config.max_attempts
        if job.attempt > max_attempts:
            return self.fail(
                job,
                f"gave up: attempt {job.attempt} exceeds max_attempts {max_attempts} "
                "(an earlier attempt's worker was lost mid-run)",
            )
        too_large = payload_too_large(job.payload, self._config.max_payload_bytes)
        if too_large is not None:
            return self.fail(
                job,
                f"payload of {too_large} bytes exceeds max_payload_bytes "
                f"({self._config.max_payload_bytes}) of queue {self.name!r}: not parsed; "
                "keep large data elsewhere and pass a reference, or raise the limit",
            )
        try:
            argument = handler.parse_json(job.payload)
        except ValidationError as exc:
            return self.fail(job, describe_validation_error(job.kind, exc))
        except Exception as exc:
            return self.fail(
                job,
                f"invalid payload for kind {job.kind!r}: {type(exc).__name__}: {exc}",
                current_traceback(),
            )
        ctx = JobContext(
            id=job.id,
            queue=self.name,
            kind=job.kind,
            attempt=job.attempt,
            max_attempts=max_attempts,
            meta={} if job.meta == "{}" else json.loads(job.meta),
            run_at=job.run_at,
            worker=self._worker_id,
            _progress_writer=self._write_progress,
            _db=self._db,
            _resources=self._resources,
        )
        job.ctx = ctx
        if job.cancel_requested:
            ctx.cancelled.set()
        timeout = job.timeout
        deadlines = job.deadlines
        assert deadlines is not None
        try:
            result = await handler.func(ctx, argument)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            expired = (job.id, job.attempt) in deadlines.expired
            ours = int(expired) + int(job.interrupted)
            if not ours or (task and task.cancelling() > ours):
                raise  # cancelled from outside: the shutdown hands the job back
            if job.interrupted:
                return self.cancelled(job)
            error = f"timed out: the handler ran longer than its timeout of {timeout:g}s"
            return self._retry(job, handler, max_attempts, error, None, timed_out=True)
        except RetryJob as exc:
            return self._retry(job, handler, max_attempts, f"retry requested: {exc}", exc.delay)
        except PermanentJobError as exc:
            return self.fail(job, f"{type(exc).__name__}: {exc}", current_traceback())
        except TimeoutError:
            return self._retry(
                job,
                handler,
                max_attempts,
                "TimeoutError raised by handler",
                None,
                current_traceback(),
            )
        except Exception as exc:
            return self._retry(
                job,
                handler,
                max_attempts,
                f"{type(exc).__name__}: {exc}",
                None,
                current_traceback(),
            )
        finally:
            if deadlines.expired and (job.id, job.attempt) in deadlines.expired:
                task = asyncio.current_task()
                if task is not None:
                    task.uncancel()  # ours, and dealt with: later awaits must not see it
            if job.interrupted:
                task = asyncio.current_task()
                if task is not None:
                    task.uncancel()
        if log.isEnabledFor(logging.DEBUG):
            log.debug("job %s succeeded", job.id, extra=job_fields(job, self.name))
        return Outcome(
            job.id,
            job.attempt,
            self.name,
            "succeeded",
            result=self._result(job, handler, result),
        )

    def _result(self, job: ClaimedJob, handler: Handler, result: Any) -> str | None:
        if result is None:
            return None
        limit = handler.max_result_bytes or self._config.max_result_bytes
        try:
            text = encode_capped(result, limit)
        except Exception as exc:
            # Whatever encoding it raised, the work is done: keep it succeeded (running it
            # again would repeat its effects) and say why the result is missing.
            log.warning(
                "job %s: its result cannot be stored as JSON: %s",
                job.id,
                exc,
                extra=job_fields(job, self.name),
            )
            why = cut(f"{type(exc).__name__}: {exc}", 2000)
            return as_json_text({"unrecorded_result": f"not JSON-serialisable: {why}"})
        if text is None:
            note = (
                f"the result is larger than max_result_bytes ({limit}) and was not stored; "
                "return a summary or a reference instead, or raise the limit"
            )
            log.warning("job %s: %s", job.id, note, extra=job_fields(job, self.name))
            return as_json_text({"unrecorded_result": note})
        return text

    def _retry(
        self,
        job: ClaimedJob,
        handler: Handler,
        max_attempts: int,
        error: str,
        delay: float | None,
        tb: str | None = None,
        *,
        timed_out: bool = False,
    ) -> Outcome:
        if job.attempt >= max_attempts:
            error = f"{error} (attempt {job.attempt} of {max_attempts})"
            return self.fail(job, error, tb, timed_out=timed_out)
        delay = retry_delay(self._config.backoff, job.attempt, delay)
        log.warning(
            "job %s attempt %s/%s failed: %s; retrying in %.1fs",
            job.id,
            job.attempt,
            max_attempts,
            error,
            delay,
            extra=job_fields(job, self.name),
        )
        return Outcome(
            job.id,
            job.attempt,
            self.name,
            "retry",
            error=_text(error),
            traceback=_text(tb),
            delay=delay,
            timed_out=timed_out,
        )

    def fail(
        self, job: ClaimedJob, error: str, tb: str | None = None, *, timed_out: bool = False
    ) -> Outcome:
        log.error("job %s failed: %s", job.id, error, extra=job_fields(job, self.name))
        return Outcome(
            job.id,
            job.attempt,
            self.name,
            "failed",
            error=_text(error),
            traceback=_text(tb),
            timed_out=timed_out,
        )

    async def _write_progress(self, job_id: int, attempt: int, progress: str) -> None:
        # Progress is advisory: a database hiccup must not fail the job that reports it.
        try:
            await self._db.execute(queries.PROGRESS, job_id, attempt, progress)
        except DB_ERRORS as exc:
            log.warning(
                "job %s: progress not recorded: %s",
                job_id,
                exc,
                extra={"job_id": job_id, "queue": self.name, "attempt": attempt},
            )


OUTCOME_LABELS: dict[OutcomeKind, str] = {
    "succeeded": "succeeded",
    "retry": "retried",
    "failed": "failed",
    "cancelled": "cancelled",
    "handback": "handed_back",
}


def outcome_label(outcome: Outcome) -> str:
    return "timed_out" if outcome.timed_out else OUTCOME_LABELS[outcome.outcome]


def current_traceback() -> str:
    return traceback.format_exc()


@overload
def _text(value: str) -> str: ...
@overload
def _text(value: None) -> None: ...
def _text(value: str | None) -> str | None:
    """PostgreSQL text cannot hold NUL characters; a huge message is cut."""
    return None if value is None else cut(value).replace("\x00", "\\0")


def job_fields(job: ClaimedJob, queue: str) -> dict[str, Any]:
    return {"job_id": job.id, "queue": queue, "kind": job.kind, "attempt": job.attempt}
