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


async def test_concurrent_keys_share_transactions_but_keep_their_own_answers(database_url: str) -> None:
    db = Database(database_url, synchronous="NORMAL")
    try:
        store = SqlStore(db)
        await store.create()
        keys = [f"tn_b:{uuid.uuid4().hex}" for _ in range(40)]
        # Each key twice in the same burst: one reservation each, the other sees it in flight.
        first = await asyncio.gather(*(store.begin(k, f"fp-{i}") for i, k in enumerate(keys + keys)))
        assert [r is None for r in first[:40]] == [True] * 40
        assert all(r is not None and not r.done and r.fingerprint == f"fp-{i}" for i, r in enumerate(first[40:]))
        await asyncio.gather(*(store.complete(k, f"fp-{i}", 200 + i % 3, {"content-type": "application/json"}, f'{{"n":{i}}}'.encode()) for i, k in enumerate(keys)))
        kept = await asyncio.gather(*(store.begin(k, f"fp-{i}") for i, k in enumerate(keys)))
        assert [(r.done, r.status, r.body) for r in kept] == [(True, 200 + i % 3, f'{{"n":{i}}}'.encode()) for i in range(40)]
        await store.close()
    finally:
        await db.dispose()


async def test_gateways_starting_together_on_an_empty_database_all_start(database_url: str) -> None:
    """Several gateways (a first deploy, a scale-up) create the store's table at once: on
    PostgreSQL, check-then-create is not atomic, and the losers crashed at start-up."""
    for _ in range(3):  # the race is timing-dependent; it lost in most rounds before the fix
        dbs = [Database(database_url, pool_size=2) for _ in range(4)]
        try:
            results = await asyncio.gather(*(SqlStore(db).create() for db in dbs), return_exceptions=True)
            assert [r for r in results if isinstance(r, BaseException)] == []
            await dbs[0].transaction(lambda conn: conn.exec_driver_sql("DROP TABLE gateway_idempotency_keys"))
        finally:
            for db in dbs:
                await db.dispose()
