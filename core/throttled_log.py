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
