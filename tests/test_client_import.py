"""Importing daemon.client loads none of the daemon's machinery, nor a driver the app does
not use."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import REPO

HEAVY = ["aiohttp", "uvloop", "prometheus_client", "aiosmtplib", "psycopg", "sqlalchemy", "jinja2"]


def test_import_loads_no_daemon_machinery() -> None:
    code = (
        "import json, sys; import daemon.client; "
        f"print(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert json.loads(out.stdout) == []
