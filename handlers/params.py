"""Values for `:name` placeholders in configured SQL (sql_tasks, reports, file_tasks): the
placeholders turned into `$n`, and each value given the type PostgreSQL asks for. Values are
always bound, never written into the SQL."""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Sequence
from decimal import Decimal
from typing import Any

from daemon import PermanentJobError

# `:name` but not the `::type` of a cast, nor inside what is not SQL code (see bind).
PLACEHOLDER = re.compile(r"(?<![:\w]):([a-z_][a-z0-9_]*)")
NOT_CODE = re.compile(
    r"--[^\n]*"  # line comment
    r"|/\*.*?\*/"  # block comment
    r"|\$([A-Za-z_]\w*|)\$.*?\$\1\$"  # dollar-quoted string
    r"|[Ee]'(?:[^'\\]|\\.|'')*'"  # E'' string with backslash escapes
    r"|'(?:[^']|'')*'"  # string
    r"|\"(?:[^\"]|\"\")*\"",  # quoted identifier
    re.DOTALL,
)


def bind(statement: str, values: dict[str, Any]) -> tuple[str, list[Any]]:
    """Turn `:name` placeholders into `$n` and the matching list of values."""
    order: list[str] = []

    def number(match: re.Match[str]) -> str:
        name = match[1]
        if name not in values:
            raise PermanentJobError(
                f"the statement uses :{name}, which is not a declared parameter "
                f"(declare it under params, or use one of: {', '.join(sorted(values))})"
            )
        if name not in order:
            order.append(name)
        return f"${order.index(name) + 1}"

    parts: list[str] = []
    last = 0
    for quoted in NOT_CODE.finditer(statement):  # leave strings and comments alone
        parts.append(PLACEHOLDER.sub(number, statement[last : quoted.start()]))
        parts.append(quoted[0])
        last = quoted.end()
    parts.append(PLACEHOLDER.sub(number, statement[last:]))
    return "".join(parts), [values[name] for name in order]


def typed_args(label: str, types: Sequence[Any], args: list[Any]) -> list[Any]:
    """`args` as the types of a prepared statement's parameters (asyncpg's `Type`s)."""
    if len(types) != len(args):
        raise PermanentJobError(
            f"{label}: the statement has {len(types)} parameters but {len(args)} "
            "placeholders were bound; write parameters only as :name"
        )
    return [coerce(label, value, type_.name) for value, type_ in zip(args, types, strict=True)]


INTEGERS = {"int2", "int4", "int8", "oid"}
FLOATS = {"float4", "float8"}
TRUE = {"1", "true", "t", "yes", "y", "on"}
FALSE = {"0", "false", "f", "no", "n", "off"}


def coerce(label: str, value: Any, type_name: str) -> Any:
    """Give PostgreSQL the type it asked for: values from the environment and from JSON
    payloads arrive as text (a day as "2026-11-30", a number as "5")."""
    if not isinstance(value, str):
        return value
    text = value.strip()
    try:
        if type_name in INTEGERS:
            return int(text)
        if type_name in FLOATS:
            return float(text)
        if type_name == "numeric":
            return Decimal(text)
        if type_name == "bool":
            if text.lower() not in TRUE | FALSE:
                raise ValueError(text)
            return text.lower() in TRUE
        if type_name == "date":
            return dt.date.fromisoformat(text)
        if type_name == "timestamp":
            return dt.datetime.fromisoformat(text)
        if type_name == "timestamptz":
            moment = dt.datetime.fromisoformat(text)
            if moment.tzinfo is None:  # whose midnight? say it
                raise PermanentJobError(
                    f"{label}: parameter value {value!r} has no time zone; "
                    "write e.g. 2026-11-30T18:00:00+00:00"
                )
            return moment
    except (ValueError, ArithmeticError) as exc:
        raise PermanentJobError(
            f"{label}: parameter value {value!r} is not a valid {type_name}"
        ) from exc
    return value
