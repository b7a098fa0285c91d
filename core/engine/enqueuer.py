"""Accepting executions into the outbox with group commit and backpressure."""

from __future__ import annotations

import contextlib
import time
from collections import Counter
from typing import AsyncIterator, Callable, Mapping, Sequence

from ipaas import reasons
from ipaas.engine import outbox
from ipaas.storage.group_commit import GroupCommit
from ipaas.engine.outbox import Accepted, NewExecution
from ipaas.errors import ResourceExhausted
from ipaas.singleflight import SingleFlight
from ipaas.storage.db import Database


class Enqueuer:
    """`max_depth` bounds the queue; `max_tenant_depth` (None: no bound) what one tenant may
    hold of it, so that one tenant's backlog (schedules every second whose steps fail and
    retry for hours) cannot fill the queue and get every other tenant's triggers refused."""

    def __init__(
        self,
        db: Database,
        on_enqueued: Callable[[], None] = lambda: None,
        max_batch: int = 512,
        max_depth: int = 100_000,
        max_tenant_depth: int | None = None,
    ) -> None:
        self.db = db
        self.on_enqueued = on_enqueued
        self.max_depth = max_depth
        self.max_tenant_depth = max_tenant_depth
        self._commits: GroupCommit[NewExecution, Accepted] = GroupCommit(self._write, name="enqueue", max_batch=max_batch)
        self._depth = 0
        self._depth_loads: SingleFlight[None, int] = SingleFlight()
        self._depth_checked = 0.0
        # Per tenant: tasks at the last count (None: not counted per tenant, as the whole
        # queue was below the share then, so no tenant could be at it), accepted since,
        # and submitted but not yet committed (a burst, such as a tick's fires, is checked
        # before any of it commits).
        self._counted: dict[str, int] | None = None
        self._counted_total = 0
        self._since: dict[str, int] = {}
        self._in_flight: dict[str, int] = {}
        self._by_tenant_wanted = False

    @property
    def depth(self) -> int:
        """Outbox tasks waiting, as last counted plus what was accepted since."""
        return self._depth

    async def refresh_depth(self, by_tenant: bool = False) -> int:
        """Count the queue; concurrent callers share one count. `by_tenant`: count per tenant
        whatever the queue's size."""
        self._by_tenant_wanted |= by_tenant
        return await self._depth_loads.do(None, self._count)

    async def _count(self) -> int:
        share = self._share()
        # Counting per tenant reads and groups the whole outbox: done only when a tenant may
        # be near its share (the queue, as last known, holds at least a share).
        by_tenant = share is not None and (self._by_tenant_wanted or self._depth >= share)
        self._by_tenant_wanted = False
        since = dict(self._since)
        if by_tenant:
            counted: dict[str, int] | None = await outbox.tenant_depths(self.db)
            depth = sum(counted.values())
        else:
            counted, depth = None, await outbox.queue_depth(self.db)
        # What committed while the count ran may be in it or not. A tenant keeps it, so its
        # bound errs towards refusing until the next count: forgotten, a burst that
        # committed under a count that missed it went past the share.
        self._since = {t: n - since.get(t, 0) for t, n in self._since.items() if n > since.get(t, 0)}
        self._depth = depth
        self._counted, self._counted_total = counted, depth
        self._depth_checked = time.monotonic()
        return self._depth

    def _share(self) -> int | None:
        share = self.max_tenant_depth
        return share if share is not None and share < self.max_depth else None

    def _held(self, tenant: str) -> int:
        """What `tenant` holds of the queue, or more (never less, but for other replicas'
        enqueues since the last count)."""
        base = self._counted.get(tenant, 0) if self._counted is not None else self._counted_total
        return base + self._since.get(tenant, 0) + self._in_flight.get(tenant, 0)

    async def submit(self, item: NewExecution) -> Accepted:
        await self.ensure_room()
        share = self._share()
        if share is None:
            return await self._commits.submit(item)
        tenant = item.tenant_id
        await self._count_if_near(tenant, 1, share)
        if self._held(tenant) >= share:
            # No count in the message: a webhook's sender would learn the owner's backlog.
            raise ResourceExhausted("this tenant's share of the execution queue is full: retry later", reasons.TENANT_QUEUE_FULL)
        self._hold({tenant: 1})
        try:
            return await self._commits.submit(item)
        finally:
            self._release({tenant: 1})

    async def ensure_room(self) -> None:
        """Raises ResourceExhausted while the queue is full."""
        if time.monotonic() - self._depth_checked > 1.0:
            await self.refresh_depth()
        if self._depth >= self.max_depth:
            raise ResourceExhausted(f"the execution queue is full ({self._depth} waiting): retry later", reasons.QUEUE_FULL)

    @contextlib.asynccontextmanager
    async def within_shares(self, items: Sequence[NewExecution]) -> AsyncIterator[list[bool]]:
        """For a caller that writes executions in its own transaction (outbox.enqueue_in),
        after ensure_room(): whether each of `items` fits in its tenant's share, a tenant's
        first items first. Those that fit are held as in flight until the block ends, so a
        concurrent submit of their tenant counts them; call enqueued() in the block with
        what committed."""
        share = self._share()
        if share is None:
            yield [True] * len(items)
            return
        wanted = Counter(item.tenant_id for item in items)
        for tenant, n in wanted.items():
            await self._count_if_near(tenant, n, share)
        # No await from here to the hold: a concurrent submit cannot take the same room.
        room = {tenant: share - self._held(tenant) for tenant in wanted}
        fits = []
        for item in items:
            fits.append(room[item.tenant_id] > 0)
            room[item.tenant_id] -= 1
        held = Counter(item.tenant_id for item, fit in zip(items, fits) if fit)
        self._hold(held)
        try:
            yield fits
        finally:
            self._release(held)

    async def _count_if_near(self, tenant: str, wanted: int, share: int) -> None:
        """Count per tenant if `wanted` more would take `tenant` past its share by the bound
        at hand, which may be the whole queue's size (then not counted per tenant)."""
        if self._held(tenant) + wanted > share:
            # Twice if the first joined a count begun before this one was wanted.
            for _ in range(2):
                if self._counted is None:
                    await self.refresh_depth(by_tenant=True)

    def _hold(self, counts: Mapping[str, int]) -> None:
        in_flight = self._in_flight
        for tenant, n in counts.items():
            in_flight[tenant] = in_flight.get(tenant, 0) + n

    def _release(self, counts: Mapping[str, int]) -> None:
        in_flight = self._in_flight
        for tenant, n in counts.items():
            if in_flight[tenant] > n:
                in_flight[tenant] -= n
            else:
                del in_flight[tenant]

    def enqueued(self, items: Sequence[NewExecution], results: Sequence[Accepted]) -> None:
        """Count executions written (results in the items' order), after they committed, and
        wake the workers for them: this enqueuer's own, and a caller's that wrote them in its
        own transaction (outbox.enqueue_in)."""
        since, new = self._since, 0
        for item, result in zip(items, results):
            if not result.duplicate:
                new += 1
                since[item.tenant_id] = since.get(item.tenant_id, 0) + 1
        self._depth += new
        self.on_enqueued()

    async def _write(self, items: list[NewExecution]) -> list[Accepted]:
        results = await outbox.enqueue_many(self.db, items)
        self.enqueued(items, results)
        return results

    async def close(self) -> None:
        await self._commits.close()
