"""Reading the configuration files: TOML, validated into Settings, errors made readable."""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from pydantic_settings import SettingsError

from daemon.config.layers import Layers, Origin, resolve_references
from daemon.config.settings import Settings
from daemon.errors import ConfigError

INSTALLED_CONFIG = Path("/etc/stoker/stoker.toml")
REPO_CONFIG = Path("deploy/stoker.toml")


# Keys whose values are never echoed in an error: they may hold credentials.
SECRET_WORDS = ("url", "dsn", "password", "token", "secret", "env", "headers")


def _origin(parts: tuple[Any, ...], file_origin: Origin) -> str:
    """Where a bad value came from: the environment variable that set it, else the file."""
    names = ["STOKER_" + "__".join(str(p) for p in parts).upper()]
    if parts and parts[0] == "database_url":
        names.insert(0, "DATABASE_URL")
    for name in names:
        if name in os.environ:
            return f"environment {name}"
    return file_origin(parts)


def _describe(error: dict[str, Any], file_origin: Origin) -> str:
    parts = tuple(error.get("loc", ()))
    loc = ".".join(str(part) for part in parts) or "(top level)"
    source = _origin(parts, file_origin)
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


def default_config_paths() -> list[Path]:
    """STOKER_CONFIG (several files separated by ':'), else /etc/stoker/stoker.toml when
    installed, else the repository's example."""
    env = os.environ.get("STOKER_CONFIG")
    if env:
        return [Path(part) for part in env.split(os.pathsep) if part.strip()]
    for candidate in (INSTALLED_CONFIG, REPO_CONFIG):
        if candidate.exists():
            return [candidate]
    return []


def read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(
            f"{path}: configuration file not found (pass --config PATH or set STOKER_CONFIG)"
        ) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None


def load_settings(paths: Path | list[Path] | None, **overrides: Any) -> Settings:
    """Read, layer, resolve and validate the configuration files (a later file overrides an
    earlier one key by key); any problem becomes one ConfigError."""
    files = [] if paths is None else [paths] if isinstance(paths, Path) else list(paths)
    layers = Layers([(str(path), read_toml(path)) for path in files])
    data = resolve_references(layers.merged, layers.origin)
    try:
        settings = Settings(**data)
    except ValidationError as exc:
        lines = [_describe(dict(err), layers.origin) for err in exc.errors()]
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
            f"{layers.origin(('database_url',))}: database_url is not set: set DATABASE_URL "
            "in the environment or database_url in the configuration file"
        )
    return settings
