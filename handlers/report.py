"""sql.report: a read-only query whose rows are emailed through email.send."""

from __future__ import annotations
