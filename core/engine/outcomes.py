"""Recording executions' outcomes: the last step's result, the final status, and the end of
the outbox task, in one transaction shared by every execution that finishes meanwhile.

The same transaction claims the tasks that take the finished ones' places (see Refill): on
SQLite every write waits for the one file lock, and one turn for both halves the engine's
turns. The statements are built once with bound parameters and run as executemany, so a
batch costs a few statements whatever its size. Tasks are touched before executions, the
lock order every other writer follows (no deadlock on PostgreSQL).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Callable

from sqlalchemy import bindparam, delete, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection

from ipaas.storage.group_commit import GroupCommit
from ipaas.engine.outbox import EXECUTIONS, STEPS, TASKS, ClaimedTask, Rotation, claim_in
from ipaas.storage.db import Database
from ipaas.storage.tables import utcnow

FINISH_EXECUTION = (
    update(EXECUTIONS)
    .where(EXECUTIONS.c.id == bindparam("b_id"), EXECUTIONS.c.status != "cancelled")
    .values(status=bindparam("b_status"), finished_at=bindparam("b_at"), error=bindparam("b_error"), next_attempt_at=None)
)
DEFER_TASK = (
    update(TASKS)
    .where(TASKS.c.id == bindparam("b_task"), TASKS.c.lease_owner == bindparam("b_owner"))
    .values(run_at=bindparam("b_run_at"), lease_owner=None, lease_expires_at=None)
)
DELETE_TASK = delete(TASKS).where(TASKS.c.id == bindparam("b_task"), TASKS.c.lease_owner == bindparam("b_owner"))
_STEP_KEYS = ("execution_id", "step_index")


def storable(text: str | None) -> str | None:
    """Text a plugin gave (an error quoting an upstream's body, a message) as a text column
    can hold it. PostgreSQL refuses NUL: the outcome's write failed, the execution stayed
    running until its lease ended and the step's upstream was called again. U+FFFD shows
    where it was. SQLite would keep it; replaced there too, so both backends answer alike.
    JSON columns (outputs, configs) are json, not jsonb: the escape \\u0000 is stored."""
    return text.replace("\x00", "\ufffd") if text and "\x00" in text else text


def storable_step(values: dict[str, Any]) -> dict[str, Any]:
    if any(values.get(key) and "\x00" in values[key] for key in ("error", "message")):
        return {**values, "error": storable(values.get("error")), "message": storable(values.get("message"))}
    return values


def step_upsert(postgres: bool) -> Any:
    """INSERT a step result, or replace the one an earlier attempt stored."""
    insert = (postgresql.insert if postgres else sqlite.insert)(STEPS)
    return insert.on_conflict_do_update(index_elements=_STEP_KEYS, set_={c.name: insert.excluded[c.name] for c in STEPS.c if c.name not in _STEP_KEYS})


@dataclass(frozen=True)
class Outcome:
    execution_id: str
    task_id: int
    owner: str
    status: str
    error: str | None = None
    step: dict[str, Any] | None = None  # the last step's row, stored with the outcome


@dataclass(frozen=True)
class Refill:
    """How the dispatcher takes new work in an outcome's transaction: `reserve(n)` says how
    many tasks to claim when n of its executions finish (and holds those slots), `start`
    runs what was claimed and gives back the slots it did not fill."""

    owner: str
    lease: timedelta
    reserve: Callable[[int], int]
    start: Callable[[list[ClaimedTask], int], None]
    rotation: Rotation | None = None  # the dispatcher's: refills take turns with its loop


class OutcomeWriter:
    def __init__(self, db: Database) -> None:
        self.db = db
        self.refill: Refill | None = None
        self._upsert = step_upsert(db.is_postgres)
        self._commits: GroupCommit[Outcome, None] = GroupCommit(self._write, name="outcomes", isolate=True)

    async def record(self, outcome: Outcome) -> None:
        await self._commits.submit(outcome)

    async def store_step(self, values: dict[str, Any]) -> None:
        """A step's result on its own (a step before the last, or a failed one)."""
        values = storable_step(values)
        await self.db.transaction(lambda conn: conn.execute(self._upsert, [values]))

    async def requeue(self, task: Any, owner: str, run_at: datetime, *, error: str, **restore: Any) -> None:
        """Give the task back to run at `run_at` and mark its execution queued; `restore`
        puts back columns the claim changed (attempts, started_at) when nothing ran."""
        values = {"status": "queued", "next_attempt_at": run_at, "error": storable(error), **restore}

        def write(conn: Connection) -> None:
            conn.execute(DEFER_TASK, {"b_task": task.task_id, "b_owner": owner, "b_run_at": run_at})
            conn.execute(update(EXECUTIONS).where(EXECUTIONS.c.id == task.execution_id, EXECUTIONS.c.status != "cancelled").values(**values))

        await self.db.transaction(write)

    async def give_up(self, task: Any, owner: str, *, error: str, attempts: int) -> None:
        """End the task and mark its execution dead without running it; `attempts` puts back
        the count the claim raised (that attempt never started)."""
        values = {"status": "dead", "finished_at": utcnow(), "error": storable(error), "attempts": attempts, "next_attempt_at": None}

        def write(conn: Connection) -> None:
            conn.execute(DELETE_TASK, {"b_task": task.task_id, "b_owner": owner})
            conn.execute(update(EXECUTIONS).where(EXECUTIONS.c.id == task.execution_id, EXECUTIONS.c.status != "cancelled").values(**values))

        await self.db.transaction(write)

    async def _write(self, outcomes: list[Outcome]) -> list[None]:
        now: datetime = utcnow()
        deletes = [{"b_task": o.task_id, "b_owner": o.owner} for o in outcomes]
        steps = [storable_step(o.step) for o in outcomes if o.step is not None]
        finals = [{"b_id": o.execution_id, "b_status": o.status, "b_at": now, "b_error": storable(o.error)} for o in outcomes if o.status]

        refill = self.refill
        limit = refill.reserve(len(outcomes)) if refill is not None else 0

        def write(conn: Connection) -> list[ClaimedTask]:
            # Claimed first: tasks before executions. The finished tasks still hold this
            # owner's lease, so the claim cannot pick them.
            claimed = claim_in(conn, refill.owner, limit, refill.lease, refill.rotation) if refill is not None else []
            conn.execute(DELETE_TASK, deletes)
            if steps:
                conn.execute(self._upsert, steps)
            if finals:
                conn.execute(FINISH_EXECUTION, finals)
            return claimed

        claimed: list[ClaimedTask] = []
        try:
            claimed = await self.db.transaction(write)
        finally:
            if refill is not None:
                refill.start(claimed, limit)
        return [None] * len(outcomes)

    async def close(self) -> None:
        await self._commits.close()
