"""Built-in handlers, always loaded. They use only daemon's public API."""

from __future__ import annotations

from handlers import basic, email, examples, http, sql

__all__ = ["basic", "email", "examples", "http", "sql"]
