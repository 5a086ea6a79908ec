"""Configuration: TOML files plus environment overrides, validated by pydantic.

Precedence, highest first: environment (`DATABASE_URL`, `STOKER_...`, `__` for nesting, e.g.
`STOKER_QUEUES__DEFAULT__CONCURRENCY=20`), then the TOML files (a later one overriding an
earlier one key by key), then the defaults of the models.
"""

from daemon.config.builtins import (
    CommandConfig,
    EmailConfig,
    FileTaskConfig,
    ReportConfig,
    SmtpConfig,
    SqlTaskConfig,
    WebhooksConfig,
    WebhookTarget,
)
from daemon.config.files import default_config_paths, load_settings
from daemon.config.models import (
    QUEUE_NAME,
    SCHEDULE_NAME,
    BackoffConfig,
    HttpConfig,
    QueueConfig,
    ScheduleConfig,
)
from daemon.config.settings import Settings, check_dsn, default_worker_id, handler_config
from daemon.errors import ConfigError

__all__ = [
    "QUEUE_NAME",
    "SCHEDULE_NAME",
    "BackoffConfig",
    "CommandConfig",
    "ConfigError",
    "EmailConfig",
    "FileTaskConfig",
    "HttpConfig",
    "QueueConfig",
    "ReportConfig",
    "ScheduleConfig",
    "Settings",
    "SmtpConfig",
    "SqlTaskConfig",
    "WebhookTarget",
    "WebhooksConfig",
    "check_dsn",
    "default_config_paths",
    "default_worker_id",
    "handler_config",
    "load_settings",
]
