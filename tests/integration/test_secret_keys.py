"""The encryption keys of credentials and webhook secrets, as an operator meets them: a core
that lacks the key the database was set up with refuses to start (cores racing on an empty
database included), and `ipaas secrets reencrypt` moves every stored secret, and the
database's key check, to the newest key so an old one can be removed."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cryptography.fernet import Fernet
from google.api import httpbody_pb2
from sqlalchemy import create_engine, select, update

from ipaas.crypto import SecretBox
from ipaas.settings import Settings
from ipaas.storage import migrate
from ipaas.storage.db import Database, sync_url
from ipaas.storage.tables import Credential
from ipaas.v1 import credentials_pb2, executions_pb2
from tests.conftest import ADMIN_KEY, core_with, make_settings, start_core
from tests.fakes.slack import FakeSlack
from tests.integration.helpers import Api, signed_webhook, slack_step
from tests.integration.test_cli import free_port, one_error_line, run_cli, said, start_core_process


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
    assert "set up with an encryption key this core does not have" in line and "IPAAS_SECRET_KEYS" in line and str(data / "secret.key") in line, line
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
            # operating.md: "prints how many it re-encrypted, then the key check" (it printed only the count)
            assert done.stdout == "re-encrypted 2 secrets with the newest key (0 already used it)\nkey check: re-encrypted with the newest key\n"
            assert (await asyncio.to_thread(reencrypt, tmp_path, database_url, f"{new},{old}")).stdout == "re-encrypted 0 secrets with the newest key (2 already used it)\nkey check: already uses the newest key\n"
            again = await asyncio.to_thread(reencrypt, tmp_path, database_url, f"{new},{old}", "--json")
            assert json.loads(again.stdout) == {"reencrypted": 0, "already_newest": 2, "changed_meanwhile": 0, "unreadable": {}, "key_check": "current"}, again.stderr

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
    # The database is set up with the old key; a rotation to a key that was later lost began.
    for n, (newest, keys) in enumerate([(old, old), (lost, f"{lost},{old}")]):
        async with core_with(tmp_path / str(n), database_url, IPAAS_SECRET_KEYS=keys) as core:
            api = Api(core.channel, (await core.new_tenant(name=f"t{n}")).md)
            ids[newest] = await api.credential("slack", {"webhook_url": "http://127.0.0.1:9/services/T/B/x"})
    before = await stored_credentials(database_url)

    done = await asyncio.to_thread(reencrypt, tmp_path, database_url, f"{new},{old}")
    line = one_error_line(done)
    assert done.returncode == 1, done.returncode
    assert f"no key in IPAAS_SECRET_KEYS decrypts 1 stored secret ({ids[lost]})" in line, line
    assert done.stdout == "re-encrypted 1 secret with the newest key (0 already used it)\nkey check: re-encrypted with the newest key\n"
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


def test_secrets_reencrypt_on_a_database_no_core_has_started_on_says_there_is_no_key_check_yet(tmp_path: Path) -> None:
    data = tmp_path / "data"
    migrate.upgrade(f"sqlite:///{data / 'ipaas.db'}")
    done = run_cli("secrets", "reencrypt", cwd=tmp_path, IPAAS_DATA_DIR=str(data), IPAAS_SECRET_KEYS=Fernet.generate_key().decode())
    assert (done.returncode, done.stderr) == (0, ""), done.stderr
    assert done.stdout == "re-encrypted 0 secrets with the newest key (0 already used it)\nkey check: none yet: the next core to start records it with its newest key\n"


# The database's key check: cores racing on an empty database, cores with other keys,
# rotation, and databases from before the check.

NO_KEY_LINE = "set up with an encryption key this core does not have"


def core_env(data: Path, database_url: str, **extra: str) -> dict[str, str]:
    return {"IPAAS_DATA_DIR": str(data), "IPAAS_DATABASE_URL": database_url, "IPAAS_ENGINE_PROCESSES": "0", "IPAAS_ADMIN_KEY": ADMIN_KEY, **extra}


def refused_start(tmp_path: Path, env: dict[str, str]) -> str:
    """`ipaas core` exits at start with one line (returned); never prints key material."""
    done = run_cli("core", cwd=tmp_path, timeout=45, **env, IPAAS_GRPC_LISTEN=f"127.0.0.1:{free_port()}")
    line = one_error_line(done)
    assert done.returncode == 3, (done.returncode, line)
    for key in env.get("IPAAS_SECRET_KEYS", "").split(","):
        assert not key or key not in done.stderr, "a key reached the terminal"
    return line


def starts(tmp_path: Path, env: dict[str, str]) -> None:
    core = start_core_process(tmp_path, env)
    core.terminate()
    assert core.wait(timeout=30) == 0


def listening(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


async def stored_check(database_url: str) -> str | None:
    from ipaas.key_check import read_check

    db = Database(database_url)
    try:
        return await db.read(read_check)
    finally:
        await db.dispose()


def test_cores_racing_on_an_empty_database_without_keys_end_up_with_one_key(tmp_path: Path, database_url: str) -> None:
    """Two replicas started together without IPAAS_SECRET_KEYS on an empty PostgreSQL
    database each generated a key and served: each then wrote credentials and webhook
    secrets the other could not read (webhooks 503, steps retried forever). On SQLite the
    core lock turned the second away, but started again once the first had stopped, it too
    generated a key of its own."""
    migrate.upgrade(database_url)  # the race is for the key, not for the migration
    datas, ports = [tmp_path / "a" / "data", tmp_path / "b" / "data"], [free_port(), free_port()]
    base = {k: v for k, v in os.environ.items() if not k.startswith("IPAAS_")}
    procs = []
    for data, port in zip(datas, ports):
        data.parent.mkdir(parents=True)
        env = {**base, **core_env(data, database_url), "IPAAS_GRPC_LISTEN": f"127.0.0.1:{port}"}
        stderr = open(data.parent / "stderr", "w")
        procs.append(subprocess.Popen([sys.executable, "-m", "ipaas", "core"], cwd=tmp_path, env=env, stderr=stderr, stdout=subprocess.DEVNULL))
        stderr.close()
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            up = [listening(port) for port in ports]
            exited = [proc.poll() is not None for proc in procs]
            if all(up) or all(exited) or sorted(zip(up, exited)) == [(False, True), (True, False)]:
                break
            time.sleep(0.1)
        assert not all(up), "both cores serve, each with its own key"
        assert sorted(zip(up, exited)) == [(False, True), (True, False)], (up, exited)
        winner, loser = (0, 1) if up[0] else (1, 0)
        assert procs[loser].returncode == 3, procs[loser].returncode
        said_then = said((datas[loser].parent / "stderr").read_text())
        assert len(said_then) == 1 and said_then[0].startswith("error: "), said_then
        assert not (datas[loser] / "secret.key").exists(), "the loser left a key that decrypts nothing"
        assert (datas[winner] / "secret.key").exists()

        if database_url.startswith("postgresql"):
            line = refused_start(tmp_path, core_env(datas[loser], database_url))  # beside the winner
            assert NO_KEY_LINE in line and "IPAAS_SECRET_KEYS" in line, line
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
                proc.wait(timeout=30)
    line = refused_start(tmp_path, core_env(datas[loser], database_url))  # alone
    assert NO_KEY_LINE in line and "IPAAS_SECRET_KEYS" in line and str(datas[loser] / "secret.key") in line, line
    assert not (datas[loser] / "secret.key").exists()
    starts(tmp_path, core_env(datas[winner], database_url))


async def test_cores_setting_up_the_key_at_the_same_moment_agree_on_one(tmp_path: Path, database_url: str) -> None:
    """The insert itself raced (each core on its own connection, at once): exactly one key is
    kept, the others are refused in their one line and leave no key file."""
    from ipaas.crypto import load_box

    async def start(settings: Settings, db: Database) -> SecretBox | SystemExit:
        try:
            return await load_box(settings, db)
        except SystemExit as refused:  # a BaseException: gather would not return it
            return refused

    migrate.upgrade(database_url)
    settings = [make_settings(tmp_path / str(n), database_url) for n in range(4)]
    dbs = [Database(database_url) for _ in settings]
    try:
        results = await asyncio.gather(*(start(s, db) for s, db in zip(settings, dbs)))
    finally:
        for db in dbs:
            await db.dispose()
    boxes = [r for r in results if isinstance(r, SecretBox)]
    refusals = [r for r in results if isinstance(r, SystemExit)]
    assert (len(boxes), len(refusals)) == (1, 3), results
    assert all(NO_KEY_LINE in str(r.code) for r in refusals), refusals
    assert [s.data_dir.joinpath("secret.key").exists() for s in settings].count(True) == 1
    check = await stored_check(database_url)
    assert check is not None and boxes[0].decrypt(check) is not None


@pytest.mark.parametrize("stored", ["nothing yet", "a credential"])
async def test_a_core_whose_keys_lack_the_databases_key_refuses_to_start(tmp_path: Path, database_url: str, stored: str) -> None:
    """A core with IPAAS_SECRET_KEYS holding none of the database's keys started and served;
    it was found out only when it first read a secret (or wrote ones the others cannot read)."""
    first, other = Fernet.generate_key().decode(), Fernet.generate_key().decode()
    async with core_with(tmp_path / "first", database_url, IPAAS_SECRET_KEYS=first) as core:
        if stored == "a credential":
            api = Api(core.channel, (await core.new_tenant()).md)
            await api.credential("slack", {"webhook_url": "http://127.0.0.1:9/services/T/B/x"})
    line = await asyncio.to_thread(refused_start, tmp_path, core_env(tmp_path / "other", database_url, IPAAS_SECRET_KEYS=other))
    assert NO_KEY_LINE in line and "none of the keys in IPAAS_SECRET_KEYS decrypts it" in line, line
    await asyncio.to_thread(starts, tmp_path, core_env(tmp_path / "other", database_url, IPAAS_SECRET_KEYS=f"{other},{first}"))


async def test_a_key_rotation_starts_and_reencrypt_moves_the_key_check_to_the_new_key(tmp_path: Path, database_url: str) -> None:
    old, new = Fernet.generate_key().decode(), Fernet.generate_key().decode()
    async with core_with(tmp_path / "old", database_url, IPAAS_SECRET_KEYS=old) as core:
        api = Api(core.channel, (await core.new_tenant()).md)
        await api.credential("slack", {"webhook_url": "http://127.0.0.1:9/services/T/B/x"})
    async with core_with(tmp_path / "rotated", database_url, IPAAS_SECRET_KEYS=f"{new},{old}"):
        pass  # the new key first, the old second: the check (under the old key) still opens

    done = await asyncio.to_thread(reencrypt, tmp_path, database_url, f"{new},{old}", "--json")
    assert (done.returncode, json.loads(done.stdout)["key_check"]) == (0, "reencrypted"), done.stderr
    assert SecretBox([new]).decrypt(await stored_check(database_url)) is not None

    line = await asyncio.to_thread(refused_start, tmp_path, core_env(tmp_path / "behind", database_url, IPAAS_SECRET_KEYS=old))
    assert NO_KEY_LINE in line, line
    await asyncio.to_thread(starts, tmp_path, core_env(tmp_path / "new", database_url, IPAAS_SECRET_KEYS=new))  # the old key removed


def downgrade_to_before_the_key_check(database_url: str) -> None:
    """The database as a release before the key check left it: same secrets, no check."""
    from alembic import command

    command.downgrade(migrate.alembic_config(database_url), "0001")
    assert migrate.current_revision(database_url) == "0001"


@pytest.mark.parametrize("stored", ["secrets", "no secret"])
async def test_a_database_from_before_the_key_check_is_adopted_by_the_first_core_with_its_key(tmp_path: Path, database_url: str, stored: str) -> None:
    """With secrets, only a key that decrypts one of them may write the check (a core with
    another key is refused and writes nothing); without, the first core's key is the one."""
    key, other = Fernet.generate_key().decode(), Fernet.generate_key().decode()
    async with FakeSlack() as slack:
        async with core_with(tmp_path / "before", database_url, IPAAS_SECRET_KEYS=key) as core:
            tenant = await core.new_tenant()
            api = Api(core.channel, tenant.md)
            if stored == "secrets":
                cred = await api.credential("slack", {"webhook_url": slack.url})
                created = await api.create({"name": "hook", "trigger": {"type": "webhook"}, "steps": [slack_step(cred, text="got {{n}}")]})
        await asyncio.to_thread(downgrade_to_before_the_key_check, database_url)

        if stored == "secrets":
            for env in (core_env(tmp_path / "other", database_url, IPAAS_SECRET_KEYS=other), core_env(tmp_path / "nokey", database_url)):
                line = await asyncio.to_thread(refused_start, tmp_path, env)
                assert NO_KEY_LINE in line, line
                assert await stored_check(database_url) is None, "a key that reads no secret was adopted"
            assert not (tmp_path / "nokey" / "secret.key").exists()
            adopted = key
        else:
            adopted = other
        async with core_with(tmp_path / "after", database_url, IPAAS_SECRET_KEYS=adopted) as core:
            assert SecretBox([adopted]).decrypt(await stored_check(database_url)) is not None
            if stored == "secrets":  # what was stored before still works
                api = Api(core.channel, tenant.md)
                raw, headers = signed_webhook(created.webhook_secret, {"n": 1}, "evt_1")
                request = executions_pb2.ReceiveWebhookRequest(workflow_id=created.workflow.id, http_body=httpbody_pb2.HttpBody(content_type="application/json", data=raw), headers=headers)
                hook = await api.executions.ReceiveWebhook(request)
                assert (await api.wait(hook.execution_id)).status == "succeeded"
    assert slack.received == ([{"text": "got 1"}] if stored == "secrets" else [])
    line = await asyncio.to_thread(refused_start, tmp_path, core_env(tmp_path / "late", database_url, IPAAS_SECRET_KEYS=key if stored == "no secret" else other))
    assert NO_KEY_LINE in line, line
