"""The encryption keys of credentials and webhook secrets, as an operator meets them: a core
that lacks the key of what the database holds refuses to start, and `ipaas secrets
reencrypt` moves every stored secret to the newest key so an old one can be removed."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from ipaas.v1 import credentials_pb2
from tests.conftest import ADMIN_KEY, make_settings, start_core
from tests.integration.helpers import Api, slack_step
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
