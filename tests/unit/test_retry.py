from __future__ import annotations

from datetime import datetime, timezone

import pytest

from ipaas.engine.retry import RetryPolicy, next_delay, parse_retry_after

POLICY = RetryPolicy(base_delay=1.0, max_delay=30.0, max_attempts=5)


@pytest.mark.parametrize(
    "attempt,rand,retry_after,expected",
    [
        (1, 1.0, None, 1.0),
        (2, 1.0, None, 2.0),
        (3, 0.5, None, 2.0),
        (4, 1.0, None, 8.0),
        (1, 0.0, None, 0.0),
        (4, 0.0, 7.5, 7.5),  # Retry-After is a floor
        (1, 1.0, 0.2, 1.0),  # jitter above Retry-After stays
        (2, 1.0, 99999.0, 3600.0),  # an absurd Retry-After is capped at an hour
        (5, 1.0, None, None),  # attempts exhausted: give up
        (6, 1.0, 3.0, None),
    ],
)
def test_next_delay(attempt: int, rand: float, retry_after: float | None, expected: float | None) -> None:
    assert next_delay(POLICY, attempt, retry_after, rand=lambda: rand) == expected


def test_backoff_is_capped_by_max_delay() -> None:
    policy = RetryPolicy(base_delay=1.0, max_delay=30.0, max_attempts=50)
    assert next_delay(policy, 20, None, rand=lambda: 1.0) == 30.0


NOW = datetime(2026, 11, 23, 12, 0, 0, tzinfo=timezone.utc)


@pytest.mark.parametrize(
    "value,expected",
    [
        ("30", 30.0),
        ("1.5", 1.5),
        ("0", 0.0),
        ("Mon, 23 Nov 2026 12:00:10 GMT", 10.0),
        ("Mon, 23 Nov 2026 11:59:00 GMT", None),
        ("-3", None),
        ("soon", None),
        ("", None),
        (None, None),
    ],
)
def test_parse_retry_after(value: str | None, expected: float | None) -> None:
    assert parse_retry_after(value, NOW) == expected
