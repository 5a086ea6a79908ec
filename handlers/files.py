"""files.cleanup: old files in a directory, or the files rows name, deleted inside a root."""

from __future__ import annotations
