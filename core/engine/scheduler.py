"""Fires scheduled workflows. Each fire is enqueued under the key (workflow, fire time), so
any number of replicas ticking at once still start one execution per fire. The fire is
enqueued before the next fire time is stored: a crash in between re-enqueues the same key,
which the outbox ignores.

A schedule whose fire times cannot be computed (a definition stored before validation
refused it, a cron croniter cannot satisfy) is parked for PARKED_FOR instead of failing the
tick: one tenant's bad row must not stop every other tenant's schedules.

A tick fires its due schedules a batch at a time, earliest first: a batch's fires are
submitted together (the enqueuer's group commit writes them in one transaction) and their
next fire times are stored in one more. A full batch means more are due: the next batch
follows at once, not a tick later. Fired one at a time, 500 a tick, 1,500 schedules due at
once took 2.6 s (SQLite) to 7.3 s (PostgreSQL) of work over three ticks a second apart, and
~13,000 would have run past the minute; now 0.5 s in one tick on either."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Callable

from sqlalchemy import and_, bindparam, func, or_, select, update

from ipaas import reasons
from ipaas.definitions import max_attempts
from ipaas.engine.enqueuer import Enqueuer
from ipaas.engine.outbox import Accepted, NewExecution
from ipaas.engine.periodic import Periodic
from ipaas.engine.schedule import DEFAULT_GRACE, due_fire
from ipaas.errors import ResourceExhausted
from ipaas.storage.db import Database
from ipaas.storage.tables import Schedule, Workflow, WorkflowVersion, utcnow
from ipaas.throttled_log import ThrottledWarning

log = logging.getLogger("ipaas.scheduler")

# How long a schedule that cannot be computed waits before it is tried again. Changing the
# workflow's schedule re-plans it at once (the store plans its next fire).
PARKED_FOR = timedelta(hours=1)
# Rows read, fired and re-planned together; under the enqueuer's group commit batch (512),
# so one batch's fires are usually one transaction.
BATCH = 500

_SCHEDULES = Schedule.__table__
# Compare-and-set on the plan read: a replica that stored it first wins, the fire is
# enqueued either way under the same key. `IS NOT DISTINCT FROM` (SQLite: `IS`) matches a
# NULL plan too.
_REPLAN = (
    update(_SCHEDULES)
    .where(
        _SCHEDULES.c.workflow_id == bindparam("workflow"),
        _SCHEDULES.c.next_fire_at.is_not_distinct_from(bindparam("was", type_=_SCHEDULES.c.next_fire_at.type)),
    )
    .values(
        next_fire_at=bindparam("plan", type_=_SCHEDULES.c.next_fire_at.type),
        last_fire_at=func.coalesce(bindparam("fired", type_=_SCHEDULES.c.last_fire_at.type), _SCHEDULES.c.last_fire_at),
    )
)


def _due(now: datetime, skip_tenants: frozenset[str] = frozenset()) -> Any:
    query = (
        select(Schedule.workflow_id, Schedule.next_fire_at, Workflow.tenant_id, WorkflowVersion.version, WorkflowVersion.definition)
        .join(Workflow, Workflow.id == Schedule.workflow_id)
        .join(WorkflowVersion, and_(WorkflowVersion.workflow_id == Workflow.id, WorkflowVersion.version == Workflow.current_version))
        .where(
            Workflow.active.is_(True),
            Workflow.deleted_at.is_(None),
            Workflow.trigger_type == "schedule",
            or_(Schedule.next_fire_at.is_(None), Schedule.next_fire_at <= now),
        )
        .order_by(Schedule.next_fire_at.asc().nulls_first())
        .limit(BATCH)
    )
    return query.where(Workflow.tenant_id.not_in(skip_tenants)) if skip_tenants else query


@dataclass
class _Batch:
    fired: int = 0
    queue_full: bool = False
    over_share: set[str] = field(default_factory=set)  # tenants whose share of the queue refused fires


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
        self._queue_full = ThrottledWarning(log, "schedule.queue_full")
        self._tenant_queue_full = ThrottledWarning(log, "schedule.tenant_queue_full")
        self._runner = Periodic("scheduler", self.tick, interval, log)

    async def tick(self) -> int:
        """Enqueue every due fire; returns how many executions were newly created."""
        now = self.clock()
        started = time.monotonic()
        missed_before = self._missed_before(now)
        fired, due = 0, _due(now)
        over_share: frozenset[str] = frozenset()
        while True:
            rows = await self.db.read(lambda conn: conn.execute(due).all())
            batch = await self._fire(rows, now, missed_before)
            fired += batch.fired
            # A full queue refused fires: their plans stay, and the next batch would be them.
            if len(rows) < BATCH or batch.queue_full:
                break
            if batch.over_share:
                # So would the refused fires of tenants over their share: the next batches
                # leave those tenants out, and the other tenants' schedules still fire.
                over_share |= batch.over_share
                due = _due(now, over_share)
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

    async def _fire(self, rows: list[Any], now: datetime, missed_before: datetime) -> _Batch:
        plans: dict[str, dict[str, Any]] = {}
        fires: list[tuple[Any, datetime, NewExecution]] = []
        for row in rows:
            try:
                fire_at, planned = due_fire(row.definition["trigger"], row.next_fire_at, now, catch_up=self.catch_up, missed_before=missed_before)
                attempts = max_attempts(row.definition)
            except Exception as exc:
                # Only this row's definition is at fault (the database answered): park it.
                # The error's type only: its text could quote the definition.
                fire_at, planned = None, now + PARKED_FOR
                log.warning("schedule.parked", extra={"workflow_id": row.workflow_id, "tenant_id": row.tenant_id, "error": type(exc).__name__, "until": planned.isoformat()})
            plans[row.workflow_id] = {"workflow": row.workflow_id, "was": row.next_fire_at, "plan": planned, "fired": fire_at}
            if fire_at is not None:
                execution = NewExecution(
                    tenant_id=row.tenant_id,
                    workflow_id=row.workflow_id,
                    workflow_version=row.version,
                    trigger="schedule",
                    payload={"scheduled_at": fire_at.isoformat().replace("+00:00", "Z")},
                    max_attempts=attempts,
                    dedup_key=f"sched:{row.workflow_id}:{fire_at.isoformat()}",
                )
                fires.append((row, fire_at, execution))
        # Submitted together, so the enqueuer's group commit writes them in one transaction.
        results = await asyncio.gather(*(self.enqueuer.submit(execution) for _, _, execution in fires), return_exceptions=True)
        batch, failure, refused, over_share = _Batch(), None, None, None
        for (row, fire_at, _), result in zip(fires, results):
            if isinstance(result, Accepted):
                batch.fired += 0 if result.duplicate else 1
                log.info("schedule.fired", extra={"workflow_id": row.workflow_id, "fire_at": fire_at.isoformat(), "duplicate": result.duplicate})
                continue
            # Not enqueued: the plan stays, so the next tick tries this fire again (skip mode
            # drops it then, as missed). The other fires of the batch still count.
            del plans[row.workflow_id]
            if isinstance(result, ResourceExhausted) and result.reason == reasons.TENANT_QUEUE_FULL:
                batch.over_share.add(row.tenant_id)
                over_share = result
            elif isinstance(result, ResourceExhausted):
                refused = result
            elif isinstance(result, BaseException):
                failure = failure or result
        if plans:
            await self.db.transaction(lambda conn: conn.execute(_REPLAN, list(plans.values())))
        if refused is not None:
            # Backpressure, not a bug: one line a minute while it lasts, no traceback.
            batch.queue_full = True
            self._queue_full(refused, deferred=sum(1 for r in results if isinstance(r, ResourceExhausted) and r.reason != reasons.TENANT_QUEUE_FULL), depth=self.enqueuer.depth)
        if over_share is not None:
            # As with a full queue: the fires keep their plans and are tried at each tick.
            deferred = sum(1 for r in results if isinstance(r, ResourceExhausted) and r.reason == reasons.TENANT_QUEUE_FULL)
            self._tenant_queue_full(over_share, deferred=deferred, tenant_ids=sorted(batch.over_share)[:10])
        if failure is not None:
            raise failure
        return batch

    def start(self) -> None:
        self._runner.start()

    async def stop(self) -> None:
        await self._runner.stop()
