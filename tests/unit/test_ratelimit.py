"""The rate limiter the gateway and the core share (ipaas.ratelimit), in memory."""

from __future__ import annotations

import asyncio

import pytest

from ipaas.ratelimit import RateLimiter, Tier

TIERS = {"free": Tier("free", 5.0, 10)}


async def test_acquire_says_nothing_while_the_burst_lasts_then_how_long_to_wait() -> None:
    limiter = RateLimiter(TIERS)
    assert [await limiter.acquire("tn_a", "free") for _ in range(10)] == [None] * 10
    wait = await limiter.acquire("tn_a", "free")
    assert wait is not None and 1.5 < wait <= 2.0, "the window is 2 s: the first of the burst leaves it then"
    assert await limiter.acquire("tn_b", "free") is None, "each tenant has its own budget"


@pytest.mark.parametrize(("tenant", "tier"), [("tn_exempt", "free"), ("tn_a", "admin"), ("tn_a", "no-such-tier")])
async def test_acquire_leaves_alone_who_is_not_limited(tenant: str, tier: str) -> None:
    limiter = RateLimiter(TIERS, unlimited=frozenset({"tn_exempt"}))
    assert [await limiter.acquire(tenant, tier) for _ in range(30)] == [None] * 30


async def test_old_entries_are_trimmed_at_most_once_a_second(monkeypatch: pytest.MonkeyPatch) -> None:
    """limits' memory storage started a trim after every request that found none running,
    each handing work to a thread: ~100 us of the core's CPU per gRPC call (measured)."""
    trims = []
    to_thread = asyncio.to_thread

    async def counted(*args, **kwargs):  # type: ignore[no-untyped-def]
        trims.append(1)
        return await to_thread(*args, **kwargs)

    monkeypatch.setattr(asyncio, "to_thread", counted)
    limiter = RateLimiter({"paid": Tier("paid", 1000.0, 1000)})
    for _ in range(50):
        assert await limiter.acquire("tn_a", "paid") is None
        await asyncio.sleep(0.001)  # as between the calls of a server: a trim may run
    assert len(trims) == 1, len(trims)


async def test_take_spends_what_fits_of_a_tenants_fires_at_once() -> None:
    """The scheduler charges a tenant's due fires of a batch together: all when they fit,
    what is left of the burst when they do not, nothing once it is spent."""
    limiter = RateLimiter(TIERS)
    assert await limiter.take("tn_a", "free", 3) == 3
    assert await limiter.take("tn_a", "free", 30) == 7
    assert await limiter.take("tn_a", "free", 1) == 0
    assert await limiter.acquire("tn_a", "free") is not None, "one budget: what take spent is spent"
    assert await limiter.take("tn_b", "free", 30) == 10, "capped at the burst, not refused for asking more"


@pytest.mark.parametrize(("tenant", "tier"), [("tn_exempt", "free"), ("tn_a", "admin"), ("tn_a", "no-such-tier")])
async def test_take_gives_all_to_who_is_not_limited(tenant: str, tier: str) -> None:
    limiter = RateLimiter(TIERS, unlimited=frozenset({"tn_exempt"}))
    assert [await limiter.take(tenant, tier, 30) for _ in range(3)] == [30] * 3


def test_throttled_counts_log_each_key_once_an_interval_with_what_it_counted_since() -> None:
    """schedule.rate_limited: one line a minute per tenant, so one tenant's lines neither
    flood the log nor hide another's."""
    import logging

    from ipaas.throttled_log import ThrottledCounts

    lines: list[tuple[str, int]] = []

    class Capture(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append((record.tenant_id, record.held_back))  # type: ignore[attr-defined]

    logger = logging.getLogger("test.throttled_counts")
    logger.addHandler(Capture())
    warn = ThrottledCounts(logger, "schedule.rate_limited", "tenant_id", "held_back", every=60.0)
    warn("tn_a", 20)
    warn("tn_a", 30)
    warn("tn_b", 5)
    assert lines == [("tn_a", 20), ("tn_b", 5)]
    warn.every, warn._next = 0.0, {}  # the minute passed
    warn("tn_a", 1)
    assert lines[-1] == ("tn_a", 31), "what it counted since its last line"
