"""Cron expressions in a time zone, with explicit daylight-saving rules.

croniter walks naive local wall time; each wall time is then resolved in the zone:
- a wall time that does not exist (spring forward) fires at the first instant after the gap;
- a wall time that occurs twice (fall back) fires once, at its first occurrence, unless the
  schedule is hourly or finer (hour field `*`), where every real instant fires once.
Six fields mean seconds first (`*/10 * * * * *`: every ten seconds), as in node-cron.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import CroniterError, croniter

NEAR = timedelta(hours=3)


def parse_zone(name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(
            f"unknown time zone {name!r}: use an IANA name such as 'UTC' or 'America/New_York'"
        ) from None


@dataclass(frozen=True)
class CronSpec:
    expr: str
    timezone: str = "UTC"
    zone: ZoneInfo = field(init=False, repr=False, compare=False)
    seconds: bool = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        fields = self.expr.split()
        if len(fields) not in (5, 6):
            raise ValueError(
                f"invalid cron expression {self.expr!r}: expected 5 fields (minute hour day "
                "month weekday) or 6 with seconds first"
            )
        object.__setattr__(self, "seconds", len(fields) == 6)
        object.__setattr__(self, "zone", parse_zone(self.timezone))
        try:
            croniter(self.expr, datetime(2026, 1, 1), second_at_beginning=self.seconds)
            # Parses is not enough: "0 0 30 2 *" (30 February) never fires.
            self.next_after(datetime(2026, 1, 1, tzinfo=UTC))
        except (CroniterError, ValueError, KeyError) as exc:
            raise ValueError(f"invalid cron expression {self.expr!r}: {exc}") from None

    @property
    def hourly_or_finer(self) -> bool:
        hour = self.expr.split()[2 if self.seconds else 1]
        return hour in ("*", "*/1")

    def _iter(self, wall: datetime) -> croniter:
        return croniter(self.expr, wall, second_at_beginning=self.seconds)

    def _wall(self, instant: datetime) -> datetime:
        return instant.astimezone(self.zone).replace(tzinfo=None)

    def instants(self, wall: datetime) -> list[datetime]:
        """The real instants (UTC) at which naive local `wall` time fires, earliest first."""
        first = wall.replace(tzinfo=self.zone, fold=0).astimezone(UTC)
        second = wall.replace(tzinfo=self.zone, fold=1).astimezone(UTC)
        if first == second:
            return [first]
        if self._wall(first) == wall:  # it exists twice: fall back
            both = sorted((first, second))
            return both if self.hourly_or_finer else both[:1]
        return [self._after_gap(min(first, second), max(first, second))]

    def _after_gap(self, low: datetime, high: datetime) -> datetime:
        """The instant the clocks jump forward, between the two readings of a missing time."""
        after = high.astimezone(self.zone).utcoffset()
        lo, hi = int(low.timestamp()), int(high.timestamp())
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if datetime.fromtimestamp(mid, UTC).astimezone(self.zone).utcoffset() == after:
                hi = mid
            else:
                lo = mid
        return datetime.fromtimestamp(hi, UTC)

    def next_after(self, after: datetime) -> datetime:
        """The first tick strictly after `after` (an aware datetime); returned in UTC."""
        after = after.astimezone(UTC)
        shift = self._shift_near(after)
        if shift is None:
            # No transition nearby: wall times map one to one onto instants.
            wall = self._iter(self._wall(after)).get_next(datetime)
            return self.instants(wall)[0]
        it = self._iter(self._wall(after - shift))
        best: datetime | None = None
        for _ in range(100_000):
            wall = it.get_next(datetime)
            for instant in self.instants(wall):
                if instant > after and (best is None or instant < best):
                    best = instant
            if best is not None and wall > self._wall(best) + shift:
                return best
        raise ValueError(f"cron expression {self.expr!r} has no tick after {after}")

    def _shift_near(self, at: datetime) -> timedelta | None:
        """The size of a clock change within reach of `at` (a margin added), else None."""
        before = (at - NEAR).astimezone(self.zone).utcoffset()
        later = (at + NEAR).astimezone(self.zone).utcoffset()
        if before is None or later is None or before == later:
            return None
        shift = abs(later - before) + timedelta(seconds=1)
        close_before = (at - shift).astimezone(self.zone).utcoffset()
        close_later = (at + shift).astimezone(self.zone).utcoffset()
        return shift if close_before != close_later else None

    def latest_ticks(self, after: datetime, upto: datetime, limit: int) -> list[datetime]:
        """Up to `limit` most recent ticks in (after, upto], oldest first (for catch-up).

        Walks wall times backwards. Near a clock change, wall order and instant order differ
        (the first pass of a repeated hour has later wall times than the start of the second),
        so the walk starts and stops a clock change's width beyond the window."""
        shift = self._shift_near(upto) or self._shift_near(after) or timedelta(0)
        floor = self._wall(after) - shift
        it = croniter(
            self.expr,
            self._wall(upto) + shift + timedelta(seconds=1),
            second_at_beginning=self.seconds,
            is_prev=True,
        )
        found: set[datetime] = set()
        for _ in range(100_000):
            wall = it.get_prev(datetime)
            if wall < floor:
                break
            found.update(i for i in self.instants(wall) if after < i <= upto)
            if len(found) >= limit:
                nth = sorted(found)[-limit]
                if wall < self._wall(nth) - shift - timedelta(seconds=1):
                    break
        return sorted(found)[-limit:] if limit else []
