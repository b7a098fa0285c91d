"""Group commit: concurrent callers share one transaction.

One flush runs at a time; items that arrive while it commits wait for the next one. An idle
system commits each item alone (no added latency); a busy one pays one transaction (one
fsync, one round of driver hand-offs) per batch instead of one per item. Every caller is
answered only after its batch committed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Awaitable, Callable, Generic, TypeVar

from ipaas.storage.outage import OutageLog

T = TypeVar("T")
R = TypeVar("R")

log = logging.getLogger("ipaas.group_commit")
database_down = OutageLog(log, "group_commit.database_unavailable")


class GroupCommit(Generic[T, R]):
    """`flush(batch)` writes a batch in one transaction and returns one result per item.

    When a batch fails and `isolate` is set, its items are retried one by one, so one bad
    item fails alone instead of taking its neighbours with it.
    """

    def __init__(self, flush: Callable[[list[T]], Awaitable[list[R]]], *, name: str, max_batch: int = 512, isolate: bool = False) -> None:
        self._flush_batch = flush
        self.name = name
        self.max_batch = max_batch
        self.isolate = isolate
        self._pending: list[tuple[T, asyncio.Future[R]]] = []
        self._flusher: asyncio.Task[None] | None = None

    async def submit(self, item: T) -> R:
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._pending.append((item, future))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush(), name=f"ipaas-{self.name}-flush")
        return await future

    async def _flush(self) -> None:
        while self._pending:
            batch, self._pending = self._pending[: self.max_batch], self._pending[self.max_batch :]
            try:
                results = await self._flush_batch([item for item, _ in batch])
            except Exception as exc:
                # In an outage every item would fail alone too: the callers get the error.
                outage = database_down(exc, writer=self.name)
                if self.isolate and len(batch) > 1 and not outage:
                    await self._one_by_one(batch)
                    continue
                if not outage:
                    log.exception("group_commit.failed", extra={"writer": self.name, "batch": len(batch)})
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            for (_, future), result in zip(batch, results):
                if not future.done():
                    future.set_result(result)

    async def _one_by_one(self, batch: list[tuple[T, asyncio.Future[R]]]) -> None:
        for item, future in batch:
            try:
                (result,) = await self._flush_batch([item])
            except Exception as exc:
                if not database_down(exc, writer=self.name):
                    log.exception("group_commit.item_failed", extra={"writer": self.name})
                if not future.done():
                    future.set_exception(exc)
            else:
                if not future.done():
                    future.set_result(result)

    async def close(self) -> None:
        if self._flusher is not None:
            with contextlib.suppress(Exception):
                await self._flusher
