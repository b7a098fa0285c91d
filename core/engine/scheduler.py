"""Fires scheduled workflows. A tick reads its due schedules, then fires them in a transaction
that first claims each schedule: it must still be the plan read, of a workflow still active,
not deleted and still scheduled. A fire is written in the same transaction as its claim and
its next fire time, so a delete, deactivation or new timing that commits after the read is
seen: that workflow does not fire. Replicas ticking at once claim in turn; the one that comes
second finds the plan moved on and fires nothing. Each fire is also enqueued under the key
(workflow, fire time), which the outbox never enqueues twice.

A schedule whose fire times cannot be computed (a definition stored before validation
refused it, a cron croniter cannot satisfy) is parked for PARKED_FOR instead of failing the
tick: one tenant's bad row must not stop every other tenant's schedules.

A tick fires its due schedules a batch at a time, earliest first: a batch's claims, fires
and next fire times are one transaction. A full batch means more are due: the next batch
follows at once, not a tick later. Fired one at a time, 500 a tick, 1,500 schedules due at
once took 2.6 s (SQLite) to 7.3 s (PostgreSQL) of work over three ticks a second apart, and
~13,000 would have run past the minute; now 0.5 s in one tick on either.

Fires of a tenant that holds its share of the queue (IPAAS_MAX_TENANT_QUEUE_DEPTH) are left
out of their batch's transaction and keep their plans, as all fires do while the queue is
full; the other tenants' fires of the batch go in, and the tick's later batches leave that
tenant out, so its refused fires, the earliest due, cannot fill every batch.

Fires are charged to their tenant's tier rate (IPAAS_RATE_FREE, ...), in a budget of their
own (not the tenant's API budget): without it a free tenant could save 200 workflows every
second and start 200 executions a second, 40x its tier. A fire over budget waits, as a fire
the full queue or the tenant's share refuses does: it keeps its plan (nothing is written for
it), the tick's later batches leave its tenant out, and the next tick tries it again,
earliest due first (`schedule.rate_limited`, one warning a minute per tenant, counts the
fires held back). A fire that waits past the missed threshold (a minute, or two intervals)
is then missed like any other: skip mode drops it (a later fire time of the schedule that
is on time still fires), collapse mode fires the schedule once, at the latest of its fire
times. So a tenant with far more schedules than its rate gets its rate, never more, and
holds at most one waiting fire per schedule. Skipping it instead (planning it on) lost fires for good: a
replica granted no budget moved on plans that another replica, granted the budget for the
same fires, then failed to claim; and a free tenant's 11th daily 09:00 report never ran,
though its window had room two seconds later.

The budget is spent after the queue and the tenant's share accept the fires, so fires that
keep their plans for those are not charged; a fire charged and then not claimed (another
replica's claim came first, a change committed after the read) is charged all the same:
with replicas ticking at once on one Redis, a tenant may get less than its rate in that
window, never more. The charge is one limiter call per tenant and batch: 1,500 schedules of
1,500 tenants due at once tick in the time they take with limits off with the budget in
memory (~50 ms of spends), ~0.4 s more with it in Redis (measured; a round trip per tenant,
16 at a time)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Callable

from sqlalchemy import and_, bindparam, exists, func, or_, select, update
from sqlalchemy.engine import Connection

from ipaas import reasons
from ipaas.definitions import max_attempts
from ipaas.engine import outbox
from ipaas.engine.enqueuer import Enqueuer
from ipaas.engine.outbox import Accepted, NewExecution
from ipaas.engine.periodic import Periodic
from ipaas.engine.schedule import DEFAULT_GRACE, due_fire
from ipaas.errors import ResourceExhausted
from ipaas.storage.db import Database
from ipaas.storage.tables import Schedule, Tenant, Workflow, WorkflowVersion, utcnow
from ipaas.throttled_log import ThrottledCounts, ThrottledWarning

if TYPE_CHECKING:
    from ipaas.ratelimit import RateLimiter

log = logging.getLogger("ipaas.scheduler")

# How long a schedule that cannot be computed waits before it is tried again. Changing the
# workflow's schedule re-plans it at once (the store plans its next fire).
PARKED_FOR = timedelta(hours=1)
# Rows read, then claimed, fired and re-planned in one transaction.
BATCH = 500
# Tenants' rate spends in flight at once (Redis connections a tick may use).
TAKE_CONCURRENCY = 16

_SCHEDULES = Schedule.__table__
_WORKFLOWS = Workflow.__table__
_IDS = bindparam("ids", expanding=True)
# What _due reads as a workflow to fire; a claim checks it again.
_LIVE = and_(_WORKFLOWS.c.active.is_(True), _WORKFLOWS.c.deleted_at.is_(None), _WORKFLOWS.c.trigger_type == "schedule")
# PostgreSQL claims with row locks, workflows before plans as every writer of both takes
# them (deleting, deactivating or editing a workflow updates its row, then its plan), in id
# order, so claims never deadlock with those or with other replicas' claims. FOR SHARE: a
# change to a claimed workflow waits for the fire's commit, and a claim that waited for a
# change re-reads the row it committed.
_LOCK_LIVE_WORKFLOWS = select(_WORKFLOWS.c.id).where(_WORKFLOWS.c.id.in_(_IDS), _LIVE).order_by(_WORKFLOWS.c.id).with_for_update(read=True)
_LOCK_PLANS = select(_SCHEDULES.c.workflow_id, _SCHEDULES.c.next_fire_at).where(_SCHEDULES.c.workflow_id.in_(_IDS)).order_by(_SCHEDULES.c.workflow_id).with_for_update(key_share=True)
# SQLite has no row locks: this UPDATE (it changes nothing) takes the database's write lock
# before it reads, so no change can commit between the claim and the fires. A SELECT would
# not do: pysqlite begins the transaction at its first write, so a SELECT first reads
# outside it.
_TOUCH_LIVE_PLANS = (
    update(_SCHEDULES)
    .where(_SCHEDULES.c.workflow_id.in_(_IDS), exists().where(_WORKFLOWS.c.id == _SCHEDULES.c.workflow_id, _LIVE))
    .values(next_fire_at=_SCHEDULES.c.next_fire_at)
    .returning(_SCHEDULES.c.workflow_id, _SCHEDULES.c.next_fire_at)
)
# Runs on claimed rows only, so its compare-and-set on the plan read always matches; it stays
# as the guard that a plan it did not read is never overwritten. `IS NOT DISTINCT FROM`
# (SQLite: `IS`) matches a NULL plan too.
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
        select(Schedule.workflow_id, Schedule.next_fire_at, Workflow.tenant_id, Tenant.tier, WorkflowVersion.version, WorkflowVersion.definition)
        .join(Workflow, Workflow.id == Schedule.workflow_id)
        .join(Tenant, Tenant.id == Workflow.tenant_id)
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
    over_rate: set[str] = field(default_factory=set)  # tenants whose tier rate held fires back


class Scheduler:
    def __init__(
        self,
        db: Database,
        enqueuer: Enqueuer,
        clock: Callable[[], datetime] = utcnow,
        interval: float = 1.0,
        catch_up: str = "collapse",
        limiter: RateLimiter | None = None,
    ) -> None:
        self.db = db
        self.enqueuer = enqueuer
        self.clock = clock
        self.interval = interval
        self.catch_up = catch_up
        self.limiter = limiter  # the tenants' tier rates, for fires; None: not limited
        # The `now` of the last tick that ran to its end, and how long it took: fires due
        # since then are on time however long the interval (it may be an hour) or the tick.
        self._last_tick: datetime | None = None
        self._last_tick_took = 0.0
        self._queue_full = ThrottledWarning(log, "schedule.queue_full")
        self._tenant_queue_full = ThrottledWarning(log, "schedule.tenant_queue_full")
        self._rate_limited = ThrottledCounts(log, "schedule.rate_limited", "tenant_id", "held_back")
        self._runner = Periodic("scheduler", self.tick, interval, log)
        self.fired_total = 0  # executions created by fires, committed (ipaas_core_schedules_fired_total)
        # Fires held back over their tenant's rate, once per tick that holds each back
        # (ipaas_core_schedules_rate_limited_total).
        self.rate_limited_total = 0

    async def tick(self) -> int:
        """Enqueue every due fire; returns how many executions were newly created."""
        now = self.clock()
        started = time.monotonic()
        missed_before = self._missed_before(now)
        fired, due = 0, _due(now)
        left_out: frozenset[str] = frozenset()
        while True:
            rows = await self.db.read(lambda conn: conn.execute(due).all())
            batch = await self._fire(rows, now, missed_before)
            fired += batch.fired
            self.fired_total += batch.fired
            # A full queue refused fires: their plans stay, and the next batch would be them.
            if len(rows) < BATCH or batch.queue_full:
                break
            if batch.over_share or batch.over_rate:
                # So would the refused fires of tenants over their share, and the held-back
                # fires of tenants over their rate: the next batches leave those tenants
                # out, and the other tenants' schedules still fire.
                left_out |= batch.over_share | batch.over_rate
                due = _due(now, left_out)
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
        batch = _Batch()
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
        if fires:
            try:
                await self.enqueuer.ensure_room()
            except ResourceExhausted as exc:
                # Backpressure, not a bug: one line a minute while it lasts, no traceback.
                # The fires keep their plans, so the next tick tries them again (skip mode
                # drops them then, as missed); the rest of the batch is planned as usual.
                batch.queue_full = True
                self._queue_full(exc, deferred=len(fires), depth=self.enqueuer.depth)
                for row, _, _ in fires:
                    del plans[row.workflow_id]
                fires = []
        async with self.enqueuer.within_shares([execution for _, _, execution in fires]) as fits:
            refused = [row for (row, _, _), fit in zip(fires, fits) if not fit]
            if refused:
                # A tenant holding its share of the queue: its fires are left out of the
                # transaction and keep their plans, as in a full queue; the other tenants'
                # fires of the batch go in, and the tick's next batches leave it out.
                fires = [fire for fire, fit in zip(fires, fits) if fit]
                for row in refused:
                    del plans[row.workflow_id]
                batch.over_share = {row.tenant_id for row in refused}
                self._tenant_queue_full(
                    ResourceExhausted("a tenant's share of the execution queue is full", reasons.TENANT_QUEUE_FULL),
                    deferred=len(refused),
                    tenant_ids=sorted(batch.over_share)[:10],
                )
            # Last, so that only fires the queue took are charged: those refused above keep
            # their plans and are tried (and charged) again later. A fire held back here was
            # held in its tenant's share until the block ends, which only errs on the safe side.
            fires = await self._charge(fires, plans, batch)
            if not plans:
                return batch
            read = {workflow_id: plan["was"] for workflow_id, plan in plans.items()}

            def claim_and_fire(conn: Connection) -> tuple[list[tuple[Any, datetime, NewExecution]], list[Accepted]]:
                claimed = _claim(conn, read)
                if claimed:
                    conn.execute(_REPLAN, [plans[workflow_id] for workflow_id in sorted(claimed)])
                fired = [fire for fire in fires if fire[0].workflow_id in claimed]
                return fired, outbox.enqueue_in(conn, [execution for _, _, execution in fired])

            fired, results = await self.db.transaction(claim_and_fire)
            self.enqueuer.enqueued([execution for _, _, execution in fired], results)
        for (row, fire_at, _), result in zip(fired, results):
            batch.fired += 0 if result.duplicate else 1
            log.info("schedule.fired", extra={"workflow_id": row.workflow_id, "fire_at": fire_at.isoformat(), "duplicate": result.duplicate})
        return batch

    async def _charge(self, fires: list[tuple[Any, datetime, NewExecution]], plans: dict[str, dict[str, Any]], batch: _Batch) -> list[tuple[Any, datetime, NewExecution]]:
        """The fires their tenants' rates have room for, earliest due first. The others wait:
        they keep their plans (nothing is written for them), their tenants are left out of
        the tick's later batches, and the next tick tries them again."""
        if self.limiter is None or not fires:
            return fires
        wanted = Counter(row.tenant_id for row, _, _ in fires)
        tiers = {row.tenant_id: row.tier for row, _, _ in fires}
        granted = await self._take(wanted, tiers)
        for tenant, n in wanted.items():
            if n > granted[tenant]:
                self.rate_limited_total += n - granted[tenant]
                self._rate_limited(tenant, n - granted[tenant], tier=tiers[tenant])
                batch.over_rate.add(tenant)
        kept = []
        for fire in fires:  # in the rows' order: earliest due first
            row = fire[0]
            if granted[row.tenant_id] > 0:
                granted[row.tenant_id] -= 1
                kept.append(fire)
            else:
                del plans[row.workflow_id]
        return kept

    async def _take(self, wanted: Counter[str], tiers: dict[str, str]) -> dict[str, int]:
        """Each tenant's fires that fit its rate. A few tenants' spends at a time: in Redis one
        after another cost a round trip each (1,500 tenants due at once: ~0.4 s more a tick),
        all at once would open a connection each."""
        assert self.limiter is not None
        limiter, room = self.limiter, asyncio.Semaphore(TAKE_CONCURRENCY)

        async def take(tenant: str, n: int) -> int:
            async with room:
                return await limiter.take(tenant, tiers[tenant], n)

        return dict(zip(wanted, await asyncio.gather(*(take(tenant, n) for tenant, n in wanted.items()))))

    def start(self) -> None:
        self._runner.start()

    async def stop(self) -> None:
        await self._runner.stop()


def _claim(conn: Connection, read: dict[str, datetime | None]) -> set[str]:
    """The schedules, of those read, whose plan is still the one read and whose workflow is
    still live; held (locked) until the caller's transaction ends."""
    ids = sorted(read)
    if conn.dialect.name == "postgresql":
        live = conn.execute(_LOCK_LIVE_WORKFLOWS, {"ids": ids}).scalars().all()
        current = conn.execute(_LOCK_PLANS, {"ids": live}).all() if live else []
    else:
        current = conn.execute(_TOUCH_LIVE_PLANS, {"ids": ids}).all()
    return {row.workflow_id for row in current if row.next_fire_at == read[row.workflow_id]}
