"""What an operation refuses: the front ends turn these into exit codes or HTTP statuses."""

from __future__ import annotations

from typing import Any

from daemon.errors import StokerError


class OperationRefused(StokerError):
    """The message says why; `fields` are details a front end may show (id, state, ...)."""

    def __init__(self, message: str, **fields: Any) -> None:
        super().__init__(message)
        self.fields = fields


class NotFound(OperationRefused):
    """No such job, queue or schedule."""


class Conflict(OperationRefused):
    """The thing exists but is in no state for this (a running job to cancel, ...)."""
