"""Concurrent callers asking for the same thing share one load (a cache miss under load
would otherwise send every waiting request to the database at once)."""

from __future__ import annotations

import asyncio
from typing import Awaitable, Callable, Generic, Hashable, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class SingleFlight(Generic[K, V]):
    def __init__(self) -> None:
        self._calls: dict[K, asyncio.Future[V]] = {}

    async def do(self, key: K, load: Callable[[], Awaitable[V]]) -> V:
        call = self._calls.get(key)
        if call is None:
            call = self._calls[key] = asyncio.ensure_future(load())
            call.add_done_callback(lambda done: self._finished(key, done))
        # A caller that gives up (cancelled) must not cancel the load the others wait for.
        return await asyncio.shield(call)

    def _finished(self, key: K, done: asyncio.Future[V]) -> None:
        if self._calls.get(key) is done:
            del self._calls[key]
        if not done.cancelled():
            done.exception()  # retrieved here, so a load nobody awaits any more is not reported as lost
