"""Accepting executions into the outbox with group commit and backpressure."""

from __future__ import annotations

import time
from typing import Callable

from ipaas import reasons
from ipaas.engine import outbox
from ipaas.storage.group_commit import GroupCommit
from ipaas.engine.outbox import Accepted, NewExecution
from ipaas.errors import ResourceExhausted
from ipaas.singleflight import SingleFlight
from ipaas.storage.db import Database


class Enqueuer:
    def __init__(self, db: Database, on_enqueued: Callable[[], None] = lambda: None, max_batch: int = 512, max_depth: int = 100_000) -> None:
        self.db = db
        self.on_enqueued = on_enqueued
        self.max_depth = max_depth
        self._commits: GroupCommit[NewExecution, Accepted] = GroupCommit(self._write, name="enqueue", max_batch=max_batch)
        self._depth = 0
        self._depth_loads: SingleFlight[None, int] = SingleFlight()
        self._depth_checked = 0.0

    @property
    def depth(self) -> int:
        """Outbox tasks waiting, as last counted plus what was accepted since."""
        return self._depth

    async def refresh_depth(self) -> int:
        self._depth = await outbox.queue_depth(self.db)
        self._depth_checked = time.monotonic()
        return self._depth

    async def submit(self, item: NewExecution) -> Accepted:
        await self.ensure_room()
        return await self._commits.submit(item)

    async def ensure_room(self) -> None:
        """Raises ResourceExhausted while the queue is full."""
        if time.monotonic() - self._depth_checked > 1.0:
            await self._depth_loads.do(None, self.refresh_depth)
        if self._depth >= self.max_depth:
            raise ResourceExhausted(f"the execution queue is full ({self._depth} waiting): retry later", reasons.QUEUE_FULL)

    def enqueued(self, results: list[Accepted]) -> None:
        """Count executions a caller wrote in its own transaction (outbox.enqueue_in), after
        it committed, and wake the workers for them."""
        self._depth += sum(1 for r in results if not r.duplicate)
        self.on_enqueued()

    async def _write(self, items: list[NewExecution]) -> list[Accepted]:
        results = await outbox.enqueue_many(self.db, items)
        self.enqueued(results)
        return results

    async def close(self) -> None:
        await self._commits.close()
