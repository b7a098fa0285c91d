"""Retention on real SQLite and PostgreSQL: finished executions older than the window go, with
their steps; anything unfinished, recent, or still owning an outbox task stays."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import pytest
from sqlalchemy import func, select, update

from ipaas.engine import outbox
from ipaas.engine.outbox import NewExecution
from ipaas.engine.retention import Retention, retention_window
from ipaas.storage import migrate
from ipaas.storage.db import Database
from ipaas.storage.tables import Execution, ExecutionStep, OutboxTask, utcnow


def item(key: str) -> NewExecution:
    return NewExecution(tenant_id="tn_a", workflow_id="wf_1", workflow_version=1, trigger="webhook", payload={"k": key}, max_attempts=3, dedup_key=key)


async def enqueue(db: Database, *keys: str) -> list[str]:
    return [r.execution_id for r in await outbox.enqueue_many(db, [item(k) for k in keys])]


async def finish(db: Database, ids: list[str], status: str, at, with_task: bool = False) -> None:
    """Mark executions finished at `at`, each with a step row, as the engine leaves them."""
    async with db.session() as s, s.begin():
        await s.execute(update(Execution).where(Execution.id.in_(ids)).values(status=status, finished_at=at))
        for execution_id in ids:
            s.add(ExecutionStep(execution_id=execution_id, step_index=0, step_id="notify", status="succeeded", attempts=1, output={"ok": True}))
        if not with_task:
            await s.execute(OutboxTask.__table__.delete().where(OutboxTask.execution_id.in_(ids)))


async def remaining(db: Database) -> tuple[set[str], int]:
    async with db.session() as s:
        ids = set((await s.scalars(select(Execution.id))).all())
        steps = int(await s.scalar(select(func.count()).select_from(ExecutionStep)))
    return ids, steps


async def test_finished_executions_past_the_window_go_with_their_steps(db: Database) -> None:
    now = utcnow()
    old = await enqueue(db, "s1", "s2", "f1", "d1", "c1")
    await finish(db, old[:2], "succeeded", now)
    await finish(db, old[2:3], "failed", now)
    await finish(db, old[3:4], "dead", now)
    await finish(db, old[4:], "cancelled", now)
    queued = await enqueue(db, "q1")  # never claimed: still to do, however old
    leased = await enqueue(db, "l1")  # cancelled while running: its task is still leased
    await finish(db, leased, "cancelled", now, with_task=True)
    later = await enqueue(db, "r1")  # finished a day later: inside the window
    await finish(db, later, "succeeded", now + timedelta(days=1))

    retention = Retention(db, timedelta(days=14), clock=lambda: now + timedelta(days=14, hours=1))
    assert await retention.prune() == 5

    ids, steps = await remaining(db)
    assert ids == {*queued, *leased, *later}
    assert steps == 2, "the deleted executions' steps went with them"
    assert await retention.prune() == 0


async def test_a_trigger_is_recognised_again_only_while_its_execution_is_kept(db: Database) -> None:
    now = utcnow()
    (first,) = await enqueue(db, "idem-1")
    await finish(db, [first], "succeeded", now)
    (again,) = await outbox.enqueue_many(db, [item("idem-1")])
    assert again.duplicate and again.execution_id == first

    await Retention(db, timedelta(days=1), clock=lambda: now + timedelta(days=2)).prune()
    (after,) = await outbox.enqueue_many(db, [item("idem-1")])
    assert not after.duplicate


async def test_pruning_goes_in_batches_until_nothing_is_left(db: Database) -> None:
    now = utcnow()
    ids = await enqueue(db, *[f"b{i}" for i in range(7)])
    await finish(db, ids, "succeeded", now)
    transactions = 0
    real = db.transaction

    async def counted(fn):  # type: ignore[no-untyped-def]
        nonlocal transactions
        transactions += 1
        return await real(fn)

    db.transaction = counted  # type: ignore[method-assign]
    assert await Retention(db, timedelta(days=1), clock=lambda: now + timedelta(days=2), batch=3, pause=0).prune() == 7
    assert transactions == 3  # 3 + 3 + 1
    assert (await remaining(db))[0] == set()


@pytest.mark.postgres
async def test_replicas_pruning_at_once_share_the_rows_without_errors(postgres_url: str) -> None:
    migrate.upgrade(postgres_url)
    dbs = [Database(postgres_url), Database(postgres_url)]
    try:
        now = utcnow()
        ids = await enqueue(dbs[0], *[f"p{i}" for i in range(400)])
        await finish(dbs[0], ids, "succeeded", now)
        later = lambda: now + timedelta(days=2)  # noqa: E731
        counts = await asyncio.gather(*(Retention(d, timedelta(days=1), clock=later, batch=20, pause=0).prune() for d in dbs))
        assert sum(counts) == 400
        assert (await remaining(dbs[0]))[0] == set()
    finally:
        for d in dbs:
            await d.dispose()


def test_the_window_setting_is_days_with_zero_for_forever() -> None:
    name = "IPAAS_EXECUTION_RETENTION_DAYS"
    assert retention_window({}) == timedelta(days=14)
    assert retention_window({name: "30"}) == timedelta(days=30)
    assert retention_window({name: "1.5"}) == timedelta(days=1, hours=12)
    assert retention_window({name: "0"}) is None
    for bad in ("0.5", "-3", "two weeks", "nan", "inf"):
        with pytest.raises(SystemExit) as refused:
            retention_window({name: bad})
        assert name in str(refused.value) and "\n" not in str(refused.value)
