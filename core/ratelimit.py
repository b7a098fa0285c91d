"""Per-tenant rate limits by tier, with the `limits` package: the gateway's for REST callers,
the core's for gRPC calls (ipaas.service.interceptors) and for scheduled fires
(ipaas.engine.scheduler), each with a budget of its own.

A tier "r requests/s, burst b" becomes a moving window of b requests per b/r seconds: an
idle tenant may send b at once, and over time it averages r/s (free: 10 per 2 s; paid: 100
per 2 s). In memory by default; in Redis when IPAAS_REDIS_URL is set, so every replica of a
layer spends one shared budget (the key prefix tells the layers apart). When the storage
does not answer, requests go through unlimited (fail open: a rate limit protects the
platform, an outage of it should not take the API down), with one warning a minute, and the
storage is tried again after a few seconds.

Lives in the core's package, as ipaas.reasons does, so that the core need not import the
gateway; the gateway imports it (ipaas.gateway.ratelimit keeps its old name).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from dataclasses import dataclass
from typing import Mapping

from limits import RateLimitItemPerSecond
from limits.aio.storage import MemoryStorage, RedisStorage
from limits.aio.strategies import MovingWindowRateLimiter

from ipaas.throttled_log import ThrottledWarning

log = logging.getLogger("ipaas.ratelimit")

DEFAULT_TIERS = {"free": (5.0, 10), "paid": (50.0, 100), "anonymous": (5.0, 20), "anonymous_webhooks": (10.0, 100)}
# Requests with no known caller (no API key, or one this gateway has never seen accepted),
# per client address: each costs the core a call and a database read before it is refused.
# No tenant has this tier (the core's tiers are free and paid).
ANONYMOUS = "anonymous"
# Webhooks the core refused (bad signature, unknown workflow, bad body), per client
# address: until accepted a webhook has no owner to charge, and each refusal cost the core a
# call (an unknown id a database read). Larger than ANONYMOUS: a busy sender's address (a
# SaaS's egress) delivers to many workflows and may get some wrong. The gateway's only.
ANONYMOUS_WEBHOOKS = "anonymous_webhooks"
STORAGE_TIMEOUT = 1.0  # seconds a Redis call may take before the request goes through unlimited
RETRY_STORAGE_AFTER = 5.0  # after a failure, so an outage does not cost every request a timeout


class _MemoryStorage(MemoryStorage):
    """limits' in-process storage, trimming expired entries at most once a second. It
    started a trim after every request that found none running, and each trim hands a
    bisect to a thread: ~100 us of CPU per request, measured on the core (a moving window
    reads its entries' times itself, so a later trim changes no answer)."""

    _next_trim = 0.0

    async def _MemoryStorage__schedule_expiry(self) -> None:  # limits' private name, overridden
        now = time.monotonic()
        if now >= self._next_trim and (self.timer is None or self.timer.done()):
            self._next_trim = now + 1.0
            self.timer = asyncio.create_task(self._MemoryStorage__expire_events())


@dataclass(frozen=True)
class Tier:
    name: str
    rate: float
    burst: int

    @property
    def window(self) -> int:
        return max(1, math.ceil(self.burst / self.rate))


@dataclass(frozen=True)
class Decision:
    allowed: bool
    headers: dict[str, str]
    retry_after: int = 0  # seconds, when not allowed


def parse_tiers(env: Mapping[str, str]) -> dict[str, Tier]:
    """IPAAS_RATE_FREE="5/10" (rate per second / burst), IPAAS_RATE_PAID="50/100",
    IPAAS_RATE_ANONYMOUS="5/20", IPAAS_RATE_ANONYMOUS_WEBHOOKS="10/100"."""
    tiers = {}
    for name, (rate, burst) in DEFAULT_TIERS.items():
        setting = f"IPAAS_RATE_{name.upper()}"
        raw = (env.get(setting) or "").strip()
        if raw:
            try:
                rate_s, burst_s = raw.split("/")
                rate, burst = float(rate_s), int(burst_s)
            except ValueError:
                rate, burst = math.nan, 0
            # A rate of 0 failed on the first request (ZeroDivisionError); a burst of 0 or a
            # negative rate was taken and refused every request.
            if not (0 < rate < math.inf and burst >= 1):
                raise SystemExit(f"{setting} must look like 5/10: a rate per second above 0, then a burst of 1 or more, got {raw!r}")
        tiers[name] = Tier(name, rate, burst)
    return tiers


class RateLimiter:
    def __init__(self, tiers: dict[str, Tier], redis_url: str | None = None, unlimited: frozenset[str] = frozenset(), key_prefix: str = "ipaas-rl") -> None:
        self.tiers = tiers
        self.unlimited = unlimited
        if redis_url:
            # limits names redis-py's schemes its own way: a plain unix:// would be taken for
            # Valkey's (and refused for want of the valkey package).
            uri = "async+" + ("redis+" + redis_url if redis_url.startswith("unix://") else redis_url)
            self.storage = RedisStorage(uri, implementation="redispy", key_prefix=key_prefix, socket_timeout=STORAGE_TIMEOUT, socket_connect_timeout=STORAGE_TIMEOUT)
        else:
            self.storage = _MemoryStorage()
        self.limiter = MovingWindowRateLimiter(self.storage)
        self._items = {name: RateLimitItemPerSecond(t.burst, t.window) for name, t in tiers.items()}
        self._down_until = 0.0
        self._warn = ThrottledWarning(log, "ratelimit.unavailable")

    async def check(self, tenant_id: str, tier_name: str, spend: bool = True) -> Decision | None:
        """None when the caller is not limited (admin, a tenant exempted by settings, or the
        storage unreachable). spend=False only looks: whether one more request fits."""
        tier = self.tiers.get(tier_name)
        if tier is None or tenant_id in self.unlimited or time.monotonic() < self._down_until:
            return None
        item = self._items[tier.name]
        try:
            allowed = await (self.limiter.hit if spend else self.limiter.test)(item, tenant_id)
            stats = await self.limiter.get_window_stats(item, tenant_id)
        except Exception as exc:  # the driver's errors: connection refused, timeout, ...
            self._down_until = time.monotonic() + RETRY_STORAGE_AFTER
            self._warn(exc)
            return None
        reset = max(0, math.ceil(stats.reset_time - time.time()))
        remaining = max(0, stats.remaining)
        headers = {
            "X-RateLimit-Limit": str(tier.burst),
            "X-RateLimit-Remaining": str(remaining),
            "X-RateLimit-Reset": str(reset),
            "RateLimit-Policy": f'"{tier.name}";q={tier.burst};w={tier.window}',
            "RateLimit": f'"{tier.name}";r={remaining};t={reset}',
        }
        return Decision(allowed, headers, 0 if allowed else max(1, reset if remaining == 0 else 1))

    async def acquire(self, tenant_id: str, tier_name: str) -> float | None:
        """Spend one request: None when it fits (or the caller is not limited), else the
        seconds until one would. Half the storage calls of check() for a request that fits:
        it needs no headers."""
        tier = self.tiers.get(tier_name)
        if tier is None or tenant_id in self.unlimited or time.monotonic() < self._down_until:
            return None
        item = self._items[tier.name]
        try:
            if await self.limiter.hit(item, tenant_id):
                return None
            stats = await self.limiter.get_window_stats(item, tenant_id)
        except Exception as exc:  # the driver's errors: connection refused, timeout, ...
            self._down_until = time.monotonic() + RETRY_STORAGE_AFTER
            self._warn(exc)
            return None
        # When the oldest request in the window leaves it (moving window: one more fits then).
        return max(0.001, stats.reset_time - time.time())

    async def take(self, tenant_id: str, tier_name: str, wanted: int) -> int:
        """Spend up to `wanted` requests at once: how many fit (all of them when the caller is
        not limited). For the scheduler, which charges a tenant's due fires together: a few
        storage calls per tenant and batch, not one per fire (1,500 fires a tick)."""
        tier = self.tiers.get(tier_name)
        if wanted <= 0 or tier is None or tenant_id in self.unlimited or time.monotonic() < self._down_until:
            return max(0, wanted)
        item = self._items[tier.name]
        try:
            # A moving window spends a cost all or nothing: try all (one call when it fits, as
            # it mostly does), else look at what is left and spend that. Another replica may
            # spend in between; then look again (a few times at most).
            fits = min(wanted, tier.burst)
            for _ in range(3):
                if await self.limiter.hit(item, tenant_id, cost=fits):
                    return fits
                stats = await self.limiter.get_window_stats(item, tenant_id)
                fits = min(wanted, max(0, stats.remaining))
                if fits == 0:
                    return 0
            return 0
        except Exception as exc:  # the driver's errors: connection refused, timeout, ...
            self._down_until = time.monotonic() + RETRY_STORAGE_AFTER
            self._warn(exc)
            return wanted

    async def ping(self) -> bool:
        return bool(await self.storage.check())
