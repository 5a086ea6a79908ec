"""Cron arithmetic across daylight-saving changes, pinned to real instants (America/New_York,
2026: clocks spring forward on 8 March at 02:00 and fall back on 1 November at 02:00)."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from daemon.cron.cronspec import CronSpec

NY = ZoneInfo("America/New_York")


def utc(
    year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0
) -> datetime:
    return datetime(year, month, day, hour, minute, second, tzinfo=UTC)


def ticks_on(spec: CronSpec, year: int, month: int, day: int) -> list[datetime]:
    start = datetime(year, month, day, tzinfo=NY).astimezone(UTC)
    end = (datetime(year, month, day) + timedelta(days=1)).replace(tzinfo=NY).astimezone(UTC)
    found, t = [], start - timedelta(seconds=1)
    while (t := spec.next_after(t)) < end:
        found.append(t)
    return found


def test_daily_0230_across_spring_forward_and_fall_back() -> None:
    spec = CronSpec("30 2 * * *", "America/New_York")
    assert spec.next_after(utc(2026, 3, 7, 0)) == utc(2026, 3, 7, 7, 30)  # 02:30 EST
    # 02:30 does not exist on 8 March: it runs at the first instant after the gap, 03:00 EDT.
    assert spec.next_after(utc(2026, 3, 7, 7, 30)) == utc(2026, 3, 8, 7, 0)
    assert spec.next_after(utc(2026, 3, 8, 7, 0)) == utc(2026, 3, 9, 6, 30)  # 02:30 EDT
    assert spec.next_after(utc(2026, 10, 31, 0)) == utc(2026, 10, 31, 6, 30)  # 02:30 EDT
    # 1 November: 02:30 EST happens once (the repeated hour is 01:00-02:00).
    assert spec.next_after(utc(2026, 10, 31, 6, 30)) == utc(2026, 11, 1, 7, 30)
    assert spec.next_after(utc(2026, 11, 1, 7, 30)) == utc(2026, 11, 2, 7, 30)


def test_daily_0130_runs_once_on_fall_back_day_at_the_first_occurrence() -> None:
    spec = CronSpec("30 1 * * *", "America/New_York")
    assert ticks_on(spec, 2026, 11, 1) == [utc(2026, 11, 1, 5, 30)]  # 01:30 EDT, not EST


@pytest.mark.parametrize(("day", "count"), [(8, 23), (9, 24)])
def test_hourly_fires_23_times_on_spring_forward_day(day: int, count: int) -> None:
    ticks = ticks_on(CronSpec("0 * * * *", "America/New_York"), 2026, 3, day)
    assert len(ticks) == count
    assert len(set(ticks)) == count


def test_hourly_fires_25_times_on_fall_back_day_every_real_hour_once() -> None:
    ticks = ticks_on(CronSpec("0 * * * *", "America/New_York"), 2026, 11, 1)
    assert len(ticks) == len(set(ticks)) == 25
    # 01:00 EDT and 01:00 EST are both real hours: both fire, an hour apart.
    assert utc(2026, 11, 1, 5) in ticks
    assert utc(2026, 11, 1, 6) in ticks
    assert all(b - a == timedelta(hours=1) for a, b in itertools.pairwise(ticks))


def test_seconds_field_comes_first() -> None:
    spec = CronSpec("*/15 * * * * *")
    assert spec.next_after(utc(2026, 1, 1, 0, 0, 1)) == utc(2026, 1, 1, 0, 0, 15)


def test_latest_ticks_for_catch_up() -> None:
    spec = CronSpec("* * * * *")
    got = spec.latest_ticks(utc(2026, 1, 1, 0, 0), utc(2026, 1, 1, 0, 5, 30), 3)
    assert got == [utc(2026, 1, 1, 0, 3), utc(2026, 1, 1, 0, 4), utc(2026, 1, 1, 0, 5)]
    assert spec.latest_ticks(utc(2026, 1, 1, 0, 5), utc(2026, 1, 1, 0, 5, 30), 3) == []


@pytest.mark.parametrize(
    ("expr", "zone", "message"),
    [
        ("61 * * * *", "UTC", "invalid cron expression '61 * * * *'"),
        ("* * * *", "UTC", "invalid cron expression '* * * *': expected 5 fields"),
        ("0 2 * * *", "Mars/Olympus", "unknown time zone 'Mars/Olympus'"),
    ],
)
def test_invalid_expressions_are_named(expr: str, zone: str, message: str) -> None:
    with pytest.raises(ValueError, match="^" + message.replace("*", r"\*")):
        CronSpec(expr, zone)


def test_latest_ticks_around_the_repeated_hour() -> None:
    # Catching up inside or after the fall-back hour must not miss its first occurrences.
    daily = CronSpec("30 1 * * *", "America/New_York")
    assert daily.latest_ticks(utc(2026, 11, 1, 5, 2), utc(2026, 11, 1, 6, 2), 1) == [
        utc(2026, 11, 1, 5, 30)
    ]
    quarterly = CronSpec("*/15 * * * *", "America/New_York")
    assert quarterly.latest_ticks(utc(2026, 11, 1, 5, 0), utc(2026, 11, 1, 6, 2), 10) == [
        utc(2026, 11, 1, 5, 15),
        utc(2026, 11, 1, 5, 30),
        utc(2026, 11, 1, 5, 45),
        utc(2026, 11, 1, 6, 0),
    ]


def test_an_expression_that_never_fires_is_refused() -> None:
    with pytest.raises(ValueError, match=r"^invalid cron expression '0 0 30 2 \*'"):
        CronSpec("0 0 30 2 *")
