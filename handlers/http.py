"""http.request: call a webhook, a named [webhooks.targets.NAME] (whose headers, such as
Authorization, come from configuration or the environment) or a payload URL whose host and port
are in webhooks.allowed_hosts and whose address, checked as it is connected to, is public unless
webhooks.allow_private_addresses. 2xx succeeds; 429/5xx retry (after Retry-After if sent);
connection errors and timeouts retry with backoff; anything else, redirects included, fails.
Configured header values are sent, but redacted from any response text the job keeps; so is
everything of the URL past scheme://host:port (chat webhooks carry their credential in the path
or query), in results, errors and logs alike."""

from __future__ import annotations

import codecs
import json
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any, Literal
from urllib.parse import parse_qsl, urlsplit

import aiohttp
from multidict import CIMultiDict
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from yarl import URL

from daemon import (
    JobContext,
    PermanentJobError,
    RetryJob,
    Settings,
    handler,
    resource,
)
from daemon.config import WebhooksConfig
from handlers.http_guard import (
    Connecting,
    RefusedAddress,
    connecting,
    guarded_socket,
    refused_range,
)

log = logging.getLogger("stoker.http")

# Credentials belong in configuration; framing belongs to the client (a payload that sets
# Host could reach a virtual host the allowlist does not name).
CREDENTIAL_HEADERS = {"authorization", "cookie", "proxy-authorization"}
CLIENT_HEADERS = {"host", "content-length", "transfer-encoding"}
MAX_RETRY_AFTER = 86_400.0
DEFAULT_PORTS = (80, 443)  # what a bare host in webhooks.allowed_hosts allows
EXCERPT_CHARS = 200
REDACTED = "[redacted]"


class WebhookError(Exception):
    """A transient failure: the queue's backoff decides when to try again."""


class HttpRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    target: str | None = Field(None, min_length=1)
    url: str | None = None
    method: Literal["GET", "POST", "PUT", "PATCH", "DELETE"] | None = None
    headers: dict[str, str] = Field(default_factory=dict)
    body: Any = Field(None, alias="json")  # `json` would shadow BaseModel.json
    timeout: float | None = Field(None, gt=0, le=3600)

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is None:
            return value
        try:
            url = URL(value)
        except ValueError as exc:
            raise ValueError(f"not a URL: {exc}") from None
        if url.scheme not in ("http", "https") or not url.host:
            raise ValueError("must be an absolute http:// or https:// URL")
        if url.user is not None or url.password is not None:
            raise ValueError("must not carry credentials: configure a [webhooks.targets.NAME]")
        return value

    @field_validator("headers")
    @classmethod
    def _no_secrets(cls, value: dict[str, str]) -> dict[str, str]:
        for name, text in value.items():
            if name.lower() in CREDENTIAL_HEADERS:
                raise ValueError(
                    f"header {name!r} may not come from a payload: put credentials in "
                    "[webhooks.targets.NAME] headers (configuration or environment)"
                )
            if name.lower() in CLIENT_HEADERS:
                raise ValueError(f"header {name!r} is set by the HTTP client, not by payloads")
            if any(c in name + text for c in "\r\n\x00"):
                raise ValueError(f"header {name!r} contains a line break or NUL")
        return value

    @model_validator(mode="after")
    def _one_destination(self) -> HttpRequest:
        if (self.target is None) == (self.url is None):
            raise ValueError(
                "give exactly one of `target` (a [webhooks.targets.NAME]) or `url` "
                "(whose host is in webhooks.allowed_hosts)"
            )
        return self


# (text to hide, what to show instead), longest first so that a whole URL goes before its parts.
Redactions = tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class Call:
    """A request resolved against the configuration, ready to send."""

    method: str
    url: str
    where: str  # the target's name or the URL's origin: what logs and errors may show
    headers: CIMultiDict[str]
    timeout: float
    redactions: Redactions
    from_payload: bool  # payload URLs may reach public addresses only (see guarded_socket)


class Webhooks:
    """One per daemon: the configuration, and pooled aiohttp sessions: one for configured
    targets, one whose sockets refuse non-public addresses for payload URLs."""

    def __init__(self, config: WebhooksConfig) -> None:
        self.config = config
        self.session = self._session(None)  # configured targets: the operator's own choice
        self.payload_session = (
            self.session if config.allow_private_addresses else self._session(guarded_socket)
        )

    def _session(self, socket_factory: aiohttp.SocketFactoryType | None) -> aiohttp.ClientSession:
        return aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(socket_factory=socket_factory),
            # One session serves many targets: cookies from one must never reach another.
            cookie_jar=aiohttp.DummyCookieJar(),
            timeout=aiohttp.ClientTimeout(total=self.config.timeout),
            headers={"User-Agent": "stoker-http.request"},
        )

    def resolve(self, req: HttpRequest) -> Call:
        headers: CIMultiDict[str] = CIMultiDict(req.headers)
        if req.target is not None:
            target = self.config.targets.get(req.target)
            if target is None:
                known = ", ".join(sorted(self.config.targets)) or "none"
                raise PermanentJobError(
                    f"target: {req.target!r} is not configured (known: {known}); "
                    f"add [webhooks.targets.{req.target}] or fix the name"
                )
            secrets = {name: value.get_secret_value() for name, value in target.headers.items()}
            for name in req.headers:
                if name in CIMultiDict(secrets):
                    raise PermanentJobError(
                        f"headers: {name!r} is set by [webhooks.targets.{req.target}] and "
                        "a payload may not override it"
                    )
            headers.update(secrets)
            where, cap = f"target {req.target}", target.timeout
            url, method, hidden = target.url, target.method, _redactable([*secrets.values()])
        else:
            assert req.url is not None  # the model guarantees exactly one of target and url
            self._check_allowed(URL(req.url))
            url, method, where = req.url, "POST", shown_url(URL(req.url))
            cap, hidden = self.config.timeout, []
        timeout = min(req.timeout or cap, cap)
        redactions = _redactions(url, hidden)
        payload = req.url is not None
        return Call(req.method or method, url, where, headers, timeout, redactions, payload)

    def _check_allowed(self, url: URL) -> None:
        """A payload URL's host must be listed with its port, or bare for ports 80 and 443."""
        host = WebhooksConfig.host_key(url.raw_host or "") or url.raw_host
        port = url.port
        allowed = set(self.config.allowed_hosts)
        if f"{host}:{port}" in allowed or (host in allowed and port in DEFAULT_PORTS):
            return
        fix = "or configure a [webhooks.targets.NAME] for this endpoint"
        if host in allowed or any(entry.startswith(f"{host}:") for entry in allowed):
            bare = f' (a bare "{host}" allows ports 80 and 443 only)' if host in allowed else ""
            raise PermanentJobError(
                f"url: port {port} of {host} is not in webhooks.allowed_hosts{bare}; "
                f'add "{host}:{port}" there, {fix}'
            )
        raise PermanentJobError(
            f"url: host {host} is not in webhooks.allowed_hosts; add it there, {fix}"
        )

    async def send(self, ctx: JobContext, call: Call, body: bytes | None) -> dict[str, Any]:
        headers = CIMultiDict({"Idempotency-Key": f"stoker-job-{ctx.id}"})
        if body is not None:
            headers["Content-Type"] = "application/json"
        headers.update(call.headers)
        status: int | str = "error"
        started = time.monotonic()
        attempt = Connecting()
        attempt_token = connecting.set(attempt)
        session = self.payload_session if call.from_payload else self.session
        try:
            async with session.request(
                call.method,
                call.url,
                headers=headers,
                data=body,
                timeout=aiohttp.ClientTimeout(total=call.timeout),
                allow_redirects=False,  # a redirect could lead off the allowlist
            ) as resp:
                status = resp.status
                text = await self._read(resp, call.redactions)
                return self._outcome(call, resp, text)
        except TimeoutError as exc:
            status = "timeout"
            raise WebhookError(
                f"{call.method} {call.where}: no response within {call.timeout:g}s"
            ) from exc
        except aiohttp.ClientError as exc:
            status = type(exc).__name__
            if attempt.refused and not attempt.allowed:
                raise PermanentJobError(
                    f"url: {call.where} connects to {', '.join(attempt.refused)}, which a "
                    "payload URL may not reach; set [webhooks] allow_private_addresses = true "
                    "to allow it, or configure a [webhooks.targets.NAME] for this endpoint"
                ) from None
            # aiohttp's messages may name the URL; the cause is dropped from the traceback the
            # job keeps for the same reason.
            message = _redact(str(exc), call.redactions)
            raise WebhookError(f"{call.method} {call.where}: {message}") from None
        finally:
            connecting.reset(attempt_token)
            elapsed = (time.monotonic() - started) * 1000
            ctx.log.info(
                "http.request %s %s -> %s in %.0f ms", call.method, call.where, status, elapsed
            )

    async def _read(self, resp: aiohttp.ClientResponse, redactions: Redactions) -> str:
        # Only a prefix is kept, so only a prefix is read: a huge response costs no memory.
        # The extra bytes let a secret straddling the cut still be recognised and redacted.
        want = max(self.config.max_result_bytes, EXCERPT_CHARS * 4)
        want += max((len(s.encode()) for s, _ in redactions), default=0)
        data = bytearray()
        while len(data) < want:
            chunk = await resp.content.read(want - len(data))
            if not chunk:
                break
            data += chunk
        return _redact(_decode(bytes(data), resp.charset), redactions)

    def _outcome(self, call: Call, resp: aiohttp.ClientResponse, text: str) -> dict[str, Any]:
        status = resp.status
        excerpt = " ".join(text[:EXCERPT_CHARS].split())
        what = f"HTTP {status} from {call.method} {call.where}"
        if 200 <= status < 300:
            limit = self.config.max_result_bytes
            return {"status": status, "body": text.encode()[:limit].decode(errors="ignore")}
        if status == 429 or status >= 500:
            delay = retry_after(resp.headers.get("Retry-After"))
            if delay is not None:
                raise RetryJob(f"{what} (Retry-After {delay:g}s): {excerpt}", delay=delay)
            raise WebhookError(f"{what}: {excerpt}")
        if 300 <= status < 400:
            location = resp.headers.get("Location", "(no Location)")
            location = _redact(location, call.redactions)[:EXCERPT_CHARS]
            raise PermanentJobError(
                f"{what}: redirect to {location} not followed, since it could leave "
                "webhooks.allowed_hosts; point the target or url at the final address"
            )
        raise PermanentJobError(f"{what}: {excerpt}")

    async def close(self) -> None:
        await self.session.close()
        await self.payload_session.close()


def retry_after(value: str | None) -> float | None:
    """Seconds to wait from a Retry-After header (seconds or an HTTP date), within a day;
    None when absent or unreadable, so the queue's backoff applies."""
    if not value:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():
        seconds = float(value)
    else:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = (when - datetime.now(UTC)).total_seconds()
    return min(max(seconds, 0.0), MAX_RETRY_AFTER)


def _decode(data: bytes, charset: str | None) -> str:
    try:
        info = codecs.lookup(charset or "utf-8")
        if not info._is_text_encoding:  # hex, base64, zlib...: not a charset at all
            raise LookupError(charset)
        decoder = info.incrementaldecoder(errors="replace")
    except (LookupError, TypeError):
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    # final=False drops a character cut in half by the prefix; PostgreSQL refuses NUL in jsonb.
    return decoder.decode(data, final=False).replace("\x00", "\ufffd")


def _redactable(values: list[str]) -> list[str]:
    found = set(values)
    # Servers that echo credentials may echo only the token of "Bearer <token>".
    found.update(value.rsplit(" ", 1)[-1] for value in values)
    return sorted(found)


def shown_url(url: URL) -> str:
    """What logs and errors may show of a URL: scheme://host[:port]/..."""
    return f"{url.origin()}/..."


def _redactions(url: str, secrets: list[str]) -> Redactions:
    pairs = {secret: REDACTED for secret in secrets}
    pairs.update(_url_redactions(url))
    kept = ((hide, show) for hide, show in pairs.items() if len(hide) >= 4)
    return tuple(sorted(kept, key=lambda pair: len(pair[0]), reverse=True))


def _url_redactions(url: str) -> dict[str, str]:
    """Each spelling in which a server or aiohttp may echo the URL, its path, its query values
    or its token-like path segments: as written, as yarl normalises it, and decoded."""
    parsed, written = URL(url), urlsplit(url)
    pairs = dict.fromkeys({url, str(parsed), parsed.human_repr()}, shown_url(parsed))
    paths = {written.path, parsed.raw_path, parsed.path} - {"", "/"}
    if written.query:
        paths |= {f"{written.path}?{written.query}", parsed.raw_path_qs, parsed.path_qs}
    pairs.update(dict.fromkeys(paths, "/..."))
    values = {v for _, v in parse_qsl(written.query, keep_blank_values=True)}
    values |= {v for pair in written.query.split("&") for v in pair.split("=", 1)[1:]}
    segments = {seg for path in paths for seg in path.split("?")[0].split("/")}
    values |= {seg for seg in segments if _tokenish(seg)}
    pairs.update(dict.fromkeys(values, REDACTED))
    return pairs


def _tokenish(segment: str) -> bool:
    # Names like "services" or "webhooks" stay readable; ids and tokens carry digits or length.
    return len(segment) >= 16 or (len(segment) >= 8 and any(c.isdigit() for c in segment))


def _redact(text: str, redactions: Redactions) -> str:
    for hidden, shown in redactions:
        text = text.replace(hidden, shown)
    return text


# The daemon's one Webhooks, made at start-up (handlers get no constructor arguments).
@resource(Webhooks)
@asynccontextmanager
async def webhooks(settings: Settings) -> AsyncIterator[Webhooks]:
    """The daemon's HTTP sessions, open from start-up to the last job."""
    hooks = Webhooks(settings.webhooks)
    log.info("http.request: %d webhook target(s) configured", len(settings.webhooks.targets))
    try:
        yield hooks
    finally:
        await hooks.close()


@handler("http.request", payload=HttpRequest)
async def http_request(ctx: JobContext, req: HttpRequest) -> dict[str, Any]:
    hooks = ctx.resource(Webhooks)
    call = hooks.resolve(req)
    # A body given as `"json": null` is sent as null; an absent one sends no body at all.
    body = json.dumps(req.body).encode() if "body" in req.model_fields_set else None
    return await hooks.send(ctx, call, body)


__all__ = [
    "HttpRequest",
    "RefusedAddress",
    "Webhooks",
    "guarded_socket",
    "http_request",
    "refused_range",
    "retry_after",
]
