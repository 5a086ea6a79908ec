"""Which database errors are the connection's or the server's state (retry the same statement
unchanged) and which are the statement's own (its values, constraints, permissions): the
completer's and the maintenance's decision between retrying and setting an outcome aside."""

from __future__ import annotations

import asyncpg


class ConnectionUnavailable(Exception):
    """No connection to write with: always transient."""


# SQLSTATE classes that are the outcome's own doing: a value (22), a constraint (23), a
# permission or a name (42), a size (54), a trigger or function saying no (P0, 2F, 38, 39,
# 09, 27), and a few more a statement can run into. Any other class is the connection's or
# the server's state (08, 25 read-only after a failover, 40, 53, 55 lock not available, 57
# shutdown or cancel, 58 I/O): the same statement is retried unchanged.
_OWN_CLASSES = frozenset({"22", "23", "42", "54", "P0", "2F", "38", "39", "09", "27", "44"})
_OWN_CLASSES |= frozenset({"0A", "21", "XX"})


def is_transient(exc: BaseException) -> bool:
    """Worth retrying unchanged: the connection or the server's state, not what was sent."""
    if isinstance(exc, asyncpg.PostgresError):
        state = exc.sqlstate or ""
        return state[:2] not in _OWN_CLASSES
    if isinstance(exc, ValueError):  # asyncpg's client-side DataError: a value it cannot encode
        return False
    return isinstance(
        exc,
        (
            ConnectionUnavailable,
            OSError,
            TimeoutError,
            asyncpg.InterfaceError,
            asyncpg.InternalClientError,
        ),
    )
