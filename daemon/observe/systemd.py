"""sd_notify: READY, WATCHDOG, STATUS and STOPPING over $NOTIFY_SOCKET; a no-op without it."""

from __future__ import annotations

import asyncio
import logging
import os
import socket

from daemon.events import wait_any

log = logging.getLogger("stoker.systemd")


class Notifier:
    def __init__(self) -> None:
        address = os.environ.get("NOTIFY_SOCKET", "")
        # A leading "@" names a socket in the abstract namespace.
        self._address = "\0" + address[1:] if address.startswith("@") else address
        self._socket: socket.socket | None = None
        self.is_ready = asyncio.Event()
        if self._address:
            self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            self._socket.setblocking(False)

    @property
    def enabled(self) -> bool:
        return self._socket is not None

    def notify(self, *lines: str) -> None:
        if self._socket is None:
            return
        try:
            self._socket.sendto("\n".join(lines).encode(), self._address)
        except OSError as exc:  # systemd gone or socket full: supervision degrades, work goes on
            log.debug("sd_notify failed: %s", exc)

    def ready(self, status: str) -> None:
        self.notify("READY=1", f"STATUS={status}")
        self.is_ready.set()

    def stopping(self, status: str) -> None:
        self.notify("STOPPING=1", f"STATUS={status}")

    def status(self, status: str) -> None:
        self.notify(f"STATUS={status}")

    def watchdog_interval(self) -> float | None:
        """Half of WATCHDOG_USEC, when the watchdog is on and meant for this process."""
        usec = os.environ.get("WATCHDOG_USEC")
        pid = os.environ.get("WATCHDOG_PID")
        if not usec or (pid and pid != str(os.getpid())):
            return None
        try:
            return int(usec) / 2_000_000
        except ValueError:
            return None

    async def watchdog(self, stopping: asyncio.Event) -> None:
        """Ping from the event loop itself, so a blocked loop stops the pings."""
        interval = self.watchdog_interval()
        if interval is None or not self.enabled:
            return
        await wait_any(self.is_ready, stopping)  # systemd expects READY=1 first
        while not stopping.is_set():
            self.notify("WATCHDOG=1")
            await wait_any(stopping, seconds=interval)

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None
