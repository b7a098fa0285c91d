"""The gateway's SQL idempotency store on real SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import uuid

from ipaas.gateway.idempotency import SqlStore
from ipaas.storage.db import Database


async def test_reserve_replay_and_abandon(database_url: str) -> None:
    db = Database(database_url, synchronous="NORMAL")
    try:
        store = SqlStore(db)
        await store.create()
        key = f"tn_a:{uuid.uuid4().hex}"
        results = await asyncio.gather(*(store.begin(key, "fp1") for _ in range(5)))
        assert sum(r is None for r in results) == 1, "exactly one concurrent request gets the key"
        assert all(r.fingerprint == "fp1" and not r.done for r in results if r is not None)
        await store.complete(key, "fp1", 201, {"location": "/x"}, b'{"ok":true}')
        done = await store.begin(key, "fp1")
        assert done is not None and (done.done, done.status, done.headers, done.body) == (True, 201, {"location": "/x"}, b'{"ok":true}')

        other = f"tn_a:{uuid.uuid4().hex}"
        assert await store.begin(other, "fp2") is None
        await store.abandon(other)
        assert await store.begin(other, "fp3") is None, "an abandoned key can be taken again"
    finally:
        await db.dispose()
