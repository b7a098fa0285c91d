"""JSON columns (payloads, rendered configs, outputs) give back the document that was stored,
number for number, on SQLite and PostgreSQL, through every connection the store uses."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest
from sqlalchemy import create_engine, insert, select

from ipaas.ids import new_id
from ipaas.storage import migrate
from ipaas.storage.db import Database, sync_url
from ipaas.storage.tables import Execution, utcnow

# A webhook stores its body's JSON as orjson read it: 2.0 is a float, 12345678901234567890
# an int past 64 bits signed.
DOCUMENTS = [2.0, 12345678901234567890, 300000.0, 0.1, -7, "2.0", True, None, [1.0, 2], {"n": 12345678901234567890, "f": 1.0}]


def execution(payload: Any) -> dict[str, Any]:
    return {"id": new_id("ex"), "tenant_id": "tn_a", "workflow_id": "wf_a", "workflow_version": 1, "trigger": "webhook", "status": "queued", "payload": payload, "attempts": 0, "max_attempts": 1, "created_at": utcnow()}


async def read_back(db: Database, ids: list[str]) -> dict[str, list[bytes]]:
    """Each document as JSON text (which tells 2.0 from 2), read by the API's session and by
    the reader threads."""
    query = select(Execution.id, Execution.payload).where(Execution.id.in_(ids))
    async with db.session() as s:
        by_session = {row.id: row.payload for row in await s.execute(query)}
    by_reader = {row.id: row.payload for row in await db.read(lambda conn: conn.execute(query).all())}
    return {"session": [orjson.dumps(by_session[i]) for i in ids], "reader": [orjson.dumps(by_reader[i]) for i in ids]}


@pytest.mark.parametrize("writer", ["session", "transaction"])
async def test_a_document_comes_back_exactly_as_stored(database_url: str, writer: str) -> None:
    """On SQLite a column declared JSON has numeric affinity: a document that was a bare number
    was stored as a number, so 2.0 came back as 2 and 12345678901234567890 as
    1.2345678901234567e+19. PostgreSQL kept them."""
    migrate.upgrade(database_url)
    db = Database(database_url)
    try:
        rows = [execution(document) for document in DOCUMENTS]
        if writer == "session":
            async with db.session() as s, s.begin():
                s.add_all(Execution(**row) for row in rows)
        else:  # the hot path's writer thread
            await db.transaction(lambda conn: conn.execute(insert(Execution), rows))
        back = await read_back(db, [row["id"] for row in rows])
    finally:
        await db.dispose()
    sent = [orjson.dumps(document) for document in DOCUMENTS]
    assert back == {"session": sent, "reader": sent}


async def test_documents_sqlite_stored_as_text_or_numbers_before_still_read(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'ipaas.db'}"
    migrate.upgrade(url)
    before = create_engine(sync_url(url), json_serializer=lambda value: orjson.dumps(value).decode())  # as the store wrote them
    documents = [{"a": [1, "x"]}, 5, 2.5, "text", None]
    rows = [execution(document) for document in documents]
    with before.begin() as conn:
        conn.execute(insert(Execution), rows)
        assert {t for (t,) in conn.exec_driver_sql("SELECT typeof(payload) FROM executions")} == {"text", "integer", "real"}
    before.dispose()
    db = Database(url)
    try:
        back = await read_back(db, [row["id"] for row in rows])
    finally:
        await db.dispose()
    sent = [orjson.dumps(document) for document in documents]
    assert back == {"session": sent, "reader": sent}
