"""Built-in handlers, always loaded (handlers.examples only when listed in handler_modules).
They use only daemon's public API."""

from __future__ import annotations

from handlers import alerts, basic, command, email, files, http, report, sql

__all__ = ["alerts", "basic", "command", "email", "files", "http", "report", "sql"]
