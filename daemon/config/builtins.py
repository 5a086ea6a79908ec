"""The built-in handlers' sections: [email], [sql_tasks], [webhooks]."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, field_validator, model_validator

from daemon.config.models import Seconds, Strict


class SmtpConfig(Strict):
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


class EmailConfig(Strict):
    sender: str = Field("stoker@localhost", description="From: unless a payload sets from_")
    templates: Path = Field(Path("deploy/templates"), description="Jinja2 templates directory")
    outbox: Path = Field(Path(".stoker/outbox"), description=".eml files when no SMTP is set")
    smtp: SmtpConfig | None = None
    max_attachment_bytes: int = Field(5 * 1_048_576, ge=0)
    message_id_domain: str = "stoker.local"


PARAM_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


class SqlTaskConfig(Strict):
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


class WebhookTarget(Strict):
    url: str = Field(pattern=r"^https?://")
    method: Literal["GET", "POST", "PUT", "PATCH", "DELETE"] = "POST"
    headers: dict[str, SecretStr] = Field(
        default_factory=dict, description="e.g. Authorization; from config or env, never payloads"
    )
    timeout: float = Field(30.0, gt=0, le=3600)


class WebhooksConfig(Strict):
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


TASK_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,127}$")
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
ParamValue = str | int | float | bool | None


def task_names(section: str, value: dict[str, Any]) -> dict[str, Any]:
    """Names of [commands], [reports], [file_tasks] entries: lowercase, so that
    STOKER_<SECTION>__<NAME>__... can override them."""
    for name in value:
        if not TASK_NAME.match(name):
            raise ValueError(
                f"{section} name {name!r} is not valid: use lowercase a-z 0-9 _ . - "
                f"(so that STOKER_{section.upper()}__<NAME>__... can override it)"
            )
    return value


def _declared_params(value: dict[str, Any], reserved: tuple[str, ...] = ()) -> dict[str, Any]:
    for name in value:
        if not PARAM_NAME.match(name) or name in reserved:
            raise ValueError(f"parameter name {name!r} is not valid (a-z 0-9 _)")
    return value


class CommandConfig(Strict):
    """A program command.run may start: argv exactly as written, never through a shell. A
    payload names the command and may give values for the declared params only, which the
    program reads as STOKER_PARAM_<NAME> environment variables."""

    argv: list[str] = Field(min_length=1, description="program and its arguments")
    cwd: Path | None = Field(None, description="working directory (default: the daemon's)")
    # Values may be credentials (from ${VAR} references): kept out of any repr.
    env: dict[str, str] = Field(default_factory=dict, repr=False)
    inherit_env: bool = Field(
        False,
        description="pass the daemon's whole environment; by default only PATH, HOME, LANG, "
        "LC_*, TZ, USER, LOGNAME, SHELL and TMPDIR pass, plus env",
    )
    params: dict[str, ParamValue] = Field(default_factory=dict)
    timeout: Seconds = Field(3600.0, gt=0, le=7 * 86_400)
    kill_grace: Seconds = Field(
        10.0, ge=0, le=600, description="seconds between SIGTERM and SIGKILL of the group"
    )
    permanent_exit_codes: list[int] = Field(
        default_factory=list, description="exit codes that fail the job at once (no retry)"
    )
    output_max_bytes: int = Field(
        65_536, ge=256, le=16 * 1_048_576, description="tail of stdout/stderr kept"
    )
    description: str = ""

    @field_validator("argv")
    @classmethod
    def _argv_words(cls, value: list[str]) -> list[str]:
        for index, word in enumerate(value):
            if "\x00" in word or (index == 0 and not word.strip()):
                raise ValueError(f"argv[{index}] {word!r} is not a valid argument")
        return value

    @field_validator("env")
    @classmethod
    def _env_names(cls, value: dict[str, str]) -> dict[str, str]:
        seen: dict[str, str] = {}
        for name in value:
            other = seen.setdefault(name.upper(), name)
            if other != name:
                # An override STOKER_COMMANDS__<NAME>__ENV__X arrives lowercased: it would add
                # a second variable beside the file's instead of replacing it.
                raise ValueError(
                    f"env has both {other} and {name}, which differ only in case (an "
                    "environment override STOKER_COMMANDS__...__ENV__... arrives in lowercase): "
                    f"read the value from the environment in the file instead, e.g. {other} = "
                    f'"${{{other.upper()}}}"'
                )
        for name, text in value.items():
            if not ENV_NAME.match(name):
                raise ValueError(f"environment variable name {name!r} is not valid")
            if "\x00" in text:
                raise ValueError(f"the value of {name} contains a NUL character")
        return value

    @field_validator("params")
    @classmethod
    def _param_names(cls, value: dict[str, Any]) -> dict[str, Any]:
        return _declared_params(value)

    @field_validator("permanent_exit_codes")
    @classmethod
    def _exit_codes(cls, value: list[int]) -> list[int]:
        for code in value:
            if not 1 <= code <= 255:
                raise ValueError(f"exit code {code} is not 1..255 (0 is success)")
        return value


class ReportConfig(Strict):
    """A read-only query sql.report runs, its rows rendered into an email (email.send)."""

    query: str = Field(min_length=1, description=":name parameters as in sql_tasks")
    params: dict[str, ParamValue] = Field(default_factory=dict)
    statement_timeout: Seconds = Field(30.0, gt=0, le=86_400)
    to: list[str] = Field(min_length=1, description="recipients; a string is split on commas")
    subject: str | None = Field(
        None,
        description="a Jinja2 template rendered with the rows' context; default: the email "
        "template's own {% block subject %}",
    )
    template: str = Field("report", pattern=r"^[A-Za-z0-9_.-]+$")
    skip_when_empty: bool = False
    max_rows: int = Field(1000, ge=1, le=100_000, description="rows beyond are left out")
    email_queue: str = Field("default", description="the queue of the email.send job")
    description: str = ""

    @field_validator("to", mode="before")
    @classmethod
    def _split(cls, value: Any) -> Any:
        if isinstance(value, str):  # "${ADMIN_EMAILS}" holding "a@x.com, b@x.com"
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("params")
    @classmethod
    def _param_names(cls, value: dict[str, Any]) -> dict[str, Any]:
        return _declared_params(value)


class FileTaskConfig(Strict):
    """files.cleanup: either sweep `directory` for files older than `older_than`, or delete
    the files a `query` names (columns id and path, relative to `root` or absolute inside
    it) and then their rows with `delete_statement` (its :ids bound to the deleted ids)."""

    directory: Path | None = None
    pattern: str = Field("*", min_length=1, description="glob the file names must match")
    older_than: Seconds | None = Field(None, ge=0, description="by modification time")
    recursive: bool = False
    query: str | None = None
    delete_statement: str | None = None
    root: Path | None = None
    params: dict[str, ParamValue] = Field(default_factory=dict)
    batch_size: int = Field(500, ge=1, le=100_000)
    statement_timeout: Seconds = Field(30.0, gt=0, le=86_400)
    dry_run: bool = Field(False, description="report what would be deleted, delete nothing")
    description: str = ""

    @field_validator("params")
    @classmethod
    def _param_names(cls, value: dict[str, Any]) -> dict[str, Any]:
        return _declared_params(value, reserved=("ids", "after_id", "batch_size"))

    @field_validator("pattern")
    @classmethod
    def _name_pattern(cls, value: str) -> str:
        if "/" in value or "\x00" in value:
            raise ValueError(
                f"pattern {value!r} is matched against file names, so it cannot contain / "
                "(use recursive = true for subdirectories)"
            )
        return value

    @model_validator(mode="after")
    def _one_kind(self) -> FileTaskConfig:
        for field in ("directory", "root"):
            # Relative would mean "from wherever the daemon was started", and an empty
            # "${UPLOADS_DIR:-}" would be "." itself: what is deleted must not drift.
            # Nor may it be / spelled another way ("/tmp/..", "//"): every file would be inside.
            place: Path | None = getattr(self, field)
            if place is None:
                continue
            if not place.is_absolute():
                raise ValueError(
                    f"{field} {str(place)!r} must be an absolute path below the filesystem "
                    "root, e.g. /var/lib/app/uploads"
                )
            if os.path.normpath(place).strip("/") == "":
                raise ValueError(
                    f"{field} {str(place)!r} is the filesystem root (/); it must be a path "
                    "below the filesystem root, e.g. /var/lib/app/uploads"
                )
            if ".." in place.parts:
                raise ValueError(
                    f"{field} {str(place)!r} has a .. component: write the path without .., "
                    "e.g. /var/lib/app/uploads rather than /var/lib/app/cache/../uploads"
                )
        if (self.directory is None) == (self.query is None):
            raise ValueError(
                "give either directory (a sweep of old files) or query (files named by rows), "
                "not both and not neither"
            )
        if self.directory is not None:
            if self.older_than is None:
                raise ValueError('a directory sweep needs older_than, e.g. "24h"')
            stray = [f for f in ("delete_statement", "root") if getattr(self, f) is not None]
            if stray:
                raise ValueError(f"{', '.join(stray)}: only for a query cleanup")
        else:
            given = {"older_than", "pattern", "recursive"} & self.model_fields_set
            if given:
                raise ValueError(f"{', '.join(sorted(given))}: only for a directory sweep")
            if self.delete_statement is None or self.root is None:
                raise ValueError("a query cleanup needs delete_statement and root")
            if ":ids" not in self.delete_statement:
                raise ValueError("delete_statement must use :ids (the ids whose files are gone)")
        return self
