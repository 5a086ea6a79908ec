"""Backoff policy: exponential with jitter, capped."""

from __future__ import annotations

import random

from daemon.config import BackoffConfig


def backoff_delay(policy: BackoffConfig, attempt: int, rng: random.Random | None = None) -> float:
    """Seconds to wait after failed attempt number `attempt` (1-based).

    base * 2**(attempt-1), capped at `cap`, then spread by +/- `jitter` (a fraction) so that
    jobs that failed together do not all come back together.
    """
    exponent = min(max(attempt - 1, 0), 62)
    delay = min(policy.cap, policy.base * (2.0**exponent))
    spread = (rng or random).uniform(-policy.jitter, policy.jitter)
    return max(0.0, delay * (1.0 + spread))
