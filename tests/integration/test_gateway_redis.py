"""Two gateway replicas sharing one Redis: one rate-limit budget, one idempotency store."""

from __future__ import annotations

import asyncio
import uuid

import httpx
import pytest
import redis.asyncio as redis

from tests.conftest import core_with, gateway_for
from tests.fakes.slack import FakeSlack

pytestmark = pytest.mark.redis


@pytest.fixture
async def clean_redis(redis_url: str):
    client = redis.from_url(redis_url)
    await client.flushdb()
    yield redis_url
    await client.flushdb()
    await client.aclose()


async def test_two_gateways_share_budget_and_idempotency(tmp_path, clean_redis: str) -> None:
    async with FakeSlack() as slack, core_with(tmp_path, IPAAS_POLL_INTERVAL="0.05") as core:
        async with gateway_for(core.target, tmp_path / "g1", IPAAS_REDIS_URL=clean_redis) as one, gateway_for(core.target, tmp_path / "g2", IPAAS_REDIS_URL=clean_redis) as two:
            free = await core.new_tenant(tier="free")
            auth = {"authorization": f"Bearer {free.key}"}
            async with httpx.AsyncClient(timeout=10, headers=auth) as http:
                cred = await http.post(f"{one}/api/credentials", json={"connector": "slack", "name": "t", "secrets": {"webhook_url": slack.url}})
                wf = await http.post(
                    f"{one}/api/workflows",
                    json={"name": "w", "trigger": {"type": "manual"}, "steps": [{"id": "s", "connector": "slack", "action": "send_message", "config": {"text": "once"}, "credential_id": cred.json()["data"]["id"]}]},
                )
                wf_id = wf.json()["data"]["workflow"]["id"]
                key = {"Idempotency-Key": str(uuid.uuid4())}
                first = await http.post(f"{one}/api/workflows/{wf_id}/run", json={}, headers=key)
                replay = await http.post(f"{two}/api/workflows/{wf_id}/run", json={}, headers=key)
                assert first.status_code == 202 and replay.headers["x-idempotency-replay"] == "true"
                assert replay.json()["data"] == first.json()["data"]

                # 3 requests spent so far (credential, workflow, run); the replay was the 4th.
                answers = await asyncio.gather(*(http.get(f"{(one, two)[i % 2]}/api/workflows") for i in range(12)))
            statuses = [r.status_code for r in answers]
            assert statuses.count(200) == 6 and statuses.count(429) == 6, statuses
        for _ in range(100):
            if slack.received:
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.2)
        assert slack.received == [{"text": "once"}]


async def test_refused_webhooks_do_not_spend_the_shared_budget(tmp_path, clean_redis: str) -> None:
    """With Redis too, a webhook only looks at its owner's budget before the core answers
    (limits' test() on the shared window) and spends it once accepted."""
    from tests.integration.helpers import signed_webhook

    async with FakeSlack() as slack, core_with(tmp_path, IPAAS_POLL_INTERVAL="0.05") as core:
        async with gateway_for(core.target, tmp_path / "g1", IPAAS_REDIS_URL=clean_redis, IPAAS_RATE_FREE="1/10") as url:
            free = await core.new_tenant(tier="free")
            async with httpx.AsyncClient(base_url=url, timeout=10, headers={"authorization": f"Bearer {free.key}"}) as http, httpx.AsyncClient(base_url=url, timeout=10) as anonymous:
                cred = await http.post("/api/credentials", json={"connector": "slack", "name": "t", "secrets": {"webhook_url": slack.url}})
                wf = await http.post(
                    "/api/workflows",
                    json={"name": "w", "trigger": {"type": "webhook"}, "steps": [{"id": "s", "connector": "slack", "action": "send_message", "config": {"text": "x"}, "credential_id": cred.json()["data"]["id"]}]},
                )
                hook, secret = f"/api/webhooks/{wf.json()['data']['workflow']['id']}", wf.json()["data"]["webhook_secret"]
                raw, signed = signed_webhook(secret, {"n": 1}, "evt_1")
                assert (await anonymous.post(hook, content=raw, headers=signed)).headers["x-ratelimit-remaining"] == "7"
                refused = [await anonymous.post(hook, content=b"{}", headers={"content-type": "application/json"}) for _ in range(10)]
                assert [r.status_code for r in refused] == [401] * 10
                assert (await http.get("/api/workflows")).headers["x-ratelimit-remaining"] == "6"
