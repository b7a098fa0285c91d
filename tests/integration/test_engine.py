"""The execution engine end to end: a real core, real SQLite, fake upstreams on loopback."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import logging
import time
from datetime import datetime, timedelta, timezone

import grpc
import pytest
from google.api import httpbody_pb2
from sqlalchemy import func, select

from ipaas.storage.tables import Execution, OutboxTask, WorkflowVersion
from ipaas.v1 import executions_pb2, tenants_pb2, workflows_pb2
from ipaas.v1.tenants_pb2_grpc import TenantServiceStub
from tests.conftest import core_with
from tests.fakes.discord import FakeDiscord
from tests.fakes.openweather import API_KEY, FakeOpenWeather
from tests.fakes.slack import FakeSlack
from tests.integration.helpers import Api, signed_headers, signed_webhook, slack_step, value, workflow

FAST = {"IPAAS_RETRY_BASE_DELAY": "0.01", "IPAAS_POLL_INTERVAL": "0.05", "IPAAS_BREAKER_RECOVERY_SECONDS": "1.5"}


async def rows(core, table) -> int:  # type: ignore[no-untyped-def]
    async with core.server.db.session() as s:
        return int(await s.scalar(select(func.count()).select_from(table)))


@pytest.fixture
async def env(tmp_path, monkeypatch):
    async with FakeSlack() as slack, FakeOpenWeather() as weather:
        monkeypatch.setenv("IPAAS_OPENWEATHER_BASE_URL", weather.base_url)
        async with core_with(tmp_path, **FAST) as core:
            tenant = await core.new_tenant()
            api = Api(core.channel, tenant.md)
            yield core, api, slack, weather


async def _put_back(api, execution_id: str):  # type: ignore[no-untyped-def]
    """The execution once the engine has put it back in the queue (next_attempt_at set),
    or as it is after 3 s."""
    for _ in range(150):
        ex = await api.execution(execution_id)
        if ex.HasField("next_attempt_at"):
            break
        await asyncio.sleep(0.02)
    return ex


async def test_two_step_workflow_maps_weather_into_slack(env) -> None:
    core, api, slack, weather = env
    wcred = await api.credential("openweather", {"api_key": API_KEY})
    scred = await api.credential("slack", {"webhook_url": slack.url})
    wf = (
        await api.create(
            {
                "name": "morning",
                "trigger": {"type": "manual"},
                "steps": [
                    {"id": "weather", "connector": "openweather", "action": "current_weather", "config": {"city": "{{city}}", "units": "metric"}, "credential_id": wcred},
                    slack_step(scred, "{{steps.weather.city}}: {{steps.weather.temperature}}°C, {{steps.weather.description}}"),
                ],
            }
        )
    ).workflow
    accepted = await api.run(wf.id, {"city": "Paris"})
    done = await api.wait(accepted.execution.id)
    assert done.status == "succeeded", done
    assert slack.received == [{"text": "Paris: 21.5°C, clear sky"}]
    assert [s.status for s in done.steps] == ["succeeded", "succeeded"]
    assert done.steps[0].output["temperature"] == 21.5
    assert "api_key" not in str(done) and API_KEY not in str(done)


async def test_a_field_that_is_one_template_keeps_the_values_type(env) -> None:
    """"{{loc.lat}}" fills a number field with the number (as text it failed the schema on
    every run, without calling the connector); where the schema asks for a string, a number
    is still written as text."""
    core, api, slack, weather = env
    wcred = await api.credential("openweather", {"api_key": API_KEY})
    scred = await api.credential("slack", {"webhook_url": slack.url})
    wf = (
        await api.create(
            {
                "name": "by coordinates",
                "trigger": {"type": "manual"},
                "steps": [
                    {"id": "weather", "connector": "openweather", "action": "current_weather", "config": {"lat": "{{loc.lat}}", "lon": "{{loc.lon}}"}, "credential_id": wcred},
                    slack_step(scred, "{{order.id}}"),
                ],
            }
        )
    ).workflow
    done = await api.wait((await api.run(wf.id, {"loc": {"lat": 48.85, "lon": 2.35}, "order": {"id": 7}})).execution.id)
    assert done.status == "succeeded", done
    assert [(q["lat"], q["lon"]) for q in weather.received] == [("48.85", "2.35")]
    assert slack.received == [{"text": "7"}]
    assert done.steps[0].rendered_config["lat"] == 48.85


async def test_an_executions_log_lines_name_its_tenant_and_workflow(env) -> None:
    """An operator tracing a failed delivery starts from the tenant or the workflow: every
    line about an execution carries both (it carried the execution id alone)."""
    import io
    import json
    import logging

    from ipaas.logs import JsonFormatter

    core, api, slack, _ = env
    scred = await api.credential("slack", {"webhook_url": slack.url})
    wf = (await api.create({"name": "traced", "trigger": {"type": "manual"}, "steps": [slack_step(scred, "hi")]})).workflow
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    root, engine = logging.getLogger(), logging.getLogger("ipaas.engine")
    root.addHandler(handler)
    levels = root.level, engine.level
    root.setLevel(logging.INFO)
    engine.setLevel(logging.INFO)  # other tests may have left it quieter
    try:
        done = await api.wait((await api.run(wf.id)).execution.id)
    finally:
        root.removeHandler(handler)
        root.setLevel(levels[0])
        engine.setLevel(levels[1])
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    finished = [line for line in lines if line["event"] == "execution.finished" and line.get("execution_id") == done.id]
    assert len(finished) == 1 and finished[0]["workflow_id"] == wf.id and finished[0]["tenant_id"].startswith("tn_"), lines
    assert 0 < finished[0]["duration_ms"] < 30_000, finished


async def test_signed_webhooks_are_accepted_and_bad_ones_refused(env) -> None:
    core, api, slack, _ = env
    scred = await api.credential("slack", {"webhook_url": slack.url})
    created = await api.create({"name": "hook", "trigger": {"type": "webhook"}, "steps": [slack_step(scred)]})
    wf_id, secret = created.workflow.id, created.webhook_secret

    async def send(body: bytes, headers: dict[str, str]) -> executions_pb2.ReceiveWebhookResponse:
        request = executions_pb2.ReceiveWebhookRequest(workflow_id=wf_id, http_body=httpbody_pb2.HttpBody(content_type="application/json", data=body), headers=headers)
        return await api.executions.ReceiveWebhook(request)  # no API key: the signature authenticates

    payload = {"order": {"id": "A-1"}, "user": {"name": "Alex"}}
    bad = []
    raw, headers = signed_webhook(secret, payload, "msg_bad1")
    bad.append((raw, {**headers, "webhook-signature": "v1,AAAA"}))
    bad.append((raw, {k: v for k, v in headers.items() if k != "webhook-signature"}))
    bad.append(signed_webhook(secret, payload, "msg_old", when=datetime.now(timezone.utc) - timedelta(minutes=10)))
    bad.append(signed_webhook("whsec_" + "A" * 43 + "=", payload, "msg_other_secret"))
    bad.append((raw.replace(b"A-1", b"A-2"), headers))  # tampered body
    for body, hdrs in bad:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await send(body, hdrs)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert await rows(core, Execution) == 0, "a refused webhook creates nothing"

    raw, headers = signed_webhook(secret, payload, "msg_1")
    first = await send(raw, headers)
    again = await send(raw, headers)
    assert not first.duplicate and again.duplicate and again.execution_id == first.execution_id
    done = await api.wait(first.execution_id)
    assert done.status == "succeeded" and done.trigger == "webhook"
    assert slack.received == [{"text": "Order A-1 for Alex"}], "a repeated webhook-id runs once"

    with pytest.raises(grpc.aio.AioRpcError) as err:
        await send(b"not json", signed_webhook(secret, {}, "msg_2")[1] | {"webhook-signature": signed_webhook(secret, {}, "msg_2")[1]["webhook-signature"]})
    assert err.value.code() in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.INVALID_ARGUMENT)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await api.executions.ReceiveWebhook(executions_pb2.ReceiveWebhookRequest(workflow_id="wf_unknown", http_body=httpbody_pb2.HttpBody(data=raw), headers=headers))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    # A correctly signed body that is not UTF-8 is a body problem, not a signature one.
    key = base64.b64decode(secret.removeprefix("whsec_"))
    stamp = str(int(time.time()))
    mac = hmac.new(key, f"msg_3.{stamp}.".encode() + b"\xff\xfe", hashlib.sha256).digest()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await send(b"\xff\xfe", {"webhook-id": "msg_3", "webhook-timestamp": stamp, "webhook-signature": "v1," + base64.b64encode(mac).decode()})
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "UTF-8" in (err.value.details() or "")


async def test_webhooks_in_one_batch_are_answered_one_by_one(env) -> None:
    """ReceiveWebhooks: each item gets what ReceiveWebhook would have answered it alone."""
    from google.rpc import code_pb2, error_details_pb2

    core, api, slack, _ = env
    scred = await api.credential("slack", {"webhook_url": slack.url})
    created = await api.create({"name": "hook", "trigger": {"type": "webhook"}, "steps": [slack_step(scred)]})
    wf_id, secret = created.workflow.id, created.webhook_secret

    def item(body: bytes, headers: dict[str, str], workflow_id: str = wf_id, key: str = "") -> executions_pb2.WebhookDelivery:
        hook = executions_pb2.ReceiveWebhookRequest(workflow_id=workflow_id, http_body=httpbody_pb2.HttpBody(data=body), headers=headers)
        return executions_pb2.WebhookDelivery(webhook=hook, request_id="req-1", idempotency_key=key)

    good = [signed_webhook(secret, {"order": {"id": f"B-{i}"}, "user": {"name": "Alex"}}, f"batch_{i}") for i in range(3)]
    raw, headers = good[0]
    batch = [
        item(*good[0]),
        item(raw, {**headers, "webhook-signature": "v1,AAAA"}),
        item(*good[1]),
        item(raw, headers, workflow_id="wf_unknown"),
        item(*good[0]),  # the same webhook-id again, in the same batch
        item(b"x" * (1024 * 1024 + 1), headers),
        item(*good[2]),
    ]
    reply = await api.executions.ReceiveWebhooks(executions_pb2.ReceiveWebhooksRequest(webhooks=batch))
    results = list(reply.results)
    assert [r.WhichOneof("result") for r in results] == ["accepted", "error", "accepted", "error", "accepted", "error", "accepted"]
    assert results[1].error.code == code_pb2.UNAUTHENTICATED and "signature" in results[1].error.message
    assert results[3].error.code == code_pb2.NOT_FOUND
    assert results[5].error.code == code_pb2.INVALID_ARGUMENT
    bad = error_details_pb2.BadRequest()
    assert results[5].error.details[0].Unpack(bad) and bad.field_violations[0].field == "http_body.data"
    assert not results[0].accepted.duplicate and results[4].accepted.duplicate
    assert results[4].accepted.execution_id == results[0].accepted.execution_id
    caller = await TenantServiceStub(core.channel).GetCaller(tenants_pb2.GetCallerRequest(), metadata=api.md)
    assert {(r.tenant_id, r.tier) for r in results if r.HasField("accepted")} == {(caller.tenant_id, caller.tier)}
    assert not any(r.tenant_id for r in results if r.HasField("error")), "a refused item names no owner"
    for r in (results[0], results[2], results[6]):
        assert (await api.wait(r.accepted.execution_id)).status == "succeeded"
    assert sorted(m["text"] for m in slack.received) == ["Order B-0 for Alex", "Order B-1 for Alex", "Order B-2 for Alex"]
    assert await rows(core, Execution) == 3

    empty = await api.executions.ReceiveWebhooks(executions_pb2.ReceiveWebhooksRequest())
    assert list(empty.results) == []
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await api.executions.ReceiveWebhooks(executions_pb2.ReceiveWebhooksRequest(webhooks=[item(*good[0])] * 513))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "at most 512" in err.value.details()


async def test_rotated_secret_keeps_the_old_one_valid_during_the_grace_period(env) -> None:
    core, api, slack, _ = env
    scred = await api.credential("slack", {"webhook_url": slack.url})
    created = await api.create({"name": "hook", "trigger": {"type": "webhook"}, "steps": [slack_step(scred)]})
    rotated = await api.workflows.RotateWebhookSecret(workflows_pb2.RotateWebhookSecretRequest(id=created.workflow.id, grace_period_seconds=3600), metadata=api.md)
    for n, secret in enumerate((created.webhook_secret, rotated.webhook_secret)):
        raw, headers = signed_webhook(secret, {"order": {"id": n}}, f"m{n}")
        await api.executions.ReceiveWebhook(executions_pb2.ReceiveWebhookRequest(workflow_id=created.workflow.id, http_body=httpbody_pb2.HttpBody(data=raw), headers=headers))
    await api.workflows.RotateWebhookSecret(workflows_pb2.RotateWebhookSecretRequest(id=created.workflow.id, revoke_previous=True), metadata=api.md)
    raw, headers = signed_webhook(rotated.webhook_secret, {"x": 1}, "m9")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await api.executions.ReceiveWebhook(executions_pb2.ReceiveWebhookRequest(workflow_id=created.workflow.id, http_body=httpbody_pb2.HttpBody(data=raw), headers=headers))
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_retry_after_is_honoured_and_5xx_retried(env) -> None:
    core, api, slack, _ = env
    scred = await api.credential("slack", {"webhook_url": slack.url})
    wf = (await api.create({"name": "r", "trigger": {"type": "manual"}, "steps": [slack_step(scred, "hi")]})).workflow
    slack.fail_next(429, retry_after=1)
    slack.fail_next(503)
    started = time.monotonic()
    ex = await api.wait((await api.run(wf.id)).execution.id)
    assert ex.status == "succeeded" and ex.attempts == 3
    assert time.monotonic() - started >= 1.0, "the upstream's Retry-After was honoured"
    assert slack.requests == 3 and len(slack.received) == 1


async def test_permanent_errors_fail_at_once(env) -> None:
    core, api, slack, _ = env
    scred = await api.credential("slack", {"webhook_url": slack.url})
    wf = (await api.create({"name": "p", "trigger": {"type": "manual"}, "steps": [slack_step(scred, "hi")]})).workflow
    slack.fail_next(400)
    ex = await api.wait((await api.run(wf.id)).execution.id)
    assert ex.status == "failed" and ex.attempts == 1 and slack.requests == 1
    assert "invalid_payload" in ex.error and ex.steps[0].retryable is False


async def test_exhausted_executions_are_dead_and_replay_resumes(env) -> None:
    core, api, slack, weather = env
    wcred = await api.credential("openweather", {"api_key": API_KEY})
    scred = await api.credential("slack", {"webhook_url": slack.url})
    wf = (
        await api.create(
            {
                "name": "d",
                "trigger": {"type": "manual"},
                "options": {"max_attempts": 2},
                "steps": [
                    {"id": "weather", "connector": "openweather", "action": "current_weather", "config": {"city": "London"}, "credential_id": wcred},
                    slack_step(scred, "{{steps.weather.temperature}}"),
                ],
            }
        )
    ).workflow
    slack.fail_next(500, times=2)
    ex = await api.wait((await api.run(wf.id)).execution.id)
    assert ex.status == "dead" and ex.attempts == 2
    assert len(weather.received) == 1, "the succeeded first step is not repeated on retry"
    dead = await api.executions.ListExecutions(executions_pb2.ListExecutionsRequest(status="dead"), metadata=api.md)
    assert [e.id for e in dead.executions] == [ex.id]

    replayed = await api.executions.ReplayExecution(executions_pb2.ReplayExecutionRequest(id=ex.id), metadata=api.md)
    assert replayed.execution.status == "queued"
    done = await api.wait(ex.id)
    assert done.status == "succeeded"
    assert len(weather.received) == 1 and slack.received == [{"text": "14"}]
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await api.executions.ReplayExecution(executions_pb2.ReplayExecutionRequest(id=ex.id), metadata=api.md)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION


async def test_breaker_opens_fails_fast_and_recovers(env) -> None:
    core, api, slack, _ = env
    scred = await api.credential("slack", {"webhook_url": slack.url})
    wf = (await api.create({"name": "b", "trigger": {"type": "manual"}, "options": {"max_attempts": 1}, "steps": [slack_step(scred, "x")]})).workflow
    slack.fail_next(500, times=5)
    for _ in range(5):
        assert (await api.wait((await api.run(wf.id)).execution.id)).status == "dead"
    from ipaas.v1 import breakers_pb2, breakers_pb2_grpc

    stub = breakers_pb2_grpc.BreakerServiceStub(core.channel)
    (state,) = (await stub.ListBreakers(breakers_pb2.ListBreakersRequest(), metadata=api.md)).breakers
    assert (state.connector, state.state, state.failure_count) == ("slack", "open", 5)

    calls_while_open = slack.requests
    deferred = (await api.run(wf.id)).execution.id
    ex = await _put_back(api, deferred)
    assert ex.status == "queued" and "circuit open" in ex.error
    assert ex.attempts == 0, "deferral spends no attempt"
    assert slack.requests == calls_while_open, "no request reaches the upstream while the breaker is open"
    done = await api.wait(deferred, timeout=10)
    assert done.status == "succeeded", "after the recovery timeout the breaker half-opens and lets it through"
    (state,) = (await stub.ListBreakers(breakers_pb2.ListBreakersRequest(), metadata=api.md)).breakers
    assert state.state == "half_open" and state.success_count == 1


async def test_permanent_failures_in_half_open_do_not_wedge_the_breaker(env) -> None:
    # Half-open lets 3 trials through; a trial that failed permanently (one workflow's
    # revoked webhook: 404) never gave its slot back. After 3 such trials every execution
    # for the connector was deferred each second, for good, the healthy upstream never tried.
    core, api, slack, _ = env
    good = await api.credential("slack", {"webhook_url": slack.url}, name="good")
    revoked = await api.credential("slack", {"webhook_url": slack.url[:-4] + "GONE"}, name="revoked")
    options = {"max_attempts": 1}
    wf_good = (await api.create({"name": "g", "trigger": {"type": "manual"}, "options": options, "steps": [slack_step(good, "x")]})).workflow
    wf_bad = (await api.create({"name": "b", "trigger": {"type": "manual"}, "options": options, "steps": [slack_step(revoked, "x")]})).workflow
    slack.fail_next(503, times=5)
    for _ in range(5):
        assert (await api.wait((await api.run(wf_good.id)).execution.id)).status == "dead"
    ((tenant_id, _),) = core.server.breakers.all_snapshots()
    breaker = core.server.breakers.get(tenant_id, "slack")
    assert breaker.state == "open"
    await asyncio.sleep(max(breaker.open_remaining, 0) + 0.05)
    for _ in range(3):
        ex = await api.wait((await api.run(wf_bad.id)).execution.id)
        assert ex.status == "failed" and "404" in ex.error, ex
    assert breaker.state == "half_open"
    ex = await api.wait((await api.run(wf_good.id)).execution.id, timeout=4)
    assert ex.status == "succeeded", ex
    assert slack.received == [{"text": "x"}]


async def test_rate_limits_on_one_webhook_do_not_block_the_tenants_other_webhooks(tmp_path) -> None:
    # Discord limits each webhook on its own. Five 429s from one busy webhook opened the
    # tenant's whole discord breaker: a message to another, healthy webhook waited 60 s.
    fast = {"IPAAS_RETRY_BASE_DELAY": "0.01", "IPAAS_POLL_INTERVAL": "0.05"}  # the breaker's own 60 s
    async with FakeDiscord() as busy, FakeDiscord() as healthy, core_with(tmp_path, **fast) as core:
        api = Api(core.channel, (await core.new_tenant()).md)
        steps = []
        for upstream in (busy, healthy):
            cred = await api.credential("discord", {"webhook_url": upstream.url}, name=str(upstream.port))
            steps.append({"id": "post", "connector": "discord", "action": "post_message", "config": {"content": "hi {{n}}"}, "credential_id": cred})
        options = {"max_attempts": 1}
        to_busy, to_healthy = [(await api.create({"name": f"w{i}", "trigger": {"type": "manual"}, "options": options, "steps": [step]})).workflow for i, step in enumerate(steps)]
        busy.fail_next(429, times=5, retry_after=0.05)
        for n in range(5):
            ex = await api.wait((await api.run(to_busy.id, {"n": n})).execution.id)
            assert ex.status == "dead" and "429" in ex.error, ex
        ex = await api.wait((await api.run(to_healthy.id, {"n": 99})).execution.id, timeout=3)
        assert ex.status == "succeeded", ex
        assert healthy.received == [{"content": "hi 99"}]
        from ipaas.v1 import breakers_pb2, breakers_pb2_grpc

        listed = (await breakers_pb2_grpc.BreakerServiceStub(core.channel).ListBreakers(breakers_pb2.ListBreakersRequest(), metadata=api.md)).breakers
        assert [(b.state, b.failure_count) for b in listed] in ([], [("closed", 0)]), listed


async def test_a_rate_limit_in_half_open_gives_its_trial_back(env) -> None:
    # A 429 counted as a failure: in half-open one rate-limited trial re-opened the breaker
    # for another recovery period, although the upstream had answered.
    core, api, slack, _ = env
    scred = await api.credential("slack", {"webhook_url": slack.url})
    wf = (await api.create({"name": "h", "trigger": {"type": "manual"}, "options": {"max_attempts": 1}, "steps": [slack_step(scred, "x")]})).workflow
    slack.fail_next(503, times=5)
    for _ in range(5):
        assert (await api.wait((await api.run(wf.id)).execution.id)).status == "dead"
    ((tenant_id, _),) = core.server.breakers.all_snapshots()
    breaker = core.server.breakers.get(tenant_id, "slack")
    assert breaker.state == "open"
    await asyncio.sleep(max(breaker.open_remaining, 0) + 0.05)
    slack.fail_next(429, times=3, retry_after=0.01)
    for _ in range(3):
        ex = await api.wait((await api.run(wf.id)).execution.id, timeout=4)
        assert ex.status == "dead" and "429" in ex.error, ex
    assert (breaker.state, breaker.snapshot().success_count) == ("half_open", 0)
    ex = await api.wait((await api.run(wf.id)).execution.id, timeout=4)
    assert ex.status == "succeeded", ex


def _plain_retryable_plugin(core) -> None:  # type: ignore[no-untyped-def]
    """A third-party connector that checks the status itself and raises a plain
    RetryableError, without RateLimited or the SDK's raise_for_status."""
    from ipaas.sdk import Action, ActionResult, Connector, RetryableError

    async def post(ctx):  # type: ignore[no-untyped-def]
        response = await ctx.http.post(ctx.config["url"], json={"text": "hi"})
        if response.status_code >= 400:
            raise RetryableError(f"chat answered {response.status_code}")
        return ActionResult(message="posted")

    core.server.registry.add(Connector("chat", "1", "d", [Action("post", "Post.", post)]), "ipaas-chat")


async def test_a_plain_retryable_error_for_a_429_does_not_open_the_breaker(env) -> None:
    # Only RateLimited was kept out of the breaker: a plugin raising a plain RetryableError
    # for a 429 had five of them, from one busy target, open the tenant's breaker for every
    # target of the connector. 5xx still open it.
    from ipaas.v1 import breakers_pb2, breakers_pb2_grpc

    core, api, healthy, _ = env
    _plain_retryable_plugin(core)
    breakers = breakers_pb2_grpc.BreakerServiceStub(core.channel)
    async with FakeSlack() as busy:
        to_busy, to_healthy = [
            (await api.create({"name": f"w{i}", "trigger": {"type": "manual"}, "options": {"max_attempts": 1}, "steps": [{"id": "s", "connector": "chat", "action": "post", "config": {"url": upstream.url}}]})).workflow
            for i, upstream in enumerate((busy, healthy))
        ]
        busy.fail_next(429, times=5, retry_after=0)
        for _ in range(5):
            ex = await api.wait((await api.run(to_busy.id)).execution.id)
            assert ex.status == "dead" and "429" in ex.error, ex
        listed = (await breakers.ListBreakers(breakers_pb2.ListBreakersRequest(), metadata=api.md)).breakers
        assert [(b.state, b.failure_count) for b in listed] in ([], [("closed", 0)]), listed
        ex = await api.wait((await api.run(to_healthy.id)).execution.id, timeout=3)
        assert ex.status == "succeeded" and healthy.received == [{"text": "hi"}], ex
        busy.fail_next(500, times=5)
        for _ in range(5):
            ex = await api.wait((await api.run(to_busy.id)).execution.id)
            assert ex.status == "dead" and "500" in ex.error, ex
        listed = (await breakers.ListBreakers(breakers_pb2.ListBreakersRequest(), metadata=api.md)).breakers
        assert [(b.connector, b.state) for b in listed] == [("chat", "open")], listed


async def test_the_retry_after_of_a_429_is_honoured_when_the_plugin_gives_none(env) -> None:
    core, api, slack, _ = env
    _plain_retryable_plugin(core)
    wf = (await api.create({"name": "w", "trigger": {"type": "manual"}, "options": {"max_attempts": 3}, "steps": [{"id": "s", "connector": "chat", "action": "post", "config": {"url": slack.url}}]})).workflow
    slack.fail_next(429, retry_after=30)
    ex_id = (await api.run(wf.id)).execution.id
    ex = await _put_back(api, ex_id)
    assert ex.status == "queued" and "429" in ex.error, ex
    wait = ex.next_attempt_at.ToDatetime(tzinfo=timezone.utc) - datetime.now(timezone.utc)
    assert timedelta(seconds=25) < wait <= timedelta(seconds=30) and slack.requests == 1, wait


async def test_a_half_open_breaker_defers_its_backlog_once_per_trial_period(tmp_path, caplog) -> None:
    # With its 3 trials in flight, a half-open breaker told every other task to come back
    # in a second: 200 queued tasks were claimed and requeued ~1,000 times in 5 s (two
    # writes each, on SQLite through the write lock ingest needs) for 3 upstream calls.
    caplog.set_level(logging.INFO, logger="ipaas.engine")
    fast = {"IPAAS_RETRY_BASE_DELAY": "0.01", "IPAAS_POLL_INTERVAL": "0.05", "IPAAS_BREAKER_RECOVERY_SECONDS": "1"}
    async with FakeSlack() as slack, core_with(tmp_path, **fast) as core:
        api = Api(core.channel, (await core.new_tenant()).md)
        cred = await api.credential("slack", {"webhook_url": slack.url})
        wf = (await api.create({"name": "s", "trigger": {"type": "manual"}, "options": {"max_attempts": 1}, "steps": [slack_step(cred, "x")]})).workflow
        slack.fail_next(500, times=5)
        for _ in range(5):
            await api.wait((await api.run(wf.id)).execution.id)
        slack.delay = 6.0  # the trials take 6 s (the step timeout is 30 s)
        backlog = 200
        for _ in range(backlog):
            await api.run(wf.id)

        def deferrals() -> int:
            return sum(1 for r in caplog.records if r.getMessage() == "execution.deferred")

        await asyncio.sleep(1.5)  # half-open now, its trials hanging on the slow upstream
        before = deferrals()
        await asyncio.sleep(5.0)
        churn = deferrals() - before
        slack.delay = 0
        assert churn <= backlog * 1.2, f"{churn} claim+requeue cycles in 5 s for {backlog} queued tasks"


async def test_idempotency_key_enqueues_once(env) -> None:
    core, api, slack, _ = env
    scred = await api.credential("slack", {"webhook_url": slack.url})
    wf = (await api.create({"name": "i", "trigger": {"type": "manual"}, "steps": [slack_step(scred, "once")]})).workflow
    first = await api.run(wf.id, key="order-77")
    second = await api.run(wf.id, key="order-77")
    assert second.duplicate and second.execution.id == first.execution.id
    await api.wait(first.execution.id)
    assert slack.received == [{"text": "once"}]
    # The same key sent to another workflow starts that one too: it used to answer with the
    # first workflow's execution (duplicate), and the second workflow never ran.
    other = (await api.create({"name": "j", "trigger": {"type": "manual"}, "steps": [slack_step(scred, "other")]})).workflow
    third = await api.run(other.id, key="order-77")
    assert not third.duplicate and third.execution.workflow_id == other.id
    await api.wait(third.execution.id)
    assert slack.received == [{"text": "once"}, {"text": "other"}]


async def test_dry_run_writes_nothing(env) -> None:
    core, api, slack, weather = env
    wcred = await api.credential("openweather", {"api_key": API_KEY})
    scred = await api.credential("slack", {"webhook_url": slack.url})
    definition = {
        "name": "try",
        "trigger": {"type": "manual"},
        "steps": [
            {"id": "weather", "connector": "openweather", "action": "current_weather", "config": {"city": "{{city}}"}, "credential_id": wcred},
            slack_step(scred, "{{steps.weather.temperature}} for {{user.name}}"),
        ],
    }
    before = (await rows(core, Execution), await rows(core, OutboxTask))
    preview = await api.executions.DryRun(executions_pb2.DryRunRequest(workflow=workflow(definition), payload=value({"city": "Tokyo"}), mode="preview"), metadata=api.md)
    assert preview.ok and [s.status for s in preview.steps] == ["ok", "ok"]
    assert preview.steps[0].rendered_config["city"] == "Tokyo"
    assert list(preview.steps[1].missing_paths) == ["steps.weather.temperature", "user.name"]
    assert weather.received == [] and slack.received == []

    test = await api.executions.DryRun(executions_pb2.DryRunRequest(workflow=workflow(definition), payload=value({"city": "Tokyo", "user": {"name": "Kai"}}), mode="test"), metadata=api.md)
    assert test.ok and [s.status for s in test.steps] == ["succeeded", "succeeded"]
    assert slack.received == [{"text": "26 for Kai"}]  # 26.0 as JavaScript writes it
    assert (await rows(core, Execution), await rows(core, OutboxTask)) == before
    wf_count = len((await api.workflows.ListWorkflows(workflows_pb2.ListWorkflowsRequest(), metadata=api.md)).workflows)
    assert wf_count == 0, "a dry run of a definition saves no workflow"


async def test_a_deleted_credential_stops_being_used_at_once(env) -> None:
    """Steps cache the encrypted credential row briefly; a delete through this core drops it."""
    from ipaas.v1 import credentials_pb2

    core, api, slack, _ = env
    cred = await api.credential("slack", {"webhook_url": slack.url})
    wf = (await api.create({"name": "c", "trigger": {"type": "manual"}, "options": {"max_attempts": 1}, "steps": [slack_step(cred, "x")]})).workflow
    assert (await api.wait((await api.run(wf.id)).execution.id)).status == "succeeded"
    await api.credentials.DeleteCredential(credentials_pb2.DeleteCredentialRequest(id=cred), metadata=api.md)
    done = await api.wait((await api.run(wf.id)).execution.id)
    assert done.status == "failed" and "no longer exists" in done.error
    assert len(slack.received) == 1


async def test_an_output_that_cannot_be_stored_fails_the_execution(env) -> None:
    """Were it left to the database, every write of the outcome would fail and the execution
    would be claimed again at each lease's end; it fails for good instead."""
    from decimal import Decimal

    from ipaas.sdk import Action, ActionResult, Connector

    core, api, _, _ = env

    async def run(ctx):  # type: ignore[no-untyped-def]
        return ActionResult(output={"price": Decimal("9.99")})  # not JSON

    core.server.registry.add(Connector(name="shop", version="1.0", description="d", actions=[Action("price", "Price.", run, {"type": "object"})]), "ipaas-shop")
    wf = (await api.create({"name": "shop", "trigger": {"type": "manual"}, "steps": [{"id": "price", "connector": "shop", "action": "price", "config": {}}]})).workflow
    done = await api.wait((await api.run(wf.id, {})).execution.id, timeout=10)
    assert done.status == "failed" and "not JSON" in done.error, done
    assert done.steps[0].status == "failed"


async def test_a_config_that_renders_too_large_fails_the_step(env) -> None:
    """A template that would copy a large payload many times fails its step for good, without
    building the text and without the engine crashing on it at every lease."""
    core, api, slack, _ = env
    scred = await api.credential("slack", {"webhook_url": slack.url})
    wf = (await api.create({"name": "echo", "trigger": {"type": "manual"}, "steps": [slack_step(scred, "{{big}} " * 4)]})).workflow
    done = await api.wait((await api.run(wf.id, {"big": "x" * 300_000})).execution.id, timeout=10)
    assert done.status == "failed" and "rendered config would be longer than 1048576 characters" in done.error, done.error
    assert done.steps[0].status == "failed" and slack.received == []


async def test_a_body_nested_too_deeply_to_store_is_refused_alone(env) -> None:
    """orjson reads 1,024 levels but writes 254: such a body is refused as bad input instead
    of failing, with an internal error, the insert of every webhook accepted with it (it is
    also deeper than a reply could carry, which refuses it first)."""
    core, api, slack, _ = env
    scred = await api.credential("slack", {"webhook_url": slack.url})
    created = await api.create({"name": "deep", "trigger": {"type": "webhook"}, "steps": [slack_step(scred)]})

    def request(raw: bytes, msg_id: str) -> executions_pb2.ReceiveWebhookRequest:
        headers = signed_headers(created.webhook_secret, raw, msg_id)
        return executions_pb2.ReceiveWebhookRequest(workflow_id=created.workflow.id, http_body=httpbody_pb2.HttpBody(content_type="application/json", data=raw), headers=headers)

    deep = b'{"order":' + b'{"d":' * 300 + b"{}" + b"}" * 301
    good = [request(b'{"order":{"id":"D-%d"},"user":{"name":"Dee"}}' % i, f"evt_ok{i}") for i in range(5)]
    answers = await asyncio.gather(api.executions.ReceiveWebhook(request(deep, "evt_deep")), *(api.executions.ReceiveWebhook(g) for g in good), return_exceptions=True)
    assert isinstance(answers[0], grpc.aio.AioRpcError) and answers[0].code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "nested too deeply (at most 32 levels of objects and arrays)" in answers[0].details()
    assert all(isinstance(a, executions_pb2.ReceiveWebhookResponse) for a in answers[1:]), answers[1:]
    for a in answers[1:]:
        assert (await api.wait(a.execution_id)).status == "succeeded"


async def test_an_execution_larger_than_one_reply_can_still_be_read(env) -> None:
    """Four steps that each render a ~900 KB payload into their config add up to more than
    one gRPC reply: the largest configs give way to a note, the rest of the execution stays."""
    from ipaas.sdk import Action, ActionResult, Connector

    core, api, _, _ = env

    async def run(ctx):  # type: ignore[no-untyped-def]
        return ActionResult(output={"length": len(ctx.config["data"])})

    core.server.registry.add(Connector(name="sink", version="1.0", description="d", actions=[Action("take", "Take.", run, {"type": "object"})]), "ipaas-sink")
    steps = [{"id": f"s{i}", "connector": "sink", "action": "take", "config": {"data": "{{big}}"}} for i in range(4)]
    created = await api.create({"name": "sink", "trigger": {"type": "webhook"}, "steps": steps})
    raw = b'{"big":"' + b"x" * 900_000 + b'"}'
    headers = signed_headers(created.webhook_secret, raw, "evt_big")
    request = executions_pb2.ReceiveWebhookRequest(workflow_id=created.workflow.id, http_body=httpbody_pb2.HttpBody(content_type="application/json", data=raw), headers=headers)
    done = await api.wait((await api.executions.ReceiveWebhook(request)).execution_id)
    assert done.status == "succeeded" and len(done.payload.struct_value.fields["big"].string_value) == 900_000
    assert [s.output["length"] for s in done.steps] == [900_000] * 4
    omitted = [s for s in done.steps if "omitted" in s.rendered_config]
    assert omitted and all(s.rendered_config["omitted"].endswith("bytes, more than one reply holds") for s in omitted)
    assert done.ByteSize() <= 4 * 1024 * 1024


async def test_payloads_that_are_bare_numbers_are_stored_and_run(env) -> None:
    """SQLite gives a column declared JSON numeric affinity: the text `5` came back as the
    integer 5, which the JSON reader refused. One such execution failed every claim after
    it (every tenant's queue stopped) and every list that held it."""
    core, api, slack, _ = env
    scred = await api.credential("slack", {"webhook_url": slack.url})
    manual = await api.create({"name": "bare", "trigger": {"type": "manual"}, "steps": [slack_step(scred, text="got {{trigger}}")]})
    hooked = await api.create({"name": "bare-hook", "trigger": {"type": "webhook"}, "steps": [slack_step(scred, text="got {{trigger}}")]})
    runs = [(await api.run(manual.workflow.id, p)).execution.id for p in (5, 2.5, -7, "text", True)]
    raw = b"12"
    hook = await api.executions.ReceiveWebhook(
        executions_pb2.ReceiveWebhookRequest(
            workflow_id=hooked.workflow.id, http_body=httpbody_pb2.HttpBody(content_type="application/json", data=raw), headers=signed_headers(hooked.webhook_secret, raw, "evt_bare")
        )
    )
    after = (await api.run(manual.workflow.id, {"order": {"id": "next"}})).execution.id
    for execution_id in (*runs, hook.execution_id, after):
        assert (await api.wait(execution_id)).status == "succeeded"
    texts = sorted(m["text"] for m in slack.received)
    assert texts == sorted(["got 5", "got 2.5", "got -7", "got text", "got true", "got 12", 'got {"order":{"id":"next"}}'])
    listed = await api.executions.ListExecutions(executions_pb2.ListExecutionsRequest(page_size=50), metadata=api.md)
    assert {e.id for e in listed.executions} >= {*runs, hook.execution_id, after}
    assert (await api.execution(runs[0])).payload.number_value == 5


async def test_a_payload_that_is_a_bare_number_reaches_the_step_as_sent(env) -> None:
    """On SQLite a webhook body of 2.0 reached the step as 2, and 12345678901234567890 as
    1.2345678901234567e+19: the stored document had been turned into a number. PostgreSQL
    kept both."""
    core, api, slack, _ = env
    scred = await api.credential("slack", {"webhook_url": slack.url})
    hooked = await api.create({"name": "bare-hook", "trigger": {"type": "webhook"}, "steps": [slack_step(scred, text="got {{trigger}}")]})
    sent = {}
    for n, raw in enumerate((b"2.0", b"12345678901234567890")):
        headers = signed_headers(hooked.webhook_secret, raw, f"evt_{n}")
        request = executions_pb2.ReceiveWebhookRequest(workflow_id=hooked.workflow.id, http_body=httpbody_pb2.HttpBody(content_type="application/json", data=raw), headers=headers)
        sent[(await api.executions.ReceiveWebhook(request)).execution_id] = raw
    for execution_id in sent:
        assert (await api.wait(execution_id)).status == "succeeded"
    # As text 2.0 is "2" (as JavaScript writes it); the stored document below keeps 2.0.
    assert sorted(m["text"] for m in slack.received) == ["got 12345678901234567890", "got 2"]
    async with core.server.db.session() as s:
        stored = {row.id: row.payload for row in await s.execute(select(Execution.id, Execution.payload).where(Execution.id.in_(sent)))}
    assert {i: repr(payload).encode() for i, payload in stored.items()} == sent


async def test_a_non_ascii_digit_in_a_template_path_is_a_key_not_a_crash(env) -> None:
    # "²".isdigit() is true and int("²") raises: the attempt crashed, the execution stayed
    # running for ever (attempts past max_attempts) and DryRun answered INTERNAL.
    core, api, slack, _ = env
    cred = await api.credential("slack", {"webhook_url": slack.url})
    options = {"max_attempts": 2, "strict_templates": True}
    wf = (await api.create({"name": "p", "trigger": {"type": "manual"}, "options": options, "steps": [slack_step(cred, "first: {{items.²}}")]})).workflow
    dry = await api.executions.DryRun(executions_pb2.DryRunRequest(workflow_id=wf.id, payload=value({"items": ["a"]})), metadata=api.md)
    assert (dry.ok, list(dry.steps[0].missing_paths)) == (False, ["items.²"])
    ex = await api.wait((await api.run(wf.id, {"items": ["a", "b"]})).execution.id, timeout=5)
    assert (ex.status, ex.attempts) == ("failed", 1)
    assert "items.²" in ex.error and slack.received == []


async def test_an_execution_claimed_again_after_its_last_attempt_is_dead_not_run(tmp_path) -> None:
    # Its last attempt was claimed and never finished (the process died, or the attempt
    # crashed): running it again would go past max_attempts, for ever if it crashes each time.
    async with FakeSlack() as slack, core_with(tmp_path, IPAAS_DISABLE_ENGINE="1", **FAST) as core:
        api = Api(core.channel, (await core.new_tenant()).md)
        cred = await api.credential("slack", {"webhook_url": slack.url})
        wf = (await api.create({"name": "c", "trigger": {"type": "manual"}, "options": {"max_attempts": 2}, "steps": [slack_step(cred, "x")]})).workflow
        queued = (await api.run(wf.id)).execution
        async with core.server.db.session() as s, s.begin():
            row = await s.get(Execution, queued.id)
            row.status, row.attempts, row.started_at = "running", 2, datetime.now(timezone.utc)
        core.server.dispatcher.start()
        ex = await api.wait(queued.id, timeout=5)
        assert (ex.status, ex.attempts) == ("dead", 2)
        assert "never finished" in ex.error
        assert slack.received == [] and await rows(core, OutboxTask) == 0


async def test_a_plugin_result_of_the_wrong_type_fails_the_execution_once(env) -> None:
    # dict("posted") raised outside every handler: the execution stayed running until its
    # lease ended, and the action (a delivery) ran again, max_attempts times.
    from ipaas.sdk import Action, ActionResult, Connector

    core, api, _, _ = env
    calls = []

    async def run(ctx):  # type: ignore[no-untyped-def]
        calls.append(1)
        return ActionResult(message="posted", output="posted")  # type: ignore[arg-type]

    core.server.registry.add(Connector("buggy", "1", "d", [Action("post", "Post.", run)]), "ipaas-buggy")
    wf = (await api.create({"name": "w", "trigger": {"type": "manual"}, "options": {"max_attempts": 3}, "steps": [{"id": "s", "connector": "buggy", "action": "post", "config": {}}]})).workflow
    done = await api.wait((await api.run(wf.id)).execution.id, timeout=3)
    assert (done.status, done.attempts, len(calls)) == ("failed", 1, 1), done
    assert "buggy.post returned an output of type str" in done.error and done.steps[0].status == "failed"


async def test_a_retry_after_given_as_text_is_honoured(env) -> None:
    # `retry_after > 0` on the header's text raised TypeError outside every handler: the
    # execution stayed running until its lease ended and the action ran again.
    from ipaas.sdk import Action, Connector, RetryableError

    core, api, _, _ = env
    calls = []

    async def run(ctx):  # type: ignore[no-untyped-def]
        calls.append(1)
        raise RetryableError("rate limited", retry_after="30")  # type: ignore[arg-type]

    core.server.registry.add(Connector("limited", "1", "d", [Action("post", "Post.", run)]), "ipaas-limited")
    wf = (await api.create({"name": "w", "trigger": {"type": "manual"}, "options": {"max_attempts": 3}, "steps": [{"id": "s", "connector": "limited", "action": "post", "config": {}}]})).workflow
    ex_id = (await api.run(wf.id)).execution.id
    ex = await _put_back(api, ex_id)
    assert ex.status == "queued" and "rate limited" in ex.error, ex
    wait = ex.next_attempt_at.ToDatetime(tzinfo=timezone.utc) - datetime.now(timezone.utc)
    assert timedelta(seconds=25) < wait <= timedelta(seconds=30) and calls == [1]


async def test_an_unexpected_error_in_a_step_fails_it_with_a_generic_message(env, monkeypatch) -> None:
    # A bug past the plugin host's checks used to leave the execution running until its
    # lease ended, then run the step again. It fails for good; the details go to the log.
    core, api, slack, _ = env
    scred = await api.credential("slack", {"webhook_url": slack.url})
    wf = (await api.create({"name": "x", "trigger": {"type": "manual"}, "options": {"max_attempts": 3}, "steps": [slack_step(scred, "x")]})).workflow
    steps = core.server.dispatcher.executor.steps

    async def crash(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise RuntimeError("secret detail hooks.slack.com/services/T0/B0/XXXX")

    monkeypatch.setattr(steps, "invoke", crash)
    done = await api.wait((await api.run(wf.id)).execution.id, timeout=3)
    assert (done.status, done.attempts) == ("failed", 1), done
    assert done.error == "step notify: internal error (RuntimeError)" and "secret" not in str(done)
    assert (done.steps[0].status, done.steps[0].retryable) == ("failed", False)


@pytest.mark.postgres
async def test_nul_characters_from_a_plugin_are_stored_on_postgres(tmp_path, postgres_url) -> None:
    # PostgreSQL's text cannot hold NUL. An upstream's error body quoted by raise_for_status
    # failed the outcome's write: the execution stayed running until its lease ended, and
    # the upstream was called again. Text columns get U+FFFD in its place; outputs are
    # stored as json (not jsonb), which keeps the escape \u0000.
    from ipaas.sdk import Action, ActionResult, Connector, PermanentError, RetryableError

    calls: list[str] = []

    async def refuse(ctx):  # type: ignore[no-untyped-def]
        calls.append("refuse")
        raise PermanentError("Upstream answered 400: bad\x00request")

    async def busy(ctx):  # type: ignore[no-untyped-def]
        calls.append("busy")
        raise RetryableError("Upstream answered 503: busy\x00")

    async def ok(ctx):  # type: ignore[no-untyped-def]
        calls.append("ok")
        return ActionResult(message="sent\x00", output={"echo": "a\x00b"})

    async with core_with(tmp_path, postgres_url, **FAST) as core:
        core.server.registry.add(Connector("nul", "1", "d", [Action("refuse", "d", refuse), Action("busy", "d", busy), Action("ok", "d", ok)]), "ipaas-nul")
        api = Api(core.channel, (await core.new_tenant()).md)
        ids = []
        for action in ("refuse", "busy", "ok"):
            steps = [{"id": "s", "connector": "nul", "action": action, "config": {}}]
            wf = (await api.create({"name": action, "trigger": {"type": "manual"}, "options": {"max_attempts": 2}, "steps": steps})).workflow
            ids.append((await api.run(wf.id)).execution.id)
        refused, retried, sent = [await api.wait(i, timeout=5) for i in ids]
    assert (refused.status, refused.error, refused.steps[0].error) == ("failed", "step s: Upstream answered 400: bad\ufffdrequest", "Upstream answered 400: bad\ufffdrequest")
    assert (retried.status, retried.attempts, retried.error) == ("dead", 2, "step s: Upstream answered 503: busy\ufffd")
    assert (sent.status, sent.steps[0].message, sent.steps[0].output["echo"]) == ("succeeded", "sent\ufffd", "a\x00b")
    assert sorted(calls) == ["busy", "busy", "ok", "refuse"]


async def test_the_core_deletes_finished_executions_past_the_retention_window(env) -> None:
    core, api, slack, weather = env
    scred = await api.credential("slack", {"webhook_url": slack.url})
    wf = (await api.create({"name": "kept", "trigger": {"type": "manual"}, "steps": [slack_step(scred, "hi")]})).workflow
    done = await api.wait((await api.run(wf.id)).execution.id)
    assert done.status == "succeeded"
    retention = core.server.retention
    assert retention is not None and retention.keep == timedelta(days=14), "on by default"

    assert await retention.prune() == 0, "finished just now: kept"
    retention.clock = lambda: datetime.now(timezone.utc) + timedelta(days=15)
    assert await retention.prune() == 1
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await api.executions.GetExecution(executions_pb2.GetExecutionRequest(id=done.id), metadata=api.md)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


async def test_a_stored_template_with_a_query_per_item_fails_its_step_at_once(env) -> None:
    """A workflow saved before filters were restricted: the audit's cubic template held an
    engine for 21 s with a 1.8 KB payload. Now its step fails for good, at once, and other
    executions run."""
    core, api, slack, _ = env
    cred = await api.credential("slack", {"webhook_url": slack.url})
    wf = (await api.create({"name": "old", "trigger": {"type": "manual"}, "options": {"max_attempts": 3}, "steps": [slack_step(cred, "saved")]})).workflow
    async with core.server.db.session() as s, s.begin():
        row = await s.get(WorkflowVersion, (wf.id, 1))
        row.definition = {**row.definition, "steps": [slack_step(cred, "{{$..[?count($..[?count($..*) > 0]) > 0]}}")]}
    ex = await api.wait((await api.run(wf.id, {"items": [{"a": i} for i in range(130)]})).execution.id, timeout=5)
    assert (ex.status, ex.attempts) == ("failed", 1)
    assert "a filter may only read the item it tests" in ex.error and slack.received == []
    fine = (await api.create({"name": "fine", "trigger": {"type": "manual"}, "steps": [slack_step(cred)]})).workflow
    ex = await api.wait((await api.run(fine.id, {"order": {"id": 7}, "user": {"name": "Ann"}})).execution.id, timeout=5)
    assert ex.status == "succeeded" and [m["text"] for m in slack.received] == ["Order 7 for Ann"]


async def test_a_step_whose_templates_visit_too_much_of_the_payload_fails_for_good(env) -> None:
    """Allowed paths, but 200 scans of 2,500 items: seconds of the engine's event loop on
    every run. The work budget fails the step at once, without retries."""
    core, api, slack, _ = env
    cred = await api.credential("slack", {"webhook_url": slack.url})
    wf = (await api.create({"name": "wide", "trigger": {"type": "manual"}, "options": {"max_attempts": 3}, "steps": [slack_step(cred, "{{$..zz}}" * 200 + "!")]})).workflow
    ex = await api.wait((await api.run(wf.id, {"items": [{"a": i} for i in range(2500)]})).execution.id, timeout=5)
    assert (ex.status, ex.attempts) == ("failed", 1)
    assert "templates visit too much of the payload" in ex.error and slack.received == []
    ex = await api.wait((await api.run(wf.id, {"items": [{"a": 1}]})).execution.id, timeout=5)
    assert ex.status == "succeeded" and [m["text"] for m in slack.received] == ["!"]


def _scans(items: int) -> dict:
    return {"items": [{"a": i} for i in range(items)]}


HEAVY = "{{$..zz}}" * 99 + "{{$.items[-1].a}} done"  # 100 scans of the payload, all allowed


@pytest.mark.parametrize("budget,outcome", [(10**9, "succeeded"), (400_000, "failed")])
async def test_another_tenants_execution_runs_while_a_heavy_render_goes_on(env, monkeypatch, budget: int, outcome: str) -> None:
    """A render of seconds (500,000 nodes; allowed here by a larger budget) held the engine's
    event loop: every other tenant's execution waited for it to end. It renders in a thread
    now; its result is the same as rendered on the loop, and past the budget the step still
    fails for good."""
    from ipaas import templates

    monkeypatch.setattr("ipaas.templates.MAX_TEMPLATE_WORK", budget)
    core, api, slack, _ = env
    other = Api(core.channel, (await core.new_tenant(name="other")).md)
    hcred = await api.credential("slack", {"webhook_url": slack.url})
    ocred = await other.credential("slack", {"webhook_url": slack.url})
    heavy = (await api.create({"name": "heavy", "trigger": {"type": "manual"}, "options": {"max_attempts": 3}, "steps": [slack_step(hcred, HEAVY)]})).workflow
    cheap = (await other.create({"name": "cheap", "trigger": {"type": "manual"}, "steps": [slack_step(ocred)]})).workflow
    heavy_id = (await api.run(heavy.id, _scans(5000))).execution.id
    await api.wait(heavy_id, statuses=("running", "succeeded", "failed", "dead"))
    started = time.monotonic()
    ex = await other.wait((await other.run(cheap.id, {"order": {"id": 7}, "user": {"name": "Ann"}})).execution.id, timeout=10)
    took = time.monotonic() - started
    assert ex.status == "succeeded", ex
    assert (await api.execution(heavy_id)).status == "running", "the heavy render was over before the other tenant's execution ran"
    assert took < 1.0, f"the other tenant's execution took {took:.2f} s"
    ex = await api.wait(heavy_id, timeout=60)
    assert (ex.status, ex.attempts) == (outcome, 1), ex
    if outcome == "succeeded":
        expected = templates.render_config({"text": HEAVY}, templates.RenderContext(trigger=_scans(5000))).value["text"]
        assert expected == "4999 done" and [m["text"] for m in slack.received] == ["Order 7 for Ann", expected]
    else:
        assert f"templates visit too much of the payload: more than {budget} nodes" in ex.error, ex
        assert [m["text"] for m in slack.received] == ["Order 7 for Ann"]


def _time_thread_renders(steps, extra: float = 0.0) -> list[tuple[float, float]]:  # type: ignore[no-untyped-def]
    """The (start, end) of every render the engine runs in a render thread, as they end;
    `extra` seconds are added to each thread render."""
    import threading

    render, spans = steps.render, []

    def timed(*args, **kwargs):  # type: ignore[no-untyped-def]
        started = time.monotonic()
        try:
            return render(*args, **kwargs)
        finally:
            if threading.current_thread() is not threading.main_thread():
                if extra:
                    time.sleep(extra)
                spans.append((started, time.monotonic()))

    steps.render = timed
    return spans


async def test_a_tenant_has_one_heavy_render_at_a_time_and_the_rest_wait_in_the_queue(env, caplog) -> None:
    """Three heavy executions at once (renders of ~0.6 s, past RenderThreads' longest wait
    in process): one renders, the others are put back in the queue (no attempt spent:
    max_attempts is 1) instead of holding worker slots, and all succeed."""
    caplog.set_level(logging.INFO, logger="ipaas.engine")
    core, api, slack, _ = env
    spans = _time_thread_renders(core.server.dispatcher.executor.steps)
    cred = await api.credential("slack", {"webhook_url": slack.url})
    text = "{{$..zz}}" * 30 + "{{$.items[-1].a}}"
    wf = (await api.create({"name": "heavy", "trigger": {"type": "manual"}, "options": {"max_attempts": 1}, "steps": [slack_step(cred, text)]})).workflow
    ids = [(await api.run(wf.id, _scans(2000))).execution.id for _ in range(3)]
    for ex_id in ids:
        ex = await api.wait(ex_id, timeout=30)
        assert (ex.status, ex.attempts) == ("succeeded", 1), ex
    assert [m["text"] for m in slack.received] == ["1999"] * 3
    deferred = [r for r in caplog.records if r.getMessage() == "execution.deferred"]
    assert deferred and all(r.connector == "slack" for r in deferred), "none was put back"
    spans.sort()
    assert len(spans) == 3 and all(a[1] <= b[0] for a, b in zip(spans, spans[1:])), f"two heavy renders of one tenant overlapped: {spans}"


async def test_a_tenants_moderately_heavy_renders_at_once_all_run_without_deferral(env, caplog) -> None:
    """Eight executions at once whose template is past the inline budget but cheap (a filter
    over 600 items, ~20 ms here): one rendered and seven went back to the queue, 0.5 to 3.5 s
    each ('heavy template renders busy'). They wait their turn in process now: all succeed
    at their first attempt, none deferred, one render at a time, within a bounded time."""
    caplog.set_level(logging.INFO, logger="ipaas.engine")
    core, api, slack, _ = env
    # ~8 ms of rendering and 10 ms more, so the renders overlap for sure (the inline
    # attempts, ~5 ms each on the loop, space the executions out).
    spans = _time_thread_renders(core.server.dispatcher.executor.steps, extra=0.01)
    cred = await api.credential("slack", {"webhook_url": slack.url})
    wf = (await api.create({"name": "moderate", "trigger": {"type": "manual"}, "options": {"max_attempts": 1}, "steps": [slack_step(cred, "{{$.items[?(@.price > 47)].id}}")]})).workflow
    payload = {"items": [{"id": i, "price": i % 50} for i in range(600)]}
    started = time.monotonic()
    ids = [r.execution.id for r in await asyncio.gather(*(api.run(wf.id, payload) for _ in range(8)))]
    done = [await api.wait(ex_id, timeout=30) for ex_id in ids]
    took = time.monotonic() - started
    assert [(ex.status, ex.attempts) for ex in done] == [("succeeded", 1)] * 8, done
    assert not [ex for ex in done if ex.error], "an execution shows an error ('heavy template renders busy')"
    deferred = [r for r in caplog.records if r.getMessage() == "execution.deferred"]
    assert not deferred, f"{len(deferred)} put back in the queue"
    spans.sort()
    assert len(spans) == 8, "each rendered once, in a render thread"
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:])), f"two heavy renders of one tenant overlapped: {spans}"
    assert took < 3.0, f"eight ~20 ms renders took {took:.2f} s"
    assert len(slack.received) == 8


async def test_a_stopped_engine_leaves_no_render_threads(tmp_path) -> None:
    import threading

    async with FakeSlack() as slack, core_with(tmp_path, **FAST) as core:
        api = Api(core.channel, (await core.new_tenant()).md)
        cred = await api.credential("slack", {"webhook_url": slack.url})
        wf = (await api.create({"name": "heavy", "trigger": {"type": "manual"}, "steps": [slack_step(cred, "{{$..zz}}!")]})).workflow
        assert (await api.wait((await api.run(wf.id, _scans(1000))).execution.id)).status == "succeeded"
        pool = core.server.dispatcher.executor.renders._pool
        ours = [t for t in threading.enumerate() if t.name.startswith("ipaas-render") and t in pool._threads]
        assert ours, "the render ran on the engine's render threads"
    deadline = time.monotonic() + 5
    while any(t.is_alive() for t in ours) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert not any(t.is_alive() for t in ours), "the render threads stopped with the engine"


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
async def test_a_quiet_tenants_execution_runs_while_a_noisy_ones_backlog_waits(tmp_path, request, backend) -> None:
    """Claims took the oldest tasks overall: behind another tenant's backlog on a slow
    upstream, a tenant's one execution waited until the whole backlog had drained (minutes
    at scale). Claims now share the workers among tenants."""
    database_url = request.getfixturevalue("postgres_url") if backend == "postgresql" else None
    async with FakeSlack(delay=0.4) as slack, core_with(tmp_path, database_url, IPAAS_WORKERS="4", **FAST) as core:
        apis = [Api(core.channel, (await core.new_tenant(name=name)).md) for name in ("noisy", "quiet")]
        flows = []
        for api, text in zip(apis, ("backlog", "prompt")):
            cred = await api.credential("slack", {"webhook_url": slack.url})
            flows.append((await api.create({"name": text, "trigger": {"type": "manual"}, "steps": [slack_step(cred, text)]})).workflow)
        backlog = 48  # 12 rounds of 4 workers x 0.4 s: about 5 s to drain
        noisy = [(await apis[0].run(flows[0].id)).execution.id for _ in range(backlog)]
        started = time.monotonic()
        quiet = await apis[1].wait((await apis[1].run(flows[1].id)).execution.id, timeout=30)
        waited = time.monotonic() - started
        drained = sum(m["text"] == "backlog" for m in slack.received)
        assert quiet.status == "succeeded", quiet
        # Its turn comes within a few of the noisy tenant's calls, not after all of them.
        assert drained <= backlog // 2 and waited < 3.0, (drained, waited)
        for execution_id in noisy:
            assert (await apis[0].wait(execution_id, timeout=30)).status == "succeeded"
