"""Incidents and their messages: one message when a condition starts, repeats folded into at
most one digest per digest_interval while it lasts, one recovery message when it ends.

Everything one evaluation of a rule decides (incidents opened, counted, closed, the rule's
cursor, and the message jobs) is written in that evaluation's one transaction, so a leader
killed midway leaves nothing half done: the next leader starts from the same rows."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import asyncpg

from daemon.alerts import queries
from daemon.config.alerts import AlertRule, AlertsConfig

ERROR_CHARS = 300
DELIVER_KIND = "alert.deliver"
# The document's fields besides event, incident_id, started_at, count and text.
SUBJECT_FIELDS = ("schedule", "queue", "kind", "job_id", "attempt", "error")


def first_line(error: str | None) -> str | None:
    """An error's first line, cut short: enough to recognise it, never a whole traceback."""
    if not error:
        return None
    line = error.strip().splitlines()[0] if error.strip() else ""
    return line if len(line) <= ERROR_CHARS else line[: ERROR_CHARS - 1] + "…"


def span(seconds: float) -> str:
    """A duration as people say it: 45 s, 10 minutes, 3 hours."""
    if seconds < 90:
        return f"{seconds:.0f} s" if seconds >= 10 else f"{seconds:.1f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} minutes"
    if seconds < 129_600:
        return f"{seconds / 3600:.0f} hours"
    return f"{seconds / 86_400:.0f} days"


def utc(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%d %H:%M:%S UTC")


def as_dict(value: Any) -> dict[str, Any]:
    """A jsonb value read with or without the codec."""
    if isinstance(value, str):
        value = json.loads(value)
    return dict(value) if isinstance(value, dict) else {}


@dataclass
class Incident:
    id: int
    event: str
    subject: str
    opened_at: datetime
    count: int
    reported: int
    last_message_at: datetime | None
    cursor: dict[str, Any] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)
    touched: bool = False

    @classmethod
    def from_row(cls, row: asyncpg.Record) -> Incident:
        return cls(
            id=row["id"],
            event=row["event"],
            subject=row["subject"],
            opened_at=row["opened_at"],
            count=row["count"],
            reported=row["reported"],
            last_message_at=row["last_message_at"],
            cursor=as_dict(row["cursor"]),
            details=as_dict(row["details"]),
        )


def document(
    event: str, incident: Incident, text: str, rule: str, count: int | None = None
) -> dict[str, Any]:
    """The message every destination gets (a generic webhook receives it as it is). No payload
    values: they may hold personal data."""
    doc: dict[str, Any] = {
        "event": event,
        "rule": rule,
        "incident_id": incident.id,
        "started_at": incident.opened_at.isoformat(),
    }
    for name in SUBJECT_FIELDS:
        doc[name] = incident.details.get(name)
    doc["count"] = incident.count if count is None else count
    doc["text"] = text
    return doc


class RuleRun:
    """One evaluation of one rule on one connection, inside its transaction."""

    def __init__(
        self,
        conn: asyncpg.Connection,
        now: datetime,
        name: str,
        rule: AlertRule,
        config: AlertsConfig,
        cursor: dict[str, Any],
        incidents: dict[str, Incident],
    ) -> None:
        self.conn = conn
        self.now = now
        self.name = name
        self.rule = rule
        self.config = config
        self.cursor = cursor
        self.incidents = incidents
        self.sent: list[dict[str, Any]] = []  # documents enqueued, for the log

    @classmethod
    async def load(
        cls,
        conn: asyncpg.Connection,
        now: datetime,
        name: str,
        rule: AlertRule,
        config: AlertsConfig,
    ) -> RuleRun:
        position = await conn.fetchval(queries.CURSOR, name)
        rows = await conn.fetch(queries.OPEN_INCIDENTS, name)
        incidents = {r["subject"]: Incident.from_row(r) for r in rows}
        return cls(conn, now, name, rule, config, as_dict(position), incidents)

    async def save_cursor(self) -> None:
        await self.conn.execute(queries.SAVE_CURSOR, self.name, json.dumps(self.cursor))

    # -- the life of an incident ---------------------------------------------------------------

    async def open(
        self,
        event: str,
        subject: str,
        text: str,
        *,
        count: int = 1,
        cursor: dict[str, Any] | None = None,
        details: dict[str, Any] | None = None,
    ) -> Incident | None:
        """Open an incident and send its first message; None if one is open already."""
        row = await self.conn.fetchrow(
            queries.OPEN_INCIDENT,
            self.name,
            event,
            subject,
            count,
            json.dumps(cursor or {}),
            json.dumps(details or {}, default=str),
        )
        if row is None:
            return None
        incident = Incident(
            id=row["id"],
            event=event,
            subject=subject,
            opened_at=row["opened_at"],
            count=count,
            reported=count,
            last_message_at=self.now,
            cursor=cursor or {},
            details=details or {},
        )
        self.incidents[subject] = incident
        await self.send(event, incident, text)
        return incident

    def add(self, incident: Incident, occurrences: int, **details: Any) -> None:
        """More of what the incident is about; told in the next digest."""
        incident.count += occurrences
        incident.details.update(details)
        incident.touched = True

    async def close(self, incident: Incident, text: str, **details: Any) -> None:
        """The condition ended: one recovery message, counting what no message told yet."""
        incident.details.update(details)
        await self.conn.execute(
            queries.CLOSE_INCIDENT,
            incident.id,
            incident.count,
            json.dumps(incident.cursor, default=str),
            json.dumps(incident.details, default=str),
        )
        del self.incidents[incident.subject]
        await self.send(f"{incident.event}_recovered", incident, text)

    async def digest(self, noun: str) -> None:
        """Fold what happened since an open incident's last message into one message, at most
        once per digest_interval; then write back every incident this evaluation changed."""
        for incident in list(self.incidents.values()):
            new = incident.count - incident.reported
            last = incident.last_message_at or incident.opened_at
            waited = (self.now - last).total_seconds()
            if new > 0 and waited >= self.config.digest_interval:
                what = incident.details.get("what") or noun
                latest = incident.details.get("latest")
                text = f"and {new} more {what} in the last {span(waited)}"
                if latest:
                    text += f" (latest: {latest})"
                await self.send(incident.event, incident, text, count=new)
                incident.reported = incident.count
                incident.last_message_at = self.now
                incident.touched = True
            if incident.touched:
                await self.conn.execute(
                    queries.UPDATE_INCIDENT,
                    incident.id,
                    incident.count,
                    incident.reported,
                    incident.last_message_at,
                    json.dumps(incident.cursor, default=str),
                    json.dumps(incident.details, default=str),
                )
                incident.touched = False

    async def send(
        self, event: str, incident: Incident, text: str, count: int | None = None
    ) -> None:
        """One alert.deliver job per destination, in this evaluation's transaction."""
        doc = document(event, incident, text, self.name, count)
        meta = {"alert": {"rule": self.name, "incident_id": incident.id, "event": event}}
        for destination in self.rule.destinations:
            await self.conn.fetchval(
                queries.ENQUEUE_MESSAGE,
                self.config.queue,
                DELIVER_KIND,
                json.dumps({"destination": destination, "message": doc}, default=str),
                self.config.max_attempts,
                json.dumps(meta),
            )
        self.sent.append(doc)
