"""Fires scheduled workflows. Each fire is enqueued under the key (workflow, fire time), so
any number of replicas ticking at once still start one execution per fire. The fire is
enqueued before the next fire time is stored: a crash in between re-enqueues the same key,
which the outbox ignores.

A schedule whose fire times cannot be computed (a definition stored before validation
refused it, a cron croniter cannot satisfy) is parked for PARKED_FOR instead of failing the
tick: one tenant's bad row must not stop every other tenant's schedules."""

from __future__ import annotations

import logging
import time
from datetime import datetime, timedelta
from typing import Callable

from sqlalchemy import and_, or_, select, update

from ipaas.definitions import max_attempts
from ipaas.engine.enqueuer import Enqueuer
from ipaas.engine.outbox import NewExecution
from ipaas.engine.periodic import Periodic
from ipaas.engine.schedule import DEFAULT_GRACE, due_fire
from ipaas.storage.db import Database
from ipaas.storage.tables import Schedule, Workflow, WorkflowVersion, utcnow

log = logging.getLogger("ipaas.scheduler")

# How long a schedule that cannot be computed waits before it is tried again. Changing the
# workflow's schedule re-plans it at once (the store plans its next fire).
PARKED_FOR = timedelta(hours=1)


class Scheduler:
    def __init__(
        self,
        db: Database,
        enqueuer: Enqueuer,
        clock: Callable[[], datetime] = utcnow,
        interval: float = 1.0,
        catch_up: str = "collapse",
    ) -> None:
        self.db = db
        self.enqueuer = enqueuer
        self.clock = clock
        self.interval = interval
        self.catch_up = catch_up
        # The `now` of the last tick that ran to its end, and how long it took: fires due
        # since then are on time however long the interval (it may be an hour) or the tick.
        self._last_tick: datetime | None = None
        self._last_tick_took = 0.0
        self._runner = Periodic("scheduler", self.tick, interval, log)

    async def tick(self) -> int:
        """Enqueue every due fire; returns how many executions were newly created."""
        now = self.clock()
        started = time.monotonic()
        missed_before = self._missed_before(now)
        q = (
            select(Schedule.workflow_id, Schedule.next_fire_at, Workflow.tenant_id, WorkflowVersion.version, WorkflowVersion.definition)
            .join(Workflow, Workflow.id == Schedule.workflow_id)
            .join(WorkflowVersion, and_(WorkflowVersion.workflow_id == Workflow.id, WorkflowVersion.version == Workflow.current_version))
            .where(
                Workflow.active.is_(True),
                Workflow.deleted_at.is_(None),
                Workflow.trigger_type == "schedule",
                or_(Schedule.next_fire_at.is_(None), Schedule.next_fire_at <= now),
            )
            .limit(500)
        )
        async with self.db.session() as s:
            rows = (await s.execute(q)).all()
        fired = 0
        for row in rows:
            try:
                fire_at, planned = due_fire(row.definition["trigger"], row.next_fire_at, now, catch_up=self.catch_up, missed_before=missed_before)
                attempts = max_attempts(row.definition)
            except Exception as exc:
                # Only this row's definition is at fault (the database answered): park it.
                # The error's type only: its text could quote the definition.
                fire_at, planned = None, now + PARKED_FOR
                log.warning("schedule.parked", extra={"workflow_id": row.workflow_id, "tenant_id": row.tenant_id, "error": type(exc).__name__, "until": planned.isoformat()})
            if fire_at is not None:
                accepted = await self.enqueuer.submit(
                    NewExecution(
                        tenant_id=row.tenant_id,
                        workflow_id=row.workflow_id,
                        workflow_version=row.version,
                        trigger="schedule",
                        payload={"scheduled_at": fire_at.isoformat().replace("+00:00", "Z")},
                        max_attempts=attempts,
                        dedup_key=f"sched:{row.workflow_id}:{fire_at.isoformat()}",
                    )
                )
                fired += 0 if accepted.duplicate else 1
                log.info("schedule.fired", extra={"workflow_id": row.workflow_id, "fire_at": fire_at.isoformat(), "duplicate": accepted.duplicate})
            async with self.db.session() as s, s.begin():
                current = Schedule.next_fire_at.is_(None) if row.next_fire_at is None else Schedule.next_fire_at == row.next_fire_at
                await s.execute(update(Schedule).where(Schedule.workflow_id == row.workflow_id, current).values(next_fire_at=planned, last_fire_at=fire_at or Schedule.last_fire_at))
        self._last_tick, self._last_tick_took = now, time.monotonic() - started
        return fired

    def _missed_before(self, now: datetime) -> datetime:
        """Fires due before this were missed: skip mode drops them, collapse fires the latest.

        Missed means nobody was ticking when it fell due: before this process's first tick,
        or before its last completed one. A minute's slack covers a plan saved while that
        tick read, and replicas' clocks that differ by seconds. A fire more than two
        intervals (plus a tick's length) late was missed too: the process was alive but
        not ticking (its database down for hours, a suspended VM), and skip mode exists so
        that a 09:00 report does not go out at 15:00."""
        if self._last_tick is None:
            return now - DEFAULT_GRACE
        late = max(DEFAULT_GRACE, timedelta(seconds=2 * self.interval + self._last_tick_took))
        return max(min(self._last_tick, now) - DEFAULT_GRACE, now - late)

    def start(self) -> None:
        self._runner.start()

    async def stop(self) -> None:
        await self._runner.stop()
