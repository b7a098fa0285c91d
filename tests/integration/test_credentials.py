"""The credential row cache on real SQLite and PostgreSQL: concurrent steps that miss share
one read, a delete is never undone by a read that was in flight, rows expire."""

from __future__ import annotations

import asyncio
import contextlib

import pytest
from cryptography.fernet import Fernet
from sqlalchemy import event

from ipaas import credentials as credentials_module
from ipaas.credentials import CredentialStore
from ipaas.crypto import SecretBox
from ipaas.errors import NotFound
from ipaas.storage import migrate
from ipaas.storage.db import Database
from ipaas.tenants import TenantStore


@pytest.fixture
async def setup(database_url: str):
    migrate.upgrade(database_url)
    db = Database(database_url)
    reads: list[str] = []

    @event.listens_for(db.engine.sync_engine, "before_cursor_execute")
    def count(conn, cursor, statement, parameters, context, executemany):  # type: ignore[no-untyped-def]
        if statement.lstrip().upper().startswith("SELECT") and "FROM credentials" in statement:
            reads.append(statement)

    store = CredentialStore(db, SecretBox([Fernet.generate_key().decode()]), lambda connector, secrets: [])
    tenant = await TenantStore(db, admin_key="ipk_admin_" + "a" * 32).create_tenant("acme", "paid")
    cred = await store.create(tenant.id, "slack", "main", {"webhook_url": "https://hooks.slack.com/services/T/B/x"})
    yield store, tenant.id, cred.id, reads
    await db.dispose()


async def test_concurrent_misses_share_one_read(setup) -> None:
    store, tenant_id, cred_id, reads = setup
    store.forget(cred_id)
    reads.clear()
    results = await asyncio.gather(*(store.secrets(tenant_id, cred_id) for _ in range(32)))
    assert all(r == {"webhook_url": "https://hooks.slack.com/services/T/B/x"} for r in results)
    assert len(reads) == 1
    await store.secrets(tenant_id, cred_id)
    assert len(reads) == 1  # cached


async def test_rows_expire_after_the_ttl(setup, monkeypatch: pytest.MonkeyPatch) -> None:
    store, tenant_id, cred_id, reads = setup
    await store.secrets(tenant_id, cred_id)
    reads.clear()
    await asyncio.sleep(credentials_module.ROW_TTL + 0.1)
    await store.secrets(tenant_id, cred_id)
    assert len(reads) == 1


async def test_a_delete_during_a_read_is_not_undone_by_it(setup) -> None:
    """Whichever finishes first, once the delete returns no later step gets the secrets."""
    store, tenant_id, cred_id, reads = setup
    store.forget(cred_id)
    reads.clear()
    in_flight = asyncio.ensure_future(store.secrets(tenant_id, cred_id))
    while not reads:  # the read has been sent
        await asyncio.sleep(0)
    await store.delete(tenant_id, cred_id)
    with contextlib.suppress(NotFound):
        await in_flight  # a step that read the row before the delete may still use it
    with pytest.raises(NotFound):
        await store.secrets(tenant_id, cred_id)


async def test_another_tenant_cannot_use_the_credential(setup) -> None:
    store, tenant_id, cred_id, reads = setup
    with pytest.raises(NotFound):
        await store.secrets("tn_someone_else", cred_id)
