"""The core's opt-in Prometheus listener (IPAAS_CORE_METRICS_LISTEN): a real core on a free
port, scraped over real HTTP and read with prometheus_client's own parser."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from ipaas.settings import Settings
from tests.conftest import core_with, gateway_for, make_settings, start_core
from tests.fakes.slack import FakeSlack
from tests.integration.helpers import Api, signed_webhook, slack_step

METRICS = {"IPAAS_CORE_METRICS_LISTEN": "127.0.0.1:0", "IPAAS_RETRY_BASE_DELAY": "0.01", "IPAAS_POLL_INTERVAL": "0.05"}


async def scrape(core) -> tuple[dict, str]:  # type: ignore[no-untyped-def]
    async with httpx.AsyncClient(timeout=10) as http:
        response = await http.get(f"http://127.0.0.1:{core.server.metrics.port}/metrics")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    samples = {(s.name, frozenset(s.labels.items())): s.value for family in text_string_to_metric_families(response.text) for s in family.samples}
    return samples, response.text


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


async def eventually(core, check, what: str, timeout: float = 15.0) -> dict:  # type: ignore[no-untyped-def]
    """Scrapes until check(samples) holds (engine processes report once a second)."""
    deadline = time.monotonic() + timeout
    while True:
        samples, _ = await scrape(core)
        if check(samples):
            return samples
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}: {sorted((k[0], sorted(k[1]), v) for k, v in samples.items() if k[0].startswith('ipaas_'))}")
        await asyncio.sleep(0.1)


async def test_executions_webhooks_schedules_and_breakers_are_counted(tmp_path) -> None:
    async with FakeSlack() as slack, core_with(tmp_path, **METRICS, IPAAS_BREAKER_FAILURES="1", IPAAS_SCHEDULER_INTERVAL="0.2") as core, gateway_for(core.target, tmp_path) as url:
        tenant = await core.new_tenant()
        api = Api(core.channel, tenant.md)
        cred = await api.credential("slack", {"webhook_url": slack.url})
        samples, _ = await scrape(core)
        assert value(samples, "ipaas_core_executions_finished_total", status="succeeded", connector="slack") == 0
        assert value(samples, "ipaas_core_engine_processes") == 0  # IPAAS_ENGINE_PROCESSES=0: in the core

        manual = (await api.create({"name": "m", "trigger": {"type": "manual"}, "options": {"max_attempts": 1}, "steps": [slack_step(cred, "x")]})).workflow
        runs = [(await api.run(manual.id)).execution.id for _ in range(2)]
        for execution_id in runs:
            assert (await api.wait(execution_id)).status == "succeeded"
        samples, _ = await scrape(core)
        assert value(samples, "ipaas_core_executions_finished_total", status="succeeded", connector="slack") == 2

        hook = (await api.create({"name": "h", "trigger": {"type": "webhook"}, "steps": [slack_step(cred, "y")]}))
        body, headers = signed_webhook(hook.webhook_secret, {"order": {"id": 1}}, msg_id="msg_metrics")
        async with httpx.AsyncClient(base_url=url, timeout=10) as http:
            for _ in range(2):  # the repeat is answered 202 as a duplicate
                assert (await http.post(f"/api/webhooks/{hook.workflow.id}", content=body, headers=headers)).status_code == 202
        samples, _ = await scrape(core)
        assert value(samples, "ipaas_core_webhooks_accepted_total") == 2

        # One failure opens the tenant's slack breaker (IPAAS_BREAKER_FAILURES=1).
        slack.fail_next(500)
        failed = await api.wait((await api.run(manual.id)).execution.id)
        assert failed.status == "dead"
        samples, text = await scrape(core)
        assert value(samples, "ipaas_core_executions_finished_total", status="dead", connector="slack") == 1
        assert value(samples, "ipaas_core_breakers", state="open", connector="slack") == 1

        await api.create({"name": "s", "trigger": {"type": "schedule", "interval_seconds": 1}, "steps": [slack_step(cred, "z")]})
        await eventually(core, lambda s: value(s, "ipaas_core_schedules_fired_total") >= 1, "a schedule fire")

        _, text = await scrape(core)
        for secret in (tenant.tenant_id, tenant.key, manual.id, hook.workflow.id, runs[0], cred):
            assert secret not in text, secret


async def test_the_outbox_backlog_is_counted_at_scrape_time(tmp_path) -> None:
    async with core_with(tmp_path, **METRICS, IPAAS_DISABLE_ENGINE="1", IPAAS_MAX_QUEUE_DEPTH="50") as core:
        tenant = await core.new_tenant()
        api = Api(core.channel, tenant.md)
        cred = await api.credential("slack", {"webhook_url": "http://127.0.0.1:9/services/T0/B0/x"})
        wf = (await api.create({"name": "q", "trigger": {"type": "manual"}, "steps": [slack_step(cred, "x")]})).workflow
        samples, _ = await scrape(core)
        assert value(samples, "ipaas_core_outbox_tasks") == 0 and value(samples, "ipaas_core_outbox_max_tasks") == 50
        for _ in range(3):
            await api.run(wf.id)
        samples, _ = await scrape(core)
        assert value(samples, "ipaas_core_outbox_tasks") == 3


async def test_engine_processes_report_what_they_finished_across_a_restart(tmp_path) -> None:
    async with FakeSlack() as slack, core_with(tmp_path, **METRICS, IPAAS_ENGINE_PROCESSES="1") as core:
        processes = core.server.processes
        tenant = await core.new_tenant()
        api = Api(core.channel, tenant.md)
        cred = await api.credential("slack", {"webhook_url": slack.url})
        wf = (await api.create({"name": "p", "trigger": {"type": "manual"}, "steps": [slack_step(cred, "x")]})).workflow

        async def run(n: int) -> None:
            for execution_id in [(await api.run(wf.id)).execution.id for _ in range(n)]:
                assert (await api.wait(execution_id)).status == "succeeded"

        await run(3)
        await eventually(core, lambda s: value(s, "ipaas_core_executions_finished_total", status="succeeded", connector="slack") == 3 and value(s, "ipaas_core_engine_processes") == 1, "the child's count")
        victim = processes.pids()[0]
        os.kill(victim, signal.SIGKILL)
        samples = await eventually(core, lambda s: value(s, "ipaas_core_engine_processes") == 0, "the dead child", timeout=5)
        assert value(samples, "ipaas_core_engine_processes_wanted") == 1
        deadline = time.monotonic() + 20
        while victim in processes.pids() or processes.alive() != 1:
            assert time.monotonic() < deadline, "no new child"
            await asyncio.sleep(0.05)
        await run(2)
        # A new child counts from 0; the core's total goes on from 3 (never back to 2).
        samples = await eventually(core, lambda s: value(s, "ipaas_core_executions_finished_total", status="succeeded", connector="slack") >= 5, "the new child's count")
        assert value(samples, "ipaas_core_executions_finished_total", status="succeeded", connector="slack") == 5


async def test_the_listener_serves_only_get_metrics(tmp_path) -> None:
    async with core_with(tmp_path, **METRICS) as core, httpx.AsyncClient(base_url=f"http://127.0.0.1:{core.server.metrics.port}", timeout=10) as http:
        assert (await http.head("/metrics")).status_code == 200
        assert (await http.post("/metrics")).status_code == 405
        assert (await http.get("/")).status_code == 404
        om = await http.get("/metrics", headers={"accept": "application/openmetrics-text; version=1.0.0"})
        assert om.headers["content-type"].startswith("application/openmetrics-text") and om.text.endswith("# EOF\n")


async def test_no_listener_unless_an_address_is_given(tmp_path) -> None:
    async with core_with(tmp_path) as core:
        assert core.server.metrics is None


@pytest.mark.parametrize("address", ["9464", "localhost", "127.0.0.1:99999", "http://127.0.0.1:9464"])
async def test_a_bad_listen_address_stops_the_core(tmp_path, address) -> None:
    with pytest.raises(SystemExit, match="IPAAS_CORE_METRICS_LISTEN"):
        async for _ in start_core(make_settings(tmp_path, IPAAS_CORE_METRICS_LISTEN=address)):
            pass


async def test_a_port_in_use_stops_the_core_with_one_line(tmp_path) -> None:
    async with core_with(tmp_path, **METRICS) as first:
        taken = f"127.0.0.1:{first.server.metrics.port}"
        settings = Settings.from_env({**make_settings(tmp_path / "b").extra, "IPAAS_CORE_METRICS_LISTEN": taken, "IPAAS_DATABASE_URL": f"sqlite:///{tmp_path / 'b.db'}", "IPAAS_DATA_DIR": str(tmp_path / "b")})
        with pytest.raises(SystemExit, match=f"cannot listen on {taken}"):
            async for _ in start_core(settings):
                pass
