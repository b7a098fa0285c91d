"""Deletes finished executions once they are older than the retention window.

Without it the executions and their steps (payloads, rendered configs, outputs) grow
forever: at 100 webhooks a second that is 8.6 million executions a day. Only executions
that are finished (succeeded, failed, dead, cancelled) before the cutoff and have no outbox
task left are deleted; their steps go with them (ON DELETE CASCADE).

Deletes go in small batches, each its own transaction, so the hot path's writers (one at a
time on SQLite) wait for one batch at most. Replicas sharing PostgreSQL each prune; SKIP
LOCKED keeps them off each other's rows and off a row a replay is changing.

A trigger's dedup key (Idempotency-Key, webhook-id, schedule fire) is kept as long as its
execution, so the window is also how long a repeated trigger is recognised: the setting
refuses less than a day, the gateway's own idempotency window."""

from __future__ import annotations

import asyncio
import logging
from datetime import datetime, timedelta
from typing import Any, Callable, Mapping

from sqlalchemy import delete, exists, select

from ipaas.ids import first_id_at
from ipaas.storage.db import Database
from ipaas.engine.periodic import Periodic
from ipaas.storage.tables import Execution, OutboxTask, utcnow

log = logging.getLogger("ipaas.retention")

FINISHED = ("succeeded", "failed", "dead", "cancelled")
DEFAULT_DAYS = 14.0
MIN_DAYS = 1.0
SETTING = "IPAAS_EXECUTION_RETENTION_DAYS"


def retention_window(env: Mapping[str, str]) -> timedelta | None:
    """IPAAS_EXECUTION_RETENTION_DAYS: days to keep finished executions; 0 keeps them forever."""
    raw = (env.get(SETTING) or "").strip()
    try:
        days = float(raw) if raw else DEFAULT_DAYS
    except ValueError:
        raise SystemExit(f"{SETTING} must be a number of days (0: keep forever), got {raw!r}") from None
    if days == 0:
        return None
    if not MIN_DAYS <= days <= 36_500:
        raise SystemExit(f"{SETTING} must be 0 (keep forever) or from {MIN_DAYS:g} to 36500 days, got {raw!r}: a repeated trigger is recognised only while its execution is kept")
    return timedelta(days=days)


class Retention:
    def __init__(
        self,
        db: Database,
        keep: timedelta,
        *,
        clock: Callable[[], datetime] = utcnow,
        interval: float = 600.0,
        first_delay: float = 60.0,
        batch: int = 500,
        pause: float = 0.05,
    ) -> None:
        self.db = db
        self.keep = keep
        self.clock = clock
        self.batch = batch
        self.pause = pause
        # The first round a minute after start, not in the way of start-up.
        self._runner = Periodic("retention", self.prune, interval, log, first_delay=first_delay)

    async def prune(self) -> int:
        """Delete every finished execution older than the window; returns how many."""
        cutoff = self.clock() - self.keep
        total = 0
        while True:
            deleted = await self.db.transaction(lambda conn: self._delete_batch(conn, cutoff))
            total += deleted
            if deleted < self.batch:
                break
            await asyncio.sleep(self.pause)  # the hot path's writers go between batches
        if total:
            log.info("retention.pruned", extra={"deleted": total, "cutoff": cutoff.isoformat()})
        return total

    def _delete_batch(self, conn: Any, cutoff: datetime) -> int:
        # Ids are time-ordered: ids made before the cutoff are a range of the primary key, so
        # the scan needs no index on finished_at (which every delivery would have to update).
        candidates = (
            select(Execution.id)
            .where(
                Execution.id < first_id_at("ex", cutoff),
                Execution.finished_at < cutoff,
                Execution.status.in_(FINISHED),
                ~exists().where(OutboxTask.execution_id == Execution.id),
            )
            .order_by(Execution.id)
            .limit(self.batch)
        )
        if self.db.is_postgres:
            candidates = candidates.with_for_update(skip_locked=True)
        return conn.execute(delete(Execution).where(Execution.id.in_(candidates.scalar_subquery()))).rowcount

    def start(self) -> None:
        self._runner.start()

    async def stop(self) -> None:
        await self._runner.stop()
