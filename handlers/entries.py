"""What a payload may name: one configured entry ([sql_tasks], [commands], [reports],
[file_tasks]) and values for the parameters that entry declares — nothing else."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TypeVar

from daemon import PermanentJobError

T = TypeVar("T")
V = TypeVar("V")


def configured_entry(entries: Mapping[str, T], name: str, *, field: str, section: str) -> T:
    """The entry the payload's `field` names, or a permanent failure listing the known ones."""
    entry = entries.get(name)
    if entry is None:
        known = ", ".join(sorted(entries)) or "none configured"
        raise PermanentJobError(
            f"{field}: {name!r} is not configured (known: {known}); see [{section}]"
        )
    return entry


def with_declared_params(
    what: str, name: str, declared: Mapping[str, V], given: Mapping[str, V]
) -> dict[str, V]:
    """The declared parameters' defaults overridden by the payload's values; a payload value
    for a parameter the entry does not declare fails the job, naming it."""
    undeclared = sorted(set(given) - set(declared))
    if undeclared:
        raise PermanentJobError(
            f"params: {what} {name!r} has no parameter "
            f"{', '.join(repr(p) for p in undeclared)}; a payload may only give values for "
            f"declared ones: {', '.join(sorted(declared)) or 'none'}"
        )
    return {**declared, **given}
