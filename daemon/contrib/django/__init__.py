"""Django's django.tasks on Stoker (pip install 'stoker[django]', Django >= 6.0).

In Django's settings::

    TASKS = {"default": {"BACKEND": "daemon.contrib.django.StokerBackend", "QUEUES": ["default"]}}

A task's `.enqueue()` inserts one Stoker job in the current transaction of Django's
database; the daemon, configured with `django_settings = "mysite.settings"`, runs it.
"""

from __future__ import annotations

from daemon.contrib.django.backend import KIND, StokerBackend

__all__ = ["KIND", "StokerBackend"]
