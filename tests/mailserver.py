"""A real SMTP server for tests (aiosmtpd on loopback) whose answers the test scripts:
each DATA takes the next reply (250 by default), listed recipients are refused with 550."""

from __future__ import annotations

import email
import email.policy
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from email.message import EmailMessage
from typing import Any

from aiosmtpd.controller import Controller


class Inbox:
    """An SMTP server's behaviour, scripted by the test: each DATA answers with the next reply."""

    def __init__(self) -> None:
        self.messages: list[EmailMessage] = []
        self.attempted_ids: list[str] = []  # Message-ID of every DATA, accepted or not
        self.replies: list[str] = []
        self.refuse_rcpt: set[str] = set()

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, rcpt_options: Any
    ) -> str:
        if address in self.refuse_rcpt:
            return "550 5.1.1 no such mailbox here"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        reply = self.replies.pop(0) if self.replies else "250 OK"
        parsed = email.message_from_bytes(envelope.content, policy=email.policy.default)
        assert isinstance(parsed, EmailMessage)
        self.attempted_ids.append(str(parsed["Message-ID"]))
        if reply.startswith("250"):
            self.messages.append(parsed)
        return reply

    def message(self, job_id: int) -> EmailMessage | None:
        """The accepted message that email.send job `job_id` sent (its Message-ID)."""
        wanted = f"<stoker-job-{job_id}@stoker.local>"
        return next((m for m in self.messages if m["Message-ID"] == wanted), None)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextmanager
def smtp_server() -> Iterator[tuple[Inbox, int]]:
    """A running server and its port, stopped when the block ends (even on failure)."""
    inbox = Inbox()
    port = free_port()
    controller = Controller(inbox, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        yield inbox, port
    finally:
        controller.stop()
