"""alert.deliver: one alert message to one [alerts.destinations.NAME] — Slack (incoming webhook,
`{"text": ...}`), Discord (webhook, `{"content": ...}`), a generic webhook (the message document
itself, signed with `X-Stoker-Signature: sha256=<HMAC-SHA256 of the body>` when the destination
has a `secret`) or email (the `alert` template, through the email.send mailer). schedule.ping:
GET a schedule's ping_url after a run succeeded (healthchecks.io, Cronitor).

Connection errors, timeouts, 429 and 5xx retry with the queue's backoff (Retry-After honoured);
other 4xx fail at once. A destination URL is a credential (a chat webhook carries its token in
the path): logs and errors name the destination, and show of a URL its scheme and host only."""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import quote, unquote, unquote_plus, urlsplit

import aiohttp
from pydantic import BaseModel, ConfigDict, Field

from daemon import JobContext, PermanentJobError, RetryJob, Settings, handler, resource
from daemon.config.alerts import AlertDestination, AlertsConfig
from handlers.email import Mailer, SendEmail
from handlers.http import retry_after

log = logging.getLogger("stoker.alerts")

EXCERPT_CHARS = 200
DISCORD_LIMIT = 2000
PING_TIMEOUT = 10.0
# What a client leaves unencoded in a URL (RFC 3986's reserved and unreserved characters).
URL_SAFE = ":/?#[]@!$&'()*+,;=-._~%"


class DeliveryError(Exception):
    """A transient failure: the queue's backoff decides when to try again."""


class AlertMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    destination: str = Field(min_length=1)
    message: dict[str, Any]


class Ping(BaseModel):
    model_config = ConfigDict(extra="forbid")
    schedule: str
    tick: str | None = None
    job_id: int | None = None


def origin(url: str) -> str:
    """What may be shown of a URL: scheme://host[:port]/..."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc.rsplit('@', 1)[-1]}/..."


def sign(secret: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


class AlertSender:
    """One per daemon: the destinations and one pooled HTTP session for all of them."""

    def __init__(self, settings: Settings) -> None:
        self.config: AlertsConfig = settings.alerts
        self.schedules = settings.schedules
        self.session = aiohttp.ClientSession(
            cookie_jar=aiohttp.DummyCookieJar(),
            headers={"User-Agent": "stoker-alerts"},
        )

    def destination(self, name: str) -> AlertDestination:
        found = self.config.destinations.get(name)
        if found is None:
            known = ", ".join(sorted(self.config.destinations)) or "none"
            raise PermanentJobError(
                f"destination: {name!r} is not configured (known: {known}); add "
                f"[alerts.destinations.{name}]"
            )
        return found

    async def post(
        self,
        ctx: JobContext,
        where: str,
        url: str,
        body: bytes,
        seconds: float,
        headers: dict[str, str] | None = None,
        method: str = "POST",
    ) -> dict[str, Any]:
        sent = {"Idempotency-Key": f"stoker-job-{ctx.id}", **(headers or {})}
        if method == "POST":
            sent["Content-Type"] = "application/json"
        try:
            async with self.session.request(
                method,
                url,
                data=body if method == "POST" else None,
                headers=sent,
                timeout=aiohttp.ClientTimeout(total=seconds),
                allow_redirects=method == "GET",
            ) as resp:
                text = (await resp.content.read(EXCERPT_CHARS * 4)).decode(errors="replace")
                status = resp.status
                wait = retry_after(resp.headers.get("Retry-After"))
        except TimeoutError:
            raise DeliveryError(f"{where}: no response within {seconds:g}s") from None
        except aiohttp.ClientError as exc:
            # aiohttp's text may carry the URL: shown as its origin only; the cause is dropped
            # from the traceback the job keeps for the same reason.
            message = _hide(str(exc), url)
            raise DeliveryError(f"{where}: {type(exc).__name__}: {message}") from None
        excerpt = " ".join(_hide(text, url)[:EXCERPT_CHARS].split())
        ctx.log.info("alert delivery %s -> HTTP %s", where, status)
        if 200 <= status < 300:
            return {"status": status}
        what = f"{where}: HTTP {status}"
        if status == 429 or status >= 500:
            if wait is not None:
                raise RetryJob(f"{what} (Retry-After {wait:g}s): {excerpt}", delay=wait)
            raise DeliveryError(f"{what}: {excerpt}")
        raise PermanentJobError(f"{what}: {excerpt} (check the destination's url)")

    async def close(self) -> None:
        await self.session.close()


def _hide(text: str, url: str) -> str:
    """A URL, its path and its query never appear in what a job keeps or logs: neither as
    written, nor decoded (a server echoing the URL it received), nor encoded as a client does."""
    parts = urlsplit(url)
    shown = origin(url)
    forms: dict[str, str] = {}
    for value, hidden in ((parts.query, "/..."), (parts.path, "/..."), (url, shown)):
        decoded = unquote(value)
        encoded = (quote(value, safe=URL_SAFE), quote(decoded, safe=URL_SAFE))
        for form in (value, decoded, unquote_plus(value), *encoded):
            forms[form] = hidden
    for secret in sorted(forms, key=len, reverse=True):
        if len(secret) > 1:
            text = text.replace(secret, forms[secret])
    return text


@resource(AlertSender)
@asynccontextmanager
async def alert_sender(settings: Settings) -> AsyncIterator[AlertSender]:
    sender = AlertSender(settings)
    try:
        yield sender
    finally:
        await sender.close()


def chat_text(message: dict[str, Any]) -> str:
    event = str(message.get("event", "alert"))
    mark = "✅" if event.endswith("_recovered") else "🚨"
    return f"{mark} [{event}] {message.get('text', '')}"


@handler("alert.deliver", payload=AlertMessage)
async def deliver(ctx: JobContext, alert: AlertMessage) -> dict[str, Any]:
    sender = ctx.resource(AlertSender)
    dest = sender.destination(alert.destination)
    where = f"{dest.type} destination {alert.destination}"
    if dest.type == "email":
        return await _email(ctx, alert, dest)
    assert dest.url is not None  # the configuration requires it
    url = dest.url.get_secret_value()
    headers: dict[str, str] = {}
    if dest.type == "slack":
        body = json.dumps({"text": chat_text(alert.message)}).encode()
    elif dest.type == "discord":
        body = json.dumps({"content": chat_text(alert.message)[:DISCORD_LIMIT]}).encode()
    else:
        body = json.dumps(alert.message).encode()
        headers["X-Stoker-Event"] = str(alert.message.get("event", ""))
        if dest.secret is not None:
            headers["X-Stoker-Signature"] = sign(dest.secret.get_secret_value(), body)
    result = await sender.post(ctx, where, url, body, dest.timeout, headers)
    return {**result, "destination": alert.destination, "event": alert.message.get("event")}


async def _email(ctx: JobContext, alert: AlertMessage, dest: AlertDestination) -> dict[str, Any]:
    mailer = ctx.resource(Mailer)
    mail = SendEmail.model_validate(
        {"to": dest.to, "template": dest.template, "context": {"alert": alert.message}}
    )
    try:
        message = mailer.compose(ctx.id, mail)
    except ValueError as exc:
        raise PermanentJobError(f"cannot compose the alert email: {exc}") from exc
    where = await mailer.deliver(ctx.id, message, list(dest.to))
    ctx.log.info(
        "alert email %s to destination %s: %s", message["Message-ID"], alert.destination, where
    )
    return {"destination": alert.destination, "message_id": message["Message-ID"]}


@handler("schedule.ping", payload=Ping)
async def ping(ctx: JobContext, req: Ping) -> dict[str, Any]:
    sender = ctx.resource(AlertSender)
    url = await _ping_url(ctx, sender, req.schedule)
    if url is None:
        return {"skipped": f"schedule {req.schedule} has no ping_url any more"}
    where = f"ping of schedule {req.schedule} ({origin(url)})"
    result = await sender.post(ctx, where, url, b"", PING_TIMEOUT, method="GET")
    return {**result, "schedule": req.schedule}


async def _ping_url(ctx: JobContext, sender: AlertSender, schedule: str) -> str | None:
    configured = sender.schedules.get(schedule)
    if configured is not None:
        return configured.ping_url
    async with ctx.db.acquire() as conn:
        url: str | None = await conn.fetchval(
            "SELECT ping_url FROM stoker.schedules WHERE name = $1", schedule
        )
    return url


__all__ = ["AlertMessage", "AlertSender", "Ping", "chat_text", "deliver", "origin", "ping", "sign"]
