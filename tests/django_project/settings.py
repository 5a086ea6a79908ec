"""Settings of the test project: its database is the test's (DJANGO_DATABASE_URL, or the
daemon's DATABASE_URL), which holds Stoker's schema too."""

from __future__ import annotations

import os
from urllib.parse import unquote, urlsplit

_url = urlsplit(os.environ.get("DJANGO_DATABASE_URL") or os.environ["DATABASE_URL"])

SECRET_KEY = "stoker-tests-only"
DEBUG = False
USE_TZ = True
INSTALLED_APPS = ["tests.django_project.tasksapp"]
DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": _url.path.lstrip("/"),
        "USER": unquote(_url.username or ""),
        "PASSWORD": unquote(_url.password or ""),
        "HOST": _url.hostname or "",
        "PORT": str(_url.port or ""),
    }
}
TASKS = {
    "default": {
        "BACKEND": "daemon.contrib.django.StokerBackend",
        "QUEUES": ["default", "django"],
    }
}
