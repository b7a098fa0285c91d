"""Schedule math, pure and clock-free: when does a cron or interval trigger fire?

Cron runs in the trigger's IANA zone (croniter on zone-aware datetimes), so "0 7 * * *" in
America/New_York is 12:00 UTC in winter and 11:00 UTC in summer. Intervals are anchored at
the Unix epoch, so every replica computes the same fire times (which the outbox dedupes).
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from zoneinfo import ZoneInfo

from croniter import croniter

EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
DEFAULT_GRACE = timedelta(seconds=60)


def _zone(trigger: dict) -> ZoneInfo:
    return ZoneInfo(trigger.get("timezone") or "UTC")


def timing(trigger: dict) -> tuple[str, str, str, int]:
    """What a trigger's fire times depend on: triggers with equal timings fire together."""
    cron = trigger.get("cron") or ""
    return (trigger.get("type") or "", cron, (trigger.get("timezone") or "UTC") if cron else "", int(trigger.get("interval_seconds") or 0))


def next_fire(trigger: dict, after: datetime, anchor: datetime = EPOCH) -> datetime:
    """The first fire time strictly after `after` (aware UTC in, aware UTC out)."""
    interval = int(trigger.get("interval_seconds") or 0)
    if interval:
        elapsed = (after - anchor).total_seconds()
        k = int(elapsed // interval) + 1
        return anchor + timedelta(seconds=k * interval)
    zone = _zone(trigger)
    it = croniter(trigger["cron"], after.astimezone(zone))
    candidate = it.get_next(datetime)
    # On the fall-back night a fixed-hour job's wall time happens twice: run it once, at the
    # first occurrence (as vixie cron does). Every candidate inside the repeated hour is a
    # second occurrence, so start again past it rather than stepping through it one
    # candidate at a time ("* 1 * * *" has 60 there). Spring-forward gaps run right after.
    if _fixed_hour(it) and _second_occurrence(candidate, zone):
        _, past_fold = _fold(candidate, zone)
        # croniter's next is strictly after its start: a fire exactly at the fold's end counts.
        candidate = croniter(trigger["cron"], (past_fold - timedelta(seconds=1)).astimezone(zone)).get_next(datetime)
    return candidate.astimezone(timezone.utc)


def _fixed_hour(it: croniter) -> bool:
    # Whether the hour is fixed is read from the expanded field, not the text: "*/1" and
    # "0-23" are every hour too, and an hourly job must run in the repeated hour as well.
    hours = it.expanded[1]
    return hours != ["*"] and len(set(hours)) < 24


def _second_occurrence(moment: datetime, zone: ZoneInfo) -> bool:
    naive = moment.astimezone(zone).replace(tzinfo=None)
    first, second = naive.replace(tzinfo=zone, fold=0), naive.replace(tzinfo=zone, fold=1)
    # Compare in UTC: same-zone comparisons ignore `fold`.
    return first.utcoffset() != second.utcoffset() and moment.astimezone(timezone.utc) == second.astimezone(timezone.utc)


def _fold(moment: datetime, zone: ZoneInfo) -> tuple[datetime, datetime]:
    """Where the repeated wall-clock span that `moment` (a second occurrence) lies in starts
    and ends, in UTC. It is as long as the clocks went back (an hour, 30 minutes on Lord
    Howe), so its end is within that much after `moment`: found by bisection to the second,
    since zoneinfo does not expose its transitions."""
    naive = moment.astimezone(zone).replace(tzinfo=None)
    shift = naive.replace(tzinfo=zone, fold=0).utcoffset() - naive.replace(tzinfo=zone, fold=1).utcoffset()
    start = moment.astimezone(timezone.utc)
    inside, outside = 0, int(shift.total_seconds())  # seconds after `moment`
    while outside - inside > 1:
        middle = (inside + outside) // 2
        if _second_occurrence(start + timedelta(seconds=middle), zone):
            inside = middle
        else:
            outside = middle
    end = start + timedelta(seconds=outside)
    return end - shift, end


def latest_fire(trigger: dict, at_or_before: datetime, anchor: datetime = EPOCH) -> datetime:
    """The last fire time at or before the given moment."""
    interval = int(trigger.get("interval_seconds") or 0)
    if interval:
        k = int((at_or_before - anchor).total_seconds() // interval)
        return anchor + timedelta(seconds=k * interval)
    zone = _zone(trigger)
    it = croniter(trigger["cron"], (at_or_before + timedelta(seconds=1)).astimezone(zone))
    candidate = it.get_prev(datetime)
    # As next_fire: a fixed-hour job did not fire in the repeated hour, so its latest fire
    # is before it. Else catching up across the fold would fire a second time, under a key
    # (the fire time) of its own.
    if _fixed_hour(it) and _second_occurrence(candidate, zone):
        fold_start, _ = _fold(candidate, zone)
        candidate = croniter(trigger["cron"], (fold_start - timedelta(seconds=1)).astimezone(zone)).get_prev(datetime)
    return candidate.astimezone(timezone.utc)


def due_fire(
    trigger: dict,
    planned: datetime | None,
    now: datetime,
    catch_up: str = "collapse",
    missed_before: datetime | None = None,
) -> tuple[datetime | None, datetime]:
    """(fire time to enqueue now or None, next planned fire time to store).

    A new schedule (planned None) plans its first fire after now. A fire due at or after
    `missed_before` is on time and fires in either mode. Older ones were missed (nobody was
    ticking): they collapse into one, the latest (catch_up="collapse"), or are skipped
    ("skip"). The scheduler passes its previous tick; without one, fires older than
    DEFAULT_GRACE are missed.
    """
    if planned is None:
        return None, next_fire(trigger, now)
    if planned > now:
        return None, planned
    latest = max(latest_fire(trigger, now), planned)
    upcoming = next_fire(trigger, now)
    on_time = latest >= (now - DEFAULT_GRACE if missed_before is None else missed_before)
    if on_time or catch_up == "collapse":
        return latest, upcoming
    return None, upcoming
