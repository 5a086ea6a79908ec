"""command.run: a configured program, in a process group of its own."""

from __future__ import annotations
