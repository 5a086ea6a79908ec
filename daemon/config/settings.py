"""Settings: the whole configuration, validated by pydantic (environment over file)."""

from __future__ import annotations

import os
import re
import socket
import uuid
from typing import Any, Literal, TypeVar
from urllib.parse import parse_qs, urlsplit

from pydantic import (
    AliasChoices,
    BaseModel,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
)
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from daemon.config.alerts import AlertsConfig
from daemon.config.builtins import (
    CommandConfig,
    EmailConfig,
    FileTaskConfig,
    ReportConfig,
    SqlTaskConfig,
    WebhooksConfig,
    task_names,
)
from daemon.config.models import (
    QUEUE_NAME,
    SCHEDULE_NAME,
    HttpConfig,
    QueueConfig,
    ScheduleConfig,
    Seconds,
)
from daemon.errors import ConfigError

MODULE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


def default_worker_id() -> str:
    """Per process and unique even when hosts share a name: host, pid and a random nonce."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="STOKER_",
        env_nested_delimiter="__",
        extra="forbid",
        populate_by_name=True,
    )

    # Secret types, so that repr, model_dump and logs never show a password; the engine reads
    # the plain DSNs through the database_url and listen_dsn properties below.
    database_url_secret: SecretStr = Field(
        SecretStr(""),
        validation_alias=AliasChoices("database_url", "DATABASE_URL", "STOKER_DATABASE_URL"),
    )
    listen_dsn_secret: SecretStr | None = Field(
        None,
        validation_alias=AliasChoices("listen_dsn", "STOKER_LISTEN_DSN"),
        description="direct (session) connection for LISTEN when database_url is a pooler",
    )
    poll_only: bool = False
    statement_cache_size: int = Field(100, ge=0, description="0 behind pgbouncer (transaction)")
    db_pool_size: int = Field(10, ge=2, le=500)
    worker_id: str = Field(default_factory=default_worker_id, min_length=1, max_length=200)
    handler_modules: list[str] = Field(default_factory=list)
    # Django's settings module (stoker[django]): Django is set up before handler_modules are
    # imported, and the daemon runs the django.tasks enqueued through StokerBackend.
    django_settings: str | None = None
    queues: dict[str, QueueConfig] = Field(default_factory=lambda: {"default": QueueConfig()})
    schedules: dict[str, ScheduleConfig] = Field(default_factory=dict)
    http: HttpConfig = Field(default_factory=HttpConfig)
    email: EmailConfig = Field(default_factory=EmailConfig)
    sql_tasks: dict[str, SqlTaskConfig] = Field(default_factory=dict)
    webhooks: WebhooksConfig = Field(default_factory=WebhooksConfig)
    commands: dict[str, CommandConfig] = Field(default_factory=dict)
    reports: dict[str, ReportConfig] = Field(default_factory=dict)
    file_tasks: dict[str, FileTaskConfig] = Field(default_factory=dict)
    alerts: AlertsConfig = Field(default_factory=AlertsConfig)
    ledger_retention_days: float = Field(
        90.0, gt=0, description="the run ledger keeps every schedule's runs this long"
    )
    # [handlers.NAME]: your own handlers' settings, each validated by the model its resource
    # factory declares (daemon.handler_config) when the daemon starts.
    handlers: dict[str, dict[str, Any]] = Field(default_factory=dict)
    leader_retry: float = Field(
        5.0, gt=0, le=600, description="seconds between non-leaders' tries for the leader lock"
    )
    lease_seconds: float = Field(30.0, ge=1, le=86_400)
    rescue_interval: float = Field(5.0, gt=0, le=3600)
    listener_probe_interval: float = Field(10.0, gt=0, le=3600)
    shutdown_timeout: float = Field(25.0, ge=0, le=86_400)
    cancel_grace: Seconds = Field(
        5.0,
        ge=0,
        le=86_400,
        description="seconds a cancelled running job may take to stop before its task is "
        "cancelled (a queue's own cancel_grace overrides it)",
    )
    flush_interval: float = Field(0.002, ge=0, le=1, description="outcome batching window, s")
    flush_max: int = Field(1000, ge=1, le=100_000)
    history_retention_days: float = Field(7.0, gt=0)
    vacuum_after_claims: int = Field(
        10_000, ge=0, description="VACUUM stoker.jobs after this many claims (0: autovacuum only)"
    )
    migrate_on_start: bool = True
    run_scheduler: bool = Field(True, description="take part in leader election and fire cron")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["auto", "json", "text"] = "auto"

    @field_validator("queues")
    @classmethod
    def _queue_names(cls, value: dict[str, QueueConfig]) -> dict[str, QueueConfig]:
        for name in value:
            if not QUEUE_NAME.match(name):
                raise ValueError(
                    f"queue name {name!r} is not valid: use 1-128 of A-Z a-z 0-9 _ . : -"
                )
        if not value:
            raise ValueError("at least one queue is needed, e.g. [queues.default]")
        return value

    @field_validator("schedules")
    @classmethod
    def _schedule_names(cls, value: dict[str, ScheduleConfig]) -> dict[str, ScheduleConfig]:
        for name in value:
            if not SCHEDULE_NAME.match(name):
                raise ValueError(
                    f"schedule name {name!r} is not valid: use lowercase a-z 0-9 _ . : - "
                    "(lowercase, so that STOKER_SCHEDULES__<NAME>__ENABLED can override it)"
                )
        return value

    @field_validator("commands", "reports", "file_tasks", "sql_tasks")
    @classmethod
    def _task_names(cls, value: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        return task_names(str(info.field_name), value)

    @field_validator("database_url_secret", "listen_dsn_secret")
    @classmethod
    def _dsn(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and value.get_secret_value():
            check_dsn(value.get_secret_value())
        return value

    @property
    def database_url(self) -> str:
        """The DSN as asyncpg needs it; anything shown to people goes through db.redact."""
        return self.database_url_secret.get_secret_value()

    @property
    def listen_dsn(self) -> str | None:
        secret = self.listen_dsn_secret
        return None if secret is None else secret.get_secret_value()

    @field_validator("handler_modules")
    @classmethod
    def _module_names(cls, value: list[str]) -> list[str]:
        for name in value:
            if not MODULE_NAME.match(name):
                raise ValueError(f"{name!r} is not a Python module path like 'myapp.jobs'")
        return value

    @field_validator("django_settings")
    @classmethod
    def _django_settings(cls, value: str | None) -> str | None:
        if value is not None and not MODULE_NAME.match(value):
            raise ValueError(f"{value!r} is not a Python module path like 'mysite.settings'")
        return value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The TOML file arrives through init kwargs (see load_settings) but must rank *below*
        # the environment, so it is re-ordered here.
        return env_settings, init_settings


M = TypeVar("M", bound=BaseModel)


def handler_config(settings: Settings, name: str, model: type[M]) -> M:
    """The [handlers.NAME] section of the configuration, validated by `model` (an absent
    section is the model's defaults); a bad value stops the daemon, naming the key."""
    try:
        return model.model_validate(settings.handlers.get(name, {}))
    except ValidationError as exc:
        problems = "; ".join(
            f"handlers.{name}.{'.'.join(str(p) for p in e['loc']) or '(section)'}: {e['msg']}"
            for e in exc.errors()
        )
        raise ConfigError(f"invalid configuration: {problems}") from None


# asyncpg's values (libpq has the same ones).
SESSION_ATTRS = ("any", "primary", "standby", "prefer-standby", "read-write", "read-only")


def check_dsn(dsn: str) -> None:
    """A PostgreSQL URL asyncpg can use: postgresql://user:pass@host:port/database, or with
    several hosts for failover, postgresql://user:pass@h1:p1,h2:p2/db?target_session_attrs=...

    The messages never quote the URL: a password with a raw @ or / in it ends the userinfo
    early, and the rest of it would then be read as a host or a port."""
    parts = urlsplit(dsn)
    if parts.scheme not in ("postgresql", "postgres"):
        raise ValueError("must be a URL like postgresql://user:password@host:5432/database")
    hosts = parts.netloc.rpartition("@")[2]
    entries = hosts.split(",") if hosts else []
    for number, entry in enumerate(entries, 1):
        where = f" (host {number} of {len(entries)})" if len(entries) > 1 else ""
        if entry.startswith("["):
            address, bracket, port = entry[1:].partition("]")
            if not bracket or not address or (port and not port.startswith(":")):
                raise ValueError(f"has an IPv6 address that is not in [brackets]{where}")
            port = port[1:]
        else:
            address, _, port = entry.partition(":")
        if not address and len(entries) > 1:
            raise ValueError(f"has an empty host name in its list of hosts{where}")
        if port and not _is_port(port):
            raise ValueError(
                f"has a port that is not a number from 1 to 65535{where}; several hosts are "
                "written postgresql://user:password@host1:5432,host2:5432/database"
            )
    query = parse_qs(parts.query, keep_blank_values=True)
    for port in ",".join(query.get("port", [])).split(",") if "port" in query else []:
        if port and not _is_port(port):
            raise ValueError("has a port parameter that is not a number from 1 to 65535")
    for attrs in query.get("target_session_attrs", []):
        if attrs not in SESSION_ATTRS:
            raise ValueError(
                "has a target_session_attrs that asyncpg does not know: use one of "
                + ", ".join(SESSION_ATTRS)
                + " (read-write for a primary that may fail over)"
            )


def _is_port(text: str) -> bool:
    return text.isascii() and text.isdigit() and 1 <= int(text) <= 65535
