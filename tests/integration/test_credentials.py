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


async def test_a_replica_left_behind_by_a_key_rotation_retries_instead_of_failing(tmp_path) -> None:
    """A replica that does not have the new key yet cannot decrypt what an updated replica
    wrote. Its executions are retried (they ran once the key arrived) and its webhooks are
    answered UNAVAILABLE (the sender retries); before, executions failed for good and
    webhooks got INTERNAL."""
    import grpc
    from google.api import httpbody_pb2

    from ipaas.v1 import executions_pb2
    from tests.conftest import core_with
    from tests.fakes.slack import FakeSlack
    from tests.integration.helpers import Api, signed_webhook, slack_step

    old, new = Fernet.generate_key().decode(), Fernet.generate_key().decode()
    fast = {"IPAAS_RETRY_BASE_DELAY": "0.05", "IPAAS_POLL_INTERVAL": "0.05"}
    async with FakeSlack() as slack:
        async with core_with(tmp_path, IPAAS_SECRET_KEYS=old, **fast):
            pass  # the database was set up with the old key (a core with only the new one would not start)
        async with core_with(tmp_path, IPAAS_SECRET_KEYS=f"{new},{old}", **fast) as updated:
            tenant = await updated.new_tenant()
            api = Api(updated.channel, tenant.md)
            cred = await api.credential("slack", {"webhook_url": slack.url})
            hooked = await api.create({"name": "w", "trigger": {"type": "webhook"}, "steps": [slack_step(cred, "hi")]})
            manual = (await api.create({"name": "m", "trigger": {"type": "manual"}, "options": {"max_attempts": 25}, "steps": [slack_step(cred, "hi")]})).workflow
        async with core_with(tmp_path, IPAAS_SECRET_KEYS=old, **fast) as behind:
            api = Api(behind.channel, tenant.md)
            execution = (await api.run(manual.id)).execution.id
            await asyncio.sleep(1.0)
            waiting = await api.execution(execution)
            assert waiting.status == "queued" and waiting.attempts >= 2, waiting
            assert "cannot decrypt" in waiting.error and "REDACTED" not in waiting.error, waiting.error
            body, headers = signed_webhook(hooked.webhook_secret, {"n": 1})
            request = executions_pb2.ReceiveWebhookRequest(workflow_id=hooked.workflow.id, http_body=httpbody_pb2.HttpBody(content_type="application/json", data=body), headers=headers)
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await api.executions.ReceiveWebhook(request)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        async with core_with(tmp_path, IPAAS_SECRET_KEYS=f"{new},{old}", **fast) as caught_up:
            done = await Api(caught_up.channel, tenant.md).wait(execution)
            assert done.status == "succeeded", done
