"""The outbox on real SQLite and PostgreSQL: one transaction per batch, deduplication under a
unique constraint, leases, and concurrent claims that never hand a task to two workers."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import pytest
from sqlalchemy import delete, func, select

from ipaas.engine import outbox
from ipaas.engine.enqueuer import Enqueuer
from ipaas.engine.outbox import NewExecution
from ipaas.errors import ResourceExhausted
from ipaas.storage import migrate
from ipaas.storage.db import Database
from ipaas.storage.tables import Execution, OutboxTask


def item(key: str | None = None, tenant: str = "tn_a") -> NewExecution:
    return NewExecution(tenant_id=tenant, workflow_id="wf_1", workflow_version=1, trigger="webhook", payload={"n": key}, max_attempts=3, dedup_key=key)


async def count(db: Database, table) -> int:
    async with db.session() as s:
        return int(await s.scalar(select(func.count()).select_from(table)))


async def test_enqueue_writes_execution_and_task_together(db: Database) -> None:
    results = await outbox.enqueue_many(db, [item("a"), item("b"), item(None)])
    assert [r.duplicate for r in results] == [False, False, False]
    assert await count(db, Execution) == 3
    assert await count(db, OutboxTask) == 3


async def test_duplicate_keys_return_the_first_execution(db: Database) -> None:
    first = (await outbox.enqueue_many(db, [item("k1")]))[0]
    again = await outbox.enqueue_many(db, [item("k1"), item("k2"), item("k2")])
    assert again[0].execution_id == first.execution_id and again[0].duplicate
    assert not again[1].duplicate
    assert again[2].duplicate and again[2].execution_id == again[1].execution_id
    # the same key in another tenant is another trigger
    other = await outbox.enqueue_many(db, [item("k1", tenant="tn_b")])
    assert not other[0].duplicate
    assert await count(db, Execution) == 3
    assert await count(db, OutboxTask) == 3


async def test_group_commit_answers_every_caller_once_committed(db: Database) -> None:
    woke = []
    enqueuer = Enqueuer(db, on_enqueued=lambda: woke.append(1))
    results = await asyncio.gather(*(enqueuer.submit(item(f"g{i % 50}")) for i in range(200)))
    assert sum(not r.duplicate for r in results) == 50
    assert await count(db, Execution) == 50
    by_key: dict[str, set[str]] = {}
    for i, r in enumerate(results):
        by_key.setdefault(f"g{i % 50}", set()).add(r.execution_id)
    assert all(len(ids) == 1 for ids in by_key.values())
    assert woke, "the dispatcher is woken after a commit"


async def test_backpressure_refuses_when_the_queue_is_full(db: Database) -> None:
    enqueuer = Enqueuer(db, max_depth=3)
    for i in range(3):
        await enqueuer.submit(item(f"bp{i}"))
    with pytest.raises(ResourceExhausted):
        await enqueuer.submit(item("bp-over"))
    assert await count(db, Execution) == 3


async def test_a_tenant_is_refused_past_its_share_while_the_others_still_enqueue(db: Database) -> None:
    """One tenant's backlog filled the whole queue and every other tenant got QUEUE_FULL."""
    enqueuer = Enqueuer(db, max_depth=10, max_tenant_depth=4)
    # A burst is checked before any of it commits: only the share gets in.
    burst = await asyncio.gather(*(enqueuer.submit(item(f"a{i}", tenant="tn_a")) for i in range(6)), return_exceptions=True)
    outcomes = [r.reason.name if isinstance(r, ResourceExhausted) else type(r).__name__ for r in burst]
    assert outcomes == ["Accepted"] * 4 + ["TENANT_QUEUE_FULL"] * 2, burst
    with pytest.raises(ResourceExhausted) as one_by_one:
        await enqueuer.submit(item("a-over", tenant="tn_a"))
    assert one_by_one.value.reason.name == "TENANT_QUEUE_FULL" and "4" not in str(one_by_one.value)
    for i in range(4):
        await enqueuer.submit(item(f"b{i}", tenant="tn_b"))
    assert await count(db, OutboxTask) == 8

    # Counted anew (a second later, or at GetQueueStats): finished work makes room.
    async with db.session() as s, s.begin():
        await s.execute(delete(OutboxTask).where(OutboxTask.tenant_id == "tn_a"))
    await enqueuer.refresh_depth()
    assert not (await enqueuer.submit(item("a-after", tenant="tn_a"))).duplicate


async def test_without_a_share_one_tenant_may_fill_the_queue(db: Database) -> None:
    enqueuer = Enqueuer(db, max_depth=3, max_tenant_depth=3)  # a single-tenant install
    for i in range(3):
        await enqueuer.submit(item(f"s{i}"))
    with pytest.raises(ResourceExhausted) as full:
        await enqueuer.submit(item("s-over"))
    assert full.value.reason.name == "QUEUE_FULL"


async def test_claims_take_leases_and_expired_leases_are_reclaimed(db: Database) -> None:
    await outbox.enqueue_many(db, [item("l1"), item("l2")])
    first = await outbox.claim_due_tasks(db, "owner-a", 10, timedelta(seconds=60))
    assert len(first) == 2
    assert await outbox.claim_due_tasks(db, "owner-b", 10, timedelta(seconds=60)) == []
    # owner-a "crashes"; its leases run out
    short = await outbox.release_leases(db, "nobody")
    assert short == 0
    async with db.session() as s, s.begin():
        from sqlalchemy import update

        from ipaas.storage.tables import utcnow

        await s.execute(update(OutboxTask).values(lease_expires_at=utcnow() - timedelta(seconds=1)))
    reclaimed = await outbox.claim_due_tasks(db, "owner-b", 10, timedelta(seconds=60))
    assert {t.execution_id for t in reclaimed} == {t.execution_id for t in first}


async def test_start_up_recovery_hands_back_the_leases_of_processes_that_are_gone(db: Database) -> None:
    import os
    import socket
    import subprocess

    gone = subprocess.Popen(["true"])
    gone.wait()
    host, live = socket.gethostname(), os.getppid()
    owners = [f"{host}:{live}:a", f"{host}:{gone.pid}:b", f"{host}:{os.getpid()}:before-a-restart", f"elsewhere:{live}:c", "unparsable"]
    await outbox.enqueue_many(db, [item(o) for o in owners])
    for owner in owners:
        assert len(await outbox.claim_due_tasks(db, owner, 1, timedelta(seconds=60))) == 1
    assert await outbox.release_dead_leases(db) == 4
    async with db.session() as s:
        assert (await s.scalars(select(OutboxTask.lease_owner).where(OutboxTask.lease_owner.is_not(None)))).all() == [owners[0]]


async def test_deferred_tasks_wait_until_due(db: Database) -> None:
    from ipaas.storage.tables import utcnow

    await outbox.enqueue_many(db, [item("d1")])
    from ipaas.engine.outcomes import OutcomeWriter

    (task,) = await outbox.claim_due_tasks(db, "w", 10, timedelta(seconds=60))
    await OutcomeWriter(db).requeue(task, "w", utcnow() + timedelta(seconds=30), error="later")
    assert await outbox.claim_due_tasks(db, "w", 10, timedelta(seconds=60)) == []
    async with db.session() as s:
        row = await s.get(Execution, task.execution_id)
    assert (row.status, row.error) == ("queued", "later")


@pytest.mark.postgres
@pytest.mark.parametrize("tenants", [1, 3])  # oldest-first claims, and fair ones
async def test_concurrent_claims_on_postgres_never_share_a_task(postgres_url: str, tenants: int) -> None:
    migrate.upgrade(postgres_url)
    replicas = [Database(postgres_url), Database(postgres_url)]
    try:
        await outbox.enqueue_many(replicas[0], [item(f"c{i}", tenant=f"tn_{i % tenants}") for i in range(300)])

        async def drain(db: Database, owner: str) -> list[str]:
            got: list[str] = []
            rotation = outbox.Rotation()
            while True:
                claimed = await outbox.claim_due_tasks(db, owner, 7, timedelta(seconds=60), rotation)
                if not claimed:
                    return got
                got += [t.execution_id for t in claimed]

        results = await asyncio.gather(*(drain(replicas[i % 2], f"w{i}") for i in range(6)))
        every = [e for r in results for e in r]
        assert len(every) == 300 and len(set(every)) == 300
        assert sum(1 for r in results if r) >= 2, "more than one worker got work"
    finally:
        for db in replicas:
            await db.dispose()


async def test_a_claim_marks_running_and_brings_the_execution_as_it_was(db: Database) -> None:
    (accepted,) = await outbox.enqueue_many(db, [item("run1")])
    (task,) = await outbox.claim_due_tasks(db, "w", 10, timedelta(seconds=60))
    assert (task.execution.id, task.execution.status, task.execution.attempts) == (accepted.execution_id, "queued", 0)
    assert task.steps == {}
    async with db.session() as s:
        row = await s.get(Execution, accepted.execution_id)
    assert (row.status, row.attempts) == ("running", 1) and row.started_at is not None


async def test_a_claim_leaves_a_final_execution_as_it_is(db: Database) -> None:
    (accepted,) = await outbox.enqueue_many(db, [item("fin1")])
    async with db.session() as s, s.begin():
        (await s.get(Execution, accepted.execution_id)).status = "cancelled"
    (task,) = await outbox.claim_due_tasks(db, "w", 10, timedelta(seconds=60))
    assert task.execution.status == "cancelled"
    async with db.session() as s:
        row = await s.get(Execution, accepted.execution_id)
    assert (row.status, row.attempts) == ("cancelled", 0)


async def test_outcomes_share_a_transaction_and_a_bad_one_fails_alone(db: Database) -> None:
    from ipaas.engine.outcomes import Outcome, OutcomeWriter
    from ipaas.storage.tables import utcnow

    accepted = await outbox.enqueue_many(db, [item(f"oc{i}") for i in range(5)])
    tasks = await outbox.claim_due_tasks(db, "w", 10, timedelta(seconds=60))
    writer = OutcomeWriter(db)
    now = utcnow()
    bad_step = {  # refers to an execution that does not exist: the foreign key refuses it
        "execution_id": "ex_missing", "step_index": 0, "step_id": "s", "attempts": 1, "rendered_config": {}, "started_at": now,
        "status": "succeeded", "error": None, "retryable": False, "output": {}, "message": None, "finished_at": now, "duration_ms": 1,
    }
    outcomes = [Outcome(t.execution_id, t.task_id, "w", "succeeded") for t in tasks]
    outcomes[2] = Outcome(tasks[2].execution_id, tasks[2].task_id, "w", "succeeded", step=bad_step)
    results = await asyncio.gather(*(writer.record(o) for o in outcomes), return_exceptions=True)
    assert [isinstance(r, Exception) for r in results] == [False, False, True, False, False]
    async with db.session() as s:
        statuses = {r.id: r.status for r in (await s.scalars(select(Execution))).all()}
    assert sorted(statuses.values()) == ["running", "succeeded", "succeeded", "succeeded", "succeeded"]
    assert statuses[tasks[2].execution_id] == "running", "the bad outcome wrote nothing"
    assert await count(db, OutboxTask) == 1 and len(accepted) == 5


async def test_an_outcome_claims_the_next_tasks_in_its_own_transaction(db: Database) -> None:
    """Refill: the finished executions' places are taken in the outcome's transaction, up to
    what the dispatcher reserves; slots reserved but not filled are given back."""
    from ipaas.engine.outcomes import Outcome, OutcomeWriter, Refill

    await outbox.enqueue_many(db, [item(f"rf{i}") for i in range(5)])
    first = await outbox.claim_due_tasks(db, "w", 2, timedelta(seconds=60))
    writer = OutcomeWriter(db)
    reserved: list[int] = []
    started: list[tuple[list[outbox.ClaimedTask], int]] = []
    # Two slots more than finish: four reserved, three due.
    writer.refill = Refill("w", timedelta(seconds=60), lambda finishing: reserved.append(finishing + 2) or finishing + 2, lambda tasks, n: started.append((tasks, n)))
    await asyncio.gather(*(writer.record(Outcome(t.execution_id, t.task_id, "w", "succeeded")) for t in first))
    claimed = [t for tasks, _ in started for t in tasks]
    assert reserved == [4] and [n for _, n in started] == [4], "one batch; the whole reservation is handed back"
    assert len(claimed) == 3 and not {t.task_id for t in claimed} & {t.task_id for t in first}
    assert all(t.execution.status == "queued" for t in claimed), "each comes with its execution as claimed"
    async with db.session() as s:
        statuses = sorted((await s.scalars(select(Execution.status))).all())
        owners = (await s.scalars(select(OutboxTask.lease_owner))).all()
    assert statuses == ["running", "running", "running", "succeeded", "succeeded"]
    assert owners == ["w", "w", "w"], "the finished tasks are gone, the claimed ones leased"


async def test_engine_commits_without_fsync_while_the_api_keeps_full(tmp_path) -> None:
    """SQLite: the API's commits (accepted triggers) survive power loss (FULL); an engine
    process's claims and outcomes use NORMAL (see ENGINE_SQLITE_SYNCHRONOUS)."""
    from ipaas.engine.processes import ENGINE_SQLITE_SYNCHRONOUS

    url = f"sqlite:///{tmp_path / 'sync.db'}"
    migrate.upgrade(url)
    levels = []
    for db in (Database(url), Database(url, synchronous=ENGINE_SQLITE_SYNCHRONOUS)):
        levels.append(await db.transaction(lambda conn: conn.exec_driver_sql("PRAGMA synchronous").scalar()))
        async with db.engine.connect() as conn:  # the API's own connection, too
            levels.append((await conn.exec_driver_sql("PRAGMA synchronous")).scalar())
        await db.dispose()
    assert levels == [2, 2, 1, 1], "FULL is 2, NORMAL is 1"


async def _queue(db: Database, tenant: str, n: int, run_at=None) -> list[str]:  # type: ignore[no-untyped-def]
    """n executions of one tenant, queued in order (run_at, when given, for every task)."""
    from sqlalchemy import update

    accepted = await outbox.enqueue_many(db, [item(f"{tenant}-{i}", tenant=tenant) for i in range(n)])
    ids = [a.execution_id for a in accepted]
    if run_at is not None:
        async with db.session() as s, s.begin():
            await s.execute(update(OutboxTask).where(OutboxTask.execution_id.in_(ids)).values(run_at=run_at))
    return ids


async def test_a_claim_shares_its_slots_among_tenants_before_an_older_backlog(db: Database) -> None:
    """Claims took the oldest tasks overall: a tenant's backlog held back every other
    tenant's executions until it drained."""
    backlog = await _queue(db, "tn_a", 1000)
    quiet = await _queue(db, "tn_b", 3)
    rotation = outbox.Rotation()
    first = await outbox.claim_due_tasks(db, "w", 4, timedelta(seconds=60), rotation)
    assert [(t.tenant_id, t.execution_id) for t in first] == [("tn_a", backlog[0]), ("tn_b", quiet[0]), ("tn_a", backlog[1]), ("tn_b", quiet[1])]
    assert all(t.execution.status == "queued" for t in first)
    second = await outbox.claim_due_tasks(db, "w", 4, timedelta(seconds=60), rotation)
    assert [(t.tenant_id, t.execution_id) for t in second] == [("tn_a", backlog[2]), ("tn_b", quiet[2]), ("tn_a", backlog[3]), ("tn_a", backlog[4])]
    # A claim as big as both tenants' turns takes all of the quiet tenant's work at once.
    await outbox.release_leases(db, "w")
    everything = await outbox.claim_due_tasks(db, "w", 6, timedelta(seconds=60), outbox.Rotation())
    assert {t.execution_id for t in everything if t.tenant_id == "tn_b"} == set(quiet)


async def test_successive_claims_go_round_the_tenants_in_each_ones_order(db: Database) -> None:
    queued = {tenant: await _queue(db, tenant, 4) for tenant in ("tn_a", "tn_b", "tn_c")}
    rotation = outbox.Rotation()
    got = [await outbox.claim_due_tasks(db, "w", 2, timedelta(seconds=60), rotation) for _ in range(6)]
    tenants = [t.tenant_id for claim in got for t in claim]
    assert tenants == ["tn_a", "tn_b", "tn_c"] * 4, "each claim starts after the tenant served last"
    for tenant, ids in queued.items():
        assert [t.execution_id for claim in got for t in claim if t.tenant_id == tenant] == ids


async def test_fair_claims_leave_deferred_and_leased_tasks_alone(db: Database) -> None:
    from ipaas.storage.tables import utcnow

    await _queue(db, "tn_a", 50, run_at=utcnow() + timedelta(minutes=5))  # an open breaker's
    busy = await _queue(db, "tn_b", 4)
    running = await outbox.claim_due_tasks(db, "w1", 1, timedelta(seconds=60), outbox.Rotation())
    assert [t.execution_id for t in running] == busy[:1]
    quiet = await _queue(db, "tn_c", 1)
    claimed = await outbox.claim_due_tasks(db, "w2", 2, timedelta(seconds=60), outbox.Rotation())
    assert [t.execution_id for t in claimed] == [busy[1], quiet[0]], "neither the deferred nor the leased task takes a turn"
    rest = await outbox.claim_due_tasks(db, "w3", 10, timedelta(seconds=60), outbox.Rotation())
    assert [t.execution_id for t in rest] == busy[2:]
    assert await outbox.claim_due_tasks(db, "w4", 10, timedelta(seconds=60), outbox.Rotation()) == []


async def test_a_tenant_new_to_the_queue_is_claimed_by_the_next_claim(db: Database) -> None:
    """A dispatcher's claims go on from where the last one stopped; a tenant that queued work
    since must be found by the next claim, not wait for a later listing with workers idle."""
    a, b = await _queue(db, "tn_a", 1), await _queue(db, "tn_b", 1)
    rotation = outbox.Rotation()
    first = await outbox.claim_due_tasks(db, "w", 4, timedelta(seconds=60), rotation)
    assert {t.execution_id for t in first} == {a[0], b[0]}
    newcomer = await _queue(db, "tn_c", 2)
    second = await outbox.claim_due_tasks(db, "w", 4, timedelta(seconds=60), rotation)
    assert [t.execution_id for t in second] == newcomer


async def test_a_claim_looks_at_a_window_of_tenants_and_fills_the_rest_oldest_first(db: Database) -> None:
    """Listing every tenant holding tasks cost a claim a seek per tenant: 30-120 ms with
    10,000 tenants holding only deferred tasks (an upstream outage). A claim looks at the
    next limit + EXTRA_TENANTS tenants in turn; slots they leave empty go to the oldest due
    tasks of any tenant, so a busy tenant past the window still gets the workers."""
    from ipaas.storage.tables import utcnow

    later = utcnow() + timedelta(minutes=5)
    for i in range(outbox.EXTRA_TENANTS + 5):  # more tenants than a window, nothing due
        await _queue(db, f"tn_d{i:03d}", 1, run_at=later)
    busy = await _queue(db, "tn_z", 6)
    statements: list[str] = []
    rotation = outbox.Rotation()

    def count(conn, cursor, statement, *args):  # type: ignore[no-untyped-def]
        statements.append(statement)

    from sqlalchemy import event

    event.listen(db.engine.sync_engine, "before_cursor_execute", count)
    try:
        claimed = await outbox.claim_due_tasks(db, "w", 4, timedelta(seconds=60), rotation)
    finally:
        event.remove(db.engine.sync_engine, "before_cursor_execute", count)
    assert [t.execution_id for t in claimed] == busy[:4]
    assert rotation.after == f"tn_d{outbox.EXTRA_TENANTS + 3:03d}", "the next claim looks at the next tenants"
    assert len(statements) <= 9, statements
