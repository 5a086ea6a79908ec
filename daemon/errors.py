"""The one small error hierarchy of Stoker."""

from __future__ import annotations


class StokerError(Exception):
    """Base of every error Stoker raises on purpose."""


class ConfigError(StokerError):
    """Bad configuration: the message names the file, the key and the fix."""


class MigrationError(StokerError):
    """The database schema cannot be brought up to date safely."""


class JobError(StokerError):
    """Raised by handlers to steer what happens to their job."""


class PermanentJobError(JobError):
    """Fail the job now: retrying cannot help (bad input, a 5xx that will not change)."""


# Longest retry delay (a year): beyond it timestamps overflow, and nobody means it.
MAX_RETRY_DELAY = 365 * 86_400.0


class RetryJob(JobError):
    """Try the job again after `delay` seconds (default: the queue's backoff)."""

    def __init__(self, message: str = "retry requested", *, delay: float | None = None) -> None:
        super().__init__(message)
        if delay is not None and not 0 <= delay <= MAX_RETRY_DELAY:  # also refuses NaN
            raise ValueError("RetryJob delay must be between 0 seconds and a year")
        self.delay = delay
