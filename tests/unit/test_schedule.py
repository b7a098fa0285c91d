"""Schedule math with explicit datetimes: zones, both DST transitions, intervals, catch-up."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import pytest

from ipaas.engine.schedule import due_fire, next_fire

U = timezone.utc


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=U)


@pytest.mark.parametrize(
    "trigger,after,expected",
    [
        ({"cron": "0 7 * * *", "timezone": "America/New_York"}, utc(2026, 1, 10), utc(2026, 1, 10, 12)),
        ({"cron": "0 7 * * *", "timezone": "America/New_York"}, utc(2026, 7, 10), utc(2026, 7, 10, 11)),
        ({"cron": "0 7 * * *", "timezone": "UTC"}, utc(2026, 7, 10, 7), utc(2026, 7, 11, 7)),
        ({"cron": "*/15 * * * *"}, utc(2026, 7, 10, 7, 1), utc(2026, 7, 10, 7, 15)),
        # Europe/Paris springs forward on 2026-03-29 at 02:00: 02:30 does not exist; it runs once, right after the gap (03:00 CEST)
        ({"cron": "30 2 * * *", "timezone": "Europe/Paris"}, utc(2026, 3, 28, 12), utc(2026, 3, 29, 1)),
        ({"cron": "30 2 * * *", "timezone": "Europe/Paris"}, utc(2026, 3, 29, 1), utc(2026, 3, 30, 0, 30)),
        # Europe/Paris falls back on 2026-10-25: 02:30 happens twice; it runs once, at the first
        ({"cron": "30 2 * * *", "timezone": "Europe/Paris"}, utc(2026, 10, 24, 12), utc(2026, 10, 25, 0, 30)),
        ({"cron": "30 2 * * *", "timezone": "Europe/Paris"}, utc(2026, 10, 25, 0, 30), utc(2026, 10, 26, 1, 30)),
        ({"cron": "30 1 * * *", "timezone": "America/New_York"}, utc(2026, 11, 1, 5, 30), utc(2026, 11, 2, 6, 30)),
        ({"interval_seconds": 300}, utc(2026, 7, 10, 7, 1), utc(2026, 7, 10, 7, 5)),
        ({"interval_seconds": 300}, utc(2026, 7, 10, 7, 5), utc(2026, 7, 10, 7, 10)),
    ],
)
def test_next_fire(trigger: dict, after: datetime, expected: datetime) -> None:
    assert next_fire({"type": "schedule", **trigger}, after) == expected


def test_a_daily_job_fires_once_on_each_dst_day() -> None:
    trigger = {"cron": "30 2 * * *", "timezone": "Europe/Paris"}
    for start in (utc(2026, 3, 28), utc(2026, 10, 24)):
        fires, t = [], start
        while (t := next_fire(trigger, t)) < start + timedelta(days=3):
            fires.append(t)
        assert len(fires) == 3


def fires(trigger: dict, start: datetime, end: datetime) -> list[datetime]:
    found, t = [], start
    while (t := next_fire(trigger, t)) < end:
        found.append(t)
    return found


@pytest.mark.parametrize(
    "cron,hours",
    [
        # America/New_York falls back on 2025-11-02: 01:00 local is 05:00 UTC (EDT), then again 06:00 UTC (EST)
        ("0 * * * *", [4, 5, 6, 7, 8]),
        ("0 */1 * * *", [4, 5, 6, 7, 8]),
        ("0 0-23 * * *", [4, 5, 6, 7, 8]),
        ("0 1 * * *", [5]),
        ("0 1-2 * * *", [5, 7]),
    ],
)
def test_the_autumn_night_repeats_no_fixed_hour_and_skips_no_hourly_fire(cron: str, hours: list[int]) -> None:
    trigger = {"cron": cron, "timezone": "America/New_York"}
    assert fires(trigger, utc(2025, 11, 2, 3, 30), utc(2025, 11, 2, 8, 30)) == [utc(2025, 11, 2, h) for h in hours]


EVERY_5_MIN = {"type": "schedule", "interval_seconds": 300}


def test_new_schedule_plans_without_firing() -> None:
    assert due_fire(EVERY_5_MIN, None, utc(2026, 1, 1, 0, 2)) == (None, utc(2026, 1, 1, 0, 5))


def test_not_yet_due() -> None:
    assert due_fire(EVERY_5_MIN, utc(2026, 1, 1, 0, 5), utc(2026, 1, 1, 0, 4)) == (None, utc(2026, 1, 1, 0, 5))


def test_due_now_fires_and_plans_the_next() -> None:
    assert due_fire(EVERY_5_MIN, utc(2026, 1, 1, 0, 5), utc(2026, 1, 1, 0, 5, 1)) == (utc(2026, 1, 1, 0, 5), utc(2026, 1, 1, 0, 10))


def test_downtime_collapses_missed_fires_into_one() -> None:
    fire, planned = due_fire(EVERY_5_MIN, utc(2026, 1, 1, 0, 5), utc(2026, 1, 1, 3, 2))
    assert fire == utc(2026, 1, 1, 3, 0)
    assert planned == utc(2026, 1, 1, 3, 5)


def test_downtime_can_skip_missed_fires() -> None:
    assert due_fire(EVERY_5_MIN, utc(2026, 1, 1, 0, 5), utc(2026, 1, 1, 3, 2), catch_up="skip") == (None, utc(2026, 1, 1, 3, 5))
    # a fire that is only just due still runs when skipping
    assert due_fire(EVERY_5_MIN, utc(2026, 1, 1, 0, 5), utc(2026, 1, 1, 0, 5, 30), catch_up="skip")[0] == utc(2026, 1, 1, 0, 5)


def test_cron_catch_up_in_a_zone() -> None:
    trigger = {"type": "schedule", "cron": "0 7 * * *", "timezone": "Europe/Paris"}
    fire, planned = due_fire(trigger, utc(2026, 1, 5, 6), utc(2026, 1, 8, 9))
    assert fire == utc(2026, 1, 8, 6)
    assert planned == utc(2026, 1, 9, 6)


@pytest.mark.parametrize(
    "cron,hours",
    [
        # every candidate of the repeated 1 AM hour (06:00-06:59 UTC) is skipped, not just 4
        ("*/15 1 * * *", [(5, 0), (5, 15), (5, 30), (5, 45)]),
        ("0,5,10,15,20 1 * * *", [(5, 0), (5, 5), (5, 10), (5, 15), (5, 20)]),
        ("*/30 1-2 * * *", [(5, 0), (5, 30), (7, 0), (7, 30)]),  # 02:00 EST, right at the fold's end
        ("* 1 * * *", [(5, m) for m in range(60)]),
    ],
)
def test_a_fixed_hour_cron_runs_only_in_the_first_of_the_repeated_hours(cron: str, hours: list[tuple[int, int]]) -> None:
    trigger = {"cron": cron, "timezone": "America/New_York"}  # falls back on 2026-11-01
    assert fires(trigger, utc(2026, 11, 1, 4), utc(2026, 11, 1, 8)) == [utc(2026, 11, 1, h, m) for h, m in hours]


def test_a_half_hour_fall_back_repeats_no_fixed_hour_fire() -> None:
    # Lord Howe falls back 30 minutes on 2026-04-05: 01:30-02:00 local happens twice.
    trigger = {"cron": "*/10 1 * * *", "timezone": "Australia/Lord_Howe"}
    local = [t.astimezone(ZoneInfo("Australia/Lord_Howe")).strftime("%H:%M%z") for t in fires(trigger, utc(2026, 4, 4, 13), utc(2026, 4, 4, 16))]
    assert local == ["01:00+1100", "01:10+1100", "01:20+1100", "01:30+1100", "01:40+1100", "01:50+1100"]


def test_skip_mode_fires_what_fell_due_since_the_last_tick_however_late() -> None:
    """A 120 s tick finds the 09:05 fire at 09:06:30: not missed, though over a minute late."""
    trigger = {"type": "schedule", "cron": "*/5 * * * *"}
    last_tick = utc(2026, 1, 1, 9, 4, 30)
    assert due_fire(trigger, utc(2026, 1, 1, 9, 5), utc(2026, 1, 1, 9, 6, 30), "skip", missed_before=last_tick - timedelta(minutes=1)) == (utc(2026, 1, 1, 9, 5), utc(2026, 1, 1, 9, 10))
    assert due_fire(trigger, utc(2026, 1, 1, 9, 5), utc(2026, 1, 1, 9, 6, 30), "skip", missed_before=utc(2026, 1, 1, 9, 5, 1)) == (None, utc(2026, 1, 1, 9, 10))


@pytest.mark.parametrize("cron,expected", [("0 1 * * *", utc(2026, 11, 1, 5)), ("*/15 1 * * *", utc(2026, 11, 1, 5, 45)), ("* 1 * * *", utc(2026, 11, 1, 5, 59))])
def test_catching_up_in_the_repeated_hour_fires_the_first_hours_fire_not_a_repeat(cron: str, expected: datetime) -> None:
    """Down from 00:50 EDT to 01:20 EST (06:20 UTC): the missed fire is the first 1 AM hour's
    last, not a 'repeat' at 01:xx EST that would be a second fire under a key of its own."""
    trigger = {"type": "schedule", "cron": cron, "timezone": "America/New_York"}
    fire, planned = due_fire(trigger, utc(2026, 11, 1, 5), utc(2026, 11, 1, 6, 20))
    assert fire == expected
    assert planned == next_fire(trigger, utc(2026, 11, 1, 6, 20)) == utc(2026, 11, 2, 6)
