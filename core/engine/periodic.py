"""A background job the core runs every so often (the scheduler's tick, retention's prune):
one failure is logged and the next round comes anyway, and a database outage is one warning
a minute instead of a traceback a round."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any, Awaitable, Callable

from ipaas.storage.outage import OutageLog


class Periodic:
    def __init__(self, name: str, work: Callable[[], Awaitable[Any]], interval: float, log: logging.Logger, first_delay: float = 0.0) -> None:
        self.name = name
        self.work = work
        self.interval = interval
        self.first_delay = first_delay
        self.log = log
        self._database_down = OutageLog(log, f"{name}.database_unavailable")
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name=f"ipaas-{self.name}")

    async def _loop(self) -> None:
        await asyncio.sleep(self.first_delay)
        while True:
            try:
                await self.work()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if not self._database_down(exc):
                    self.log.exception(f"{self.name}.failed")
            await asyncio.sleep(self.interval)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
