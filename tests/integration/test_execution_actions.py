"""Cancel and replay against the engine and retention writing the same execution at the same
moment, on real SQLite and PostgreSQL. The other writer's commit is injected just before the
action's write reaches the database, on a connection of its own, as an engine process or
the retention task would make it."""

from __future__ import annotations

import threading
from typing import Callable

import pytest
from sqlalchemy import create_engine, delete, event

from ipaas.engine.outcomes import FINISH_EXECUTION
from ipaas.errors import FailedPrecondition, NotFound
from ipaas.execution_store import ExecutionStore
from ipaas.ids import new_id
from ipaas.storage.db import Database, sync_url
from ipaas.storage.tables import Execution, utcnow


async def execution(db: Database, status: str) -> str:
    execution_id = new_id("ex")
    async with db.session() as s, s.begin():
        s.add(Execution(id=execution_id, tenant_id="tn_a", workflow_id="wf_x", workflow_version=1, trigger="manual", status=status, attempts=1, max_attempts=1, created_at=utcnow()))
    return execution_id


def before_the_actions_write(db: Database, other_writer: Callable[[], None]) -> Callable[[], None]:
    """Runs `other_writer` (committing on its own connection) once, just before the first
    UPDATE of an execution through `db`'s API connection; returns the undo."""
    done: list[bool] = []

    def hook(conn, cursor, statement, *args) -> None:  # type: ignore[no-untyped-def]
        if not done and statement.lstrip().upper().startswith("UPDATE EXECUTIONS"):
            done.append(True)
            writer = threading.Thread(target=other_writer)
            writer.start()
            writer.join(timeout=5)

    event.listen(db.engine.sync_engine, "before_cursor_execute", hook)
    return lambda: event.remove(db.engine.sync_engine, "before_cursor_execute", hook)


async def test_cancel_never_overwrites_an_outcome_the_engine_just_wrote(db: Database, database_url: str) -> None:
    execution_id = await execution(db, "running")
    engine = create_engine(sync_url(database_url))

    def engine_finishes() -> None:
        with engine.begin() as conn:
            conn.execute(FINISH_EXECUTION, {"b_id": execution_id, "b_status": "succeeded", "b_at": utcnow(), "b_error": None})

    undo = before_the_actions_write(db, engine_finishes)
    try:
        with pytest.raises(FailedPrecondition, match="is succeeded"):
            await ExecutionStore(db).cancel("tn_a", execution_id)
    finally:
        undo()
        engine.dispose()
    assert (await ExecutionStore(db).get("tn_a", execution_id)).execution.status == "succeeded"


async def test_replaying_an_execution_retention_just_deleted_is_not_found(db: Database, database_url: str) -> None:
    execution_id = await execution(db, "dead")
    other = create_engine(sync_url(database_url))

    def retention_deletes() -> None:
        with other.begin() as conn:
            conn.execute(delete(Execution).where(Execution.id == execution_id))

    undo = before_the_actions_write(db, retention_deletes)
    try:
        with pytest.raises(NotFound):
            await ExecutionStore(db).replay("tn_a", execution_id)
    finally:
        undo()
        other.dispose()
