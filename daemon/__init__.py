"""Stoker: a background-job daemon for PostgreSQL.

The public API for applications and handler modules::

    from daemon import handler, JobContext, RetryJob, PermanentJobError, enqueue
    from daemon import resource, handler_config  # a handler's resources and its [handlers.X]
"""

from __future__ import annotations

from daemon.config import Settings, handler_config
from daemon.context import JobContext
from daemon.cron.schedules import delete_schedule, save_schedule
from daemon.engine.registry import REGISTRY, handler, on_shutdown, on_startup, resource
from daemon.enqueue import Job, enqueue, enqueue_many
from daemon.errors import ConfigError, PermanentJobError, RetryJob, StokerError

__all__ = [
    "REGISTRY",
    "ConfigError",
    "Job",
    "JobContext",
    "PermanentJobError",
    "RetryJob",
    "Settings",
    "StokerError",
    "delete_schedule",
    "enqueue",
    "enqueue_many",
    "handler",
    "handler_config",
    "on_shutdown",
    "on_startup",
    "resource",
    "save_schedule",
]
