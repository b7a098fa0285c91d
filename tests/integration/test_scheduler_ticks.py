"""The scheduler's tick on a real core (SQLite and PostgreSQL): slow ticks, many schedules
due at once, a full queue, and schedules stored before validation refused them."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from sqlalchemy import select

from ipaas.engine.scheduler import Scheduler
from ipaas.storage.tables import Execution, Schedule, WorkflowVersion
from tests.conftest import core_with
from tests.fakes.slack import FakeSlack
from tests.integration.helpers import Api, slack_step

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


async def test_schedules_stored_before_validation_refused_them_do_not_stop_the_tick(tmp_path, database_url, monkeypatch) -> None:
    """Saving now refuses croniter's R and H and the zones localtime and Factory; rows stored
    earlier keep firing (R, localtime) or are parked (H needs a hash id), and the other
    tenants' schedules fire."""
    async with FakeSlack() as slack, core_with(tmp_path, database_url, IPAAS_DISABLE_ENGINE="1") as core:
        api = Api(core.channel, (await core.new_tenant()).md)
        cred = await api.credential("slack", {"webhook_url": slack.url})
        clock = Clock(datetime(2026, 1, 1, 0, 0, 30, tzinfo=U))
        monkeypatch.setattr("ipaas.workflow_store.utcnow", clock)
        stored = {}
        for trigger in ({"cron": "R * * * *", "timezone": "UTC"}, {"cron": "H * * * *", "timezone": "UTC"}, {"cron": "* * * * *", "timezone": "localtime"}, {"cron": "* * * * *", "timezone": "Factory"}):
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
