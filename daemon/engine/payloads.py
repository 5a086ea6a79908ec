"""Size caps on what a job brings in (its payload) and out (its result, its error text).

Checked before anything is decoded or fully encoded: one huge value must not block the event
loop for seconds (leases are renewed from it) nor make a flush PostgreSQL refuses."""

from __future__ import annotations

import json
from typing import Any

# Longest error message or traceback kept per attempt; the rest is cut with a note.
MAX_ERROR_CHARS = 65_536

# Results this small (counted in nodes and string characters) are encoded in one pass by the
# C encoder; anything larger goes through the incremental encoder, which stops at the cap.
_QUICK_NODES = 200

_ENCODER = json.JSONEncoder(default=str, separators=(",", ":"), allow_nan=False)


def payload_too_large(text: str, limit: int) -> int | None:
    """The payload's size in bytes if it exceeds `limit`, else None (cheap when it fits)."""
    if len(text) * 4 <= limit:  # a character is at most 4 bytes of UTF-8
        return None
    size = len(text.encode("utf-8", "surrogatepass"))
    return size if size > limit else None


def encode_capped(value: Any, limit: int) -> str | None:
    """`value` as JSON text, or None if that would exceed `limit` characters. Raises what
    json.dumps raises for values JSON cannot hold (NaN, Infinity, circular references)."""
    if _small(value, limit):
        text = _ENCODER.encode(value)
        return text if len(text) <= limit else None
    size = 0
    parts = []
    for chunk in _ENCODER.iterencode(value):
        size += len(chunk)
        if size > limit:
            return None
        parts.append(chunk)
    return "".join(parts)


def _small(value: Any, limit: int) -> bool:
    """Is `value` certainly small? Visits at most _QUICK_NODES nodes."""
    budget = _QUICK_NODES
    chars = 0
    stack = [value]
    while stack:
        budget -= 1
        if budget < 0:
            return False
        item = stack.pop()
        if isinstance(item, str):
            chars += len(item)  # a long string fails the size test below at once
        elif isinstance(item, dict):
            if len(item) > budget:
                return False
            for key, inner in item.items():
                chars += len(key) if isinstance(key, str) else 24
                stack.append(inner)
        elif isinstance(item, (list, tuple)):
            if len(item) > budget:
                return False
            stack.extend(item)
        elif item is None or isinstance(item, (bool, int, float)):
            chars += 24
        else:
            return False  # encoded through default=str: its size is unknown
        if chars * 2 > limit:
            return False
    return True


def cut(text: str, limit: int = MAX_ERROR_CHARS) -> str:
    """`text` cut to `limit` characters, saying how much was left out."""
    if len(text) <= limit:
        return text
    return text[:limit] + f"... ({len(text) - limit} more characters cut)"
