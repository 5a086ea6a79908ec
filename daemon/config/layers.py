"""Several configuration files as one: later files override earlier ones key by key, and
`${VAR}` / `${VAR:-default}` in any string value is read from the environment at start."""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from typing import Any

from daemon.errors import ConfigError

# Where a key path was set: the name of the last file that has it.
Origin = Callable[[tuple[Any, ...]], str]

# ${NAME} or ${NAME:-default}; $${ is a literal "${". The default may hold no "}".
REFERENCE = re.compile(r"\$(\$)?\{([^}]*)\}")
VARIABLE = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)(?::-(.*))?$", re.DOTALL)


# A job's payload and meta are one value each, the argument of a handler: a later file that
# sets one replaces it whole (merging two payloads would make a third nobody wrote).
WHOLE_VALUES = frozenset({"payload", "meta"})


class Layers:
    """Files in the order given; tables merge key by key, anything else (a string, a number,
    a list, a payload or meta table) is replaced whole by the later file's value."""

    def __init__(self, files: list[tuple[str, dict[str, Any]]]) -> None:
        self.files = files
        self.merged: dict[str, Any] = {}
        for _, data in files:
            self.merged = merge(self.merged, data)

    def origin(self, parts: tuple[Any, ...]) -> str:
        for name, data in reversed(self.files):
            if _has(data, parts):
                return str(name)
        if not self.files:
            return "environment"
        return self.files[-1][0] if len(self.files) == 1 else " + ".join(n for n, _ in self.files)


def merge(base: Mapping[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        below = out.get(key)
        if isinstance(below, Mapping) and isinstance(value, Mapping) and key not in WHOLE_VALUES:
            out[key] = merge(below, value)
        else:
            out[key] = value
    return out


def _has(data: Any, parts: tuple[Any, ...]) -> bool:
    for part in parts:
        if (isinstance(data, Mapping) and part in data) or (
            isinstance(data, list) and isinstance(part, int) and 0 <= part < len(data)
        ):
            data = data[part]
        else:
            return False
    return True


def resolve_references(
    data: dict[str, Any], origin: Origin, environ: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """Every string value with `${VAR}` references, resolved; one ConfigError naming each
    variable that is unset without a default, and the key that uses it."""
    env = os.environ if environ is None else environ
    problems: list[str] = []

    def text(value: str, path: tuple[Any, ...]) -> str:
        def one(match: re.Match[str]) -> str:
            if match[1]:  # $${...}: written out as it is, less the escaping $
                return match[0][1:]
            reference = VARIABLE.match(match[2])
            key = ".".join(str(p) for p in path)
            if reference is None:
                problems.append(
                    f"{origin(path)}: {key}: ${{{match[2]}}} is not a variable reference: "
                    "write ${NAME} or ${NAME:-default} (NAME of A-Z a-z 0-9 _), or $${ for "
                    "a literal ${"
                )
                return match[0]
            name, default = reference[1], reference[2]
            if default is not None and "${" in default:
                problems.append(
                    f"{origin(path)}: {key}: a reference inside a default (${{{name}:-${{...}}}}) "
                    f"is not supported: write the default out, or set {name}"
                )
                return match[0]
            if name in env:
                return env[name]
            if default is not None:
                return default
            problems.append(
                f"{origin(path)}: {key}: environment variable {name} is not set and has no "
                f"default: set it, or write ${{{name}:-default}}"
            )
            return match[0]

        return REFERENCE.sub(one, value) if "${" in value else value

    def walk(value: Any, path: tuple[Any, ...]) -> Any:
        if isinstance(value, str):
            return text(value, path)
        if isinstance(value, Mapping):
            return {k: walk(v, (*path, k)) for k, v in value.items()}
        if isinstance(value, list):
            return [walk(v, (*path, i)) for i, v in enumerate(value)]
        return value

    resolved: dict[str, Any] = walk(data, ())
    if problems:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(problems))
    return resolved
