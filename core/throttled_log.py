"""A warning logged at most once per interval: an outage (Redis down) would otherwise log one
line per request, burying everything else."""

from __future__ import annotations

import logging
import time
from typing import Any


class ThrottledWarning:
    def __init__(self, logger: logging.Logger, event: str, every: float = 60.0) -> None:
        self.logger = logger
        self.event = event
        self.every = every
        self._next = 0.0

    def __call__(self, error: BaseException, **fields: Any) -> None:
        """Names the error's type only: a driver's message may carry a host, a statement or
        a key, and never adds what an operator needs beyond the event and the type."""
        now = time.monotonic()
        if now < self._next:
            return
        self._next = now + self.every
        self.logger.warning(self.event, extra={"error": type(error).__name__, **fields})


class ThrottledCounts:
    """A warning per key (a tenant) at most once per interval, carrying how many times it
    happened since that key's last line: a tenant over its limit every tick gets one line a
    minute, and one tenant's lines do not hide another's."""

    def __init__(self, logger: logging.Logger, event: str, key_field: str, count_field: str, every: float = 60.0) -> None:
        self.logger = logger
        self.event = event
        self.key_field = key_field
        self.count_field = count_field
        self.every = every
        self._next: dict[str, float] = {}
        self._counts: dict[str, int] = {}

    def __call__(self, key: str, count: int, **fields: Any) -> None:
        now = time.monotonic()
        self._counts[key] = self._counts.get(key, 0) + count
        if now < self._next.get(key, 0.0):
            return
        if len(self._next) > 10_000:  # keys quiet for an interval need no memory
            self._next = {k: t for k, t in self._next.items() if t > now}
            self._counts = {k: c for k, c in self._counts.items() if k in self._next or k == key}
        self._next[key] = now + self.every
        self.logger.warning(self.event, extra={self.key_field: key, self.count_field: self._counts.pop(key), **fields})
