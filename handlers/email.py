"""email.send: transactional email over SMTP (aiosmtplib), from Jinja2 templates or literal
text/HTML, or into an outbox directory of .eml files when no SMTP server is configured.

Every message's Message-ID is derived from the job id, so a retried job re-sends the same
message and receivers can drop the duplicate. Transient failures (connection, timeouts, 4xx)
retry with the queue's backoff; permanent ones (5xx, such as an unknown mailbox) fail the job
at once with the server's reply."""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import os
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from email.message import EmailMessage
from email.utils import formatdate
from typing import Any

import aiosmtplib
import jinja2
from pydantic import BaseModel, ConfigDict, Field, field_validator

from daemon import JobContext, PermanentJobError, Settings, handler, resource
from daemon.config import EmailConfig

log = logging.getLogger("stoker.email")

# Headers a payload may not set: they are the message's identity and routing.
RESERVED_HEADERS = {"from", "to", "cc", "bcc", "subject", "message-id", "date", "reply-to"}
HEADER_NAME = re.compile(r"^[!-9;-~]+$")  # RFC 5322: printable, no colon, no space


def _one_line(value: str, field: str) -> str:
    if "\r" in value or "\n" in value:
        raise ValueError(f"{field} contains a line break")
    return value


class Attachment(BaseModel):
    model_config = ConfigDict(extra="forbid")
    filename: str = Field(min_length=1, max_length=255)
    content_type: str = Field("application/octet-stream", pattern=r"^[\w.+-]+/[\w.+-]+$")
    content_base64: str

    @field_validator("content_type")
    @classmethod
    def _not_multipart(cls, value: str) -> str:
        if value.lower().startswith("multipart/"):
            raise ValueError(
                f"{value!r} is a container, not a file type: give the file's own type, "
                "e.g. application/pdf, or application/octet-stream"
            )
        return value


class SendEmail(BaseModel):
    model_config = ConfigDict(extra="forbid")
    to: list[str] = Field(min_length=1)
    cc: list[str] = Field(default_factory=list)
    bcc: list[str] = Field(default_factory=list)
    from_: str | None = Field(None, alias="from")
    reply_to: str | None = None
    subject: str | None = None
    template: str | None = Field(None, pattern=r"^[A-Za-z0-9_.-]+$")
    context: dict[str, Any] = Field(default_factory=dict)
    text: str | None = None
    html: str | None = None
    headers: dict[str, str] = Field(default_factory=dict)
    attachments: list[Attachment] = Field(default_factory=list)

    @field_validator("to", "cc", "bcc", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("to", "cc", "bcc")
    @classmethod
    def _addresses(cls, value: list[str]) -> list[str]:
        return [_one_line(address, "an address") for address in value]

    @field_validator("from_", "reply_to", "subject")
    @classmethod
    def _single_line(cls, value: str | None) -> str | None:
        return None if value is None else _one_line(value, "the value")

    @field_validator("headers")
    @classmethod
    def _no_reserved(cls, value: dict[str, str]) -> dict[str, str]:
        for name, text in value.items():
            if not HEADER_NAME.match(name):
                raise ValueError(f"header name {name!r} is not valid (no spaces, no colon)")
            if name.lower() in RESERVED_HEADERS:
                raise ValueError(f"header {name!r} is set by its own field, not by headers")
            if name.lower().startswith("content-") or name.lower() == "mime-version":
                # The email library rebuilds these from the body: one would be dropped, a
                # multipart Content-Type would break composing.
                raise ValueError(
                    f"header {name!r} is set by Stoker from text, html and attachments; "
                    "remove it from headers"
                )
            if "\n" in name or "\r" in name or "\n" in text or "\r" in text:
                raise ValueError(f"header {name!r} contains a line break")
        return value


class Mailer:
    """Renders and delivers; one per daemon, made at start-up from [email]."""

    def __init__(self, config: EmailConfig) -> None:
        self.config = config
        self.templates = jinja2.Environment(
            loader=jinja2.FileSystemLoader(str(config.templates)),
            autoescape=jinja2.select_autoescape(enabled_extensions=("html", "html.j2")),
            undefined=jinja2.StrictUndefined,
            enable_async=False,
        )
        self._idle: list[aiosmtplib.SMTP] = []

    # -- composing ---------------------------------------------------------------------------

    def compose(self, job_id: int, mail: SendEmail) -> EmailMessage:
        subject, text, html = mail.subject, mail.text, mail.html
        if mail.template:
            subject, text, html = self._render(mail.template, mail.context, subject)
        if not subject:
            raise PermanentJobError("no subject: give `subject`, or a {% block subject %}")
        if not text and not html:
            raise PermanentJobError("no body: give `text` and/or `html`, or a `template`")
        message = EmailMessage()
        message["From"] = mail.from_ or self.config.sender
        message["To"] = ", ".join(mail.to)
        if mail.cc:
            message["Cc"] = ", ".join(mail.cc)
        if mail.reply_to:
            message["Reply-To"] = mail.reply_to
        message["Subject"] = subject.strip()
        message["Date"] = formatdate(localtime=False)
        message["Message-ID"] = f"<stoker-job-{job_id}@{self.config.message_id_domain}>"
        for name, value in mail.headers.items():
            message[name] = value
        message.set_content(text or "This message is in HTML only.")
        if html:
            message.add_alternative(html, subtype="html")
        self._attach(message, mail.attachments)
        return message

    def _render(
        self, name: str, context: dict[str, Any], subject: str | None
    ) -> tuple[str | None, str | None, str | None]:
        rendered: dict[str, str | None] = {"txt": None, "html": None}
        found_subject = subject
        try:
            for kind in ("txt", "html"):
                try:
                    template = self.templates.get_template(f"{name}.{kind}.j2")
                except jinja2.TemplateNotFound:
                    continue
                blocks = template.blocks
                if "body" in blocks:  # subject and body blocks: the body is the message
                    body = blocks["body"](template.new_context(context))
                    rendered[kind] = "".join(body).strip() + "\n"
                else:
                    rendered[kind] = template.render(context)
                if found_subject is None and "subject" in blocks:
                    block = blocks["subject"](template.new_context(context))
                    found_subject = "".join(block).strip()
        except jinja2.UndefinedError as exc:
            raise PermanentJobError(f"template {name!r}: {exc} (add it to `context`)") from exc
        except jinja2.TemplateError as exc:
            raise PermanentJobError(f"template {name!r} is broken: {exc}") from exc
        if rendered["txt"] is None and rendered["html"] is None:
            raise PermanentJobError(
                f"no template {name}.txt.j2 or {name}.html.j2 in {self.config.templates}"
            )
        return found_subject, rendered["txt"], rendered["html"]

    def _attach(self, message: EmailMessage, attachments: list[Attachment]) -> None:
        total = 0
        for item in attachments:
            try:
                data = base64.b64decode(item.content_base64, validate=True)
            except (binascii.Error, ValueError) as exc:
                raise PermanentJobError(f"attachment {item.filename!r}: not base64") from exc
            total += len(data)
            if total > self.config.max_attachment_bytes:
                raise PermanentJobError(
                    f"attachments exceed {self.config.max_attachment_bytes} bytes"
                )
            maintype, subtype = item.content_type.split("/", 1)
            message.add_attachment(data, maintype=maintype, subtype=subtype, filename=item.filename)

    # -- delivering --------------------------------------------------------------------------

    async def deliver(self, job_id: int, message: EmailMessage, recipients: list[str]) -> str:
        if self.config.smtp is None:
            return await asyncio.to_thread(self._to_outbox, job_id, message)
        refused = await self._send(message, recipients)
        if refused:
            log.warning("message %s: some recipients refused: %s", message["Message-ID"], refused)
            return f"sent; refused: {refused}"
        return "sent"

    def _to_outbox(self, job_id: int, message: EmailMessage) -> str:
        outbox = self.config.outbox
        outbox.mkdir(parents=True, exist_ok=True)
        path = outbox / f"{job_id}.eml"
        partial = path.with_suffix(".eml.partial")
        partial.write_bytes(bytes(message))
        os.replace(partial, path)  # a reader never sees half a message
        return str(path)

    async def _send(self, message: EmailMessage, recipients: list[str]) -> str | None:
        """Deliver; return the replies of recipients refused for good, if only some were."""
        smtp = await self._acquire()
        try:
            refused, _ = await smtp.send_message(message, recipients=recipients)
        except aiosmtplib.SMTPRecipientsRefused as exc:
            self._release(smtp)
            replies = "; ".join(f"{r.recipient}: {r.code} {r.message}" for r in exc.recipients)
            if all(r.code >= 500 for r in exc.recipients):
                raise PermanentJobError(f"every recipient was refused: {replies}") from exc
            raise ConnectionError(f"recipients refused for now: {replies}") from exc
        except aiosmtplib.SMTPResponseException as exc:
            self._discard(smtp)
            if exc.code >= 500:
                raise PermanentJobError(f"SMTP server refused: {exc.code} {exc.message}") from exc
            raise  # 4xx: try again later
        except BaseException:
            self._discard(smtp)
            raise
        self._release(smtp)
        if refused:  # some recipients were accepted, some not
            replies = "; ".join(f"{rcpt}: {r.code} {r.message}" for rcpt, r in refused.items())
            if any(r.code < 500 for r in refused.values()):
                # Sent again to everyone; the stable Message-ID lets receivers drop repeats.
                raise ConnectionError(f"some recipients deferred: {replies}")
            return replies
        return None

    async def _acquire(self) -> aiosmtplib.SMTP:
        while self._idle:
            smtp = self._idle.pop()
            if smtp.is_connected:
                return smtp
        cfg = self.config.smtp
        assert cfg is not None
        smtp = aiosmtplib.SMTP(
            hostname=cfg.host,
            port=cfg.port,
            username=cfg.username,
            password=cfg.password.get_secret_value() if cfg.password else None,
            use_tls=cfg.tls,
            start_tls=None if cfg.starttls and not cfg.tls else False,
            timeout=cfg.timeout,
            validate_certs=cfg.validate_certs,
            cert_bundle=str(cfg.ca_file) if cfg.ca_file else None,
        )
        await smtp.connect()
        return smtp

    def _release(self, smtp: aiosmtplib.SMTP) -> None:
        self._idle.append(smtp)  # reused by the next job: one connection, many messages

    def _discard(self, smtp: aiosmtplib.SMTP) -> None:
        smtp.close()

    async def close(self) -> None:
        while self._idle:
            smtp = self._idle.pop()
            try:
                await asyncio.wait_for(smtp.quit(), timeout=5)
            except (aiosmtplib.SMTPException, OSError, TimeoutError):
                smtp.close()


@resource(Mailer)
@asynccontextmanager
async def mailer(settings: Settings) -> AsyncIterator[Mailer]:
    """The daemon's one Mailer (its SMTP connections), open from start-up to the last job."""
    one = Mailer(settings.email)
    where = (
        "SMTP " + settings.email.smtp.host
        if settings.email.smtp
        else (f"outbox {settings.email.outbox}")
    )
    log.info("email.send delivers to %s", where)
    try:
        yield one
    finally:
        await one.close()


@handler("email.send", payload=SendEmail)
async def send_email(ctx: JobContext, mail: SendEmail) -> dict[str, Any]:
    mailer = ctx.resource(Mailer)
    try:
        message = mailer.compose(ctx.id, mail)
    except ValueError as exc:  # the email library refused a value: retrying cannot help
        raise PermanentJobError(f"cannot compose the message: {exc}") from exc
    where = await mailer.deliver(ctx.id, message, [*mail.to, *mail.cc, *mail.bcc])
    ctx.log.info("email %s to %s: %s", message["Message-ID"], ", ".join(mail.to), where)
    return {
        "message_id": message["Message-ID"],
        "delivered": where,
        "recipients": len(mail.to) + len(mail.cc) + len(mail.bcc),
    }


__all__ = ["Mailer", "SendEmail", "send_email"]
