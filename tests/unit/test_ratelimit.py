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
