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
