"""How long a failed job waits before its next attempt: the delay its handler asked for
(RetryJob(delay=...)), else the queue's backoff, exponential with jitter; never over a year."""

from __future__ import annotations

import random

from daemon.config import BackoffConfig
from daemon.errors import MAX_RETRY_DELAY


def retry_delay(policy: BackoffConfig, attempt: int, requested: float | None) -> float:
    """Seconds until the next attempt after failed attempt number `attempt` (1-based)."""
    delay = backoff_delay(policy, attempt) if requested is None else requested
    return min(delay, MAX_RETRY_DELAY)


def backoff_delay(policy: BackoffConfig, attempt: int, rng: random.Random | None = None) -> float:
    """Seconds to wait after failed attempt number `attempt` (1-based).

    base * 2**(attempt-1), capped at `cap`, then spread by +/- `jitter` (a fraction) so that
    jobs that failed together do not all come back together.
    """
    exponent = min(max(attempt - 1, 0), 62)
    delay = min(policy.cap, policy.base * (2.0**exponent))
    spread = (rng or random).uniform(-policy.jitter, policy.jitter)
    return max(0.0, delay * (1.0 + spread))
