"""The dispatcher: a bounded pool of workers that claim due outbox tasks with a lease.

Workers wake at once on new work: in process through `notify()`, across replicas through
PostgreSQL LISTEN/NOTIFY; polling is the fallback. The loop only claims and spawns; the
executor records every outcome, and claims the tasks that take the finished executions'
places in the same transaction (outcomes.Refill), so a busy engine writes once per batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import uuid
from datetime import timedelta
from typing import Any

from ipaas.engine import outbox
from ipaas.engine.executor import Executor
from ipaas.engine.outcomes import Refill
from ipaas.storage.db import Database
from ipaas.storage.outage import OutageLog

log = logging.getLogger("ipaas.dispatcher")


def default_workers() -> int:
    # Steps are I/O-bound (HTTP calls), so many per core keep upstream latency hidden, and
    # executions finishing together share their outcome's transaction (bench: 16 → 32
    # workers raised end-to-end deliveries ~1.2x on 2 cores).
    return max(8, (os.cpu_count() or 1) * 16)


class Dispatcher:
    def __init__(
        self,
        db: Database,
        executor: Executor,
        workers: int = 0,
        lease: timedelta = timedelta(seconds=60),
        poll_interval: float = 1.0,
        recover_leases: bool = True,
    ) -> None:
        self.db = db
        self.executor = executor
        self.workers = workers or default_workers()
        self.lease = lease
        self.poll_interval = poll_interval
        # On SQLite the core's own dispatcher is the only one, so at start a lease is a dead
        # process's (or a live orphan's, kept). Engine processes share the file: their parent
        # recovers for them.
        self.recover_leases = recover_leases
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._wake = asyncio.Event()
        self._inflight: dict[int, asyncio.Task[None]] = {}
        self._reserved = 0  # slots held by claims in progress
        self._stopping = False
        self._loop_task: asyncio.Task[None] | None = None
        self._lease_task: asyncio.Task[None] | None = None
        self._listen_task: asyncio.Task[None] | None = None
        self._database_down = OutageLog(log, "dispatcher.database_unavailable")
        self.processed = 0  # tasks this replica ran to an outcome (a figure for operators)
        self.rotation = outbox.Rotation()  # fair claims go round the tenants from here
        executor.outcomes.refill = Refill(self.owner, lease, self._reserve, self._start, self.rotation)

    @property
    def inflight(self) -> int:
        return len(self._inflight)

    def notify(self) -> None:
        self._wake.set()

    def start(self) -> None:
        self._loop_task = asyncio.create_task(self._run(), name="ipaas-dispatcher")
        self._lease_task = asyncio.create_task(self._keep_leases(), name="ipaas-dispatcher-leases")
        if self.db.is_postgres:
            self._listen_task = asyncio.create_task(self._listen(), name="ipaas-dispatcher-listen")

    async def _run(self) -> None:
        if self.recover_leases and not self.db.is_postgres:
            await outbox.release_dead_leases(self.db)
        while not self._stopping:
            # Clear before claiming, so a wake-up that arrives during the claim is kept.
            self._wake.clear()
            free = self._reserve(0)
            if free > 0:
                claimed: list[outbox.ClaimedTask] = []
                try:
                    claimed = await outbox.claim_due_tasks(self.db, self.owner, free, self.lease, self.rotation)
                except Exception as exc:
                    if not self._database_down(exc):
                        log.exception("dispatcher.claim_failed")
                finally:
                    self._start(claimed, free)
            # Either the due work is all claimed or the pool is full: both end with a wake-up
            # (new work, a finished worker) or the poll interval.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.poll_interval):
                    await self._wake.wait()

    def _reserve(self, finishing: int) -> int:
        """Hold the slots free once `finishing` running executions end, for a claim."""
        if self._stopping:
            return 0
        free = max(0, self.workers - len(self._inflight) - self._reserved + finishing)
        self._reserved += free
        return free

    def _start(self, tasks: list[outbox.ClaimedTask], reserved: int) -> None:
        self._reserved -= reserved
        if self._stopping:
            return  # stop() releases this owner's leases once the last outcome is written
        for task in tasks:
            self._inflight[task.task_id] = asyncio.create_task(self._work(task))

    async def _work(self, task: outbox.ClaimedTask) -> None:
        try:
            await self.executor.run(task, self.owner)
            self.processed += 1
        except asyncio.CancelledError:
            raise
        except Exception:
            # The task keeps its lease and is retried once the lease expires.
            log.exception("dispatcher.task_crashed", extra={"execution_id": task.execution_id})
        finally:
            self._inflight.pop(task.task_id, None)
            self._wake.set()

    async def _keep_leases(self) -> None:
        """Every third of a lease, extend the leases of everything in flight in one UPDATE
        (a task claimed just after a round still has two thirds of its lease at the next).
        One loop per dispatcher instead of a timer task per execution: a task's lease is
        extended only while this process is alive and working on it."""
        interval = self.lease.total_seconds() / 3
        while True:
            await asyncio.sleep(interval)
            if self._inflight:
                try:
                    await outbox.extend_leases(self.db, list(self._inflight), self.owner, self.lease)
                except Exception as exc:
                    if not self._database_down(exc):
                        log.warning("dispatcher.extend_leases_failed", exc_info=True)

    async def _listen(self) -> None:
        import psycopg

        from ipaas.storage.db import sync_url

        dsn = sync_url(self.db.url).set(drivername="postgresql").render_as_string(hide_password=False)
        while not self._stopping:
            try:
                async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
                    await conn.execute(f"LISTEN {outbox.NOTIFY_CHANNEL}")
                    async for _ in conn.notifies():
                        self._wake.set()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if not self._database_down(exc):
                    log.warning("dispatcher.listen_failed", exc_info=True)
                await asyncio.sleep(self.poll_interval)

    async def stop(self, deadline: float = 10.0) -> None:
        """Stop claiming, let in-flight executions finish within the deadline, then cancel
        the rest and release their leases so another replica can take them at once."""
        self._stopping = True
        self._wake.set()
        for task in (self._loop_task, self._listen_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        pending: Any = list(self._inflight.values())
        if pending:
            _done, pending = await asyncio.wait(pending, timeout=deadline)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=2)
        if self._lease_task is not None:  # kept until now: in-flight work keeps its leases
            self._lease_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._lease_task
        await self.executor.outcomes.close()  # outcomes already handed over are written first
        released = await outbox.release_leases(self.db, self.owner)
        log.info("dispatcher.stopped", extra={"released": released})
