"""What the execution API accepts, it can answer: payloads and outputs no deeper than a
gRPC reply carries, and dry runs no larger than one reply, through a real core."""

from __future__ import annotations

from typing import Any

import grpc
import httpx
import orjson
import pytest
from google.api import httpbody_pb2
from google.protobuf import json_format
from sqlalchemy import update

from ipaas.storage.tables import Execution, ExecutionStep
from ipaas.v1 import executions_pb2 as pb
from ipaas.wire import MAX_JSON_DEPTH
from tests.conftest import core_with, gateway_for
from tests.integration.helpers import Api, slack_step, value, workflow

FAST = {"IPAAS_RETRY_BASE_DELAY": "0.01", "IPAAS_POLL_INTERVAL": "0.05"}


def nested(levels: int) -> Any:
    data: Any = "leaf"
    for _ in range(levels):
        data = {"a": data}
    return data


def as_json(message: Any) -> Any:
    return json_format.MessageToDict(message)


async def refused(call: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return caught.value


@pytest.fixture
async def env(tmp_path):
    async with core_with(tmp_path, **FAST) as core:
        tenant = await core.new_tenant()
        api = Api(core.channel, tenant.md)
        cred = await api.credential("slack", {"webhook_url": "http://127.0.0.1:9/unreachable"})
        yield core, api, cred


def webhook(workflow_id: str, data: Any) -> pb.ReceiveWebhookRequest:
    return pb.ReceiveWebhookRequest(workflow_id=workflow_id, http_body=httpbody_pb2.HttpBody(content_type="application/json", data=orjson.dumps(data)))


async def test_a_payload_nested_deeper_than_a_reply_carries_is_refused_by_every_trigger(env) -> None:
    """Accepted before, a payload 33+ objects deep made its execution unreadable (INTERNAL, or
    a reply the client could not parse) and every ListExecutions page holding it failed."""
    core, api, cred = env
    hook = (await api.create({"name": "hook", "trigger": {"type": "webhook"}, "options": {"allow_unsigned_webhooks": True}, "steps": [slack_step(cred)]})).workflow
    manual = (await api.create({"name": "man", "trigger": {"type": "manual"}, "steps": [slack_step(cred)]})).workflow
    too_deep = nested(MAX_JSON_DEPTH + 1)

    for error in [
        await refused(api.executions.ReceiveWebhook(webhook(hook.id, too_deep))),
        await refused(api.executions.RunWorkflow(pb.RunWorkflowRequest(workflow_id=manual.id, payload=value(too_deep)), metadata=api.md)),
        await refused(api.executions.DryRun(pb.DryRunRequest(workflow_id=manual.id, payload=value(too_deep)), metadata=api.md)),
    ]:
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error
        assert f"nested too deeply (at most {MAX_JSON_DEPTH} levels of objects and arrays)" in error.details()

    # The deepest payload allowed is answered and read back whole, alone and in a page.
    deepest = nested(MAX_JSON_DEPTH)
    by_hook = await api.executions.ReceiveWebhook(webhook(hook.id, deepest))
    run = await api.executions.RunWorkflow(pb.RunWorkflowRequest(workflow_id=manual.id, payload=value(deepest)), metadata=api.md)
    assert run is not None and as_json(run.execution.payload) == deepest  # None: grpc.aio could not parse the reply
    for execution_id in (by_hook.execution_id, run.execution.id):
        read = await api.executions.GetExecution(pb.GetExecutionRequest(id=execution_id), metadata=api.md)
        assert read is not None and as_json(read.execution.payload) == deepest
    page = await api.executions.ListExecutions(pb.ListExecutionsRequest(), metadata=api.md)
    assert page is not None and {e.id for e in page.executions} == {by_hook.execution_id, run.execution.id}


async def test_a_webhook_nested_too_deeply_is_refused_over_rest(tmp_path) -> None:
    async with core_with(tmp_path) as core, gateway_for(core.target, tmp_path) as url:
        api = Api(core.channel, (await core.new_tenant()).md)
        cred = await api.credential("slack", {"webhook_url": "http://127.0.0.1:9/unreachable"})
        hook = (await api.create({"name": "hook", "trigger": {"type": "webhook"}, "options": {"allow_unsigned_webhooks": True}, "steps": [slack_step(cred)]})).workflow
        async with httpx.AsyncClient(base_url=url, timeout=10) as http:
            answer = await http.post(f"/api/webhooks/{hook.id}", content=orjson.dumps(nested(MAX_JSON_DEPTH + 1)), headers={"content-type": "application/json"})
    assert answer.status_code == 422 and answer.json()["error"]["code"] == "invalid_argument", answer.text
    assert "nested too deeply" in answer.json()["error"]["message"]


def nested_bytes(levels: int) -> bytes:
    """JSON nested `levels` objects deep, past what orjson (255) or Python's recursion writes."""
    return b'{"a":' * levels + b'"leaf"' + b"}" * levels


async def test_json_nested_past_the_limit_gets_one_answer_over_rest_however_deep(tmp_path) -> None:
    """Exactly one level too deep was 422 INVALID_FIELD (the core's check); two or more were
    400 REQUEST_UNPARSABLE (protobuf could not parse the request the gateway sent), ~100 or
    more 400 "payload is not valid" (protobuf's JSON parser in the gateway gave up), and past
    1,024 a webhook or body was "not valid JSON". Now every depth past the limit is the
    core's 422, naming the field, on every route that takes free-form JSON."""
    too_deep = f"is nested too deeply (at most {MAX_JSON_DEPTH} levels of objects and arrays)"
    async with core_with(tmp_path) as core, gateway_for(core.target, tmp_path) as url:
        tenant = await core.new_tenant(tier="paid")
        api = Api(core.channel, tenant.md)
        cred = await api.credential("slack", {"webhook_url": "http://127.0.0.1:9/unreachable"})
        manual = (await api.create({"name": "man", "trigger": {"type": "manual"}, "steps": [slack_step(cred)]})).workflow
        hook = (await api.create({"name": "hook", "trigger": {"type": "webhook"}, "options": {"allow_unsigned_webhooks": True}, "steps": [slack_step(cred)]})).workflow
        step = orjson.dumps(slack_step(cred))[:-1]  # a step whose config gains a deep key
        async with httpx.AsyncClient(base_url=url, timeout=20, headers={"authorization": f"Bearer {tenant.key}", "content-type": "application/json"}) as http:

            async def post(path: str, body: bytes) -> httpx.Response:
                return await http.post(path, content=body)

            def run(levels: int) -> bytes:
                return b'{"payload":' + nested_bytes(levels) + b"}"

            def dry_run(levels: int) -> bytes:
                return b'{"mode":"preview","workflow_id":"' + manual.id.encode() + b'","payload":' + nested_bytes(levels) + b"}"

            def create(levels: int) -> bytes:  # the config object itself is one level
                return b'{"name":"deep","trigger":{"type":"manual"},"steps":[' + step.replace(b'"config":{', b'"config":{"deep":' + nested_bytes(levels - 1) + b",") + b"}]}"

            deepest = [await post(f"/api/workflows/{manual.id}/run", run(MAX_JSON_DEPTH)), await post("/api/workflows/dry-run", dry_run(MAX_JSON_DEPTH))]
            assert [a.status_code for a in deepest] == [202, 200], [a.text[:300] for a in deepest]
            for levels in (MAX_JSON_DEPTH + 1, MAX_JSON_DEPTH + 2, 40, 200, 1000, 1100):
                for path, body, field in [
                    (f"/api/workflows/{manual.id}/run", run(levels), "payload"),
                    ("/api/workflows/dry-run", dry_run(levels), "payload"),
                    ("/api/workflows", create(levels), "steps[0].config"),
                    (f"/api/webhooks/{hook.id}", nested_bytes(levels), "http_body.data"),
                ]:
                    answer = await post(path, body)
                    error = answer.json().get("error", {})
                    where = (levels, path, answer.status_code, answer.text[:300])
                    assert (answer.status_code, error.get("code"), error.get("reason")) == (422, "invalid_argument", "INVALID_FIELD"), where
                    if levels <= 1000:  # past orjson's 1,024 levels (the body's own included), no field can be named
                        assert error["details"] == [{"field": field, "description": too_deep if field != "http_body.data" else f"the body {too_deep}"}], where
                    else:
                        assert error["details"][0]["field"] in ("body", "http_body.data") and too_deep in error["message"], where


async def test_an_output_nested_deeper_than_a_reply_carries_fails_its_step(env) -> None:
    """A connector passing on an upstream's deep JSON made the execution unreadable once its
    output was stored; the step fails for good instead, and the execution reads."""
    from ipaas.sdk import Action, ActionResult, Connector

    core, api, _ = env

    async def run(ctx):  # type: ignore[no-untyped-def]
        return ActionResult(output=nested(MAX_JSON_DEPTH + 5))

    core.server.registry.add(Connector(name="relay", version="1.0", description="d", actions=[Action("fetch", "Fetch.", run, {"type": "object"})]), "ipaas-relay")
    wf = (await api.create({"name": "relay", "trigger": {"type": "manual"}, "steps": [{"id": "fetch", "connector": "relay", "action": "fetch", "config": {}}]})).workflow
    done = await api.wait((await api.run(wf.id, {})).execution.id, timeout=10)
    assert done.status == "failed" and f"nested too deeply (at most {MAX_JSON_DEPTH} levels" in done.error, done
    assert done.steps[0].status == "failed" and not done.steps[0].output


async def test_values_stored_too_deep_to_send_come_back_as_a_note(env) -> None:
    """Rows stored before triggers and steps refused such values: each one gives way to a
    note, and its execution, and every page listing it, can be read again."""
    core, api, cred = env
    wf = (await api.create({"name": "man", "trigger": {"type": "manual"}, "options": {"max_attempts": 1}, "steps": [slack_step(cred)]})).workflow
    older = (await api.run(wf.id, {"order": {"id": 1}})).execution.id
    poisoned = (await api.run(wf.id, {"order": {"id": 2}})).execution.id
    await api.wait(poisoned)
    deep = nested(60)  # as a webhook body up to 254 levels deep was once stored
    async with core.server.db.session() as session, session.begin():
        await session.execute(update(Execution).where(Execution.id == poisoned).values(payload=deep))
        await session.execute(update(ExecutionStep).where(ExecutionStep.execution_id == poisoned).values(output={"body": deep}, rendered_config={"text": deep}))

    read = await api.execution(poisoned)
    note = {"omitted": f"nested more than {MAX_JSON_DEPTH} levels deep, more than one reply carries"}
    assert read is not None and as_json(read.payload) == note
    assert as_json(read.steps[0].output) == note and as_json(read.steps[0].rendered_config) == note
    page = await api.executions.ListExecutions(pb.ListExecutionsRequest(page_size=1), metadata=api.md)
    assert page is not None and [e.id for e in page.executions] == [poisoned]
    rest = await api.executions.ListExecutions(pb.ListExecutionsRequest(page_token=page.next_page_token), metadata=api.md)
    assert [e.id for e in rest.executions] == [older]
    assert as_json((await api.execution(older)).payload) == {"order": {"id": 1}}


@pytest.mark.parametrize("by", ["definition", "workflow_id"])
async def test_a_dry_run_larger_than_one_reply_still_answers(env, by: str) -> None:
    """Six steps each rendering a ~900 KB payload outgrew the 4 MiB reply: the caller got the
    transport's RESOURCE_EXHAUSTED (no request id), after "test" mode had called the
    connectors. The largest configs give way to a note of their size, as GetExecution's do."""
    core, api, cred = env
    steps = [{"id": f"s{i}", "connector": "slack", "action": "send_message", "config": {"text": "hi", "blocks": ["{{big}}"]}, "credential_id": cred} for i in range(6)]
    definition = {"name": "big", "trigger": {"type": "manual"}, "steps": steps}
    request = pb.DryRunRequest(payload=value({"big": "x" * 900_000}))
    if by == "definition":
        request.workflow.CopyFrom(workflow(definition))
    else:
        request.workflow_id = (await api.create(definition)).workflow.id
    dry = await api.executions.DryRun(request, metadata=api.md)
    assert dry.ok and [s.status for s in dry.steps] == ["ok"] * 6, dry.steps
    omitted = [s for s in dry.steps if "omitted" in s.rendered_config]
    assert omitted and all(s.rendered_config["omitted"].endswith("bytes, more than one reply holds") for s in omitted)
    kept = [s for s in dry.steps if "omitted" not in s.rendered_config]
    assert kept and all(len(s.rendered_config["blocks"][0]) == 900_000 for s in kept)
    assert dry.ByteSize() <= 4 * 1024 * 1024
