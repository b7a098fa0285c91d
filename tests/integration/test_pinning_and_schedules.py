"""Executions pin their version; schedules fire once per fire time across replicas."""

from __future__ import annotations

import contextlib
from datetime import datetime, timedelta, timezone

from sqlalchemy import select

from ipaas.engine.scheduler import Scheduler
from ipaas.storage.tables import Execution, Schedule
from ipaas.v1 import workflows_pb2
from tests.conftest import core_with
from tests.fakes.slack import FakeSlack
from tests.integration.helpers import Api, slack_step, workflow


async def test_editing_or_deleting_a_workflow_never_changes_a_queued_execution(tmp_path) -> None:
    async with FakeSlack() as slack, core_with(tmp_path, IPAAS_DISABLE_ENGINE="1", IPAAS_POLL_INTERVAL="0.05") as core:
        api = Api(core.channel, (await core.new_tenant()).md)
        cred = await api.credential("slack", {"webhook_url": slack.url})
        wf = (await api.create({"name": "pin", "trigger": {"type": "manual"}, "steps": [slack_step(cred, "v1 {{n}}")]})).workflow
        queued = (await api.run(wf.id, {"n": 1})).execution
        assert queued.status == "queued" and queued.workflow_version == 1
        await api.workflows.UpdateWorkflow(
            workflows_pb2.UpdateWorkflowRequest(id=wf.id, expected_version=1, workflow=workflow({"steps": [slack_step(cred, "v2 {{n}}")]})), metadata=api.md
        )
        second = (await api.run(wf.id, {"n": 2})).execution
        assert second.workflow_version == 2
        await api.workflows.DeleteWorkflow(workflows_pb2.DeleteWorkflowRequest(id=wf.id), metadata=api.md)

        core.server.dispatcher.start()  # now let the queued work run
        assert (await api.wait(queued.id)).status == "succeeded"
        assert (await api.wait(second.id)).status == "succeeded"
        assert sorted(m["text"] for m in slack.received) == ["v1 1", "v2 2"]


class Clock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


async def test_scheduled_workflows_fire_once_per_fire_time_across_replicas(tmp_path, monkeypatch) -> None:
    async with FakeSlack() as slack, core_with(tmp_path, IPAAS_DISABLE_ENGINE="1") as core:
        api = Api(core.channel, (await core.new_tenant()).md)
        cred = await api.credential("slack", {"webhook_url": slack.url})
        clock = Clock(datetime(2026, 1, 1, 0, 0, 30, tzinfo=timezone.utc))
        monkeypatch.setattr("ipaas.workflow_store.utcnow", clock)  # saving plans the first fire
        wf = (await api.create({"name": "tick", "trigger": {"type": "schedule", "interval_seconds": 60}, "steps": [slack_step(cred, "at {{scheduled_at}}")]})).workflow
        replicas = [Scheduler(core.server.db, core.server.enqueuer, clock=clock) for _ in range(2)]

        assert [await r.tick() for r in replicas] == [0, 0], "the first fire is not due yet"
        clock.now += timedelta(seconds=31)  # 00:01:01, the 00:01:00 fire is due
        fired = [await r.tick() for r in replicas]
        assert sum(fired) == 1, "two replicas, one fire"
        clock.now += timedelta(hours=3)  # downtime: 180 missed fires collapse into one
        fired = [await r.tick() for r in replicas]
        assert sum(fired) == 1
        async with core.server.db.session() as s:
            executions = (await s.scalars(select(Execution).where(Execution.workflow_id == wf.id).order_by(Execution.id))).all()
            plan = await s.get(Schedule, wf.id)
        assert [e.payload["scheduled_at"] for e in executions] == ["2026-01-01T00:01:00Z", "2026-01-01T03:01:00Z"]
        assert plan.next_fire_at == datetime(2026, 1, 1, 3, 2, tzinfo=timezone.utc)

        await api.workflows.SetWorkflowActive(workflows_pb2.SetWorkflowActiveRequest(id=wf.id, active=False), metadata=api.md)
        clock.now += timedelta(minutes=10)
        assert [await r.tick() for r in replicas] == [0, 0], "deactivation stops fires at once"


async def test_cron_schedule_in_a_time_zone_fires_at_local_time(tmp_path, monkeypatch) -> None:
    async with FakeSlack() as slack, core_with(tmp_path, IPAAS_DISABLE_ENGINE="1") as core:
        api = Api(core.channel, (await core.new_tenant()).md)
        cred = await api.credential("slack", {"webhook_url": slack.url})
        trigger = {"type": "schedule", "cron": "0 7 * * *", "timezone": "America/New_York"}
        clock = Clock(datetime(2026, 7, 1, 10, 0, tzinfo=timezone.utc))
        monkeypatch.setattr("ipaas.workflow_store.utcnow", clock)
        wf = (await api.create({"name": "morning", "trigger": trigger, "steps": [slack_step(cred, "good morning")]})).workflow
        scheduler = Scheduler(core.server.db, core.server.enqueuer, clock=clock)
        await scheduler.tick()
        clock.now = datetime(2026, 7, 1, 11, 0, 5, tzinfo=timezone.utc)  # 07:00 EDT
        assert await scheduler.tick() == 1
        async with core.server.db.session() as s:
            plan = await s.get(Schedule, wf.id)
        assert plan.next_fire_at == datetime(2026, 7, 2, 11, 0, tzinfo=timezone.utc)


async def test_a_schedule_saved_just_before_a_fire_time_fires_then(tmp_path, monkeypatch) -> None:
    """Saving plans the first fire: a schedule saved half a second before 00:01:00 fires at
    00:01:00, not a minute later (the scheduler used to plan it at its next tick, after)."""
    async with FakeSlack() as slack, core_with(tmp_path, IPAAS_DISABLE_ENGINE="1") as core:
        api = Api(core.channel, (await core.new_tenant()).md)
        cred = await api.credential("slack", {"webhook_url": slack.url})
        clock = Clock(datetime(2026, 1, 1, 0, 0, 59, 500000, tzinfo=timezone.utc))
        monkeypatch.setattr("ipaas.workflow_store.utcnow", clock)
        scheduler = Scheduler(core.server.db, core.server.enqueuer, clock=clock)
        created = (await api.create({"name": "new", "trigger": {"type": "schedule", "interval_seconds": 60}, "steps": [slack_step(cred, "x")]})).workflow
        changed = (await api.create({"name": "was manual", "trigger": {"type": "manual"}, "steps": [slack_step(cred, "x")]})).workflow
        await api.workflows.UpdateWorkflow(
            workflows_pb2.UpdateWorkflowRequest(id=changed.id, expected_version=1, workflow=workflow({"trigger": {"type": "schedule", "interval_seconds": 60}})), metadata=api.md
        )
        clock.now = datetime(2026, 1, 1, 0, 1, 0, 300000, tzinfo=timezone.utc)  # the next tick
        assert await scheduler.tick() == 2
        assert await _fired(core, created.id) == await _fired(core, changed.id) == ["2026-01-01T00:01:00Z"]


async def test_cancelled_executions_do_not_run(tmp_path) -> None:
    from ipaas.v1 import executions_pb2

    async with FakeSlack() as slack, core_with(tmp_path, IPAAS_DISABLE_ENGINE="1", IPAAS_POLL_INTERVAL="0.05") as core:
        api = Api(core.channel, (await core.new_tenant()).md)
        cred = await api.credential("slack", {"webhook_url": slack.url})
        wf = (await api.create({"name": "c", "trigger": {"type": "manual"}, "steps": [slack_step(cred, "never")]})).workflow
        queued = (await api.run(wf.id)).execution
        cancelled = await api.executions.CancelExecution(executions_pb2.CancelExecutionRequest(id=queued.id), metadata=api.md)
        assert cancelled.execution.status == "cancelled"
        kept = (await api.run(wf.id, {"x": 1})).execution
        core.server.dispatcher.start()
        assert (await api.wait(kept.id)).status == "succeeded"
        assert (await api.execution(queued.id)).status == "cancelled"
        assert len(slack.received) == 1


async def test_a_schedule_that_cannot_be_computed_is_parked_and_the_others_still_fire(tmp_path, caplog, monkeypatch) -> None:
    from ipaas.engine.scheduler import PARKED_FOR
    from ipaas.storage.tables import WorkflowVersion

    clock = Clock(datetime(2026, 1, 1, 0, 0, 30, tzinfo=timezone.utc))
    monkeypatch.setattr("ipaas.workflow_store.utcnow", clock)
    async with FakeSlack() as slack, core_with(tmp_path, IPAAS_DISABLE_ENGINE="1") as core:
        mallory = Api(core.channel, (await core.new_tenant(name="mallory")).md)
        victim = Api(core.channel, (await core.new_tenant(name="victim")).md)
        mcred = await mallory.credential("slack", {"webhook_url": slack.url})
        vcred = await victim.credential("slack", {"webhook_url": slack.url})
        bad = (await mallory.create({"name": "feb30", "trigger": {"type": "schedule", "cron": "0 0 * * *"}, "steps": [slack_step(mcred, "x")]})).workflow
        good = (await victim.create({"name": "tick", "trigger": {"type": "schedule", "interval_seconds": 60}, "steps": [slack_step(vcred, "tick")]})).workflow
        # A cron no date matches, stored (unplanned) before validation refused it: croniter
        # raises on it.
        async with core.server.db.session() as s, s.begin():
            row = await s.get(WorkflowVersion, (bad.id, 1))
            row.definition = {**row.definition, "trigger": {**row.definition["trigger"], "cron": "0 0 30 2 *"}}
            (await s.get(Schedule, bad.id)).next_fire_at = None
        scheduler = Scheduler(core.server.db, core.server.enqueuer, clock=clock)

        assert await scheduler.tick() == 0, "parks the bad schedule; the good one is not due yet"
        clock.now += timedelta(seconds=31)
        assert await scheduler.tick() == 1, "the other tenant's schedule fires"
        async with core.server.db.session() as s:
            parked = await s.get(Schedule, bad.id)
            fired = (await s.scalars(select(Execution).where(Execution.workflow_id == good.id))).all()
        assert parked.next_fire_at == datetime(2026, 1, 1, 0, 0, 30, tzinfo=timezone.utc) + PARKED_FOR
        assert len(fired) == 1
        assert [r.workflow_id for r in caplog.records if r.msg == "schedule.parked"] == [bad.id]


async def _fired(core, workflow_id: str) -> list[str]:  # type: ignore[no-untyped-def]
    async with core.server.db.session() as s:
        return sorted(p["scheduled_at"] for p in (await s.scalars(select(Execution.payload).where(Execution.workflow_id == workflow_id))).all())


@contextlib.asynccontextmanager
async def hourly_at_9_58(tmp_path, monkeypatch):  # type: ignore[no-untyped-def]
    """An hourly workflow on a core without an engine, a scheduler on a fake clock at 09:58
    (the store's clock too: an edit plans fires from it), the 10:00 fire planned."""
    async with FakeSlack() as slack, core_with(tmp_path, IPAAS_DISABLE_ENGINE="1") as core:
        api = Api(core.channel, (await core.new_tenant()).md)
        cred = await api.credential("slack", {"webhook_url": slack.url})
        clock = Clock(datetime(2030, 1, 1, 9, 58, tzinfo=timezone.utc))
        monkeypatch.setattr("ipaas.workflow_store.utcnow", clock)
        wf = (await api.create({"name": "hourly", "trigger": {"type": "schedule", "cron": "0 * * * *"}, "steps": [slack_step(cred, "tick")]})).workflow
        scheduler = Scheduler(core.server.db, core.server.enqueuer, clock=clock)
        assert await scheduler.tick() == 0
        yield core, api, wf, clock, scheduler


async def test_an_edit_just_before_a_fire_time_keeps_or_replans_that_fire(tmp_path, monkeypatch) -> None:
    """The scheduler ticks once a second: an edit between its last tick before a fire time
    and the fire time must not move the fire past it."""
    async with hourly_at_9_58(tmp_path, monkeypatch) as (core, api, wf, clock, scheduler):

        async def edit(version: int, changes: dict, at: datetime) -> None:
            clock.now = at
            request = workflows_pb2.UpdateWorkflowRequest(id=wf.id, expected_version=version, workflow=workflow(changes), update_mask={"paths": list(changes)})
            await api.workflows.UpdateWorkflow(request, metadata=api.md)

        await edit(1, {"name": "renamed"}, datetime(2030, 1, 1, 9, 59, 59, 600000, tzinfo=timezone.utc))
        clock.now = datetime(2030, 1, 1, 10, 0, 0, 500000, tzinfo=timezone.utc)
        assert await scheduler.tick() == 1, "a rename keeps the planned fire"
        await edit(2, {"trigger": {"type": "schedule", "cron": "30 * * * *"}}, datetime(2030, 1, 1, 10, 29, 59, 600000, tzinfo=timezone.utc))
        clock.now = datetime(2030, 1, 1, 10, 30, 0, 500000, tzinfo=timezone.utc)
        assert await scheduler.tick() == 1, "a new schedule's first fire is planned at the edit"
        assert await _fired(core, wf.id) == ["2030-01-01T10:00:00Z", "2030-01-01T10:30:00Z"]


async def test_a_reactivated_schedule_fires_from_then_on_without_catching_up(tmp_path, monkeypatch) -> None:
    async with hourly_at_9_58(tmp_path, monkeypatch) as (core, api, wf, clock, scheduler):

        async def set_active(active: bool, at: datetime) -> None:
            clock.now = at
            await api.workflows.SetWorkflowActive(workflows_pb2.SetWorkflowActiveRequest(id=wf.id, active=active), metadata=api.md)

        await set_active(True, datetime(2030, 1, 1, 9, 59, 59, 600000, tzinfo=timezone.utc))  # already active: nothing changes
        clock.now = datetime(2030, 1, 1, 10, 0, 0, 500000, tzinfo=timezone.utc)
        assert await scheduler.tick() == 1
        await set_active(False, datetime(2030, 1, 1, 10, 5, tzinfo=timezone.utc))
        await set_active(True, datetime(2030, 1, 4, 12, 59, 59, 600000, tzinfo=timezone.utc))  # three days later
        clock.now += timedelta(milliseconds=100)
        assert await scheduler.tick() == 0, "no catch-up for the days it was off"
        clock.now = datetime(2030, 1, 4, 13, 0, 0, 500000, tzinfo=timezone.utc)
        assert await scheduler.tick() == 1, "the first fire after reactivation"
        assert await _fired(core, wf.id) == ["2030-01-01T10:00:00Z", "2030-01-04T13:00:00Z"]
