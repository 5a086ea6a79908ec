"""Built-in handlers, always loaded (handlers.examples only when listed in handler_modules).
They use only daemon's public API."""

from __future__ import annotations

from handlers import basic, command, email, files, http, report, sql

__all__ = ["basic", "command", "email", "files", "http", "report", "sql"]
