"""Circuit breakers per (tenant, connector), built on the `circuitbreaker` package.

The package counts consecutive failures and opens after a threshold; its half-open state
lets every call through and closes on the first success. The seeds' policy is stricter: in
half-open a few trial calls go through, 3 successes close it and any failure re-opens it.
The engine does not wrap calls in the breaker; it asks `allow()` first (so a task can be
deferred until the breaker half-opens, without spending an attempt) and then records the
outcome. Only retryable upstream failures count: a 4xx caused by bad input says nothing
about the upstream's health. A call let through in half-open holds one of its few trial
slots until it is settled, so every call `allow()` lets through is settled exactly once
(see Trial): by its outcome, or given back without one.

Each core replica keeps its own breakers. The registry forgets a clean breaker (closed, no
failure counted, no call in flight): it holds nothing that `get()` would not recreate. A
failure count does not lapse with time, as in `circuitbreaker`: the failures that open a
breaker are consecutive, however far apart, so only a success clears them.
"""

from __future__ import annotations

import heapq
import logging
import random
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Callable

from circuitbreaker import STATE_CLOSED, STATE_HALF_OPEN, STATE_OPEN, CircuitBreaker

log = logging.getLogger("ipaas.breakers")

Clock = Callable[[], float]
OnChange = Callable[[tuple[str, str], str, str], None]
Key = tuple[str, str]

# A deferred task comes back up to this share of its wait later than the breaker asked, so
# a backlog deferred together does not all come due at the same instant.
DEFER_JITTER = 0.25
# Trials in flight that should have settled already (their calls are bounded by a timeout,
# so this is the time it takes to record them): wait this long before asking again.
MIN_TRIAL_WAIT = 1.0
# The registry drops clean breakers when it has grown to twice what it kept last time, at
# least this many, so a sweep costs O(1) per breaker created.
MIN_SWEEP_SIZE = 256
_RANK = {STATE_OPEN: 2, STATE_HALF_OPEN: 1}


@dataclass(frozen=True)
class BreakerPolicy:
    failure_threshold: int = 5
    recovery_timeout: float = 60.0
    success_threshold: int = 3


@dataclass(frozen=True)
class BreakerState:
    connector: str
    state: str
    failure_count: int
    success_count: int
    opened_at: datetime | None
    half_open_at: datetime | None


class Breaker(CircuitBreaker):
    """One breaker. Reuses the package's state fields; time comes from an injected clock."""

    def __init__(self, key: Key, policy: BreakerPolicy, clock: Clock, on_change: OnChange, troubled: dict[Key, Breaker] | None = None) -> None:
        super().__init__(failure_threshold=policy.failure_threshold, recovery_timeout=policy.recovery_timeout, name=f"{key[0]}:{key[1]}")
        self.key = key
        self.policy = policy
        self._clock = clock
        self._on_change = on_change
        self._opened = clock()
        self._opened_wall: datetime | None = None
        self._successes = 0
        self._trials = 0
        self._trials_settle_by = 0.0  # when the trials in flight must have settled
        self._calls = 0  # calls let through and not settled yet: the registry keeps this breaker
        self._used = True  # got since the registry's last sweep
        # The registry's breakers that are not clean, kept up to date here so that its
        # report never walks the clean ones.
        self._troubled = troubled if troubled is not None else {}
        self._lock = threading.Lock()

    @property
    def open_remaining(self) -> float:  # type: ignore[override]
        return (self._opened + self._recovery_timeout) - self._clock()

    @property
    def state(self) -> str:  # type: ignore[override]
        if self._state == STATE_OPEN and self.open_remaining <= 0:
            return STATE_HALF_OPEN
        return self._state

    def _move(self, new: str) -> None:
        old = self.state
        if new == STATE_OPEN:
            self._opened = self._clock()
            self._opened_wall = datetime.now(timezone.utc)
            self._successes = self._trials = 0
            self._troubled[self.key] = self
        elif new == STATE_CLOSED:
            self.reset()
            self._successes = self._trials = 0
            self._troubled.pop(self.key, None)
        self._state = new
        if old != new:
            log.warning("breaker.state_changed", extra={"tenant_id": self.key[0], "connector": self.key[1], "from": old, "to": new})
            self._on_change(self.key, old, new)

    def peek(self) -> float | None:
        """Seconds until an open breaker half-opens; None if it is not open. Takes no trial."""
        with self._lock:
            return max(self.open_remaining, 0.001) if self.state == STATE_OPEN else None

    def allow(self, call_timeout: float | None = None) -> float | None:
        """None when a call may go now; otherwise seconds until it may. `call_timeout` bounds
        the call about to be made: while half-open, a call that finds every trial slot taken
        waits until the trials in flight must have settled."""
        with self._lock:
            state = self.state
            if state == STATE_CLOSED:
                self._calls += 1
                return None
            if state == STATE_OPEN:
                return max(self.open_remaining, 0.001)
            if self._state == STATE_OPEN:  # the timeout just ran out: now half-open
                self._state = STATE_HALF_OPEN
                self._successes = self._trials = 0
                self._trials_settle_by = 0.0
                log.warning("breaker.state_changed", extra={"tenant_id": self.key[0], "connector": self.key[1], "from": STATE_OPEN, "to": STATE_HALF_OPEN})
                self._on_change(self.key, STATE_OPEN, STATE_HALF_OPEN)
            # Half-open: only as many trial calls in flight as successes needed to close.
            now = self._clock()
            if self._trials >= self.policy.success_threshold:
                # Not a second: asked again each second, every queued task of this tenant
                # and connector was claimed and requeued until the trials settled (up to
                # the step timeout), a backlog's worth of writes a second for 3 calls.
                return max(self._trials_settle_by - now, MIN_TRIAL_WAIT)
            self._trials += 1
            self._calls += 1
            self._trials_settle_by = max(self._trials_settle_by, now + (call_timeout or self.policy.recovery_timeout))
            return None

    def record_success(self) -> None:
        with self._lock:
            self._calls = max(0, self._calls - 1)
            if self.state == STATE_HALF_OPEN:
                self._trials = max(0, self._trials - 1)
                self._successes += 1
                if self._successes >= self.policy.success_threshold:
                    self._move(STATE_CLOSED)
            elif self.state == STATE_CLOSED and self._failure_count:
                self._failure_count = 0
                self._troubled.pop(self.key, None)

    def release_trial(self) -> None:
        """Give back a trial slot taken by `allow()` when the call has no outcome to count."""
        with self._lock:
            self._calls = max(0, self._calls - 1)
            # Outside half-open there is no slot to give back (opening resets the count).
            # A trial from an earlier half-open period may free a slot in this one: one
            # more trial at most, never fewer.
            if self.state == STATE_HALF_OPEN:
                self._trials = max(0, self._trials - 1)

    def record_failure(self) -> None:
        with self._lock:
            self._calls = max(0, self._calls - 1)
            state = self.state
            if state == STATE_HALF_OPEN:
                self._move(STATE_OPEN)
            elif state == STATE_CLOSED:
                self._failure_count += 1
                self._troubled[self.key] = self
                if self._failure_count >= self._failure_threshold:
                    self._move(STATE_OPEN)

    def snapshot(self) -> BreakerState:
        state = self.state
        half_open_at = None
        if state == STATE_OPEN and self._opened_wall is not None:
            half_open_at = datetime.now(timezone.utc) + timedelta(seconds=max(self.open_remaining, 0))
        return BreakerState(
            connector=self.key[1],
            state=state,
            failure_count=self._failure_count,
            success_count=self._successes,
            opened_at=self._opened_wall if state != STATE_CLOSED else None,
            half_open_at=half_open_at,
        )


class Trial:
    """One call a breaker let through, settled once: `success()`, `failure()`, or `release()`
    when neither applies. The caller releases in a `finally`, which does nothing after an
    outcome. Without it, a call that ended any other way kept its half-open slot; after
    three the breaker refused every call until the process restarted."""

    __slots__ = ("_breaker", "_settled")

    def __init__(self, breaker: Breaker) -> None:
        self._breaker = breaker
        self._settled = False

    def _settle(self) -> bool:
        first, self._settled = not self._settled, True
        return first

    def success(self) -> None:
        if self._settle():
            self._breaker.record_success()

    def failure(self) -> None:
        if self._settle():
            self._breaker.record_failure()

    def release(self) -> None:
        if self._settle():
            self._breaker.release_trial()


def spread(wait: float) -> float:
    """A breaker's wait made up to DEFER_JITTER longer, never shorter (sooner, the task
    would only be deferred again)."""
    return wait * (1.0 + DEFER_JITTER * random.random())


class BreakerRegistry:
    def __init__(self, policy: BreakerPolicy = BreakerPolicy(), clock: Clock = time.monotonic, on_change: OnChange | None = None) -> None:
        self.policy = policy
        self.clock = clock
        self.on_change: OnChange = on_change or (lambda key, old, new: None)
        self._breakers: dict[Key, Breaker] = {}
        self._troubled: dict[Key, Breaker] = {}  # open, half-open, or closed with failures
        self._sweep_at = MIN_SWEEP_SIZE

    def __len__(self) -> int:
        return len(self._breakers)

    def get(self, tenant_id: str, connector: str) -> Breaker:
        key = (tenant_id, connector)
        breaker = self._breakers.get(key)
        if breaker is None:
            if len(self._breakers) >= self._sweep_at:
                self._sweep()
            breaker = self._breakers[key] = Breaker(key, self.policy, self.clock, self.on_change, self._troubled)
        else:
            breaker._used = True
        return breaker

    def _sweep(self) -> None:
        """Forget the clean breakers not used since the last sweep. One with a call in
        flight stays: the call's outcome must reach the breaker that later calls ask."""
        kept: dict[Key, Breaker] = {}
        for key, breaker in self._breakers.items():
            if breaker._used or breaker._calls or key in self._troubled:
                breaker._used = False
                kept[key] = breaker
        self._breakers = kept
        self._sweep_at = max(MIN_SWEEP_SIZE, 2 * len(kept))

    def all_snapshots(self) -> list[tuple[str, BreakerState]]:
        return [(tenant, b.snapshot()) for (tenant, _), b in self._breakers.items()]

    def report(self, limit: int) -> list[tuple[str, BreakerState]]:
        """The breakers that are not clean, the most open first, at most `limit`: the work
        is in proportion to those, never to the clean ones."""
        troubled = list(self._troubled.values())
        if len(troubled) > limit:
            troubled = heapq.nlargest(limit, troubled, key=lambda b: (_RANK.get(b.state, 0), b._failure_count))
        return [(b.key[0], b.snapshot()) for b in troubled]

    def snapshot(self, tenant_id: str) -> list[BreakerState]:
        return sorted((b.snapshot() for (t, _), b in self._breakers.items() if t == tenant_id), key=lambda s: s.connector)
