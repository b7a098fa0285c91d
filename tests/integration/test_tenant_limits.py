"""One tenant cannot starve the others (security audit F3), on a real core and gateway: a
tenant's backlog is bounded by its share of the queue, so the others' triggers are still
accepted."""

from __future__ import annotations

import asyncio

import grpc
import httpx
from google.api import httpbody_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from ipaas.v1 import executions_pb2, tenants_pb2, tenants_pb2_grpc
from tests.conftest import core_with, gateway_for
from tests.fakes.slack import FakeSlack
from tests.integration.helpers import Api, signed_webhook, slack_step
from tests.integration.test_error_info import details_of, error_info, refused


async def test_a_tenant_over_its_share_is_refused_and_the_others_webhooks_still_get_in(tmp_path) -> None:
    """Before, the heavy tenant filled the whole queue and the light tenant's signed
    webhooks got 429 QUEUE_FULL."""
    async with FakeSlack() as slack, core_with(tmp_path, IPAAS_DISABLE_ENGINE="1", IPAAS_MAX_QUEUE_DEPTH="4") as core, gateway_for(core.target, tmp_path) as url:
        heavy_tenant, light_tenant = await core.new_tenant(tier="paid", name="heavy"), await core.new_tenant(tier="paid", name="light")
        heavy, light = Api(core.channel, heavy_tenant.md), Api(core.channel, light_tenant.md)
        step = [slack_step(await heavy.credential("slack", {"webhook_url": slack.url}))]
        manual = (await heavy.create({"name": "m", "trigger": {"type": "manual"}, "steps": step})).workflow
        hooked = await heavy.create({"name": "h", "trigger": {"type": "webhook"}, "steps": step})
        victim = await light.create({"name": "v", "trigger": {"type": "webhook"}, "steps": [slack_step(await light.credential("slack", {"webhook_url": slack.url}))]})
        for _ in range(2):  # half of 4, the default share
            await heavy.run(manual.id)
        over = await refused(heavy.run(manual.id))
        assert over.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and error_info(over).reason == "TENANT_QUEUE_FULL", over
        # The tenant can see why: its share beside what it holds (the answer had no share).
        stats = await heavy.executions.GetQueueStats(executions_pb2.GetQueueStatsRequest(), metadata=heavy.md)
        assert (stats.tenant_depth, stats.tenant_max_depth, stats.max_depth) == (2, 2, 4)
        async with httpx.AsyncClient(base_url=url, timeout=10) as http:
            run = await http.post(f"/api/workflows/{manual.id}/run", json={}, headers={"authorization": f"Bearer {heavy_tenant.key}"})
            body, headers = signed_webhook(hooked.webhook_secret, {"n": 1})
            own_webhook = await http.post(f"/api/webhooks/{hooked.workflow.id}", content=body, headers=headers)
            others = []
            for i in range(2):
                body, headers = signed_webhook(victim.webhook_secret, {"n": i}, msg_id=f"msg_{i}")
                others.append(await http.post(f"/api/webhooks/{victim.workflow.id}", content=body, headers=headers))
    for answer in (run, own_webhook):
        assert answer.status_code == 429 and answer.headers.get("retry-after") == "1", answer.text
        assert answer.json()["error"]["reason"] == "TENANT_QUEUE_FULL" and answer.json()["error"]["code"] == "resource_exhausted"
    assert [r.status_code for r in others] == [202, 202], [r.text for r in others]


# A window of 20 s (burst 10 at 0.5/s): every call of a test falls in one window however
# slow the machine, so the counts below are exact.
SLOW_FREE_TIER = {"IPAAS_RATE_LIMITS_OFF": "0", "IPAAS_RATE_FREE": "0.5/10"}


def retry_info(error: grpc.aio.AioRpcError) -> error_details_pb2.RetryInfo:
    status = rpc_status.from_call(error)
    assert status is not None, error
    infos = details_of(status, error_details_pb2.RetryInfo)
    assert len(infos) == 1, status
    return infos[0]


async def test_a_tenant_calling_the_core_directly_gets_its_tiers_rate_limit(tmp_path) -> None:
    """Before, a free-tier key was held to 10 of 40 runs through REST but had 300 direct
    gRPC runs in 0.8 s accepted. Admin calls, webhooks and other tenants are not held."""
    async with FakeSlack() as slack, core_with(tmp_path, IPAAS_DISABLE_ENGINE="1", **SLOW_FREE_TIER) as core:
        free, other = await core.new_tenant(tier="free"), await core.new_tenant(tier="free", name="other")
        api = Api(core.channel, free.md)
        step = [slack_step(await api.credential("slack", {"webhook_url": slack.url}))]
        manual = (await api.create({"name": "m", "trigger": {"type": "manual"}, "steps": step})).workflow
        hooked = await api.create({"name": "h", "trigger": {"type": "webhook"}, "steps": step})
        outcomes = await asyncio.gather(*(api.run(manual.id) for _ in range(40)), return_exceptions=True)
        limited = [o for o in outcomes if isinstance(o, grpc.aio.AioRpcError)]
        assert len(outcomes) - len(limited) == 10 - 3, "the burst, less the three calls of the set-up"
        assert {(e.code(), error_info(e).reason) for e in limited} == {(grpc.StatusCode.RESOURCE_EXHAUSTED, "RATE_LIMITED")}
        wait = retry_info(limited[0]).retry_delay.ToTimedelta().total_seconds()
        assert 0 < wait <= 20, wait

        tenants = tenants_pb2_grpc.TenantServiceStub(core.channel)
        for _ in range(15):
            await tenants.ListTenants(tenants_pb2.ListTenantsRequest(), metadata=core.admin)
            await tenants.GetCaller(tenants_pb2.GetCallerRequest(), metadata=free.md)  # the gateway's check of a key
        body, headers = signed_webhook(hooked.webhook_secret, {"n": 1})
        webhook = await api.executions.ReceiveWebhook(
            executions_pb2.ReceiveWebhookRequest(workflow_id=hooked.workflow.id, http_body=httpbody_pb2.HttpBody(data=body, content_type="application/json"), headers=headers)
        )
        assert webhook.execution_id
        others = Api(core.channel, other.md)
        assert (await others.credential("slack", {"webhook_url": slack.url})).startswith("cr")


async def test_a_rest_caller_gets_its_whole_budget_with_both_layers_limiting(tmp_path, redis_url) -> None:
    """The gateway and the core each limit, in one Redis: each layer has its own budget, so a
    REST caller at its limit is not held to half of it. The core's budget is the tenant's
    whole: what it spent through REST, it cannot spend again calling the core directly."""
    shared = {**SLOW_FREE_TIER, "IPAAS_REDIS_URL": redis_url}
    async with FakeSlack() as slack, core_with(tmp_path, IPAAS_DISABLE_ENGINE="1", **shared) as core, gateway_for(core.target, tmp_path, **shared) as url:
        free = await core.new_tenant(tier="free")
        async with httpx.AsyncClient(base_url=url, headers={"authorization": f"Bearer {free.key}"}, timeout=10) as http:
            cred = (await http.post("/api/credentials", json={"connector": "slack", "name": "c", "secrets": {"webhook_url": slack.url}})).json()["data"]["id"]
            wf = (await http.post("/api/workflows", json={"name": "m", "trigger": {"type": "manual"}, "steps": [slack_step(cred)]})).json()["data"]["workflow"]
            runs = [await http.post(f"/api/workflows/{wf['id']}/run", json={}) for _ in range(40)]
        assert [r.status_code for r in runs] == [202] * 8 + [429] * 32, [r.text for r in runs if r.status_code != 202][:1]
        assert {r.json()["error"]["reason"] for r in runs[8:]} == {"RATE_LIMITED"}
        direct = await refused(Api(core.channel, free.md).run(wf["id"]))
        assert (direct.code(), error_info(direct).reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "RATE_LIMITED")


async def test_a_rest_caller_that_spent_the_cores_budget_directly_gets_429_with_the_cores_wait(tmp_path) -> None:
    async with FakeSlack() as slack, core_with(tmp_path, IPAAS_DISABLE_ENGINE="1", **SLOW_FREE_TIER) as core, gateway_for(core.target, tmp_path, **SLOW_FREE_TIER) as url:
        free = await core.new_tenant(tier="free")
        api = Api(core.channel, free.md)
        manual = (await api.create({"name": "m", "trigger": {"type": "manual"}, "steps": [slack_step(await api.credential("slack", {"webhook_url": slack.url}))]})).workflow
        await asyncio.gather(*(api.run(manual.id) for _ in range(10)), return_exceptions=True)
        async with httpx.AsyncClient(base_url=url, headers={"authorization": f"Bearer {free.key}"}, timeout=10) as http:
            run = await http.post(f"/api/workflows/{manual.id}/run", json={})
    assert run.status_code == 429 and run.json()["error"]["reason"] == "RATE_LIMITED", run.text
    assert 10 <= int(run.headers["retry-after"]) <= 20, "the core's RetryInfo: the window's 20 s, less the time the test took"
