"""Reading executions, and the operator actions on them: replay and cancel."""

from __future__ import annotations

from typing import Any

from dataclasses import dataclass

from sqlalchemy import delete, select, update

from ipaas import reasons
from ipaas.engine import outbox
from ipaas.errors import FailedPrecondition, InvalidArgument, NotFound
from ipaas.pagination import Page, PageRequest
from ipaas.storage.db import Database
from ipaas.storage.tables import Execution, ExecutionStep, OutboxTask, utcnow

STATUSES = ("queued", "running", "succeeded", "failed", "dead", "cancelled")
REPLAYABLE = ("dead", "failed")


@dataclass(frozen=True)
class ExecutionView:
    execution: Execution
    steps: list[ExecutionStep]


class ExecutionStore:
    def __init__(self, db: Database, on_enqueued=lambda: None) -> None:  # type: ignore[no-untyped-def]
        self.db = db
        self.on_enqueued = on_enqueued

    async def get(self, tenant_id: str, execution_id: str) -> ExecutionView:
        """The execution and its steps, as read-only rows with the models' attributes."""

        def load(conn: Any) -> tuple[Any, list[Any]]:
            row = conn.execute(select(*Execution.__table__.c).where(Execution.id == execution_id, Execution.tenant_id == tenant_id)).first()
            if row is None:
                return None, []
            steps = conn.execute(select(*ExecutionStep.__table__.c).where(ExecutionStep.execution_id == execution_id).order_by(ExecutionStep.step_index)).all()
            return row, list(steps)

        row, steps = await self.db.read(load)
        if row is None:
            raise NotFound(f"execution {execution_id} not found", reasons.EXECUTION_NOT_FOUND(executionId=execution_id))
        return ExecutionView(row, steps)

    async def list(self, tenant_id: str, workflow_id: str, status: str, paging: PageRequest) -> Page[Execution]:
        if status and status not in STATUSES:
            raise InvalidArgument.field("status", f"must be one of {', '.join(STATUSES)}")
        q = select(Execution).where(Execution.tenant_id == tenant_id).order_by(Execution.id.desc()).limit(paging.size + 1)
        if workflow_id:
            q = q.where(Execution.workflow_id == workflow_id)
        if status:
            q = q.where(Execution.status == status)
        if paging.after:
            q = q.where(Execution.id < paging.after)
        async with self.db.session() as s:
            rows = list((await s.scalars(q)).all())
        return Page.of(rows, paging, key=lambda e: e.id)

    async def replay(self, tenant_id: str, execution_id: str) -> ExecutionView:
        """Queue a dead or failed execution again, with a fresh attempt budget. Succeeded
        steps are kept, so it resumes where it stopped, on the version it pinned."""
        async with self.db.session() as s, s.begin():
            await self._change(s, tenant_id, execution_id, REPLAYABLE, "replayed", status="queued", attempts=0, error=None, finished_at=None, next_attempt_at=None)
            await outbox.add_task(s, execution_id, tenant_id, utcnow())
        self.on_enqueued()
        return await self.get(tenant_id, execution_id)

    async def cancel(self, tenant_id: str, execution_id: str) -> ExecutionView:
        async with self.db.session() as s, s.begin():
            if self.db.is_postgres:
                # Tasks before executions, the order claims and outcomes lock in. The UPDATE
                # then takes NO KEY UPDATE on the execution, which lets step rows that
                # reference it go on being written.
                await s.execute(select(OutboxTask.id).where(OutboxTask.execution_id == execution_id).with_for_update())
            await self._change(s, tenant_id, execution_id, ("queued", "running"), "cancelled", status="cancelled", finished_at=utcnow())
            # A queued task is dropped; a running one notices the status when it finishes its step.
            await s.execute(delete(OutboxTask).where(OutboxTask.execution_id == execution_id, OutboxTask.lease_owner.is_(None)))
        return await self.get(tenant_id, execution_id)

    async def _change(self, s: Any, tenant_id: str, execution_id: str, allowed: tuple[str, ...], action: str, **values: Any) -> None:
        """Update the execution only if it is still in an allowed status, checked in the
        statement itself: on SQLite a read before the write is outside the write lock, so
        the engine could finish the execution (or retention delete it) between the two;
        cancel then overwrote a success, and replay failed with INTERNAL."""
        result = await s.execute(
            update(Execution).where(Execution.id == execution_id, Execution.tenant_id == tenant_id, Execution.status.in_(allowed)).values(**values)
        )
        if result.rowcount == 1:
            return
        status = await s.scalar(select(Execution.status).where(Execution.id == execution_id, Execution.tenant_id == tenant_id))
        if status is None:
            raise NotFound(f"execution {execution_id} not found", reasons.EXECUTION_NOT_FOUND(executionId=execution_id))
        raise FailedPrecondition(f"execution {execution_id} is {status}; only {' or '.join(allowed)} executions can be {action}", reasons.EXECUTION_STATUS_CONFLICT(executionId=execution_id, status=status))
