"""The encryption keys of credentials and webhook secrets, as an operator meets them: a core
that lacks the key of what the database holds refuses to start, and `ipaas secrets
reencrypt` moves every stored secret to the newest key so an old one can be removed."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
from pathlib import Path

import pytest
from cryptography.fernet import Fernet
from google.api import httpbody_pb2
from sqlalchemy import create_engine, select, update

from ipaas.crypto import SecretBox
from ipaas.storage import migrate
from ipaas.storage.db import Database, sync_url
from ipaas.storage.tables import Credential
from ipaas.v1 import credentials_pb2, executions_pb2
from tests.conftest import ADMIN_KEY, core_with, make_settings, start_core
from tests.fakes.slack import FakeSlack
from tests.integration.helpers import Api, signed_webhook, slack_step
from tests.integration.test_cli import free_port, one_error_line, run_cli, start_core_process


async def store_secret(tmp_path: Path, database_url: str, kind: str) -> None:
    """A core with a generated key file stores one secret of this kind, then stops."""
    async for core in start_core(make_settings(tmp_path, database_url)):
        api = Api(core.channel, (await core.new_tenant()).md)
        cred = await api.credential("slack", {"webhook_url": "http://127.0.0.1:9/services/T/B/x"})
        if kind == "webhook secret":
            await api.create({"name": "hook", "trigger": {"type": "webhook"}, "steps": [slack_step(cred)]})
            await api.credentials.DeleteCredential(credentials_pb2.DeleteCredentialRequest(id=cred), metadata=api.md)


@pytest.mark.parametrize("kind", ["credential", "webhook secret"])
async def test_a_core_without_the_key_of_stored_secrets_refuses_to_start_in_one_line(tmp_path: Path, database_url: str, kind: str) -> None:
    """A second replica started without IPAAS_SECRET_KEYS (or a core whose key file was lost)
    generated a key of its own and served: every webhook through it answered 503 and every
    step with a credential was retried forever."""
    await store_secret(tmp_path / "first", database_url, kind)
    data = tmp_path / "second" / "data"
    env = {"IPAAS_DATA_DIR": str(data), "IPAAS_DATABASE_URL": database_url, "IPAAS_ENGINE_PROCESSES": "0", "IPAAS_ADMIN_KEY": ADMIN_KEY}
    done = run_cli("core", cwd=tmp_path, **env, IPAAS_GRPC_LISTEN=f"127.0.0.1:{free_port()}")
    line = one_error_line(done)
    assert done.returncode == 3, done.returncode
    assert "encrypted with a key this core does not have" in line and "IPAAS_SECRET_KEYS" in line and str(data / "secret.key") in line, line
    assert not (data / "secret.key").exists(), "no key of its own is left behind for the next start to use"

    data.mkdir(parents=True, exist_ok=True)
    shutil.copy(tmp_path / "first" / "data" / "secret.key", data / "secret.key")  # restored: it starts
    core = start_core_process(tmp_path, env)
    core.terminate()
    core.wait(timeout=30)


def reencrypt(tmp_path: Path, database_url: str, keys: str, *args: str) -> subprocess.CompletedProcess[str]:
    return run_cli("secrets", "reencrypt", *args, cwd=tmp_path, IPAAS_DATABASE_URL=database_url, IPAAS_SECRET_KEYS=keys)


async def stored_credentials(database_url: str) -> dict[str, str]:
    db = Database(database_url)
    try:
        async with db.session() as s:
            return {row.id: row.ciphertext for row in await s.scalars(select(Credential))}
    finally:
        await db.dispose()


async def test_secrets_reencrypt_moves_every_secret_to_the_newest_key_so_the_old_one_can_go(tmp_path: Path, database_url: str) -> None:
    """Nothing re-encrypted stored secrets: each kept the key that first encrypted it, so an
    old key could never be removed from IPAAS_SECRET_KEYS."""
    old, new = Fernet.generate_key().decode(), Fernet.generate_key().decode()
    async with FakeSlack() as slack:
        async with core_with(tmp_path / "before", database_url, IPAAS_SECRET_KEYS=old) as core:
            tenant = await core.new_tenant()
            api = Api(core.channel, tenant.md)
            cred = await api.credential("slack", {"webhook_url": slack.url})
            created = await api.create({"name": "hook", "trigger": {"type": "webhook"}, "steps": [slack_step(cred, text="got {{n}}")]})
            # Beside the running core, once every core has the new key first.
            done = await asyncio.to_thread(reencrypt, tmp_path, database_url, f"{new},{old}", "--batch-size", "1")
            assert (done.returncode, done.stderr) == (0, ""), done.stderr
            assert done.stdout == "re-encrypted 2 secrets with the newest key (0 already used it)\n"
            again = await asyncio.to_thread(reencrypt, tmp_path, database_url, f"{new},{old}", "--json")
            assert json.loads(again.stdout) == {"reencrypted": 0, "already_newest": 2, "changed_meanwhile": 0, "unreadable": {}}, again.stderr

        async with core_with(tmp_path / "after", database_url, IPAAS_SECRET_KEYS=new) as core:  # the old key removed
            api = Api(core.channel, tenant.md)
            raw, headers = signed_webhook(created.webhook_secret, {"n": 1}, "evt_1")
            request = executions_pb2.ReceiveWebhookRequest(workflow_id=created.workflow.id, http_body=httpbody_pb2.HttpBody(content_type="application/json", data=raw), headers=headers)
            hook = await api.executions.ReceiveWebhook(request)
            assert (await api.wait(hook.execution_id)).status == "succeeded"
    assert slack.received == [{"text": "got 1"}]


async def test_secrets_reencrypt_names_in_one_line_the_secrets_no_key_decrypts(tmp_path: Path, database_url: str) -> None:
    old, lost, new = (Fernet.generate_key().decode() for _ in range(3))
    ids = {}
    for n, key in enumerate((old, lost)):
        async with core_with(tmp_path / str(n), database_url, IPAAS_SECRET_KEYS=key) as core:
            api = Api(core.channel, (await core.new_tenant(name=f"t{n}")).md)
            ids[key] = await api.credential("slack", {"webhook_url": "http://127.0.0.1:9/services/T/B/x"})
    before = await stored_credentials(database_url)

    done = await asyncio.to_thread(reencrypt, tmp_path, database_url, f"{new},{old}")
    line = one_error_line(done)
    assert done.returncode == 1, done.returncode
    assert f"no key in IPAAS_SECRET_KEYS decrypts 1 stored secret ({ids[lost]})" in line, line
    assert done.stdout == "re-encrypted 1 secret with the newest key (0 already used it)\n"
    after = await stored_credentials(database_url)
    assert SecretBox([new]).decrypt(after[ids[old]]) == {"webhook_url": "http://127.0.0.1:9/services/T/B/x"}
    assert after[ids[lost]] == before[ids[lost]]


async def test_a_secret_a_core_rewrites_during_reencrypt_keeps_the_cores_value(tmp_path: Path, database_url: str) -> None:
    from ipaas.reencrypt import reencrypt_secrets

    old, new = Fernet.generate_key().decode(), Fernet.generate_key().decode()
    async with core_with(tmp_path, database_url, IPAAS_SECRET_KEYS=old) as core:
        api = Api(core.channel, (await core.new_tenant()).md)
        urls = {await api.credential("slack", {"webhook_url": f"http://127.0.0.1:9/services/T/B/{name}"}, name=name): name for name in ("a", "b")}
    rewritten = {"webhook_url": "http://127.0.0.1:9/services/T/B/rewritten"}
    raced: list[str] = []

    class RacingBox(SecretBox):
        def rotate(self, token: str) -> str | None:
            if not raced:  # a core writes this secret anew after it was read, before it is written
                engine = create_engine(sync_url(database_url))
                with engine.begin() as conn:
                    raced.append(conn.scalar(select(Credential.id).where(Credential.ciphertext == token)))
                    conn.execute(update(Credential).where(Credential.id == raced[0]).values(ciphertext=SecretBox([new]).encrypt(rewritten)))
                engine.dispose()
            return super().rotate(token)

    db = Database(database_url)
    try:
        done = await reencrypt_secrets(db, RacingBox([new, old]), batch=1)
    finally:
        await db.dispose()
    assert (done.rewritten, done.changed, done.unreadable) == (1, 1, {})
    stored = {i: SecretBox([new]).decrypt(token) for i, token in (await stored_credentials(database_url)).items()}
    assert stored.pop(raced[0]) == rewritten, "the core's value is kept, not the one read before it"
    ((other, value),) = stored.items()
    assert value == {"webhook_url": f"http://127.0.0.1:9/services/T/B/{urls[other]}"}


def test_secrets_reencrypt_without_keys_says_so_and_makes_none(tmp_path: Path) -> None:
    """A key it generated would decrypt nothing stored (and be found by a core started there)."""
    data = tmp_path / "data"
    migrate.upgrade(f"sqlite:///{data / 'ipaas.db'}")
    done = run_cli("secrets", "reencrypt", cwd=tmp_path, IPAAS_DATA_DIR=str(data))
    line = one_error_line(done)
    assert done.returncode == 1 and f"no encryption key in IPAAS_SECRET_KEYS nor in {data / 'secret.key'}" in line, line
    assert not (data / "secret.key").exists()
