"""One tenant cannot starve the others (security audit F3), on a real core and gateway: a
tenant's backlog is bounded by its share of the queue, so the others' triggers are still
accepted."""

from __future__ import annotations

import grpc
import httpx

from tests.conftest import core_with, gateway_for
from tests.fakes.slack import FakeSlack
from tests.integration.helpers import Api, signed_webhook, slack_step
from tests.integration.test_error_info import error_info, refused


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
