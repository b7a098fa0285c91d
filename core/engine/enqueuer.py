"""Group commit for the outbox: concurrent triggers share one transaction.

One flush runs at a time; triggers that arrive while it commits wait for the next one. An
idle system commits each trigger alone (no added latency); a busy one pays one fsync per
batch instead of one per trigger. Every caller is answered only after its batch committed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Callable

from ipaas.engine import outbox
from ipaas.engine.outbox import Accepted, NewExecution
from ipaas.errors import ResourceExhausted
from ipaas.storage.db import Database

log = logging.getLogger("ipaas.enqueuer")


class Enqueuer:
    def __init__(self, db: Database, on_enqueued: Callable[[], None] = lambda: None, max_batch: int = 512, max_depth: int = 100_000) -> None:
        self.db = db
        self.on_enqueued = on_enqueued
        self.max_batch = max_batch
        self.max_depth = max_depth
        self._pending: list[tuple[NewExecution, asyncio.Future[Accepted]]] = []
        self._flusher: asyncio.Task[None] | None = None
        self._depth = 0
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
        if time.monotonic() - self._depth_checked > 1.0:
            await self.refresh_depth()
        if self._depth >= self.max_depth:
            raise ResourceExhausted(f"the execution queue is full ({self._depth} waiting): retry later")
        future: asyncio.Future[Accepted] = asyncio.get_running_loop().create_future()
        self._pending.append((item, future))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush())
        return await future

    async def _flush(self) -> None:
        while self._pending:
            batch, self._pending = self._pending[: self.max_batch], self._pending[self.max_batch :]
            try:
                results = await outbox.enqueue_many(self.db, [item for item, _ in batch])
            except Exception as exc:
                log.exception("enqueue.failed", extra={"batch": len(batch)})
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            self._depth += sum(1 for r in results if not r.duplicate)
            for (_, future), result in zip(batch, results):
                if not future.done():
                    future.set_result(result)
            self.on_enqueued()

    async def close(self) -> None:
        if self._flusher is not None:
            with contextlib.suppress(Exception):
                await self._flusher
