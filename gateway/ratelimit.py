"""The gateway's name for the rate limiter it shares with the core (kept for imports)."""

from ipaas.ratelimit import ANONYMOUS, ANONYMOUS_WEBHOOKS, DEFAULT_TIERS, Decision, RateLimiter, Tier, parse_tiers

__all__ = ["ANONYMOUS", "ANONYMOUS_WEBHOOKS", "DEFAULT_TIERS", "Decision", "RateLimiter", "Tier", "parse_tiers"]
