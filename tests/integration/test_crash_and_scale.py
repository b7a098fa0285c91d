"""Durability under a crash, and scale-out on PostgreSQL.

The crash test kills the core with SIGKILL while it delivers to a slow fake Slack, restarts
it, and shows every accepted trigger executed: zero lost. Deliveries are at least once to
third parties; the duplicates are counted and bounded by the work in flight at the kill."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from google.api import httpbody_pb2

from ipaas.v1 import executions_pb2, executions_pb2_grpc, tenants_pb2, tenants_pb2_grpc
from tests.conftest import ADMIN_KEY, bearer, core_with, free_port
from tests.fakes.slack import FakeSlack
from tests.integration.helpers import Api, signed_webhook, slack_step

WORKERS = 8



def start_core(tmp_path: Path, port: int, engine_processes: int = 0) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "IPAAS_DATA_DIR": str(tmp_path / "data"),
        "IPAAS_GRPC_LISTEN": f"127.0.0.1:{port}",
        "IPAAS_ADMIN_KEY": ADMIN_KEY,
        "IPAAS_ALLOW_INSECURE_TARGETS": "1",
        "IPAAS_WORKERS": str(WORKERS),
        "IPAAS_POLL_INTERVAL": "0.1",
        "IPAAS_RETRY_BASE_DELAY": "0.05",
        "IPAAS_LOG_LEVEL": "WARNING",
        "IPAAS_RATE_LIMITS_OFF": "1",  # hundreds of runs from one free-tier tenant
        "IPAAS_ENGINE_PROCESSES": str(engine_processes),
    }
    # A session of its own, so a crash can take the core and its engine processes together.
    return subprocess.Popen([sys.executable, "-m", "ipaas", "core"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


async def wait_serving(channel: grpc.aio.Channel) -> None:
    stub = tenants_pb2_grpc.TenantServiceStub(channel)
    for _ in range(150):
        try:
            await stub.ListTenants(tenants_pb2.ListTenantsRequest(), metadata=bearer(ADMIN_KEY), timeout=1)
            return
        except grpc.aio.AioRpcError:
            await asyncio.sleep(0.1)
    raise AssertionError("core did not start")


@pytest.mark.parametrize("engine_processes", [0, 2], ids=["in-process", "engine-processes"])
async def test_sigkill_mid_run_loses_nothing(tmp_path: Path, engine_processes: int) -> None:
    """The machine dies: SIGKILL to the core and every engine process at once."""
    port = free_port()
    async with FakeSlack(delay=0.05) as slack:
        proc = start_core(tmp_path, port, engine_processes)
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        try:
            await wait_serving(channel)
            admin = tenants_pb2_grpc.TenantServiceStub(channel)
            tenant = (await admin.CreateTenant(tenants_pb2.CreateTenantRequest(name="crash"), metadata=bearer(ADMIN_KEY))).tenant
            key = (await admin.CreateApiKey(tenants_pb2.CreateApiKeyRequest(tenant_id=tenant.id), metadata=bearer(ADMIN_KEY))).secret
            api = Api(channel, bearer(key))
            cred = await api.credential("slack", {"webhook_url": slack.url})
            created = await api.create({"name": "hook", "trigger": {"type": "webhook"}, "steps": [slack_step(cred, "event {{n}}")]})
            wf_id, secret = created.workflow.id, created.webhook_secret
            stub = executions_pb2_grpc.ExecutionServiceStub(channel)

            accepted: dict[int, str] = {}

            async def send(n: int) -> None:
                raw, headers = signed_webhook(secret, {"n": n}, f"evt_{n}")
                try:
                    reply = await stub.ReceiveWebhook(
                        executions_pb2.ReceiveWebhookRequest(workflow_id=wf_id, http_body=httpbody_pb2.HttpBody(data=raw), headers=headers), timeout=5
                    )
                    accepted[n] = reply.execution_id
                except grpc.aio.AioRpcError:
                    pass  # not accepted: the sender would retry; it is not owed a delivery

            total = 300
            senders = [asyncio.create_task(send(n)) for n in range(total)]
            while len(slack.received) < 40:  # mid-run: some delivered, many queued, some in flight
                await asyncio.sleep(0.01)
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
            await asyncio.gather(*senders)
            delivered_at_kill = len(slack.received)
            assert 0 < len(accepted) <= total

            proc = start_core(tmp_path, port, engine_processes)
            await wait_serving(channel)
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                delivered = {int(m["text"].split()[1]) for m in slack.received}
                if set(accepted) <= delivered:
                    break
                await asyncio.sleep(0.1)
            counts = collections.Counter(int(m["text"].split()[1]) for m in slack.received)
            lost = [n for n in accepted if n not in counts]
            duplicates = sum(c - 1 for c in counts.values())
            print(f"\ncrash test: accepted={len(accepted)} delivered_before_kill={delivered_at_kill} lost={len(lost)} duplicates={duplicates}")
            assert lost == [], f"accepted but never delivered: {lost[:10]}"
            assert duplicates <= WORKERS * max(1, engine_processes), "at most the executions in flight at the kill are repeated"
            for n in list(accepted)[:20]:
                assert (await api.execution(accepted[n])).status == "succeeded"
        finally:
            await channel.close()
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # anything of the session still running


@pytest.mark.postgres
async def test_two_replicas_on_postgres_run_every_task_exactly_once(tmp_path: Path, postgres_url: str) -> None:
    async with FakeSlack(delay=0.01) as slack:
        from cryptography.fernet import Fernet

        shared = {"IPAAS_WORKERS": "8", "IPAAS_SECRET_KEYS": Fernet.generate_key().decode()}  # replicas share keys
        async with core_with(tmp_path / "a", postgres_url, **shared) as a, core_with(tmp_path / "b", postgres_url, **shared) as b:
            tenant = await a.new_tenant()
            api_a, api_b = Api(a.channel, tenant.md), Api(b.channel, tenant.md)
            cred = await api_a.credential("slack", {"webhook_url": slack.url})
            wf = (await api_a.create({"name": "pg", "trigger": {"type": "manual"}, "steps": [slack_step(cred, "job {{n}}")]})).workflow
            total = 200
            ids = await asyncio.gather(*(((api_a, api_b)[n % 2]).run(wf.id, {"n": n}) for n in range(total)))
            deadline = time.monotonic() + 60
            while len(slack.received) < total and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.3)
            counts = collections.Counter(m["text"] for m in slack.received)
            assert len(counts) == total and set(counts.values()) == {1}, "every task done exactly once"
            assert a.server.dispatcher.processed > 0 and b.server.dispatcher.processed > 0, "both replicas did work"
            assert a.server.dispatcher.processed + b.server.dispatcher.processed == total
            print(f"\npostgres replicas: a={a.server.dispatcher.processed} b={b.server.dispatcher.processed}")
            assert len({r.execution.id for r in ids}) == total
