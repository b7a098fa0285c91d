"""The retry policy: a pure function of the attempt and the error (procrastinate style)."""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from typing import Callable

MAX_RETRY_AFTER = 3600.0


@dataclass(frozen=True)
class RetryPolicy:
    base_delay: float = 1.0
    max_delay: float = 300.0
    max_attempts: int = 5


def next_delay(policy: RetryPolicy, attempt: int, retry_after: float | None, rand: Callable[[], float] = random.random) -> float | None:
    """Seconds to wait before attempt `attempt + 1`, or None to give up (the execution is dead).

    Exponential backoff with full jitter (AWS architecture blog): spreads retries of many
    executions that failed together. An upstream's Retry-After is a floor, capped at an hour.
    """
    if attempt >= policy.max_attempts:
        return None
    ceiling = min(policy.max_delay, policy.base_delay * 2 ** max(0, attempt - 1))
    delay = rand() * ceiling
    if retry_after is not None and retry_after > 0:
        delay = max(delay, min(retry_after, MAX_RETRY_AFTER))
    return delay


def parse_retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """Retry-After as seconds: delta-seconds (floats too, as Discord sends) or an HTTP-date."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=timezone.utc)
        seconds = (when - (now or datetime.now(timezone.utc))).total_seconds()
    if seconds != seconds or seconds < 0:  # NaN or negative
        return None
    return seconds
