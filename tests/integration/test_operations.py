"""Operational guarantees: queue depth is visible, shutdown drains or hands work back, and a
credential's secret never reaches a log line or a stored execution."""

from __future__ import annotations

import asyncio
import logging

import httpx
import pytest
from sqlalchemy import text

from ipaas.v1 import executions_pb2
from tests.conftest import core_with, gateway_for
from tests.fakes.slack import FakeSlack
from tests.integration.helpers import Api, slack_step


async def test_queue_depth_is_exposed_over_grpc_and_rest(tmp_path) -> None:
    async with FakeSlack() as slack, core_with(tmp_path, IPAAS_DISABLE_ENGINE="1", IPAAS_MAX_QUEUE_DEPTH="3", IPAAS_MAX_TENANT_QUEUE_DEPTH="3") as core, gateway_for(core.target, tmp_path) as url:
        tenant = await core.new_tenant(tier="paid")
        api = Api(core.channel, tenant.md)
        cred = await api.credential("slack", {"webhook_url": slack.url})
        wf = (await api.create({"name": "q", "trigger": {"type": "manual"}, "steps": [slack_step(cred)]})).workflow
        for _ in range(3):
            await api.run(wf.id)
        stats = await api.executions.GetQueueStats(executions_pb2.GetQueueStatsRequest(), metadata=api.md)
        assert (stats.depth, stats.tenant_depth, stats.max_depth, stats.tenant_max_depth) == (3, 3, 3, 3)
        async with httpx.AsyncClient(base_url=url, headers={"authorization": f"Bearer {tenant.key}"}) as http:
            assert (await http.get("/api/queue")).json()["data"]["depth"] == "3"  # int64 is a JSON string
            refused = await http.post(f"/api/workflows/{wf.id}/run", json={})
        assert refused.status_code == 429 and "queue is full" in refused.json()["error"]["message"]


async def test_graceful_shutdown_finishes_in_flight_work(tmp_path) -> None:
    async with FakeSlack(delay=0.5) as slack:
        async with core_with(tmp_path, IPAAS_POLL_INTERVAL="0.05") as core:
            api = Api(core.channel, (await core.new_tenant()).md)
            cred = await api.credential("slack", {"webhook_url": slack.url})
            wf = (await api.create({"name": "g", "trigger": {"type": "manual"}, "steps": [slack_step(cred, "drained")]})).workflow
            ex = (await api.run(wf.id)).execution
            await api.wait(ex.id, statuses=("running",))
            await core.server.stop(grace=5)
            assert slack.received == [{"text": "drained"}], "the in-flight step finished before the core stopped"


async def test_a_step_longer_than_its_lease_keeps_the_lease(tmp_path) -> None:
    """The dispatcher extends the leases of what it holds, so a slow step is not claimed (and
    delivered) a second time when its first lease runs out."""
    async with FakeSlack(delay=2.5) as slack:
        async with core_with(tmp_path, IPAAS_POLL_INTERVAL="0.05", IPAAS_LEASE_SECONDS="0.6") as core:
            api = Api(core.channel, (await core.new_tenant()).md)
            cred = await api.credential("slack", {"webhook_url": slack.url})
            wf = (await api.create({"name": "l", "trigger": {"type": "manual"}, "steps": [slack_step(cred, "once")]})).workflow
            ex = (await api.run(wf.id)).execution
            done = await api.wait(ex.id, timeout=15)
            await asyncio.sleep(0.5)  # room for a second claim's delivery, had there been one
            assert done.status == "succeeded" and done.attempts == 1
            assert slack.received == [{"text": "once"}], "four lease lengths long, delivered once"


async def test_shutdown_past_its_deadline_releases_leases(tmp_path) -> None:
    async with FakeSlack(delay=3) as slack:
        async with core_with(tmp_path, IPAAS_POLL_INTERVAL="0.05") as core:
            api = Api(core.channel, (await core.new_tenant()).md)
            cred = await api.credential("slack", {"webhook_url": slack.url})
            wf = (await api.create({"name": "g", "trigger": {"type": "manual"}, "steps": [slack_step(cred, "slow")]})).workflow
            ex = (await api.run(wf.id)).execution
            await api.wait(ex.id, statuses=("running",))
            await core.server.stop(grace=0.2)
        from ipaas.storage.db import Database

        db = Database(f"sqlite:///{tmp_path / 'ipaas.db'}")
        async with db.engine.connect() as conn:
            rows = (await conn.execute(text("SELECT execution_id, lease_owner FROM outbox_tasks"))).all()
        await db.dispose()
        assert [(r.execution_id, r.lease_owner) for r in rows] == [(ex.id, None)], "the unfinished task is handed back at once"


async def test_credential_secret_never_reaches_logs_or_stored_executions(tmp_path, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    token = "S3cretSlackToken0123456789"
    async with FakeSlack(token=token) as slack, core_with(tmp_path, IPAAS_POLL_INTERVAL="0.05", IPAAS_RETRY_BASE_DELAY="0.01") as core:
        url = slack.url
        api = Api(core.channel, (await core.new_tenant()).md)
        cred = await api.credential("slack", {"webhook_url": url})
        wf = (await api.create({"name": "s", "trigger": {"type": "manual"}, "options": {"max_attempts": 2}, "steps": [slack_step(cred, "hi {{user}}")]})).workflow
        ok = await api.wait((await api.run(wf.id, {"user": "a"})).execution.id)
        slack.fail_next(500, times=2)
        failed = await api.wait((await api.run(wf.id, {"user": "b"})).execution.id)
        assert ok.status == "succeeded" and failed.status == "dead"
        assert slack.received == [{"text": "hi a"}]
        async with core.server.db.engine.connect() as conn:
            stored = repr((await conn.execute(text("SELECT * FROM executions"))).all()) + repr((await conn.execute(text("SELECT * FROM execution_steps"))).all())
        answers = str(ok) + str(failed)
    logged = "\n".join(f"{r.getMessage()} {r.__dict__}" for r in caplog.records)
    for where in (stored, answers, logged):
        assert token not in where


@pytest.mark.postgres
async def test_a_database_outage_is_503_with_retry_after_and_one_warning_not_tracebacks(tmp_path, postgres_url: str, caplog) -> None:
    """PostgreSQL cut off (through a proxy): callers got 500 "internal error" with no
    Retry-After, and the core logged a traceback per request and per poll. Now 503 with
    Retry-After, one warning a minute per component, and all is well once it is back."""
    from sqlalchemy.engine import make_url

    from tests.fakes.tcp_proxy import TcpProxy
    from tests.integration.helpers import signed_webhook

    caplog.set_level(logging.INFO)
    real = make_url(postgres_url)
    proxy = await TcpProxy(real.port or 5432).start()
    async with FakeSlack() as slack:
        proxied = real.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
        async with core_with(tmp_path, proxied, IPAAS_POLL_INTERVAL="0.05", IPAAS_SCHEDULER_INTERVAL="0.05") as core, gateway_for(core.target, tmp_path) as url:
            tenant = await core.new_tenant(tier="paid")
            api = Api(core.channel, tenant.md)
            cred = await api.credential("slack", {"webhook_url": slack.url})
            created = await api.create({"name": "w", "trigger": {"type": "webhook"}, "steps": [slack_step(cred)]})
            hook = f"/api/webhooks/{created.workflow.id}"
            async with httpx.AsyncClient(base_url=url, headers={"authorization": f"Bearer {tenant.key}"}, timeout=20) as http:
                await proxy.close()  # refused, and every open connection dropped
                caplog.clear()
                answers = []
                for i in range(5):
                    raw, headers = signed_webhook(created.webhook_secret, {"order": {"id": str(i)}}, f"msg_down{i}")
                    answers.append(await http.post(hook, content=raw, headers={**headers, "content-type": "application/json"}))
                    answers.append(await http.get("/api/workflows"))
                await asyncio.sleep(0.5)  # the dispatcher's and scheduler's polls meet the outage too
                during = list(caplog.records)
                await proxy.start()
                raw, headers = signed_webhook(created.webhook_secret, {"order": {"id": "back"}}, "msg_back")
                back = await http.post(hook, content=raw, headers={**headers, "content-type": "application/json"})
    assert [(a.status_code, a.headers.get("retry-after"), a.json()["error"]["code"], a.json()["error"]["reason"]) for a in answers] == [(503, "5", "unavailable", "DATABASE_UNAVAILABLE")] * 10, [a.text for a in answers]
    assert all("database is unavailable" in a.json()["error"]["message"] for a in answers), [a.json()["error"]["message"] for a in answers]
    tracebacks = [r.getMessage() for r in during if r.exc_info and r.name.startswith("ipaas")]
    assert tracebacks == [], tracebacks
    warned = [r.getMessage() for r in during if r.getMessage().endswith("database_unavailable")]
    assert warned and len(warned) == len(set(warned)), f"one warning per component, not one per request: {warned}"
    await proxy.close()
    assert back.status_code == 202, back.text
