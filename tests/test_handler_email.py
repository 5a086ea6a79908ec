"""email.send with a real daemon: the file outbox, and a real SMTP server (aiosmtpd) on
loopback that accepts, defers (4xx) or refuses (5xx)."""

from __future__ import annotations

import email
import email.policy
import ssl
from collections.abc import Iterator
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import trustme
from aiosmtpd.controller import Controller

from tests.conftest import REPO, DaemonFactory, eventually, finished
from tests.mailserver import Inbox, free_port, smtp_server

TEMPLATES = REPO / "deploy" / "templates"


@pytest.fixture
def smtp() -> Iterator[tuple[Inbox, int]]:
    with smtp_server() as server:
        yield server


async def send(db: asyncpg.Connection, payload: dict[str, Any], **cols: Any) -> int:
    job_id: int = await db.fetchval(
        "SELECT stoker.enqueue('default', 'email.send', $1, max_attempts => $2)",
        payload,
        cols.get("max_attempts"),
    )
    return job_id


WELCOME = {
    "to": "bob@example.com",
    "template": "welcome",
    "context": {"name": "<b>Bob</b>", "shop_name": "Gear Shop", "login_url": "https://x/login"},
}


async def test_without_smtp_messages_land_in_the_outbox(
    daemons: DaemonFactory, db: asyncpg.Connection, tmp_path: Path
) -> None:
    outbox = tmp_path / "outbox"
    await daemons.start(
        f"""
        [email]
        templates = "{TEMPLATES}"
        outbox = "{outbox}"
        sender = "shop@example.com"
        """
    )
    job_id = await send(db, WELCOME)
    row = await finished(db, job_id)
    assert row["state"] == "succeeded", row["last_error"]
    path = outbox / f"{job_id}.eml"
    message = email.message_from_bytes(path.read_bytes(), policy=email.policy.default)
    assert isinstance(message, EmailMessage)
    assert message["Subject"] == "Welcome to Gear Shop, <b>Bob</b>"
    assert message["To"] == "bob@example.com"
    assert message["From"] == "shop@example.com"
    assert message["Message-ID"] == f"<stoker-job-{job_id}@stoker.local>"
    text = message.get_body(("plain",))
    html = message.get_body(("html",))
    assert text is not None and html is not None
    assert "Hello <b>Bob</b>," in text.get_content()  # plain text stays as written
    assert "Hello &lt;b&gt;Bob&lt;/b&gt;," in html.get_content()  # HTML is escaped
    assert row["result"]["delivered"] == str(path)


async def test_a_missing_template_variable_fails_clearly(
    daemons: DaemonFactory, db: asyncpg.Connection, tmp_path: Path
) -> None:
    await daemons.start(f'[email]\ntemplates = "{TEMPLATES}"\noutbox = "{tmp_path}"\n')
    job_id = await send(db, {"to": "a@example.com", "template": "welcome", "context": {}})
    row = await finished(db, job_id)
    assert row["state"] == "failed"
    assert row["attempts"] == 1
    assert "'name' is undefined (add it to `context`)" in row["last_error"]


def smtp_config(port: int) -> str:
    return f"""
    [queues.default]
    backoff = {{ base = 0.2, jitter = 0 }}
    [email]
    templates = "{TEMPLATES}"
    smtp = {{ host = "127.0.0.1", port = {port}, starttls = false }}
    """


async def test_smtp_delivery_retries_4xx_with_the_same_message_id(
    smtp: tuple[Inbox, int], daemons: DaemonFactory, db: asyncpg.Connection
) -> None:
    inbox, port = smtp
    inbox.replies = ["451 4.3.0 try again later", "451 4.3.0 still busy"]
    await daemons.start(smtp_config(port))
    job_id = await send(db, {**WELCOME, "cc": ["carol@example.com"], "bcc": "audit@example.com"})
    row = await finished(db, job_id)
    assert row["state"] == "succeeded", row["last_error"]
    assert row["attempts"] == 3
    assert [e["error"][-28:] for e in row["errors"]] == [
        "451, 4.3.0 try again later)",
        "(451, 4.3.0 still busy)",
    ] or all("451" in e["error"] for e in row["errors"])
    [message] = inbox.messages  # the two refused deliveries left nothing behind
    expected_id = f"<stoker-job-{job_id}@stoker.local>"
    assert inbox.attempted_ids == [expected_id] * 3  # every retry re-sent the same id
    assert message["Message-ID"] == expected_id
    assert message["Subject"] == "Welcome to Gear Shop, <b>Bob</b>"
    assert message["To"] == "bob@example.com"
    text, html = message.get_body(("plain",)), message.get_body(("html",))
    assert text is not None and "Sign in here: https://x/login" in text.get_content()
    assert html is not None and '<a href="https://x/login">Sign in</a>' in html.get_content()
    assert message["Cc"] == "carol@example.com"
    assert "Bcc" not in message  # blind copies travel in the envelope only
    assert row["result"]["recipients"] == 3


async def test_smtp_5xx_fails_at_once_with_the_servers_reply(
    smtp: tuple[Inbox, int], daemons: DaemonFactory, db: asyncpg.Connection
) -> None:
    inbox, port = smtp
    inbox.refuse_rcpt = {"nobody@example.com"}
    await daemons.start(smtp_config(port))
    job_id = await send(db, {"to": "nobody@example.com", "subject": "Hi", "text": "hello"})
    row = await finished(db, job_id)
    assert row["state"] == "failed"
    assert row["attempts"] == 1
    assert "550 5.1.1 no such mailbox here" in row["last_error"]
    assert inbox.messages == []


async def test_smtp_server_down_is_retried_until_it_is_back(
    daemons: DaemonFactory, db: asyncpg.Connection
) -> None:
    port = free_port()
    await daemons.start(smtp_config(port))
    job_id = await send(db, {"to": "a@example.com", "subject": "Hi", "text": "hello"})

    async def retried() -> bool:
        errors = await db.fetchval("SELECT errors FROM stoker.all_jobs WHERE id = $1", job_id)
        return bool(errors)

    await eventually(retried)
    inbox = Inbox()
    controller = Controller(inbox, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        row = await finished(db, job_id)
        assert row["state"] == "succeeded", row["last_error"]
        assert row["attempts"] >= 2
        assert len(inbox.messages) == 1
    finally:
        daemons.stop_all()  # first, so the server sees its clients go before it stops
        controller.stop()


async def test_bad_payloads_name_the_field(daemons: DaemonFactory, db: asyncpg.Connection) -> None:
    await daemons.start(f'[email]\ntemplates = "{TEMPLATES}"\n')
    bad = await send(db, {"to": "a@example.com", "text": "x", "headers": {"Subject": "sneaky"}})
    row = await finished(db, bad)
    assert row["state"] == "failed"
    assert "headers: Value error, header 'Subject' is set by its own field" in row["last_error"]
    nobody = await send(db, {"subject": "x", "text": "x"})
    row = await finished(db, nobody)
    assert "to: Field required" in row["last_error"]
    for sneaky, message in (
        (
            {"to": "a@example.com", "subject": "hi\nBcc: x@evil.example", "text": "x"},
            "subject: Value error, the value contains a line break",
        ),
        (
            {"to": "a@example.com", "subject": "hi", "text": "x", "headers": {"From ": "x@evil"}},
            "header name 'From ' is not valid",
        ),
    ):
        row = await finished(db, await send(db, sneaky))
        assert row["state"] == "failed"
        assert row["attempts"] == 1
        assert message in row["last_error"]


@pytest.mark.parametrize(
    "header",
    [
        ("Content-Type", "multipart/mixed; boundary=x"),
        ("content-type", "text/html"),
        ("Content-Transfer-Encoding", "base64"),
        ("Content-Disposition", "attachment"),
        ("Content-Language", "en"),
        ("MIME-Version", "2.0"),
    ],
)
async def test_content_headers_are_refused_at_once_naming_the_header(
    daemons: DaemonFactory, db: asyncpg.Connection, tmp_path: Path, header: tuple[str, str]
) -> None:
    await daemons.start(
        f"""
        [queues.default]
        backoff = {{ base = 0.1, jitter = 0 }}
        [email]
        templates = "{TEMPLATES}"
        outbox = "{tmp_path}"
        """
    )
    name, value = header
    mail = {"to": "a@example.com", "subject": "hi", "text": "x", "headers": {name: value}}
    row = await finished(db, await send(db, mail, max_attempts=5))
    assert row["state"] == "failed", row["result"]
    assert row["attempts"] == 1  # retrying cannot fix a payload
    assert (
        f"headers: Value error, header {name!r} is set by Stoker from text, html and attachments"
        in row["last_error"]
    )
    assert "Traceback" not in row["last_error"]
    assert not (tmp_path / f"{row['id']}.eml").exists()


async def test_a_multipart_attachment_type_is_refused_at_once(
    daemons: DaemonFactory, db: asyncpg.Connection, tmp_path: Path
) -> None:
    await daemons.start(f'[email]\ntemplates = "{TEMPLATES}"\noutbox = "{tmp_path}"\n')
    part = {"filename": "a.txt", "content_type": "multipart/mixed", "content_base64": "aGk="}
    mail = {"to": "a@example.com", "subject": "hi", "text": "x", "attachments": [part]}
    row = await finished(db, await send(db, mail, max_attempts=5))
    assert row["state"] == "failed"
    assert row["attempts"] == 1
    assert (
        "attachments.0.content_type: Value error, 'multipart/mixed' is a container"
        in (row["last_error"])
    )


async def test_other_headers_are_sent(
    daemons: DaemonFactory, db: asyncpg.Connection, tmp_path: Path
) -> None:
    await daemons.start(f'[email]\ntemplates = "{TEMPLATES}"\noutbox = "{tmp_path}"\n')
    mail = {"to": "a@example.com", "subject": "hi", "text": "x", "headers": {"X-Campaign": "may"}}
    row = await finished(db, await send(db, mail))
    assert row["state"] == "succeeded", row["last_error"]
    message = email.message_from_bytes((tmp_path / f"{row['id']}.eml").read_bytes())
    assert message["X-Campaign"] == "may"


async def test_starttls_with_a_self_signed_certificate_the_config_trusts(
    daemons: DaemonFactory, db: asyncpg.Connection, tmp_path: Path
) -> None:
    ca = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_context)
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    inbox = Inbox()
    port = free_port()
    controller = Controller(
        inbox,
        hostname="127.0.0.1",
        port=port,
        tls_context=server_context,
        require_starttls=True,
    )
    controller.start()
    try:
        await daemons.start(
            f"""
            [email]
            templates = "{TEMPLATES}"
            smtp = {{ host = "127.0.0.1", port = {port}, starttls = true, ca_file = "{ca_file}" }}
            """
        )
        job_id = await send(db, {"to": "tls@example.com", "subject": "secure", "text": "hi"})
        row = await finished(db, job_id)
        assert row["state"] == "succeeded", row["last_error"]
        [message] = inbox.messages
        assert message["Subject"] == "secure"
    finally:
        daemons.stop_all()  # first, so the server sees its clients go before it stops
        controller.stop()
