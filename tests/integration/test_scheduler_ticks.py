"""The scheduler's tick on a real core (SQLite and PostgreSQL): slow ticks, many schedules
due at once, a full queue, tenants over their share of it, and schedules stored before
validation refused them."""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import delete, func, select, text, update

from ipaas.engine.enqueuer import Enqueuer
from ipaas.engine.scheduler import Scheduler
from ipaas.storage.db import Database
from ipaas.storage.tables import Execution, OutboxTask, Schedule, Tenant, Workflow, WorkflowVersion
from ipaas.v1 import workflows_pb2
from tests.conftest import core_with
from tests.fakes.slack import FakeSlack
from tests.integration.helpers import Api, slack_step, workflow
from tests.integration.test_error_info import error_info, refused

U = timezone.utc


class Clock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


async def _scheduled_at(core, workflow_id: str | None = None) -> list[str]:  # type: ignore[no-untyped-def]
    q = select(Execution.payload)
    if workflow_id:
        q = q.where(Execution.workflow_id == workflow_id)
    async with core.server.db.session() as s:
        return sorted(p["scheduled_at"] for p in (await s.scalars(q)).all())


async def test_skip_mode_runs_every_fire_of_a_slow_tick_and_drops_only_those_missed_in_downtime(tmp_path, database_url, monkeypatch) -> None:
    """IPAAS_SCHEDULER_INTERVAL=120 with IPAAS_SCHEDULE_CATCH_UP=skip: each */5 fire is
    found 90 s late with no downtime at all. A fixed 60 s grace dropped every one."""
    async with FakeSlack() as slack, core_with(tmp_path, database_url, IPAAS_DISABLE_ENGINE="1") as core:
        api = Api(core.channel, (await core.new_tenant()).md)
        cred = await api.credential("slack", {"webhook_url": slack.url})
        clock = Clock(datetime(2026, 1, 1, 0, 0, 30, tzinfo=U))
        monkeypatch.setattr("ipaas.workflow_store.utcnow", clock)
        wf = (await api.create({"name": "every-5-min", "trigger": {"type": "schedule", "cron": "*/5 * * * *"}, "steps": [slack_step(cred, "hi")]})).workflow
        scheduler = Scheduler(core.server.db, core.server.enqueuer, clock=clock, interval=120, catch_up="skip")
        fired = 0
        for _ in range(30):  # an hour of 120 s ticks, at 00:02:30, 00:04:30, ...
            clock.now += timedelta(seconds=120)
            fired += await scheduler.tick()
        assert fired == 12
        assert await _scheduled_at(core, wf.id) == [f"2026-01-01T00:{m:02}:00Z" for m in range(5, 60, 5)] + ["2026-01-01T01:00:00Z"]

        # A restart after downtime: the 04:00 fire fell before this process's first tick.
        restarted = Scheduler(core.server.db, core.server.enqueuer, clock=clock, interval=120, catch_up="skip")
        clock.now = datetime(2026, 1, 1, 4, 2, 30, tzinfo=U)
        assert await restarted.tick() == 0, "skip mode still drops what fell due while nobody ticked"
        assert [await restarted.tick() for clock.now in (clock.now + timedelta(seconds=120), clock.now + timedelta(seconds=240))] == [0, 1], "on time again from then on"
        # Alive but not ticking for 43 minutes (its database down): 04:45 found at 04:49:30,
        # more than two 120 s intervals late, is stale.
        clock.now = datetime(2026, 1, 1, 4, 49, 30, tzinfo=U)
        assert await restarted.tick() == 0
        assert (await _scheduled_at(core, wf.id))[-1] == "2026-01-01T04:05:00Z"


async def test_schedules_due_at_once_all_fire_in_one_tick(tmp_path, database_url, monkeypatch) -> None:
    """More schedules due at 09:00 than a batch: one tick fires them all, each once, and
    plans each one's next fire. A tick used to stop at 500 and wait for the next."""
    n = 1200  # more than two of the scheduler's 500-row batches
    async with FakeSlack() as slack, core_with(tmp_path, database_url, IPAAS_DISABLE_ENGINE="1") as core:
        api, clock, (first,) = await _due_at_nine(core, slack, monkeypatch)
        await _clone(core, first.id, n - 1)
        scheduler = Scheduler(core.server.db, core.server.enqueuer, clock=clock, catch_up="skip")
        started = time.perf_counter()
        assert await scheduler.tick() == n
        print(f"\n{n} schedules due at once: one tick, {time.perf_counter() - started:.2f} s")
        assert await _scheduled_at(core) == ["2026-01-01T09:00:00Z"] * n
        async with core.server.db.session() as s:
            plans = (await s.execute(select(Schedule.next_fire_at, func.count()).group_by(Schedule.next_fire_at))).all()
        assert plans == [(datetime(2026, 1, 2, 9, tzinfo=U), n)]
        assert await scheduler.tick() == 0


async def _due_at_nine(core, slack, monkeypatch, names: tuple[str, ...] = ("daily",), text: str = "hi"):  # type: ignore[no-untyped-def]
    """A new tenant's workflows on `0 9 * * *`, saved at 08:59 (so each is planned for
    09:00), and the clock moved just past 09:00: every one is due."""
    api = Api(core.channel, (await core.new_tenant()).md)
    cred = await api.credential("slack", {"webhook_url": slack.url})
    clock = Clock(datetime(2026, 1, 1, 8, 59, tzinfo=U))
    monkeypatch.setattr("ipaas.workflow_store.utcnow", clock)
    made = [(await api.create({"name": name, "trigger": {"type": "schedule", "cron": "0 9 * * *"}, "steps": [slack_step(cred, text)]})).workflow for name in names]
    clock.now = datetime(2026, 1, 1, 9, 0, 0, 500000, tzinfo=U)
    return api, clock, made


async def _clone(core, workflow_id: str, copies: int) -> None:  # type: ignore[no-untyped-def]
    """Copies of a saved scheduled workflow with its plan, written directly: saving a
    thousand through the API would take most of the test's time."""
    async with core.server.db.session() as s, s.begin():
        wf, version, plan = await s.get(Workflow, workflow_id), await s.get(WorkflowVersion, (workflow_id, 1)), await s.get(Schedule, workflow_id)
        ids = [f"{workflow_id}-{i}" for i in range(copies)]
        s.add_all(Workflow(id=w, tenant_id=wf.tenant_id, name=w, current_version=1, active=True, trigger_type="schedule", created_at=wf.created_at, updated_at=wf.updated_at) for w in ids)
        await s.flush()  # the versions and plans refer to the workflows
        s.add_all(WorkflowVersion(workflow_id=w, version=1, tenant_id=wf.tenant_id, definition=version.definition, created_at=version.created_at) for w in ids)
        s.add_all(Schedule(workflow_id=w, tenant_id=wf.tenant_id, next_fire_at=plan.next_fire_at) for w in ids)


async def test_a_full_queue_defers_fires_without_failing_the_tick(tmp_path, database_url, monkeypatch, caplog) -> None:
    """enqueuer.submit refuses with ResourceExhausted while the queue is full. That used to
    end the tick (the rest of its schedules neither fired nor planned) with a traceback
    every second. Now the fires wait, one warning a minute says so, and the rest of the tick
    goes on."""
    async with FakeSlack() as slack, core_with(tmp_path, database_url, IPAAS_DISABLE_ENGINE="1") as core:
        api = Api(core.channel, (await core.new_tenant()).md)
        cred = await api.credential("slack", {"webhook_url": slack.url})
        clock = Clock(datetime(2026, 1, 1, 0, 0, 30, tzinfo=U))
        monkeypatch.setattr("ipaas.workflow_store.utcnow", clock)
        due = [(await api.create({"name": f"tick-{i}", "trigger": {"type": "schedule", "interval_seconds": 60}, "steps": [slack_step(cred, "x")]})).workflow for i in range(3)]
        unplanned = (await api.create({"name": "new", "trigger": {"type": "schedule", "interval_seconds": 3600}, "steps": [slack_step(cred, "x")]})).workflow
        async with core.server.db.session() as s, s.begin():
            (await s.get(Schedule, unplanned.id)).next_fire_at = None
        full = Enqueuer(core.server.db, max_depth=0)
        scheduler = Scheduler(core.server.db, full, clock=clock)
        clock.now = datetime(2026, 1, 1, 0, 1, 0, 500000, tzinfo=U)
        with caplog.at_level(logging.INFO, logger="ipaas.scheduler"):
            assert await scheduler.tick() == 0
            clock.now += timedelta(seconds=1)
            assert await scheduler.tick() == 0
        warnings = [r for r in caplog.records if r.name == "ipaas.scheduler" and r.levelno >= logging.WARNING]
        assert [(r.msg, r.deferred, r.exc_info) for r in warnings] == [("schedule.queue_full", 3, None)], "one line, no traceback"
        async with core.server.db.session() as s:
            assert (await s.get(Schedule, due[0].id)).next_fire_at == datetime(2026, 1, 1, 0, 1, tzinfo=U), "the refused fire is still planned"
            assert (await s.get(Schedule, unplanned.id)).next_fire_at == datetime(2026, 1, 1, 1, tzinfo=U), "the rest of the tick ran"

        full.max_depth = 100  # the queue drained
        clock.now += timedelta(seconds=1)
        assert await scheduler.tick() == 3
        assert await _scheduled_at(core) == ["2026-01-01T00:01:00Z"] * 3
        await full.close()


async def test_fires_of_a_tenant_over_its_share_wait_and_the_other_tenants_fire(tmp_path, database_url, monkeypatch, caplog) -> None:
    """A tenant whose backlog holds its share of the queue: its fires keep their plans, as
    in a full queue, one warning a minute, and they do not stop the tick. Its refused fires,
    the earliest due, filled the tick's batches: the other tenants' schedules never fired."""
    monkeypatch.setattr("ipaas.engine.scheduler.BATCH", 2)
    async with FakeSlack() as slack, core_with(tmp_path, database_url, IPAAS_DISABLE_ENGINE="1") as core:
        heavy, light = Api(core.channel, (await core.new_tenant(name="heavy")).md), Api(core.channel, (await core.new_tenant(name="light")).md)
        clock = Clock(datetime(2026, 1, 1, 0, 0, 30, tzinfo=U))
        monkeypatch.setattr("ipaas.workflow_store.utcnow", clock)
        every_minute = {"trigger": {"type": "schedule", "interval_seconds": 60}}
        cred = await heavy.credential("slack", {"webhook_url": slack.url})
        heavy_ids = [(await heavy.create({"name": f"h{i}", **every_minute, "steps": [slack_step(cred, "x")]})).workflow.id for i in range(2)]
        manual = (await heavy.create({"name": "backlog", "trigger": {"type": "manual"}, "steps": [slack_step(cred, "x")]})).workflow.id
        for _ in range(2):
            await heavy.run(manual)
        light_cred = await light.credential("slack", {"webhook_url": slack.url})
        light_id = (await light.create({"name": "l", **every_minute, "steps": [slack_step(light_cred, "x")]})).workflow.id
        async with core.server.db.session() as s, s.begin():
            for workflow_id in heavy_ids:  # due first: the first batch is the heavy tenant's
                (await s.get(Schedule, workflow_id)).next_fire_at = datetime(2026, 1, 1, 0, 0, 50, tzinfo=U)
        shared = Enqueuer(core.server.db, max_depth=100, max_tenant_depth=2)
        scheduler = Scheduler(core.server.db, shared, clock=clock)
        clock.now = datetime(2026, 1, 1, 0, 1, 0, 500000, tzinfo=U)
        with caplog.at_level(logging.INFO, logger="ipaas.scheduler"):
            assert await scheduler.tick() == 1
            clock.now += timedelta(seconds=1)
            assert await scheduler.tick() == 0
        assert await _scheduled_at(core, light_id) == ["2026-01-01T00:01:00Z"]
        warnings = [r for r in caplog.records if r.name == "ipaas.scheduler" and r.levelno >= logging.WARNING]
        heavy_tenant = (await core.server.db.read(lambda conn: conn.execute(select(Workflow.tenant_id).where(Workflow.id == manual)).scalar()))
        assert [(r.msg, r.deferred, r.tenant_ids, r.exc_info) for r in warnings] == [("schedule.tenant_queue_full", 2, [heavy_tenant], None)]
        async with core.server.db.session() as s:
            assert (await s.get(Schedule, heavy_ids[0])).next_fire_at == datetime(2026, 1, 1, 0, 0, 50, tzinfo=U), "the refused fire is still planned"

        async with core.server.db.session() as s, s.begin():  # the backlog drained
            await s.execute(delete(OutboxTask))
        await shared.refresh_depth()
        clock.now += timedelta(seconds=1)
        assert await scheduler.tick() == 2
        assert [await _scheduled_at(core, w) for w in heavy_ids] == [["2026-01-01T00:01:00Z"]] * 2, "collapsed into one fire each"
        await shared.close()


async def test_a_batch_leaves_out_the_fires_past_a_tenants_share_and_commits_the_others(tmp_path, database_url, monkeypatch, caplog) -> None:
    """A batch's fires commit in one transaction with their claims, so the share is checked
    for the whole batch before it: the fires of a tenant past its share are left out and keep
    their plans, while its earliest fire that fits and the other tenant's fire of the same
    batch commit. The fires count towards the share at once: the tenant's next run is refused."""
    settings = {"IPAAS_DISABLE_ENGINE": "1", "IPAAS_MAX_QUEUE_DEPTH": "10", "IPAAS_MAX_TENANT_QUEUE_DEPTH": "2"}
    async with FakeSlack() as slack, core_with(tmp_path, database_url, **settings) as core:
        heavy_tenant, light_tenant = await core.new_tenant(name="heavy"), await core.new_tenant(name="light")
        heavy, light = Api(core.channel, heavy_tenant.md), Api(core.channel, light_tenant.md)
        clock = Clock(datetime(2026, 1, 1, 0, 0, 30, tzinfo=U))
        monkeypatch.setattr("ipaas.workflow_store.utcnow", clock)
        every_minute = {"trigger": {"type": "schedule", "interval_seconds": 60}}
        cred = await heavy.credential("slack", {"webhook_url": slack.url})
        heavy_ids = [(await heavy.create({"name": f"h{i}", **every_minute, "steps": [slack_step(cred, "x")]})).workflow.id for i in range(3)]
        manual = (await heavy.create({"name": "backlog", "trigger": {"type": "manual"}, "steps": [slack_step(cred, "x")]})).workflow.id
        await heavy.run(manual)  # one of its two
        light_id = (await light.create({"name": "l", **every_minute, "steps": [slack_step(await light.credential("slack", {"webhook_url": slack.url}), "x")]})).workflow.id
        kept = [datetime(2026, 1, 1, 0, 0, s, tzinfo=U) for s in (40, 45, 50)]
        async with core.server.db.session() as s, s.begin():
            for workflow_id, plan in zip(heavy_ids, kept):  # the heavy tenant's are due first
                (await s.get(Schedule, workflow_id)).next_fire_at = plan
        scheduler = Scheduler(core.server.db, core.server.enqueuer, clock=clock)
        clock.now = datetime(2026, 1, 1, 0, 1, 0, 500000, tzinfo=U)
        with caplog.at_level(logging.INFO, logger="ipaas.scheduler"):
            assert await scheduler.tick() == 2, "one batch: the heavy tenant's earliest fire and the light tenant's"
        assert [await _scheduled_at(core, w) for w in [*heavy_ids, light_id]] == [["2026-01-01T00:01:00Z"], [], [], ["2026-01-01T00:01:00Z"]]
        async with core.server.db.session() as s:
            plans = [(await s.get(Schedule, w)).next_fire_at for w in [*heavy_ids, light_id]]
        assert plans == [datetime(2026, 1, 1, 0, 2, tzinfo=U), *kept[1:], datetime(2026, 1, 1, 0, 2, tzinfo=U)], "the refused fires are still planned"
        warnings = [r for r in caplog.records if r.name == "ipaas.scheduler" and r.levelno >= logging.WARNING]
        assert [(r.msg, r.deferred, r.tenant_ids, r.exc_info) for r in warnings] == [("schedule.tenant_queue_full", 2, [heavy_tenant.tenant_id], None)]
        over = await refused(heavy.run(manual))
        assert error_info(over).reason == "TENANT_QUEUE_FULL", "the fire that got in counts towards the share"

        async with core.server.db.session() as s, s.begin():  # the backlog drained
            await s.execute(delete(OutboxTask))
        await core.server.enqueuer.refresh_depth()
        clock.now += timedelta(seconds=1)
        assert await scheduler.tick() == 2
        assert [await _scheduled_at(core, w) for w in heavy_ids[1:]] == [["2026-01-01T00:01:00Z"]] * 2


async def test_schedules_stored_before_validation_refused_them_do_not_stop_the_tick(tmp_path, database_url, monkeypatch) -> None:
    """Saving now refuses croniter's R and H, steps larger than their field (*/61) and the
    zones localtime and Factory; rows stored earlier keep firing (R, */61, localtime) or are
    parked (H needs a hash id), and the other tenants' schedules fire."""
    async with FakeSlack() as slack, core_with(tmp_path, database_url, IPAAS_DISABLE_ENGINE="1") as core:
        api = Api(core.channel, (await core.new_tenant()).md)
        cred = await api.credential("slack", {"webhook_url": slack.url})
        clock = Clock(datetime(2026, 1, 1, 0, 0, 30, tzinfo=U))
        monkeypatch.setattr("ipaas.workflow_store.utcnow", clock)
        stored = {}
        for trigger in ({"cron": "R * * * *", "timezone": "UTC"}, {"cron": "H * * * *", "timezone": "UTC"}, {"cron": "* * * * *", "timezone": "localtime"}, {"cron": "* * * * *", "timezone": "Factory"}, {"cron": "*/61 * * * *", "timezone": "UTC"}):
            wf = (await api.create({"name": "old", "trigger": {"type": "schedule", "cron": "* * * * *"}, "steps": [slack_step(cred, "x")]})).workflow
            async with core.server.db.session() as s, s.begin():
                row = await s.get(WorkflowVersion, (wf.id, 1))
                row.definition = {**row.definition, "trigger": {"type": "schedule", **trigger}}
                (await s.get(Schedule, wf.id)).next_fire_at = None
            stored[wf.id] = trigger
        good = (await api.create({"name": "good", "trigger": {"type": "schedule", "interval_seconds": 60}, "steps": [slack_step(cred, "x")]})).workflow
        scheduler = Scheduler(core.server.db, core.server.enqueuer, clock=clock)
        assert await scheduler.tick() == 0
        clock.now += timedelta(hours=2)
        assert await scheduler.tick() >= 1
        assert await _scheduled_at(core, good.id) == ["2026-01-01T02:00:00Z"]
        (step_61,) = [w for w, trigger in stored.items() if trigger["cron"] == "*/61 * * * *"]
        assert await _scheduled_at(core, step_61) == ["2026-01-01T02:00:00Z"], "at minute 0, as croniter reads it"


class _ChangeAfterRead:
    """The scheduler's database, running `change` once right after the tick has read its due
    schedules: what the change commits lands between that read and the fire."""

    def __init__(self, db, change) -> None:  # type: ignore[no-untyped-def]
        self._db, self._change = db, change

    async def read(self, fn):  # type: ignore[no-untyped-def]
        rows = await self._db.read(fn)
        if self._change is not None:
            change, self._change = self._change, None
            await change()
        return rows

    def __getattr__(self, name: str):  # type: ignore[no-untyped-def]
        return getattr(self._db, name)


CHANGES = {
    "deleted": lambda api, wf: api.workflows.DeleteWorkflow(workflows_pb2.DeleteWorkflowRequest(id=wf.id), metadata=api.md),
    "deactivated": lambda api, wf: api.workflows.SetWorkflowActive(workflows_pb2.SetWorkflowActiveRequest(id=wf.id, active=False), metadata=api.md),
    "schedule removed": lambda api, wf: api.workflows.UpdateWorkflow(
        workflows_pb2.UpdateWorkflowRequest(id=wf.id, expected_version=1, workflow=workflow({"trigger": {"type": "manual"}})), metadata=api.md
    ),
    "replanned": lambda api, wf: api.workflows.UpdateWorkflow(
        workflows_pb2.UpdateWorkflowRequest(id=wf.id, expected_version=1, workflow=workflow({"trigger": {"type": "schedule", "cron": "30 9 * * *"}})), metadata=api.md
    ),
}


# The changed workflow's plan after the tick: the change's own (a deactivated workflow keeps
# its plan until reactivated, which plans anew).
PLAN_AFTER = {"deleted": None, "deactivated": datetime(2026, 1, 1, 9, tzinfo=U), "schedule removed": None, "replanned": datetime(2026, 1, 1, 9, 30, tzinfo=U)}


@pytest.mark.parametrize("change", CHANGES)
async def test_a_change_committed_between_the_read_and_the_fire_is_seen(tmp_path, database_url, monkeypatch, change) -> None:
    """A tick reads its due schedules, then fires them. A workflow deleted, deactivated,
    made manual or given another time in between still got the fire it no longer has; the
    other fires of the batch go out as before."""
    async with FakeSlack() as slack, core_with(tmp_path, database_url, IPAAS_DISABLE_ENGINE="1") as core:
        api, clock, (changed, kept) = await _due_at_nine(core, slack, monkeypatch, ("changed", "kept"), "x")
        scheduler = Scheduler(_ChangeAfterRead(core.server.db, lambda: CHANGES[change](api, changed)), core.server.enqueuer, clock=clock)

        assert await scheduler.tick() == 1
        assert await _scheduled_at(core, kept.id) == ["2026-01-01T09:00:00Z"]
        assert await _scheduled_at(core, changed.id) == []
        async with core.server.db.session() as s:
            plan = await s.get(Schedule, changed.id)
        assert (plan.next_fire_at if plan else None) == PLAN_AFTER[change]


async def test_a_change_in_progress_when_the_fire_starts_is_waited_for_on_postgresql(tmp_path, postgres_url, monkeypatch) -> None:
    """Another replica deactivates the workflow while this one fires it: the fire waits for
    that transaction and, once it commits, does not fire. Without the wait the fire read the
    workflow as it was and committed after the deactivation had."""
    async with FakeSlack() as slack, core_with(tmp_path, postgres_url, IPAAS_DISABLE_ENGINE="1") as core:
        api, clock, (wf,) = await _due_at_nine(core, slack, monkeypatch, text="x")
        scheduler = Scheduler(core.server.db, core.server.enqueuer, clock=clock)
        async with core.server.db.engine.connect() as other, core.server.db.engine.connect() as watch:
            await other.execute(update(Workflow).where(Workflow.id == wf.id).values(active=False))
            tick = asyncio.create_task(scheduler.tick())
            waiting = text("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND datname = current_database()")
            for _ in range(200):  # until the tick waits for the deactivation, or is done without
                if tick.done() or (await watch.execute(waiting)).scalar():
                    break
                await watch.rollback()
                await asyncio.sleep(0.025)
            await other.commit()
            assert await tick == 0
        assert await _scheduled_at(core, wf.id) == []


async def test_replicas_ticking_at_once_fire_each_schedule_once_on_postgresql(tmp_path, postgres_url, monkeypatch) -> None:
    """Two replicas (each its own connections) tick at the same moment over more due
    schedules than a batch: the claims of one wait for the other's, none deadlocks, and
    every schedule fires once. (SQLite has one core per database.)"""
    n = 1200
    async with FakeSlack() as slack, core_with(tmp_path, postgres_url, IPAAS_DISABLE_ENGINE="1") as core:
        api, clock, (first,) = await _due_at_nine(core, slack, monkeypatch)
        await _clone(core, first.id, n - 1)
        other_db = Database(core.server.db.url)
        other_enqueuer = Enqueuer(other_db)
        try:
            replicas = [Scheduler(core.server.db, core.server.enqueuer, clock=clock, catch_up="skip"), Scheduler(other_db, other_enqueuer, clock=clock, catch_up="skip")]
            fired = await asyncio.wait_for(asyncio.gather(*(r.tick() for r in replicas)), 60)
        finally:
            await other_enqueuer.close()
            await other_db.dispose()
        assert sum(fired) == n
        assert await _scheduled_at(core) == ["2026-01-01T09:00:00Z"] * n


# Tier rates for the tests of schedules' rate: the free tier's window is 20 s (burst 10 at
# 0.5/s), so every tick of a test falls in one window however slow the machine, and the
# counts below are exact. The paid tier keeps its default (50/s, burst 100).
SLOW_FREE_TIER = {"IPAAS_DISABLE_ENGINE": "1", "IPAAS_RATE_LIMITS_OFF": "0", "IPAAS_RATE_FREE": "0.5/10"}


async def _every_second(core, slack, clock, tier: str, n: int):  # type: ignore[no-untyped-def]
    """A new tenant of `tier` with n workflows on `interval_seconds: 1`: one saved through
    the API (two calls of its budget), the others cloned."""
    tenant = await core.new_tenant(tier=tier, name=tier)
    api = Api(core.channel, tenant.md)
    cred = await api.credential("slack", {"webhook_url": slack.url})
    first = (await api.create({"name": "every-second", "trigger": {"type": "schedule", "interval_seconds": 1}, "steps": [slack_step(cred, "x")]})).workflow
    await _clone(core, first.id, n - 1)
    return tenant, api, [first.id, *(f"{first.id}-{i}" for i in range(n - 1))]


async def _executions_of(core, tenant_id: str) -> int:  # type: ignore[no-untyped-def]
    async with core.server.db.session() as s:
        return (await s.execute(select(func.count()).select_from(Execution).where(Execution.tenant_id == tenant_id))).scalar()


async def _plans(core, workflow_ids: list[str]) -> list[datetime]:  # type: ignore[no-untyped-def]
    async with core.server.db.session() as s:
        return [(await s.get(Schedule, w)).next_fire_at for w in workflow_ids]


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.redis)])
def budget_storage(request: pytest.FixtureRequest) -> dict[str, str]:
    return {"IPAAS_REDIS_URL": request.getfixturevalue("redis_url")} if request.param == "redis" else {}


async def _window_passes(core, tenant_id: str) -> None:  # type: ignore[no-untyped-def]
    """The tenant's schedule budget as it is once its window has passed (the free tier's
    window is 20 s of real time in these tests): empty again."""
    limiter = core.server.scheduler.limiter
    await limiter.limiter.clear(limiter._items["free"], tenant_id)


async def _fired_workflows(core, tenant_id: str) -> list[str]:  # type: ignore[no-untyped-def]
    async with core.server.db.session() as s:
        return sorted((await s.scalars(select(Execution.workflow_id).where(Execution.tenant_id == tenant_id))).all())


async def test_a_free_tenants_schedules_are_held_to_its_tier_rate_and_a_paid_tenants_all_fire(tmp_path, database_url, budget_storage, monkeypatch, caplog) -> None:
    """30 workflows every second: a free tenant (burst 10) started 30 executions a tick for
    ever, whatever its tier. Now it gets its burst; its other fires wait, keeping their
    plans, one warning says so, and its API budget (in Redis: another key prefix) is
    untouched. Once its window has room the waiting fires go first, earliest due, and never
    more than the burst at once however long they waited: each schedule holds one waiting
    fire at most. A paid tenant's 90 fires are within its burst of 100: all fire."""
    async with FakeSlack() as slack, core_with(tmp_path, database_url, **SLOW_FREE_TIER, **budget_storage) as core:
        clock = Clock(datetime(2026, 1, 1, 0, 0, 30, tzinfo=U))
        monkeypatch.setattr("ipaas.workflow_store.utcnow", clock)
        free, free_api, free_ids = await _every_second(core, slack, clock, "free", 30)
        paid, _, paid_ids = await _every_second(core, slack, clock, "paid", 30)
        scheduler = core.server.scheduler  # as the core built it (not started: IPAAS_DISABLE_ENGINE)
        scheduler.clock = clock
        clock.now = datetime(2026, 1, 1, 0, 1, 0, 500000, tzinfo=U)
        with caplog.at_level(logging.INFO, logger="ipaas.scheduler"):
            fired = []
            for _ in range(3):
                fired.append(await scheduler.tick())
                clock.now += timedelta(seconds=1)
        assert fired == [40, 30, 30]
        assert (await _executions_of(core, free.tenant_id), await _executions_of(core, paid.tenant_id)) == (10, 90)
        assert scheduler.rate_limited_total == 20 + 30 + 30, "held back at each tick"
        warnings = [r for r in caplog.records if r.name == "ipaas.scheduler" and r.levelno >= logging.WARNING]
        assert [(r.msg, r.tenant_id, r.held_back, r.tier) for r in warnings] == [("schedule.rate_limited", free.tenant_id, 20, "free")], "one line a minute per tenant"
        # Held back, not skipped: the 20 that never fired still wait with the plan they had
        # (00:00:31, planned when saved), the 10 that fired with 00:01:01; nothing was
        # written for either since.
        first = set(await _fired_workflows(core, free.tenant_id))
        plans = dict(zip(free_ids, await _plans(core, free_ids)))
        assert {w: p for w, p in plans.items() if w in first} == dict.fromkeys(first, datetime(2026, 1, 1, 0, 1, 1, tzinfo=U))
        assert {w: p for w, p in plans.items() if w not in first} == dict.fromkeys(set(free_ids) - first, datetime(2026, 1, 1, 0, 0, 31, tzinfo=U))

        # A minute and a half later the window has room: the burst goes out, no more (not the
        # ~2,700 fires due meanwhile), the longest waiting first, each as one fire (collapse).
        clock.now = datetime(2026, 1, 1, 0, 2, 30, 500000, tzinfo=U)
        await _window_passes(core, free.tenant_id)
        await scheduler.tick()
        assert await _executions_of(core, free.tenant_id) == 20
        second = set(await _fired_workflows(core, free.tenant_id)) - first
        assert len(second) == 10 and not second & first, "the fires that waited went first"
        clock.now += timedelta(seconds=1)
        await _window_passes(core, free.tenant_id)
        await scheduler.tick()
        assert set(await _fired_workflows(core, free.tenant_id)) == set(free_ids), "every schedule got its turn"
        assert await _executions_of(core, free.tenant_id) == 30
        assert await _scheduled_at(core, sorted(second)[0]) == ["2026-01-01T00:02:30Z"], "one fire, the latest, for all it waited"
        # A budget of its own: the schedules did not spend the tenant's API calls.
        assert (await free_api.run(free_ids[0])).execution.id


async def test_with_limits_off_every_fire_of_a_free_tenant_goes_out(tmp_path, monkeypatch) -> None:
    """IPAAS_RATE_LIMITS_OFF=1 (the tests' default): schedules fire as they always did."""
    async with FakeSlack() as slack, core_with(tmp_path, IPAAS_DISABLE_ENGINE="1", IPAAS_RATE_FREE="0.5/10") as core:
        clock = Clock(datetime(2026, 1, 1, 0, 0, 30, tzinfo=U))
        monkeypatch.setattr("ipaas.workflow_store.utcnow", clock)
        free, _, _ = await _every_second(core, slack, clock, "free", 30)
        scheduler = core.server.scheduler
        scheduler.clock = clock
        clock.now = datetime(2026, 1, 1, 0, 1, 0, 500000, tzinfo=U)
        fired = []
        for _ in range(3):
            fired.append(await scheduler.tick())
            clock.now += timedelta(seconds=1)
        assert fired == [30, 30, 30]
        assert await _executions_of(core, free.tenant_id) == 90


async def test_fires_a_full_queue_or_a_tenants_share_defers_are_not_charged_to_its_rate(tmp_path, database_url, monkeypatch) -> None:
    """A fire the queue refuses keeps its plan and is tried again each tick: charged each
    time, a tenant whose fires waited out a full queue would find its budget spent on fires
    that never went out. They are charged when they go in: the burst (10) of 12, then the
    other 2 held back until the window has room."""
    async with FakeSlack() as slack, core_with(tmp_path, database_url, **SLOW_FREE_TIER) as core:
        clock = Clock(datetime(2026, 1, 1, 0, 0, 30, tzinfo=U))
        monkeypatch.setattr("ipaas.workflow_store.utcnow", clock)
        free, _, ids = await _every_second(core, slack, clock, "free", 12)
        full = Enqueuer(core.server.db, max_depth=0)
        scheduler = core.server.scheduler
        scheduler.clock, scheduler.enqueuer = clock, full
        clock.now = datetime(2026, 1, 1, 0, 1, 0, 500000, tzinfo=U)
        for _ in range(3):
            assert await scheduler.tick() == 0
            clock.now += timedelta(seconds=1)
        full.max_depth, full.max_tenant_depth = 100, 0  # the queue drained; the tenant has no share left
        assert await scheduler.tick() == 0
        clock.now += timedelta(seconds=1)
        full.max_tenant_depth = None
        assert await scheduler.tick() == 10
        assert scheduler.rate_limited_total == 2
        assert await _executions_of(core, free.tenant_id) == 10
        # The other 2 wait, keeping their plans, for the window to have room.
        fired = set(await _fired_workflows(core, free.tenant_id))
        plans = dict(zip(ids, await _plans(core, ids)))
        assert {plans[w] for w in fired} == {clock.now.replace(microsecond=0) + timedelta(seconds=1)}
        assert [plans[w] for w in ids if w not in fired] == [datetime(2026, 1, 1, 0, 0, 31, tzinfo=U)] * 2
        clock.now += timedelta(seconds=1)
        await _window_passes(core, free.tenant_id)
        assert await scheduler.tick() == 10
        assert set(await _fired_workflows(core, free.tenant_id)) == set(ids), "the 2 that waited went first"
        await full.close()


async def test_schedules_of_many_tenants_due_at_once_fire_in_one_tick_with_limits_on(tmp_path, database_url, budget_storage, monkeypatch) -> None:
    """The cost of charging fires: 1,500 schedules due at 09:00, each of another tenant (the
    most calls to the limiter: one spend per tenant and batch), within their rate: one
    tick fires them all, in about the time it takes with limits off (~0.5 s)."""
    n = 1500
    async with FakeSlack() as slack, core_with(tmp_path, database_url, **SLOW_FREE_TIER, **budget_storage) as core:
        api, clock, (first,) = await _due_at_nine(core, slack, monkeypatch)
        await _clone(core, first.id, n - 1)
        async with core.server.db.session() as s, s.begin():  # each copy to a tenant of its own
            s.add_all(Tenant(id=f"tn-{i}", name=f"t{i}", tier="free", created_at=clock.now) for i in range(n - 1))
            await s.flush()
            for i in range(n - 1):
                await s.execute(update(Workflow).where(Workflow.id == f"{first.id}-{i}").values(tenant_id=f"tn-{i}"))
        scheduler = core.server.scheduler
        scheduler.clock = clock
        started = time.perf_counter()
        assert await scheduler.tick() == n
        took = time.perf_counter() - started
        print(f"\n{n} schedules of {n} tenants due at once, limits on: one tick, {took:.2f} s")
        assert scheduler.rate_limited_total == 0
        assert await _scheduled_at(core) == ["2026-01-01T09:00:00Z"] * n


async def _daily_free(core, slack, monkeypatch, n: int):  # type: ignore[no-untyped-def]
    """A free tenant's n workflows on `0 9 * * *`, planned for 09:00 (one saved through the
    API, the others cloned: n saves would spend its API budget), and the clock just past."""
    tenant = await core.new_tenant(tier="free", name="daily")
    api = Api(core.channel, tenant.md)
    cred = await api.credential("slack", {"webhook_url": slack.url})
    clock = Clock(datetime(2026, 1, 1, 8, 59, tzinfo=U))
    monkeypatch.setattr("ipaas.workflow_store.utcnow", clock)
    first = (await api.create({"name": "daily", "trigger": {"type": "schedule", "cron": "0 9 * * *"}, "steps": [slack_step(cred, "hi")]})).workflow
    await _clone(core, first.id, n - 1)
    clock.now = datetime(2026, 1, 1, 9, 0, 0, 500000, tzinfo=U)
    scheduler = core.server.scheduler
    scheduler.clock = clock
    return tenant, clock, scheduler, [first.id, *(f"{first.id}-{i}" for i in range(n - 1))]


@pytest.mark.parametrize("catch_up", ["collapse", "skip"])
async def test_a_free_tenants_eleventh_daily_report_waits_for_room_in_its_window_and_fires(tmp_path, database_url, monkeypatch, catch_up) -> None:
    """11 workflows on `0 9 * * *`, burst 10: the 11th fire was skipped (planned on to
    tomorrow) every day, though the window had room seconds later. Now it waits, keeping its
    plan, and fires at a later tick, as the 09:00 fire, in either catch-up mode."""
    async with FakeSlack() as slack, core_with(tmp_path, database_url, **SLOW_FREE_TIER) as core:
        tenant, clock, scheduler, ids = await _daily_free(core, slack, monkeypatch, 11)
        scheduler.catch_up = catch_up
        assert await scheduler.tick() == 10
        clock.now += timedelta(seconds=1)
        assert await scheduler.tick() == 0, "the window is still spent"
        assert sorted(await _plans(core, ids)).count(datetime(2026, 1, 1, 9, tzinfo=U)) == 1, "the 11th still waits for 09:00"
        clock.now += timedelta(seconds=1)
        await _window_passes(core, tenant.tenant_id)
        assert await scheduler.tick() == 1
        assert [await _scheduled_at(core, w) for w in ids] == [["2026-01-01T09:00:00Z"]] * 11
        assert set(await _plans(core, ids)) == {datetime(2026, 1, 2, 9, tzinfo=U)}
        assert await scheduler.tick() == 0


@pytest.mark.parametrize("catch_up", ["collapse", "skip"])
async def test_fires_waiting_past_the_missed_threshold_are_dropped_in_skip_mode_and_fire_once_in_collapse_mode(tmp_path, database_url, monkeypatch, catch_up) -> None:
    """30 daily workflows of a free tenant (burst 10) whose window stays spent: 20 fires wait
    on time for a minute (DEFAULT_GRACE), then are missed like fires of a downtime. Skip
    drops them (planned on to tomorrow, nothing enqueued, not charged); collapse fires each
    once, the burst at a time. Either way the tenant gets at most its rate and no backlog
    beyond one waiting fire per schedule."""
    async with FakeSlack() as slack, core_with(tmp_path, database_url, **SLOW_FREE_TIER) as core:
        tenant, clock, scheduler, ids = await _daily_free(core, slack, monkeypatch, 30)
        scheduler.catch_up = catch_up
        nine, tomorrow = datetime(2026, 1, 1, 9, tzinfo=U), datetime(2026, 1, 2, 9, tzinfo=U)
        assert await scheduler.tick() == 10
        for clock.now in (datetime(2026, 1, 1, 9, 0, 1, 500000, tzinfo=U), datetime(2026, 1, 1, 9, 0, 59, 500000, tzinfo=U)):
            assert await scheduler.tick() == 0
            assert sorted(await _plans(core, ids)) == [nine] * 20 + [tomorrow] * 10, "waiting, on time"
        clock.now = datetime(2026, 1, 1, 9, 1, 1, 500000, tzinfo=U)  # 09:00 is more than a minute ago
        await _window_passes(core, tenant.tenant_id)
        held = scheduler.rate_limited_total
        if catch_up == "skip":
            assert await scheduler.tick() == 0
            assert set(await _plans(core, ids)) == {tomorrow}
            assert scheduler.rate_limited_total == held, "dropped, not held back"
            assert await _executions_of(core, tenant.tenant_id) == 10
        else:
            fired = []
            for _ in range(3):
                fired.append(await scheduler.tick())
                clock.now += timedelta(seconds=1)
                await _window_passes(core, tenant.tenant_id)
            assert fired == [10, 10, 0], "the burst at a time, each schedule once"
            assert [await _scheduled_at(core, w) for w in ids] == [["2026-01-01T09:00:00Z"]] * 30
            assert set(await _plans(core, ids)) == {tomorrow}


async def test_a_tenant_over_its_rate_is_left_out_of_the_ticks_later_batches(tmp_path, database_url, monkeypatch) -> None:
    """A free tenant's held-back fires are the earliest due and keep their plans: read again,
    they would fill every batch of the tick. Its later batches leave it out, as a tenant over
    its queue share: the tick ends, and the other tenant's schedule fires in it."""
    monkeypatch.setattr("ipaas.engine.scheduler.BATCH", 2)
    async with FakeSlack() as slack, core_with(tmp_path, database_url, **SLOW_FREE_TIER) as core:
        clock = Clock(datetime(2026, 1, 1, 0, 0, 30, tzinfo=U))
        monkeypatch.setattr("ipaas.workflow_store.utcnow", clock)
        free, _, free_ids = await _every_second(core, slack, clock, "free", 14)
        paid, _, (paid_id,) = await _every_second(core, slack, clock, "paid", 1)
        async with core.server.db.session() as s, s.begin():  # the free tenant's are due first
            await s.execute(update(Schedule).where(Schedule.workflow_id.in_(free_ids)).values(next_fire_at=datetime(2026, 1, 1, 0, 0, 50, tzinfo=U)))
        scheduler = core.server.scheduler
        scheduler.clock = clock
        reads = 0
        real_read = core.server.db.read

        async def read(fn):  # type: ignore[no-untyped-def]
            nonlocal reads
            reads += 1
            return await real_read(fn)

        monkeypatch.setattr(core.server.db, "read", read)
        clock.now = datetime(2026, 1, 1, 0, 1, 0, 500000, tzinfo=U)
        assert await asyncio.wait_for(scheduler.tick(), 10) == 10 + 1
        assert reads == 5 + 1 + 1, "five batches of the burst, one held back, then the paid tenant's"
        held = [w for w, p in zip(free_ids, await _plans(core, free_ids)) if p == datetime(2026, 1, 1, 0, 0, 50, tzinfo=U)]
        assert len(held) == 4, "held back, their plans kept"
        reads = 0
        clock.now += timedelta(seconds=1)
        assert await asyncio.wait_for(scheduler.tick(), 10) == 1
        assert reads == 2
        assert await _scheduled_at(core, paid_id) == ["2026-01-01T00:01:00Z", "2026-01-01T00:01:01Z"]


@pytest.mark.redis
async def test_a_replica_without_budget_leaves_the_fires_another_replica_was_granted_on_postgresql(tmp_path, postgres_url, redis_url, monkeypatch) -> None:
    """Two replicas share the tenant's budget in Redis and tick at once over 8 fires (burst
    10): one is granted 8, the other the 2 left. The second skipped the 6 it had no budget
    for, planning them on; committing first, it moved the plans the first replica then
    failed to claim: 2 executions, 6 fires lost for good and their budget spent. Now it
    writes nothing for fires it holds back, and all 8 fire, each once."""
    async with FakeSlack() as slack, core_with(tmp_path, postgres_url, **SLOW_FREE_TIER, IPAAS_REDIS_URL=redis_url) as core:
        clock = Clock(datetime(2026, 1, 1, 0, 0, 30, tzinfo=U))
        monkeypatch.setattr("ipaas.workflow_store.utcnow", clock)
        free, _, ids = await _every_second(core, slack, clock, "free", 8)
        limiter = core.server.scheduler.limiter
        assert limiter is not None
        other_db = Database(core.server.db.url)
        other_enqueuer = Enqueuer(other_db)
        clock.now = datetime(2026, 1, 1, 0, 1, 0, 500000, tzinfo=U)
        a = Scheduler(core.server.db, core.server.enqueuer, clock=clock, limiter=limiter)
        b = Scheduler(other_db, other_enqueuer, clock=clock, limiter=limiter)
        a._last_tick = b._last_tick = clock.now - timedelta(seconds=1)
        real_take = limiter.take
        grants = []

        async def take(tenant: str, tier: str, n: int) -> int:
            got = await real_take(tenant, tier, n)
            grants.append(got)
            if got == n:  # the replica granted all its fires answers later (Redis latency, a GC pause)
                await asyncio.sleep(0.3)
            return got

        monkeypatch.setattr(limiter, "take", take)
        try:
            fired = await asyncio.wait_for(asyncio.gather(a.tick(), b.tick()), 30)
        finally:
            await other_enqueuer.close()
            await other_db.dispose()
        assert sorted(grants) == [2, 8]
        assert sorted(fired) == [2, 6], "the replica granted 8 claims the 6 the other held back"
        assert [await _scheduled_at(core, w) for w in ids] == [["2026-01-01T00:01:00Z"]] * 8
        assert set(await _plans(core, ids)) == {datetime(2026, 1, 1, 0, 1, 1, tzinfo=U)}
