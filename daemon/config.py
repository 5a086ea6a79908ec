"""Configuration: a TOML file plus environment overrides, validated by pydantic.

Precedence, highest first: environment (`DATABASE_URL`, `STOKER_...`, `__` for nesting, e.g.
`STOKER_QUEUES__DEFAULT__CONCURRENCY=20`), then the TOML file, then the defaults below.
"""

from __future__ import annotations

import json
import os
import re
import socket
import tomllib
import uuid
from pathlib import Path
from typing import Any, Literal, TypeVar
from urllib.parse import urlsplit

from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
)

from daemon.cron.cronspec import CronSpec
from daemon.errors import ConfigError

QUEUE_NAME = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")
MODULE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
INSTALLED_CONFIG = Path("/etc/stoker/stoker.toml")
REPO_CONFIG = Path("deploy/stoker.toml")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class BackoffConfig(_Strict):
    """Exponential backoff between attempts: base * 2**(attempt-1), capped, +/- jitter."""

    base: float = Field(1.0, gt=0, description="seconds after the first failure")
    cap: float = Field(600.0, gt=0, le=30 * 86_400, description="longest wait in seconds")
    jitter: float = Field(0.2, ge=0, le=1, description="fraction of spread, 0..1")


class QueueConfig(_Strict):
    concurrency: int = Field(10, ge=1, le=10_000)
    batch_size: int = Field(100, ge=1, le=10_000)
    timeout: float = Field(300.0, gt=0, description="default handler timeout, seconds")
    max_attempts: int = Field(5, ge=1, le=1000)
    backoff: BackoffConfig = Field(default_factory=BackoffConfig)
    poll_interval: float = Field(2.0, gt=0, le=3600)
    max_payload_bytes: int = Field(
        16 * 1_048_576,
        ge=1024,
        le=512 * 1_048_576,
        description="a larger payload fails its job at once, before it is parsed",
    )
    max_result_bytes: int = Field(
        1_048_576,
        ge=64,
        le=256 * 1_048_576,
        description="a larger result is not stored; the job still succeeds, with a note",
    )


SCHEDULE_NAME = re.compile(r"^[a-z0-9][a-z0-9_.:-]{0,127}$")


class ScheduleConfig(_Strict):
    """One cron schedule: every tick enqueues a job of `kind` on `queue`."""

    cron: str = Field(description="5 fields, or 6 with seconds first")
    timezone: str = "UTC"
    kind: str = Field(min_length=1, max_length=200)
    queue: str = "default"
    payload: dict[str, Any] = Field(default_factory=dict)
    meta: dict[str, Any] = Field(default_factory=dict)
    enabled: bool = True
    catch_up: Literal["skip", "latest", "all"] = "latest"
    max_catch_up: int = Field(10, ge=1, le=1000)
    skip_grace: float = Field(
        60.0, ge=0, description='catch_up = "skip": seconds late a tick may still fire'
    )
    overlap: Literal["skip", "allow"] = "skip"
    description: str = ""

    @model_validator(mode="after")
    def _valid_cron(self) -> ScheduleConfig:
        CronSpec(self.cron, self.timezone)  # raises ValueError naming the expression or zone
        for field in ("payload", "meta"):
            try:
                json.dumps(getattr(self, field), allow_nan=False)
            except ValueError as exc:
                raise ValueError(f"{field} is not valid JSON for PostgreSQL: {exc}") from None
        if not QUEUE_NAME.match(self.queue):
            raise ValueError(f"queue {self.queue!r} is not a valid queue name")
        return self


class HttpConfig(_Strict):
    """The daemon's HTTP server: /health, /ready, /metrics and the admin API."""

    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    # A secret type, so that repr, model_dump and logs never show it; read it as admin_token.
    admin_token_secret: SecretStr | None = Field(
        None,
        alias="admin_token",
        description="bearer token for /api/v1, 16 characters or more; the admin API is off without",
    )

    @field_validator("admin_token_secret")
    @classmethod
    def _long_token(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value()) < 16:
            raise ValueError("must be at least 16 characters (e.g. from `openssl rand -hex 32`)")
        return value

    @property
    def admin_token(self) -> str | None:
        secret = self.admin_token_secret
        return None if secret is None else secret.get_secret_value()

    max_body_bytes: int = Field(1_048_576, ge=1024, le=64 * 1_048_576)
    loop_lag_threshold: float = Field(5.0, gt=0, description="seconds blocked before /health fails")
    depth_sample_interval: float = Field(5.0, gt=0, description="queue depth sampling, seconds")
    max_requests_per_second: float = Field(
        100.0,
        gt=0,
        description="admin API requests beyond this wait their turn (probes never do)",
    )
    max_queued_requests: int = Field(
        100,
        ge=0,
        le=100_000,
        description="admin API requests that may wait their turn; beyond, 429 with Retry-After",
    )


class SmtpConfig(_Strict):
    """Where email.send delivers. Without it, messages go to the outbox directory as files."""

    host: str
    port: int = Field(587, ge=1, le=65535)
    username: str | None = None
    password: SecretStr | None = None
    tls: bool = Field(False, description="implicit TLS (usually port 465)")
    starttls: bool = Field(True, description="upgrade with STARTTLS when the server offers it")
    timeout: float = Field(30.0, gt=0)
    validate_certs: bool = True
    ca_file: Path | None = Field(None, description="trust this CA (e.g. a self-signed server)")


class EmailConfig(_Strict):
    sender: str = Field("stoker@localhost", description="From: unless a payload sets from_")
    templates: Path = Field(Path("deploy/templates"), description="Jinja2 templates directory")
    outbox: Path = Field(Path(".stoker/outbox"), description=".eml files when no SMTP is set")
    smtp: SmtpConfig | None = None
    max_attachment_bytes: int = Field(5 * 1_048_576, ge=0)
    message_id_domain: str = "stoker.local"


PARAM_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


class SqlTaskConfig(_Strict):
    """A maintenance statement sql.batch runs `batch_size` rows at a time until done. The
    statement comes only from here, never from a job payload; `:name` placeholders are bound
    as values (`:batch_size` always exists), and payloads may override declared params only."""

    statement: str = Field(min_length=1)
    batch_size: int = Field(1000, ge=1, le=1_000_000)
    params: dict[str, str | int | float | bool | None] = Field(default_factory=dict)
    pause: float = Field(0.1, ge=0, le=3600, description="seconds between batches")
    max_batches: int | None = Field(None, ge=1)
    statement_timeout: float = Field(30.0, gt=0)
    lock_timeout: float = Field(5.0, gt=0)
    database_url: str | None = Field(
        None, repr=False, description="another database; default: Stoker's"
    )
    description: str = ""

    @field_validator("params")
    @classmethod
    def _param_names(cls, value: dict[str, Any]) -> dict[str, Any]:
        for name in value:
            if not PARAM_NAME.match(name) or name == "batch_size":
                raise ValueError(f"parameter name {name!r} is not valid (a-z 0-9 _)")
        return value


class WebhookTarget(_Strict):
    url: str = Field(pattern=r"^https?://")
    method: Literal["GET", "POST", "PUT", "PATCH", "DELETE"] = "POST"
    headers: dict[str, SecretStr] = Field(
        default_factory=dict, description="e.g. Authorization; from config or env, never payloads"
    )
    timeout: float = Field(30.0, gt=0, le=3600)


class WebhooksConfig(_Strict):
    """http.request: named targets, and the hosts and ports a payload URL may point at."""

    # A target's URL may be its credential (chat webhooks): kept out of any repr of Settings.
    targets: dict[str, WebhookTarget] = Field(default_factory=dict, repr=False)
    allowed_hosts: list[str] = Field(
        default_factory=list,
        description='"host" (its ports 80 and 443 only) or "host:port", "[v6 address]:port"',
    )
    allow_private_addresses: bool = Field(
        False,
        description="let payload URLs reach loopback, private, link-local... addresses "
        "(configured targets always may)",
    )
    timeout: float = Field(30.0, gt=0, le=3600)
    max_result_bytes: int = Field(4096, ge=0, le=1_048_576)

    @field_validator("allowed_hosts")
    @classmethod
    def _hosts_and_ports(cls, value: list[str]) -> list[str]:
        return [cls.allowed_entry(entry) for entry in value]

    @classmethod
    def allowed_entry(cls, entry: str) -> str:
        """The canonical spelling of an allowed_hosts entry: host or host:port, lowercase,
        IPv6 addresses compressed and in brackets."""
        text = entry.strip()
        bracketed = re.fullmatch(r"\[([^\]]+)\](?::(.*))?", text)
        if bracketed:
            host, port = bracketed[1], bracketed[2]
        elif text.count(":") > 1:  # a bare IPv6 address: no port possible
            host, port = text, None
        else:
            host, colon, port = text.partition(":")
            port = port if colon else None
        key = cls.host_key(host)
        number = int(port) if port is not None and re.fullmatch(r"[0-9]{1,5}", port) else None
        if key is None or (port is not None and not 1 <= (number or 0) <= 65535):
            raise ValueError(
                f'{entry!r} is not "host" (ports 80 and 443) or "host:port": write e.g. '
                '"hooks.example.com", "hooks.example.com:8443" or "[2001:db8::1]:8443", '
                "without scheme or path"
            )
        return key if number is None else f"{key}:{number}"

    @staticmethod
    def host_key(host: str) -> str | None:
        """How a host is compared: lowercase, no trailing dot, IPv6 compressed in brackets;
        None when it is no host name or address at all."""
        import ipaddress

        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            try:  # an international name is compared in the ASCII form it is sent in
                name = host.lower().rstrip(".").encode("idna").decode("ascii")
            except UnicodeError:
                return None
            label = r"[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?"
            return name if re.fullmatch(rf"{label}(\.{label})*", name) else None
        return f"[{address.compressed}]" if address.version == 6 else address.compressed


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
    queues: dict[str, QueueConfig] = Field(default_factory=lambda: {"default": QueueConfig()})
    schedules: dict[str, ScheduleConfig] = Field(default_factory=dict)
    http: HttpConfig = Field(default_factory=HttpConfig)
    email: EmailConfig = Field(default_factory=EmailConfig)
    sql_tasks: dict[str, SqlTaskConfig] = Field(default_factory=dict)
    webhooks: WebhooksConfig = Field(default_factory=WebhooksConfig)
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


def check_dsn(dsn: str) -> None:
    """A PostgreSQL URL asyncpg can use: postgresql://user:pass@host:port/database."""
    parts = urlsplit(dsn)
    if parts.scheme not in ("postgresql", "postgres"):
        raise ValueError("must be a URL like postgresql://user:password@host:5432/database")
    try:
        parts.port  # noqa: B018 - parsing the port is the check
    except ValueError:
        raise ValueError("has a port that is not a number") from None


def default_config_path() -> Path | None:
    """STOKER_CONFIG, else /etc/stoker/stoker.toml when installed, else the repo example."""
    env = os.environ.get("STOKER_CONFIG")
    if env:
        return Path(env)
    for candidate in (INSTALLED_CONFIG, REPO_CONFIG):
        if candidate.exists():
            return candidate
    return None


SECRET_WORDS = ("url", "dsn", "password", "token", "secret")


def _origin(parts: tuple[Any, ...], source: str) -> str:
    """Where a bad value came from: the environment variable that set it, else the file."""
    names = ["STOKER_" + "__".join(str(p) for p in parts).upper()]
    if parts and parts[0] == "database_url":
        names.insert(0, "DATABASE_URL")
    for name in names:
        if name in os.environ:
            return f"environment {name}"
    return source


def _describe(error: dict[str, Any], source: str) -> str:
    parts = tuple(error.get("loc", ()))
    loc = ".".join(str(part) for part in parts) or "(top level)"
    source = _origin(parts, source)
    kind = error.get("type", "")
    if kind == "extra_forbidden":
        return f"{source}: {loc}: unknown key (check its spelling and section)"
    if kind == "missing":
        return f"{source}: {loc}: required but not set"
    message = str(error.get("msg", "invalid value"))
    got = error.get("input")
    secret = any(word in loc.lower() for word in SECRET_WORDS)
    shown = "" if secret or isinstance(got, dict | list) else f" (got {got!r})"
    return f"{source}: {loc}: {message}{shown}"


def load_settings(path: Path | None, **overrides: Any) -> Settings:
    """Read and validate the configuration; any problem becomes one ConfigError."""
    data: dict[str, Any] = {}
    source = str(path) if path else "environment"
    if path is not None:
        try:
            with path.open("rb") as fh:
                data = tomllib.load(fh)
        except FileNotFoundError as exc:
            raise ConfigError(
                f"{path}: configuration file not found (pass --config PATH or set STOKER_CONFIG)"
            ) from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read: {exc.strerror}") from exc
    try:
        settings = Settings(**data)
    except ValidationError as exc:
        lines = [_describe(dict(err), source) for err in exc.errors()]
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(lines)) from None
    except SettingsError as exc:
        # A STOKER_ variable that should hold JSON (a list or table) does not.
        cause = f": {exc.__cause__}" if exc.__cause__ else ""
        raise ConfigError(
            f"environment: {exc}{cause} (lists and tables are given as JSON, e.g. "
            "STOKER_HANDLER_MODULES='[\"myapp.jobs\"]')"
        ) from None
    if overrides:  # command-line flags win over file and environment
        settings = settings.model_copy(update=overrides)
    if not settings.database_url:
        raise ConfigError(
            f"{source}: database_url is not set: set DATABASE_URL in the environment "
            "or database_url in the configuration file"
        )
    return settings


__all__ = [
    "BackoffConfig",
    "ConfigError",
    "QueueConfig",
    "Settings",
    "default_config_path",
    "load_settings",
]
