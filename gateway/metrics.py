"""The gateway's Prometheus metrics, served raw at GET /metrics (not in the envelope: a
scraper reads the exposition format as it is).

Labels hold only what the gateway itself bounds: a route's template (never the path as sent,
which carries ids), a known HTTP method, a status code, a tier, a gRPC code. No tenant, key,
workflow or any other value a caller chooses: a label value per id would grow the series
without bound and publish who calls what to whoever can scrape.

Each gateway has a registry of its own (not prometheus_client's global one): tests run
several in one process, and nothing else in the process registers there by accident.
"""

from __future__ import annotations

import time
from typing import Any, Iterable, Mapping

from prometheus_client import CollectorRegistry, Counter, Histogram, PlatformCollector, ProcessCollector, disable_created_metrics
from prometheus_client.exposition import choose_encoder

from ipaas.settings import boolean

# The scope key the gateway's router leaves the matched route's template under.
ROUTE = "ipaas.route"
UNMATCHED = "unmatched"  # no route: 404, 405, or refused before routing (431)
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
OTHER = "other"
# From a cached read (~1 ms) to the gateway's 30 s call timeout.
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# Seconds an exposition is served again to other scrapes. /metrics needs no key and is
# outside the rate limits (scrapers call it that way), and one rendering costs ~3.5 ms of CPU
# (about 29 ordinary requests): rendered at most once a second per format, a loop of scrapes
# costs a copy of bytes each. Prometheus scrapes every 10 s or more, so no scraper sees it.
EXPOSITION_TTL = 1.0


def enabled(env: Mapping[str, str]) -> bool:
    """IPAAS_METRICS: on unless turned off (a misspelt value stops start-up, as every
    on/off setting does)."""
    return boolean(env, "IPAAS_METRICS", True)


class GatewayMetrics:
    enabled = True

    def __init__(self, templates: Iterable[str], local_paths: Iterable[str], tiers: Iterable[str], failure_codes: Iterable[str]) -> None:
        # A `_created` timestamp beside every counter and histogram series doubles what is
        # scraped and says nothing a process start time does not (prometheus_client's
        # switch is per process: the gateway is one).
        disable_created_metrics()
        self.registry = registry = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
        self._requests = Counter("ipaas_gateway_requests", "HTTP requests answered, by route template, method and status.", ("route", "method", "status"), registry=registry)
        self._duration = Histogram("ipaas_gateway_request_duration_seconds", "Time from a request's head to its answer sent, by route template.", ("route",), buckets=BUCKETS, registry=registry)
        rate_limited = Counter("ipaas_gateway_rate_limited", "Requests refused 429 by the gateway's rate limiter, by tier.", ("tier",), registry=registry)
        self._replays = Counter("ipaas_gateway_idempotent_replays", "Requests answered with a kept answer (X-Idempotency-Replay: true).", registry=registry)
        failures = Counter(
            "ipaas_gateway_core_call_failures",
            "Calls to the core that failed: unreachable, timed out, an answer that could not be read, or the core unavailable or failing (by gRPC code).",
            ("code",),
            registry=registry,
        )
        self._local = frozenset(local_paths)
        routes = {*templates, *self._local, UNMATCHED}
        # Children resolved once: labels() takes a lock and builds a key per call, a dict
        # lookup does neither. Every label value is known up front except the status, whose
        # children are made on first use (a few dozen statuses at most).
        self._durations = {route: self._duration.labels(route) for route in routes}
        self._routes = frozenset(routes)
        self._counts: dict[tuple[str, str, int], Any] = {}
        self._rate_limited = {tier: rate_limited.labels(tier) for tier in (*tiers, OTHER)}
        self._failures = {code: failures.labels(code) for code in (*failure_codes, OTHER)}
        self._expositions: dict[str, tuple[float, bytes]] = {}  # content type -> (rendered at, body)

    def observe(self, scope: dict[str, Any], status: int, seconds: float) -> None:
        """One answered request."""
        route = scope.get(ROUTE)
        if route is None:
            path = scope["path"]
            route = path if path in self._local else UNMATCHED
        method = scope["method"]
        if method not in METHODS:  # a client may send any token as a method
            method = OTHER
        key = (route, method, status)
        child = self._counts.get(key)
        if child is None:
            child = self._counts[key] = self._requests.labels(route if route in self._routes else UNMATCHED, method, str(status))
        child.inc()
        self._durations.get(route, self._durations[UNMATCHED]).observe(seconds)

    def rate_limited(self, tier: str) -> None:
        (self._rate_limited.get(tier) or self._rate_limited[OTHER]).inc()

    def replayed(self) -> None:
        self._replays.inc()

    def core_call_failed(self, code: str) -> None:
        (self._failures.get(code) or self._failures[OTHER]).inc()

    def exposition(self, accept: str | None) -> tuple[bytes, str]:
        """The body and content type a scraper asked for (Prometheus text, or OpenMetrics
        when its Accept header prefers it), rendered at most once per EXPOSITION_TTL."""
        encode, content_type = choose_encoder(accept or "")
        now = time.monotonic()
        kept = self._expositions.get(content_type)
        if kept is not None and now - kept[0] < EXPOSITION_TTL:
            return kept[1], content_type
        body = encode(self.registry)
        self._expositions[content_type] = (now, body)
        return body, content_type


class NoMetrics:
    """IPAAS_METRICS=0: the same calls, each doing nothing, and no /metrics."""

    enabled = False

    def observe(self, scope: dict[str, Any], status: int, seconds: float) -> None:
        pass

    def rate_limited(self, tier: str) -> None:
        pass

    def replayed(self) -> None:
        pass

    def core_call_failed(self, code: str) -> None:
        pass
