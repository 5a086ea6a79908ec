"""[alerts]: where alert messages go (destinations) and what deserves one (rules).

A destination's `url` and `secret` are credentials (a Slack or Discord webhook URL carries its
token in the path): secret values, never shown by repr, dumps or configuration errors. Give them
as references (`url = "${SLACK_ALERTS_URL}"`) or through the environment
(`STOKER_ALERTS__DESTINATIONS__OPS__URL`)."""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import Field, SecretStr, ValidationInfo, field_validator, model_validator

from daemon.config.builtins import TASK_NAME
from daemon.config.models import QUEUE_NAME, Seconds, Strict

EVENTS = ("job_failed", "schedule_failing", "schedule_late", "schedule_slow", "queue_backlog")
Event = Literal["job_failed", "schedule_failing", "schedule_late", "schedule_slow", "queue_backlog"]
# The thresholds each event reads; any other threshold on a rule is a mistake worth naming.
THRESHOLDS: dict[str, tuple[str, ...]] = {
    "job_failed": ("recover_after",),
    "schedule_failing": ("alert_after_failures",),
    "schedule_late": ("grace",),
    "schedule_slow": ("max_duration",),
    "queue_backlog": ("max_wait",),
}
REQUIRED = {"schedule_slow": "max_duration", "queue_backlog": "max_wait"}
FILTERS: dict[str, tuple[str, ...]] = {
    "job_failed": ("queues", "kinds"),
    "schedule_failing": ("schedules",),
    "schedule_late": ("schedules",),
    "schedule_slow": ("schedules",),
    "queue_backlog": ("queues",),
}
ADDRESS = re.compile(r"^[^@\s]+@[^@\s]+$")


class AlertDestination(Strict):
    """Where an alert message goes: a chat webhook, a signed JSON webhook, or email."""

    type: Literal["slack", "discord", "webhook", "email"]
    url: SecretStr | None = Field(None, description="slack, discord, webhook: the endpoint")
    secret: SecretStr | None = Field(
        None, description="webhook: HMAC-SHA256 key; X-Stoker-Signature: sha256=<hex of body>"
    )
    to: list[str] = Field(default_factory=list, description="email: the recipients")
    template: str = Field("alert", pattern=r"^[A-Za-z0-9_.-]+$", description="email template")
    timeout: Seconds = Field(10.0, gt=0, le=300)

    @field_validator("to", mode="before")
    @classmethod
    def _split(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @model_validator(mode="after")
    def _complete(self) -> AlertDestination:
        if self.type == "email":
            if not self.to:
                raise ValueError("an email destination needs `to` (one address or a list)")
            for address in self.to:
                if not ADDRESS.match(address):
                    raise ValueError(f"to: {address!r} is not an email address")
            if self.url is not None or self.secret is not None:
                raise ValueError("an email destination takes `to` and `template`, not url/secret")
            return self
        if self.url is None:
            raise ValueError(
                f"a {self.type} destination needs `url` (from the environment, e.g. "
                'url = "${ALERTS_URL}")'
            )
        if not re.match(r"^https?://[^/\s]+", self.url.get_secret_value()):
            # The value is a credential: the message never repeats it.
            raise ValueError("url must be an http:// or https:// URL (value not shown)")
        if self.secret is not None and self.type != "webhook":
            raise ValueError('`secret` signs generic webhooks only (type = "webhook")')
        if self.to:
            raise ValueError(f"`to` is for email destinations, not {self.type}")
        return self


class AlertRule(Strict):
    """What deserves a message: an event, its thresholds and filters, and where it goes."""

    event: Event
    destinations: list[str] = Field(min_length=1)
    queues: list[str] = Field(default_factory=list, description="only these queues")
    kinds: list[str] = Field(default_factory=list, description="job_failed: only these kinds")
    schedules: list[str] = Field(default_factory=list, description="only these schedules")
    alert_after_failures: int | None = Field(None, ge=1, le=10_000)
    grace: Seconds | None = Field(None, gt=0)
    max_duration: Seconds | None = Field(None, gt=0)
    max_wait: Seconds | None = Field(None, gt=0)
    recover_after: Seconds | None = Field(
        None, gt=0, description="job_failed: close after this long without a new failure"
    )

    @model_validator(mode="after")
    def _thresholds(self) -> AlertRule:
        needed = REQUIRED.get(self.event)
        if needed and getattr(self, needed) is None:
            raise ValueError(f'event {self.event} needs {needed} (seconds, or text such as "5m")')
        for name in ("alert_after_failures", "grace", "max_duration", "max_wait", "recover_after"):
            if getattr(self, name) is not None and name not in THRESHOLDS[self.event]:
                raise ValueError(f"{name} is not read by event {self.event}: remove it")
        for name in ("queues", "kinds", "schedules"):
            if getattr(self, name) and name not in FILTERS[self.event]:
                raise ValueError(
                    f"{name} does not filter event {self.event} "
                    f"(it takes {', '.join(FILTERS[self.event])})"
                )
        for queue in self.queues:
            if not QUEUE_NAME.match(queue):
                raise ValueError(f"queues: {queue!r} is not a valid queue name")
        return self

    @property
    def failures(self) -> int:
        return self.alert_after_failures or 1

    @property
    def late_after(self) -> float:
        return self.grace if self.grace is not None else 60.0

    @property
    def quiet(self) -> float:
        return self.recover_after if self.recover_after is not None else 3600.0


class AlertsConfig(Strict):
    """Alert rules evaluated by the leader; messages delivered as jobs on an internal queue."""

    digest_interval: Seconds = Field(
        300.0,
        gt=0,
        description="repeats of an open incident are folded into one message this often",
    )
    evaluate_interval: Seconds = Field(
        2.0, gt=0, le=600, description="seconds between the leader's passes over the rules"
    )
    queue: str = Field(
        "stoker.alerts",
        description="the internal queue alert messages and pings are delivered from",
    )
    concurrency: int = Field(
        2, ge=1, le=100, description="alert deliveries at once per daemon ([queues.X] wins)"
    )
    max_attempts: int = Field(
        25, ge=1, le=1000, description="attempts to deliver one message before giving up"
    )
    serve_queue: bool = Field(
        False,
        description="serve the alert queue even with no rule or configured ping_url (for "
        "ping_url set on rows of stoker.schedules only)",
    )
    # Destinations hold credentials: kept out of any repr of Settings.
    destinations: dict[str, AlertDestination] = Field(default_factory=dict, repr=False)
    rules: dict[str, AlertRule] = Field(default_factory=dict)

    @field_validator("destinations", "rules")
    @classmethod
    def _names(cls, value: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        for name in value:
            if not TASK_NAME.match(name):
                section = str(info.field_name)
                raise ValueError(
                    f"{section} name {name!r} is not valid: use lowercase a-z 0-9 _ . - (so "
                    f"that STOKER_ALERTS__{section.upper()}__<NAME>__... can override it)"
                )
        return value

    @field_validator("queue")
    @classmethod
    def _queue_name(cls, value: str) -> str:
        if not QUEUE_NAME.match(value):
            raise ValueError(f"{value!r} is not a valid queue name")
        return value

    @model_validator(mode="after")
    def _known_destinations(self) -> AlertsConfig:
        known = ", ".join(sorted(self.destinations)) or "none configured"
        for name, rule in self.rules.items():
            for dest in rule.destinations:
                if dest not in self.destinations:
                    raise ValueError(
                        f"rules.{name}.destinations: {dest!r} is not a configured destination "
                        f"(known: {known}); add [alerts.destinations.{dest}]"
                    )
            if self.queue in rule.queues:
                raise ValueError(
                    f"rules.{name}.queues: the alert queue {self.queue!r} cannot be watched "
                    "by an alert rule (its messages would alert about themselves)"
                )
        return self

    @property
    def in_use(self) -> bool:
        return bool(self.rules) or self.serve_queue


__all__ = ["EVENTS", "AlertDestination", "AlertRule", "AlertsConfig", "Event"]
