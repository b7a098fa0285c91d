"""The transactional outbox: queries to enqueue, claim, defer and finish tasks.

Accepting a trigger writes the execution row and its outbox task in ONE transaction, with
the trigger's deduplication key under a unique constraint; nothing else starts work. A task
row exists while its execution still needs a worker and is deleted when it is done, so the
table stays small and claims stay cheap.

Claims take a lease (owner, expiry). On PostgreSQL they use FOR UPDATE SKIP LOCKED so any
number of replicas share one queue; on SQLite the single writer serialises them. An expired
lease (a crashed replica) makes the task claimable again.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, bindparam, func, or_, select, text, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncSession

from ipaas.ids import new_id
from ipaas.storage.db import Database
from ipaas.storage.tables import Execution, ExecutionStep, OutboxTask, utcnow

EXECUTIONS = Execution.__table__
STEPS = ExecutionStep.__table__
TASKS = OutboxTask.__table__

NOTIFY_CHANNEL = "ipaas_outbox"


@dataclass(frozen=True)
class NewExecution:
    tenant_id: str
    workflow_id: str
    workflow_version: int
    trigger: str
    payload: Any
    max_attempts: int
    dedup_key: str | None = None


@dataclass(frozen=True)
class Accepted:
    execution_id: str
    status: str
    duplicate: bool
    created_at: datetime | None = None  # set for a new execution (a duplicate's is stored)
    # The version the execution pinned: a manual run's duplicate is compared with the
    # version its repeat asked for.
    workflow_version: int = 0


@dataclass(frozen=True)
class ClaimedTask:
    task_id: int
    execution_id: str
    tenant_id: str
    execution: Any = None  # the execution row as it was before this claim (None: gone)
    steps: dict[int, Any] = field(default_factory=dict)  # step index -> stored step row


_INSERT_EXECUTION_PG = postgresql.insert(EXECUTIONS).on_conflict_do_nothing().returning(EXECUTIONS.c.id)
_INSERT_EXECUTION_SQLITE = sqlite.insert(EXECUTIONS).on_conflict_do_nothing().returning(EXECUTIONS.c.id)
_INSERT_TASK = TASKS.insert()


async def enqueue_many(db: Database, items: list[NewExecution]) -> list[Accepted]:
    """Enqueue a batch in one transaction (group commit). Duplicates (same tenant and
    dedup key, earlier or within the batch) return the existing execution."""
    now = utcnow()
    rows = _execution_rows(items, now)  # built before the transaction: the writer waits less
    return await db.transaction(lambda conn: _write(conn, items, rows, now))


def enqueue_in(conn: Connection, items: list[NewExecution]) -> list[Accepted]:
    """enqueue_many within the caller's transaction: for executions that must commit with
    the caller's other writes or not at all (a schedule's fire and its claim)."""
    now = utcnow()
    return _write(conn, items, _execution_rows(items, now), now)


def _execution_rows(items: list[NewExecution], now: datetime) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    by_key: set[tuple[str, str]] = set()
    for i, item in enumerate(items):
        if item.dedup_key is not None:
            key = (item.tenant_id, item.dedup_key)
            if key in by_key:  # a repeat inside the same batch
                continue
            by_key.add(key)
        rows.append(
            {
                "id": new_id("ex"),
                "tenant_id": item.tenant_id,
                "workflow_id": item.workflow_id,
                "workflow_version": item.workflow_version,
                "trigger": item.trigger,
                "status": "queued",
                "payload": item.payload,
                "dedup_key": item.dedup_key,
                "attempts": 0,
                "max_attempts": item.max_attempts,
                "created_at": now,
                "_index": i,
            }
        )
    return rows


def _write(conn: Connection, items: list[NewExecution], rows: list[dict[str, Any]], now: datetime) -> list[Accepted]:
    postgres = conn.dialect.name == "postgresql"
    results: list[Accepted | None] = [None] * len(items)
    inserted: set[str] = set()
    if rows:
        result = conn.execute(_INSERT_EXECUTION_PG if postgres else _INSERT_EXECUTION_SQLITE, [{k: v for k, v in r.items() if k != "_index"} for r in rows])
        inserted = {row[0] for row in result}
    new_rows = [r for r in rows if r["id"] in inserted]
    if new_rows:
        conn.execute(_INSERT_TASK, [{"execution_id": r["id"], "tenant_id": r["tenant_id"], "run_at": now, "created_at": now} for r in new_rows])
        if postgres:
            conn.execute(text("SELECT pg_notify(:channel, '')"), {"channel": NOTIFY_CHANNEL})
    for r in new_rows:
        results[r["_index"]] = Accepted(r["id"], "queued", False, now, r["workflow_version"])
    missing = [i for i, res in enumerate(results) if res is None]
    if missing:
        wanted = {(items[i].tenant_id, items[i].dedup_key) for i in missing}
        found = conn.execute(
            select(EXECUTIONS.c.id, EXECUTIONS.c.status, EXECUTIONS.c.tenant_id, EXECUTIONS.c.dedup_key, EXECUTIONS.c.workflow_version).where(
                or_(*(and_(EXECUTIONS.c.tenant_id == t, EXECUTIONS.c.dedup_key == k) for t, k in wanted))
            )
        )
        existing = {(r.tenant_id, r.dedup_key): r for r in found}
        for i in missing:
            r = existing[(items[i].tenant_id, items[i].dedup_key)]
            # A repeat within the batch of an execution inserted now is a duplicate too.
            results[i] = Accepted(r.id, r.status, True, workflow_version=r.workflow_version)
    return [r for r in results if r is not None]


async def queue_depth(db: Database, tenant_id: str | None = None) -> int:
    q = select(func.count()).select_from(OutboxTask)
    if tenant_id is not None:
        q = q.where(OutboxTask.tenant_id == tenant_id)
    async with db.engine.connect() as conn:
        return int((await conn.execute(q)).scalar() or 0)


_TENANT_DEPTHS = select(TASKS.c.tenant_id, func.count()).group_by(TASKS.c.tenant_id)


async def tenant_depths(db: Database) -> dict[str, int]:
    """Outbox tasks waiting, per tenant that has any."""
    async with db.engine.connect() as conn:
        return {tenant: int(n) for tenant, n in await conn.execute(_TENANT_DEPTHS)}


_NOW = bindparam("now", type_=TASKS.c.run_at.type)
_IDS = bindparam("ids", expanding=True)
# Claims run for every few finished executions: their statements are built once.
_PICK = (
    select(TASKS.c.id)
    .where(TASKS.c.run_at <= _NOW, or_(TASKS.c.lease_expires_at.is_(None), TASKS.c.lease_expires_at < _NOW))
    .order_by(TASKS.c.run_at, TASKS.c.id)
    .limit(bindparam("limit"))
)
_PICK_LOCKED = _PICK.with_for_update(skip_locked=True)
# Slots a fair claim's tenants in turn left empty (outbox._oldest).
_PICK_OTHERS = _PICK.where(TASKS.c.id.not_in(bindparam("picked", expanding=True)))
_PICK_OTHERS_LOCKED = _PICK_OTHERS.with_for_update(skip_locked=True)
# SQLite: one writer at a time, so picking and leasing can be one statement (one fewer
# round trip under the write lock, and no list of ids to render into SQL).
_PICK_AND_LEASE = (
    update(TASKS)
    .where(TASKS.c.id.in_(_PICK.scalar_subquery()))
    .values(lease_owner=bindparam("owner"), lease_expires_at=bindparam("until", type_=TASKS.c.lease_expires_at.type))
    .returning(TASKS.c.id, TASKS.c.execution_id, TASKS.c.tenant_id)
)
_LEASE = (
    update(TASKS)
    .where(TASKS.c.id.in_(_IDS))
    .values(lease_owner=bindparam("owner"), lease_expires_at=bindparam("until", type_=TASKS.c.lease_expires_at.type))
    .returning(TASKS.c.id, TASKS.c.execution_id, TASKS.c.tenant_id)
)
# What the executor reads of a claimed execution (each datetime column costs a parse per row).
_CLAIMED_EXECUTIONS = select(
    *(EXECUTIONS.c[name] for name in ("id", "tenant_id", "workflow_id", "workflow_version", "status", "payload", "attempts", "max_attempts", "started_at"))
).where(EXECUTIONS.c.id.in_(_IDS))
_CLAIMED_STEPS = select(STEPS).where(STEPS.c.execution_id.in_(_IDS))
_MARK_RUNNING = (
    update(EXECUTIONS)
    .where(EXECUTIONS.c.id.in_(_IDS), EXECUTIONS.c.status.in_(("queued", "running")))
    .values(status="running", attempts=EXECUTIONS.c.attempts + 1, started_at=func.coalesce(EXECUTIONS.c.started_at, _NOW), next_attempt_at=None)
)


# Fair claims. The next tenants holding tasks after the one served last are found by a loose
# index scan of ix_outbox_tasks_tenant_id_run_at_id that stops after :k seeks (one per
# tenant, however many tasks each holds), in the database's own order of tenant ids (no
# comparison is made in Python, whose order a collation may not share). Each one's due tasks
# are then read by a seek on the same index, in its own order (run_at, id): a backlog, due or
# deferred, is never scanned, and a claim's cost does not grow with the count of tenants.
_DUE = "o.run_at <= :now AND (o.lease_expires_at IS NULL OR o.lease_expires_at < :now)"
# Up to :q due tasks of each listed tenant. PostgreSQL locks them per tenant with SKIP
# LOCKED, so replicas still share every tenant's queue; SQLite has no LATERAL, a correlated
# IN with its own LIMIT is the same per-tenant seek.
_PICK_PER_TENANT_LOCKED = text(
    f"""
    SELECT p.id, p.tenant_id FROM unnest(CAST(:tenants AS VARCHAR[])) AS t(tenant_id)
    CROSS JOIN LATERAL (
        SELECT o.id, o.tenant_id, o.run_at FROM outbox_tasks o
        WHERE o.tenant_id = t.tenant_id AND {_DUE}
        ORDER BY o.run_at, o.id LIMIT :q FOR UPDATE SKIP LOCKED
    ) p
    ORDER BY p.tenant_id, p.run_at, p.id
    """
).bindparams(_NOW)
_PICK_PER_TENANT = text(
    f"""
    SELECT p.id, p.tenant_id FROM json_each(:tenants) AS t
    JOIN outbox_tasks p ON p.id IN (
        SELECT o.id FROM outbox_tasks o WHERE o.tenant_id = t.value AND {_DUE}
        ORDER BY o.run_at, o.id LIMIT :q
    )
    ORDER BY p.tenant_id, p.run_at, p.id
    """
).bindparams(_NOW)
# The next :k tenants holding tasks after :after (going round to the first ones, :after
# itself last), each with its oldest due task if it has one: the turn a fair claim deals
# from, in one statement. Two loose index scans, one after :after and one from the first
# tenant up to :after, each stopping after :k seeks.
_TURN_CTE = """
    WITH RECURSIVE
    after_it(tenant_id, n) AS (
        SELECT (SELECT min(o.tenant_id) FROM outbox_tasks o WHERE o.tenant_id > :after), 1
        UNION ALL
        SELECT (SELECT min(o.tenant_id) FROM outbox_tasks o WHERE o.tenant_id > after_it.tenant_id), after_it.n + 1
        FROM after_it WHERE after_it.tenant_id IS NOT NULL AND after_it.n < :k
    ),
    from_first(tenant_id, n) AS (
        SELECT (SELECT min(o.tenant_id) FROM outbox_tasks o), :k + 1
        UNION ALL
        SELECT (SELECT min(o.tenant_id) FROM outbox_tasks o WHERE o.tenant_id > from_first.tenant_id), from_first.n + 1
        FROM from_first WHERE from_first.tenant_id IS NOT NULL AND from_first.tenant_id < :after AND from_first.n < 2 * :k
    ),
    turn(tenant_id, n) AS (
        SELECT tenant_id, n FROM (
            SELECT tenant_id, n FROM after_it WHERE tenant_id IS NOT NULL
            UNION ALL
            SELECT tenant_id, n FROM from_first WHERE tenant_id IS NOT NULL AND tenant_id <= :after
        ) both_ranges ORDER BY n LIMIT :k
    )
"""
_TURN_LOCKED = text(
    _TURN_CTE.replace(":k", "CAST(:k AS INTEGER)")
    + f"""
    SELECT w.tenant_id, p.id FROM turn w
    LEFT JOIN LATERAL (
        SELECT o.id FROM outbox_tasks o WHERE o.tenant_id = w.tenant_id AND {_DUE}
        ORDER BY o.run_at, o.id LIMIT 1 FOR UPDATE SKIP LOCKED
    ) p ON true
    ORDER BY w.n
    """
).bindparams(_NOW)
_TURN = text(
    _TURN_CTE
    + f"""
    SELECT w.tenant_id, p.id FROM turn w
    LEFT JOIN outbox_tasks p ON p.id IN (
        SELECT o.id FROM outbox_tasks o WHERE o.tenant_id = w.tenant_id AND {_DUE}
        ORDER BY o.run_at, o.id LIMIT 1
    )
    ORDER BY w.n
    """
).bindparams(_NOW)


# How long a dispatcher that found one tenant's tasks (or none) claims oldest-first without
# looking for other tenants: a second tenant's work waits at most this long for its turns
# (oldest-first still claims it meanwhile), and the single-tenant claim costs no extra
# statement.
SINGLE_TENANT_RECHECK = 0.25  # seconds
# Tenants a claim looks at beyond its slots' count, for when some have nothing due (a
# breaker's deferred tasks, leased ones): slots none of them fills go oldest-first.
EXTRA_TENANTS = 4
_FIRST = ""  # before every tenant id, in any collation


@dataclass
class Rotation:
    """Where fair claims resume: after the tenant served last. One per dispatcher, shared by
    its loop's claims and its refills, so successive claims go round the tenants."""

    after: str = _FIRST
    single_until: float = 0.0  # time.monotonic() until which the queue is taken to hold one tenant


async def claim_due_tasks(db: Database, owner: str, limit: int, lease: timedelta, rotation: Rotation | None = None) -> list[ClaimedTask]:
    """Lease up to `limit` due tasks and mark their executions running, in one transaction
    (see claim_in)."""
    return await db.transaction(lambda conn: claim_in(conn, owner, limit, lease, rotation))


def claim_in(conn: Connection, owner: str, limit: int, lease: timedelta, rotation: Rotation | None = None) -> list[ClaimedTask]:
    """Within the caller's transaction: lease up to `limit` due tasks and mark their
    executions running.

    When several tenants have tasks, the slots are shared among them round-robin, starting
    after `rotation`'s tenant, so a tenant's backlog does not hold back the others'; within
    a tenant the order is (run_at, id). Each task comes back with its execution as it was
    before the claim and the step results stored by earlier attempts, so the executor starts
    without another round trip. Tasks are locked before executions here and everywhere else
    (PostgreSQL deadlock order).
    """
    if limit <= 0:
        return []
    now = utcnow()
    rotation = rotation if rotation is not None else Rotation()
    postgres = conn.dialect.name == "postgresql"
    ids = _pick_fairly(conn, postgres, now, limit, rotation)
    if ids is not None:
        leased = conn.execute(_LEASE, {"ids": ids, "owner": owner, "until": now + lease}).all() if ids else []
        dealt = {task_id: i for i, task_id in enumerate(ids)}
        leased.sort(key=lambda r: dealt[r.id])  # started in turn, as dealt
    elif postgres:  # one tenant (the common case): the plain oldest-first claim
        ids = list(conn.execute(_PICK_LOCKED, {"now": now, "limit": limit}).scalars())
        leased = conn.execute(_LEASE, {"ids": ids, "owner": owner, "until": now + lease}).all() if ids else []
    else:
        leased = conn.execute(_PICK_AND_LEASE, {"now": now, "limit": limit, "owner": owner, "until": now + lease}).all()
    if not leased:
        return []
    execution_ids = [r.execution_id for r in leased]
    executions = {r.id: r for r in conn.execute(_CLAIMED_EXECUTIONS, {"ids": execution_ids})}
    steps: dict[str, dict[int, Any]] = {}
    for row in conn.execute(_CLAIMED_STEPS, {"ids": execution_ids}):
        steps.setdefault(row.execution_id, {})[row.step_index] = row
    conn.execute(_MARK_RUNNING, {"ids": execution_ids, "now": now})
    return [ClaimedTask(r.id, r.execution_id, r.tenant_id, executions.get(r.execution_id), steps.get(r.execution_id, {})) for r in leased]


def _pick_fairly(conn: Connection, postgres: bool, now: datetime, limit: int, rotation: Rotation) -> list[int] | None:
    """The ids of up to `limit` due tasks dealt one per tenant in turn, or None when at most
    one tenant holds tasks (oldest-first is then fair, and cheaper).

    The next limit + EXTRA_TENANTS tenants in turn offer their oldest due task (one
    statement); when fewer than `limit` had one, those that did offer their share of the
    rest, and slots still empty go to the oldest due tasks of any tenant. A claim so makes about
    2 x (limit + EXTRA_TENANTS) index seeks at most; on PostgreSQL rows offered but not
    chosen stay locked only until this transaction ends."""
    if rotation.single_until > time.monotonic():
        return None
    rows = conn.execute(_TURN_LOCKED if postgres else _TURN, {"after": rotation.after, "k": limit + EXTRA_TENANTS, "now": now}).all()
    window = [tenant for tenant, _ in rows]
    if len(window) <= 1:
        rotation.single_until = time.monotonic() + SINGLE_TENANT_RECHECK
        return None
    offered = {tenant: [task_id] for tenant, task_id in rows if task_id is not None}
    if offered and (short := _short(offered, limit)):
        # Their fair share of what is left; slots a tenant cannot fill go oldest-first.
        offered.update(_offers(conn, postgres, list(offered), now, 1 + -(-short // len(offered))))
    picked = _deal(window, offered, limit, rotation)
    if short := limit - len(picked):
        picked += _oldest(conn, postgres, now, short, picked)
    return picked


def _oldest(conn: Connection, postgres: bool, now: datetime, n: int, picked: list[int]) -> list[int]:
    """Up to n due tasks, oldest first, not among `picked`: for slots the tenants in turn
    left empty, so workers do not idle while others' work is due."""
    query = _PICK_OTHERS_LOCKED if postgres else _PICK_OTHERS
    return list(conn.execute(query, {"now": now, "limit": n, "picked": picked}).scalars())


def _short(offered: dict[str, list[int]], limit: int) -> int:
    """Slots no offer has filled yet (none when the offers outnumber them)."""
    return max(0, limit - sum(len(ids) for ids in offered.values()))


def _offers(conn: Connection, postgres: bool, tenants: list[str], now: datetime, each: int) -> dict[str, list[int]]:
    """Up to `each` due task ids per tenant, in claim order."""
    if postgres:
        rows = conn.execute(_PICK_PER_TENANT_LOCKED, {"tenants": tenants, "now": now, "q": each})
    else:
        rows = conn.execute(_PICK_PER_TENANT, {"tenants": json.dumps(tenants), "now": now, "q": each})
    offered: dict[str, list[int]] = {}
    for task_id, tenant in rows:
        offered.setdefault(tenant, []).append(task_id)
    return offered


def _deal(window: list[str], offered: dict[str, list[int]], limit: int, rotation: Rotation) -> list[int]:
    """Round-robin over the window's tenants (already in turn); the next claim starts after
    the last one dealt, or after the window when none had anything due."""
    order = [tenant for tenant in window if offered.get(tenant)]
    picked: list[int] = []
    rotation.after = window[-1]
    for turn in range(limit):
        dealt = False
        for tenant in order:
            if turn < len(offered[tenant]):
                picked.append(offered[tenant][turn])
                rotation.after, dealt = tenant, True
                if len(picked) == limit:
                    return picked
        if not dealt:
            break
    return picked


async def extend_leases(db: Database, task_ids: list[int], owner: str, lease: timedelta) -> int:
    """Push back the expiry of the leases `owner` still holds among `task_ids`."""
    stmt = update(TASKS).where(TASKS.c.id.in_(task_ids), TASKS.c.lease_owner == owner).values(lease_expires_at=utcnow() + lease)
    return await db.transaction(lambda conn: conn.execute(stmt).rowcount)


async def release_leases(db: Database, owner: str) -> int:
    """Give back every lease this owner holds (graceful shutdown): others may claim at once."""
    stmt = update(TASKS).where(TASKS.c.lease_owner == owner).values(lease_owner=None, lease_expires_at=None)
    return await db.transaction(lambda conn: conn.execute(stmt).rowcount)


async def release_dead_leases(db: Database) -> int:
    """SQLite has one core per database, so when it starts claiming, a lease is a process's
    that is gone (its task is handed back now instead of at expiry) or an engine child's that
    outlived the previous core, killed alone (the OOM killer), and finishes what it holds for
    up to its stop grace. Handed back, that work ran twice: the new core's engines took it
    beside the child. So a live owner's lease ends as leases do (finished, released or
    expired). Owners are "host:pid:tag" (Dispatcher.owner): the pid in every lease answers
    signal 0 while its process lives, which needs no lock file that every child inherits."""
    host, me = socket.gethostname(), os.getpid()

    def release(conn: Connection) -> int:
        owners = conn.execute(select(TASKS.c.lease_owner).where(TASKS.c.lease_owner.is_not(None)).distinct()).scalars().all()
        dead = [o for o in owners if not _may_be_running(o, host, me)]
        if not dead:
            return 0
        return conn.execute(update(TASKS).where(TASKS.c.lease_owner.in_(dead)).values(lease_owner=None, lease_expires_at=None)).rowcount

    released = await db.transaction(release)
    if released:
        logging.getLogger("ipaas.dispatcher").warning("dispatcher.recovered_leases", extra={"tasks": released})
    return released


def _may_be_running(owner: str, host: str, me: int) -> bool:
    parts = owner.rsplit(":", 2)
    # Another host's process cannot share an SQLite file, and this process has only just
    # started (its pid in a lease is a predecessor's, e.g. PID 1 in a restarted container).
    if len(parts) != 3 or parts[0] != host or not parts[1].isdigit() or int(parts[1]) in (0, me):
        return False
    try:
        os.kill(int(parts[1]), 0)
    except PermissionError:
        return True  # it exists, as another user
    except (OSError, OverflowError):
        return False
    return True  # a reused pid keeps the task until its lease expires: late, never lost


async def add_task(s: AsyncSession, execution_id: str, tenant_id: str, run_at: datetime) -> None:
    """Enqueue an existing execution again (replay)."""
    s.add(OutboxTask(execution_id=execution_id, tenant_id=tenant_id, run_at=run_at, created_at=utcnow()))
