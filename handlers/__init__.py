"""Built-in handlers, always loaded (handlers.examples only when listed in handler_modules).
They use only daemon's public API."""

from __future__ import annotations

from handlers import basic, email, http, sql

__all__ = ["basic", "email", "http", "sql"]
