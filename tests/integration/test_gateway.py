"""The REST gateway over real HTTP (uvicorn) in front of a real core."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re

import grpc
import httpx
import orjson
import pytest
from google.api import httpbody_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from ipaas import reasons
from ipaas.v1 import workflows_pb2
from tests.conftest import ADMIN_KEY, core_with, free_port, gateway_for
from tests.fakes.slack import FakeSlack
from tests.integration.helpers import Api, signed_headers, signed_webhook

FAST = {"IPAAS_RETRY_BASE_DELAY": "0.01", "IPAAS_POLL_INTERVAL": "0.05"}


@pytest.fixture
async def stack(tmp_path):
    async with FakeSlack() as slack, core_with(tmp_path, **FAST) as core, gateway_for(core.target, tmp_path) as url:
        paid = await core.new_tenant(tier="paid")
        async with httpx.AsyncClient(base_url=url, headers={"authorization": f"Bearer {paid.key}"}, timeout=10) as http:
            yield core, http, slack


def assert_envelope(response: httpx.Response, success: bool) -> dict:
    body = response.json()
    assert body["success"] is success
    assert body["meta"]["request_id"] == response.headers["x-request-id"]
    assert ("data" in body) if success else ("error" in body and {"code", "reason", "domain", "metadata", "message", "details"} <= set(body["error"]))
    assert success or body["error"]["reason"] in reasons.ALL, body
    assert success or (body["error"]["domain"] == reasons.DOMAIN and all(isinstance(v, str) for v in body["error"]["metadata"].values())), body
    return body


async def create_workflow(http: httpx.AsyncClient, slack: FakeSlack, trigger: str = "manual") -> dict:
    cred = await http.post("/api/credentials", json={"connector": "slack", "name": f"team-{trigger}", "secrets": {"webhook_url": slack.url}})
    assert cred.status_code == 201, cred.text
    assert "webhook_url" not in str(cred.json()["data"].get("secrets", "")) and slack.url not in cred.text
    wf = await http.post(
        "/api/workflows",
        json={
            "name": "orders",
            "trigger": {"type": trigger},
            "steps": [{"id": "notify", "connector": "slack", "action": "send_message", "config": {"text": "Order {{order.id}}"}, "credential_id": cred.json()["data"]["id"]}],
        },
    )
    assert wf.status_code == 201, wf.text
    return assert_envelope(wf, True)["data"]


async def test_workflow_crud_versions_and_readable_json(stack) -> None:
    core, http, slack = stack
    created = await create_workflow(http, slack)
    wf = created["workflow"]
    assert wf["trigger"]["type"] == "manual" and wf["version"] == 1 and wf["active"] is True
    assert wf["steps"][0]["credential_id"].startswith("cred_")
    got = await http.get(f"/api/workflows/{wf['id']}")
    assert assert_envelope(got, True)["data"]["name"] == "orders"

    patched = await http.patch(f"/api/workflows/{wf['id']}", json={"name": "orders v2"}, headers={"If-Match": '"1"'})
    assert patched.status_code == 200 and patched.json()["data"]["version"] == 2
    stale = await http.patch(f"/api/workflows/{wf['id']}", json={"name": "stale"}, headers={"If-Match": '"1"'})
    assert stale.status_code == 409 and assert_envelope(stale, False)["error"]["code"] == "aborted"
    rolled = await http.post(f"/api/workflows/{wf['id']}/rollback", json={"version": 1})
    assert rolled.json()["data"]["version"] == 3 and rolled.json()["data"]["name"] == "orders"
    versions = await http.get(f"/api/workflows/{wf['id']}/versions", params={"page_size": 2})
    body = assert_envelope(versions, True)
    assert [v["version"] for v in body["data"]["versions"]] == [3, 2]
    token = body["meta"]["pagination"]["next_page_token"]
    rest = await http.get(f"/api/workflows/{wf['id']}/versions", params={"page_size": 2, "page_token": token})
    assert [v["version"] for v in assert_envelope(rest, True)["data"]["versions"]] == [1]
    # Tokens this API never issued: base64 of bytes, of JSON, of a number past int32, of "5_0".
    for forged in ("AAAA", "eyJ4IjoxfQ", "OTk5OTk5OTk5OTk5OTk5OTk5OTk5", "NV8w", "MA"):
        bad = await http.get(f"/api/workflows/{wf['id']}/versions", params={"page_token": forged})
        assert bad.status_code == 422 and assert_envelope(bad, False)["error"]["details"][0]["field"] == "page_token", forged
    deleted = await http.delete(f"/api/workflows/{wf['id']}")
    assert deleted.status_code == 204 and deleted.content == b""
    assert (await http.get(f"/api/workflows/{wf['id']}")).status_code == 404


async def test_manual_run_and_execution_lookup(stack) -> None:
    core, http, slack = stack
    wf = (await create_workflow(http, slack))["workflow"]
    run = await http.post(f"/api/workflows/{wf['id']}/run", json={"payload": {"order": {"id": 7}}})
    assert run.status_code == 202, run.text
    execution_id = run.json()["data"]["execution"]["id"]
    for _ in range(200):
        ex = (await http.get(f"/api/executions/{execution_id}")).json()["data"]
        if ex["status"] == "succeeded":
            break
        await asyncio.sleep(0.05)
    assert ex["status"] == "succeeded" and slack.received == [{"text": "Order 7"}]
    listed = await http.get("/api/executions", params={"workflow_id": wf["id"], "status": "succeeded"})
    assert [e["id"] for e in listed.json()["data"]["executions"]] == [execution_id]


async def test_error_classes_use_the_envelope(stack) -> None:
    core, http, slack = stack
    cases = [
        (await http.get("/api/nowhere"), 404, "not_found"),
        (await http.put("/api/workflows"), 405, "method_not_allowed"),
        (await http.post("/api/workflows", content=b"{nope", headers={"content-type": "application/json"}), 400, "bad_request"),
        (await http.post("/api/workflows", content=b"name=x", headers={"content-type": "application/x-www-form-urlencoded"}), 415, "unsupported_media_type"),
        (await http.post("/api/workflows", content=b"x" * (300 * 1024), headers={"content-type": "application/json"}), 413, "payload_too_large"),
        (await http.post("/api/workflows", json={"name": "", "trigger": {"type": "bogus"}, "steps": []}), 422, "invalid_argument"),
        (await http.post("/api/workflows", json={"unknown_field": 1}), 400, "bad_request"),
        (await http.get("/api/workflows/wf_missing"), 404, "not_found"),
        (await http.get("/api/tenants"), 403, "permission_denied"),
        (await http.get("/api/workflows", headers={"authorization": "Bearer ipk_wrong"}), 401, "unauthenticated"),
        (await http.get("/api/workflows", params={"page_size": "many"}), 400, "bad_request"),
    ]
    for response, status, code in cases:
        assert response.status_code == status, (response.request.url, response.text)
        body = assert_envelope(response, False)
        assert body["error"]["code"] == code, body
        assert "Traceback" not in response.text
    assert cases[1][0].headers["allow"] == "GET, HEAD, POST"
    invalid = cases[5][0].json()["error"]["details"]
    assert {"field": "trigger.type", "description": "must be one of webhook, schedule, manual"} in invalid


async def test_each_error_over_rest_names_its_reason(stack) -> None:
    """error.reason tells apart what code and status do not: the core's reasons (from its
    ErrorInfo) and the gateway's own. Before, the envelope had code and English only."""
    core, http, slack = stack
    wf = (await create_workflow(http, slack))["workflow"]
    hook = (await create_workflow(http, slack, trigger="webhook"))["workflow"]
    async with httpx.AsyncClient(base_url=http.base_url, headers={"authorization": f"Bearer {ADMIN_KEY}"}, timeout=10) as admin:
        tenant_route_as_admin = await admin.get("/api/workflows")
    await http.post("/api/workflows", json={"name": "k"}, headers={"Idempotency-Key": "reason-k"})
    cases = [
        (await http.get("/api/nowhere"), 404, "ROUTE_NOT_FOUND"),
        (await http.put("/api/workflows"), 405, "METHOD_NOT_ALLOWED"),
        (await http.post("/api/workflows", content=b"{nope", headers={"content-type": "application/json"}), 400, "REQUEST_UNPARSABLE"),
        (await http.post("/api/workflows", content=b"name=x", headers={"content-type": "application/x-www-form-urlencoded"}), 415, "UNSUPPORTED_MEDIA_TYPE"),
        (await http.post("/api/workflows", content=b"x" * (300 * 1024), headers={"content-type": "application/json"}), 413, "PAYLOAD_TOO_LARGE"),
        (await http.post("/api/workflows", json={"name": "", "trigger": {"type": "bogus"}, "steps": []}), 422, "INVALID_FIELD"),
        (await http.post("/api/workflows", json={"unknown_field": 1}), 400, "INVALID_FIELD"),
        (await http.get("/api/workflows/wf_missing"), 404, "WORKFLOW_NOT_FOUND"),
        (await http.get(f"/api/workflows/{wf['id']}/versions/9"), 404, "WORKFLOW_VERSION_NOT_FOUND"),
        (await http.get("/api/executions/ex_missing"), 404, "EXECUTION_NOT_FOUND"),
        (await http.delete("/api/credentials/cred_missing"), 404, "CREDENTIAL_NOT_FOUND"),
        (await http.get("/api/tenants"), 403, "ADMIN_KEY_REQUIRED"),
        (tenant_route_as_admin, 403, "TENANT_KEY_REQUIRED"),
        (await http.get("/api/workflows", headers={"authorization": ""}), 401, "API_KEY_MISSING"),
        (await http.get("/api/workflows", headers={"authorization": "Bearer ipk_wrong"}), 401, "API_KEY_INVALID"),
        (await http.get("/api/workflows", headers={"authorization": "Bearer ipk_wrong"}), 401, "API_KEY_INVALID"),  # from the gateway's cache
        (await http.patch(f"/api/workflows/{wf['id']}", json={"name": "z"}, headers={"If-Match": '"7"'}), 409, "STALE_VERSION"),
        (await http.patch(f"/api/workflows/{wf['id']}", json={"name": "z"}, headers={"If-Match": "seven"}), 400, "INVALID_HEADER"),
        (await http.post(f"/api/workflows/{wf['id']}/webhook-secret/rotate", json={}), 400, "WORKFLOW_NOT_WEBHOOK_TRIGGERED"),
        (await http.post("/api/workflows", json={"name": "other"}, headers={"Idempotency-Key": "reason-k"}), 422, "IDEMPOTENCY_KEY_REUSED"),
        (await http.post(f"/api/webhooks/{hook['id']}", json={"order": {"id": 1}}), 401, "WEBHOOK_SIGNATURE_INVALID"),
        (await http.post("/api/webhooks/wf_missing", json={"order": {"id": 1}}), 404, "WORKFLOW_NOT_FOUND"),
    ]
    for response, status, reason in cases:
        assert (response.status_code, assert_envelope(response, False)["error"]["reason"]) == (status, reason), (response.request.url, response.text)


async def test_error_domain_and_metadata_over_rest_are_the_cores_error_info(stack) -> None:
    """error.domain and error.metadata pass on google.rpc.ErrorInfo as the core sent it, so a
    REST client learns which resource an error is about (and the current version of a stale
    one) without parsing English. Before, the envelope carried the reason alone."""
    core, http, slack = stack
    wf = (await create_workflow(http, slack))["workflow"]
    hook = (await create_workflow(http, slack, trigger="webhook"))["workflow"]
    long_id = "wf_" + "x" * 200  # under the gateway's 256, over the core's 128 for metadata
    cases = [
        (await http.get("/api/workflows/wf_missing"), 404, "WORKFLOW_NOT_FOUND", {"resourceType": "workflow", "workflowId": "wf_missing"}),
        (await http.get(f"/api/workflows/{wf['id']}/versions/9"), 404, "WORKFLOW_VERSION_NOT_FOUND", {"resourceType": "workflow_version", "workflowId": wf["id"], "version": "9"}),
        (await http.patch(f"/api/workflows/{wf['id']}", json={"name": "z"}, headers={"If-Match": '"7"'}), 409, "STALE_VERSION", {"resourceType": "workflow", "workflowId": wf["id"], "currentVersion": "1"}),
        (await http.get(f"/api/workflows/{long_id}"), 404, "WORKFLOW_NOT_FOUND", {"resourceType": "workflow", "workflowId": long_id[: reasons.MAX_METADATA_CHARS - 1] + "…"}),
        # An item of the core's webhook batch fails with its own google.rpc.Status.
        (await http.post(f"/api/webhooks/{hook['id']}", json={"order": {"id": 1}}), 401, "WEBHOOK_SIGNATURE_INVALID", {"resourceType": "workflow", "workflowId": hook["id"]}),
        (await http.get("/api/tenants"), 403, "ADMIN_KEY_REQUIRED", {}),
        (await http.get("/api/workflows", headers={"authorization": "Bearer ipk_wrong"}), 401, "API_KEY_INVALID", {}),
        (await http.get("/api/workflows", headers={"authorization": "Bearer ipk_wrong"}), 401, "API_KEY_INVALID", {}),  # from the gateway's cache
        (await http.get("/api/nowhere"), 404, "ROUTE_NOT_FOUND", {}),  # the gateway's own
    ]
    for response, status, reason, metadata in cases:
        error = assert_envelope(response, False)["error"]
        assert (response.status_code, error["reason"], error["domain"], error["metadata"]) == (status, reason, "ipaas.v1", metadata), (response.request.url, response.text)

    # The same error over gRPC and over REST: one ErrorInfo, nothing added on the way.
    api = Api(core.channel, (("authorization", http.headers["authorization"]),))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await api.workflows.GetWorkflow(workflows_pb2.GetWorkflowRequest(id="wf_missing"), metadata=api.md)
    info = error_details_pb2.ErrorInfo()
    assert [d for d in rpc_status.from_call(caught.value).details if d.Unpack(info)]
    assert (info.reason, info.domain, dict(info.metadata)) == ("WORKFLOW_NOT_FOUND", cases[0][0].json()["error"]["domain"], cases[0][0].json()["error"]["metadata"])

    # Metadata is ids the core chose: a refused credential names its kind, never its secrets.
    again = await http.post("/api/credentials", json={"connector": "slack", "name": "team-manual", "secrets": {"webhook_url": slack.url}})
    error = assert_envelope(again, False)["error"]
    assert (again.status_code, error["reason"], error["metadata"]) == (409, "CREDENTIAL_ALREADY_EXISTS", {"resourceType": "credential"})
    assert slack.url not in again.text and slack.token not in again.text


async def test_idempotent_replay_conflict_and_changed_body(stack) -> None:
    core, http, slack = stack
    wf = (await create_workflow(http, slack))["workflow"]
    key = {"Idempotency-Key": "run-order-1"}
    first = await http.post(f"/api/workflows/{wf['id']}/run", json={"payload": {"order": {"id": 1}}}, headers=key)
    second = await http.post(f"/api/workflows/{wf['id']}/run", json={"payload": {"order": {"id": 1}}}, headers=key)
    assert first.status_code == second.status_code == 202
    assert second.headers["x-idempotency-replay"] == "true" and "x-idempotency-replay" not in first.headers
    assert second.json()["data"] == first.json()["data"]
    # The replay's envelope names the replay's request id, not the first request's.
    assert_envelope(second, True)["meta"]["request_id"] != first.json()["meta"]["request_id"]
    changed = await http.post(f"/api/workflows/{wf['id']}/run", json={"payload": {"order": {"id": 2}}}, headers=key)
    assert changed.status_code == 422
    seeds_header = await http.post(f"/api/workflows/{wf['id']}/run", json={}, headers={"X-Idempotency-Key": "k2"})
    again = await http.post(f"/api/workflows/{wf['id']}/run", json={}, headers={"X-Idempotency-Key": "k2"})
    assert again.headers.get("x-idempotency-replay") == "true" and again.json()["data"] == seeds_header.json()["data"]
    for _ in range(200):
        if len(slack.received) >= 2:
            break
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.2)
    assert len(slack.received) == 2, "replays ran nothing"
    too_long = await http.post(f"/api/workflows/{wf['id']}/run", json={}, headers={"Idempotency-Key": "k" * 256})
    assert too_long.status_code == 400


async def test_two_different_idempotency_keys_in_one_request_are_refused(stack) -> None:
    """Before, the first header won: a client sending both (a proxy adding one) could get
    another request's kept answer, or a run it meant to dedupe."""
    core, http, slack = stack
    wf = (await create_workflow(http, slack))["workflow"]
    run = f"/api/workflows/{wf['id']}/run"
    both = await http.post(run, json={}, headers=[("Idempotency-Key", "a"), ("X-Idempotency-Key", "b")])
    repeated = await http.post(run, json={}, headers=[("Idempotency-Key", "a"), ("Idempotency-Key", "b")])
    for response in (both, repeated):
        assert response.status_code == 400, response.text
        error = assert_envelope(response, False)["error"]
        assert "more than one Idempotency-Key" in error["message"] and error["reason"] == "INVALID_HEADER", error
    agreeing = await http.post(run, json={}, headers=[("Idempotency-Key", "a"), ("X-Idempotency-Key", "a")])
    assert agreeing.status_code == 202, agreeing.text
    for _ in range(200):
        if slack.received:
            break
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.3)
    assert len(slack.received) == 1, "only the request with one key ran"


async def test_two_authorization_headers_are_refused_not_the_first_taken(stack) -> None:
    """Before, the gateway sent the core only the first value, so a request carrying two
    tenants' keys ran as whichever a client or proxy wrote first; the core refuses the same
    over gRPC (AUTHORIZATION_AMBIGUOUS)."""
    core, http, slack = stack
    other = await core.new_tenant(tier="paid", name="other")
    mine = http.headers["authorization"]
    one = await http.get("/api/caller")
    assert one.status_code == 200, one.text
    for values in ([mine, f"Bearer {other.key}"], [f"Bearer {other.key}", mine], [mine, mine], ["", mine]):
        for response in (
            await http.get("/api/caller", headers=[("authorization", v) for v in values]),
            await http.post("/api/workflows", json={"name": "x"}, headers=[("authorization", v) for v in values]),
        ):
            assert response.status_code == 401, (values, response.text)
            error = assert_envelope(response, False)["error"]
            assert (error["reason"], error["code"]) == ("AUTHORIZATION_AMBIGUOUS", "unauthenticated"), error
    listed = assert_envelope(await http.get("/api/workflows"), True)["data"]["workflows"]
    assert listed == [], "a refused create wrote nothing"


async def test_two_if_match_headers_are_refused_not_the_first_taken(stack) -> None:
    """Two If-Match lines are one list, as `"1", "2"` in one line is, which was refused
    already: taking the first checked the change against a version the client may not have
    meant."""
    core, http, slack = stack
    wf = (await create_workflow(http, slack))["workflow"]
    for values in (['"1"', '"2"'], ['"2"', '"1"'], ['"1"', '"1"']):
        answer = await http.patch(f"/api/workflows/{wf['id']}", json={"name": "two"}, headers=[("If-Match", v) for v in values])
        assert answer.status_code == 400, (values, answer.text)
        assert assert_envelope(answer, False)["error"]["reason"] == "INVALID_HEADER"
    assert (await http.get(f"/api/workflows/{wf['id']}")).json()["data"]["version"] == 1
    one = await http.patch(f"/api/workflows/{wf['id']}", json={"name": "one"}, headers={"If-Match": '"1"'})
    assert one.status_code == 200 and one.json()["data"]["version"] == 2, one.text


async def test_in_flight_repeat_is_a_conflict(stack) -> None:
    core, http, slack = stack
    slack.delay = 1.0
    cred = (await http.post("/api/credentials", json={"connector": "slack", "name": "slow", "secrets": {"webhook_url": slack.url}})).json()["data"]["id"]
    definition = {"workflow": {"name": "d", "trigger": {"type": "manual"}, "steps": [{"id": "s", "connector": "slack", "action": "send_message", "config": {"text": "x"}, "credential_id": cred}]}, "mode": "test"}
    headers = {"Idempotency-Key": "slow-dry-run"}
    first = asyncio.create_task(http.post("/api/workflows/dry-run", json=definition, headers=headers))
    await asyncio.sleep(0.3)
    second = await http.post("/api/workflows/dry-run", json=definition, headers=headers)
    assert second.status_code == 409
    assert (await first).status_code == 200


async def test_signed_webhook_through_the_gateway(stack) -> None:
    core, http, slack = stack
    created = await create_workflow(http, slack, trigger="webhook")
    wf_id, secret = created["workflow"]["id"], created["webhook_secret"]
    raw, headers = signed_webhook(secret, {"order": {"id": "W-9"}}, "evt_1")
    async with httpx.AsyncClient(base_url=str(http.base_url)) as anonymous:
        accepted = await anonymous.post(f"/api/webhooks/{wf_id}", content=raw, headers=headers)
        assert accepted.status_code == 202, accepted.text
        assert accepted.json()["data"]["execution_id"].startswith("ex_")
        bad = await anonymous.post(f"/api/webhooks/{wf_id}", content=raw, headers={**headers, "webhook-signature": "v1,bad"})
        assert bad.status_code == 401
        big = await anonymous.post(f"/api/webhooks/{wf_id}", content=b"{" + b" " * (1024 * 1024 + 1) + b"}", headers=headers)
        assert big.status_code == 413
        missing = await anonymous.post("/api/webhooks/wf_nope", content=raw, headers=headers)
        assert missing.status_code == 404


async def test_a_webhook_body_that_is_not_json_is_400_as_issue_4_says(stack) -> None:
    """Answered 422 INVALID_FIELD naming http_body.data before, as if a field's value were
    refused; issue 4 says not JSON → 400, which REST bodies that are not JSON get too
    (REQUEST_UNPARSABLE). A webhook's Content-Type is not looked at."""
    from ipaas.v1 import executions_pb2, executions_pb2_grpc

    core, http, slack = stack
    created = await create_workflow(http, slack, trigger="webhook")
    wf_id, secret = created["workflow"]["id"], created["webhook_secret"]
    async with httpx.AsyncClient(base_url=str(http.base_url)) as anonymous:
        for n, (raw, content_type) in enumerate([(b"hello", "text/plain"), (b"hello", "application/json"), (b"a=1&b=2", "application/x-www-form-urlencoded"), (b'{"order": ', "application/json"), (b'{"a": "\xff"}', "application/json")]):
            # Not UTF-8 is refused before the signature is checked (the signer cannot sign it).
            headers = {**(signed_headers(secret, raw, f"evt_nj_{n}") if raw.isascii() else {}), "content-type": content_type}
            answer = await anonymous.post(f"/api/webhooks/{wf_id}", content=raw, headers=headers)
            assert answer.status_code == 400, (raw, answer.text)
            error = assert_envelope(answer, False)["error"]
            assert (error["reason"], error["details"]) == ("REQUEST_UNPARSABLE", []) and "not valid JSON" in error["message"], error
        unsigned = await anonymous.post(f"/api/webhooks/{wf_id}", content=b"hello", headers={"content-type": "text/plain"})
        assert unsigned.status_code == 401, "the signature is checked before the JSON"
        raw = b'{"order": {"id": "T-1"}}'
        as_text = await anonymous.post(f"/api/webhooks/{wf_id}", content=raw, headers={**signed_headers(secret, raw, "evt_text"), "content-type": "text/plain"})
        assert as_text.status_code == 202, as_text.text
    # The same over gRPC: REQUEST_UNPARSABLE, and no BadRequest, as for a request that did not parse.
    hook = executions_pb2.ReceiveWebhookRequest(workflow_id=wf_id, http_body=httpbody_pb2.HttpBody(data=b"hello"), headers=signed_headers(secret, b"hello", "evt_grpc"))
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await executions_pb2_grpc.ExecutionServiceStub(core.channel).ReceiveWebhook(hook)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = rpc_status.from_call(refused.value).details
    info = error_details_pb2.ErrorInfo()
    assert len(details) == 1 and details[0].Unpack(info) and info.reason == "REQUEST_UNPARSABLE", details


async def test_concurrent_webhooks_each_get_their_own_answer(stack) -> None:
    """The gateway sends webhooks that arrive together in one call to the core: a bad one
    among them fails alone, and every good one is accepted once and delivered once."""
    core, http, slack = stack
    created = await create_workflow(http, slack, trigger="webhook")
    wf_id, secret = created["workflow"]["id"], created["webhook_secret"]
    good = [signed_webhook(secret, {"order": {"id": f"C-{i}"}}, f"evt_c{i}") for i in range(30)]
    unsigned = [(raw, {**headers, "webhook-signature": "v1,bad"}) for raw, headers in good[:5]]
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    async with httpx.AsyncClient(base_url=str(http.base_url), limits=limits, timeout=10) as anonymous:
        sends = [anonymous.post(f"/api/webhooks/{wf_id}", content=raw, headers=headers) for raw, headers in good]
        sends += [anonymous.post(f"/api/webhooks/{wf_id}", content=raw, headers=headers) for raw, headers in unsigned]
        sends += [anonymous.post("/api/webhooks/wf_nope", content=good[0][0], headers=good[0][1]) for _ in range(3)]
        sends += [anonymous.post(f"/api/webhooks/{wf_id}", content=raw, headers=headers) for raw, headers in good[:5]]  # repeats
        answers = await asyncio.gather(*sends)
    assert [a.status_code for a in answers] == [202] * 30 + [401] * 5 + [404] * 3 + [202] * 5
    for answer in answers:
        assert_envelope(answer, answer.status_code == 202)
    assert len({a.headers["x-request-id"] for a in answers}) == len(answers)
    ids = [a.json()["data"]["execution_id"] for a in answers[:30]]
    assert len(set(ids)) == 30
    assert [a.json()["data"]["execution_id"] for a in answers[-5:]] == ids[:5]
    for _ in range(200):
        if len(slack.received) >= 30:
            break
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.2)
    assert sorted(m["text"] for m in slack.received) == sorted(f"Order C-{i}" for i in range(30))


async def test_a_webhooks_request_id_leads_to_its_execution_in_the_log(stack) -> None:
    """An operator holds a webhook's request id (the sender's X-Request-ID answer, a gateway
    line) and follows it to the delivery. The execution's lines come from the engine, which
    never saw the request: before, no line held the request id and the execution id
    together. Now the core's acceptance line pairs them, through the gateway's batched call
    and a direct ReceiveWebhook alike."""
    import io

    from google.api import httpbody_pb2

    from ipaas.logs import configure_logging
    from ipaas.v1 import executions_pb2, executions_pb2_grpc
    from tests.integration.helpers import signed_headers

    core, http, slack = stack
    created = await create_workflow(http, slack, trigger="webhook")
    wf_id, secret = created["workflow"]["id"], created["webhook_secret"]
    stream = io.StringIO()
    handler = configure_logging("INFO", stream)
    try:
        raw, headers = signed_webhook(secret, {"order": {"id": "T-1"}}, "evt_trace")
        async with httpx.AsyncClient(base_url=str(http.base_url), timeout=10) as anonymous:
            answer = await anonymous.post(f"/api/webhooks/{wf_id}", content=raw, headers={**headers, "X-Request-ID": "trace-me-42"})
        assert answer.status_code == 202 and answer.headers["x-request-id"] == "trace-me-42", answer.text
        via_gateway = answer.json()["data"]["execution_id"]
        direct_raw = b'{"order":{"id":"T-2"}}'
        request = executions_pb2.ReceiveWebhookRequest(workflow_id=wf_id, http_body=httpbody_pb2.HttpBody(content_type="application/json", data=direct_raw), headers=signed_headers(secret, direct_raw, "evt_trace_2"))
        direct = (await executions_pb2_grpc.ExecutionServiceStub(core.channel).ReceiveWebhook(request, metadata=(("x-request-id", "direct-7"),))).execution_id
        for _ in range(200):
            if stream.getvalue().count('"execution.finished"') >= 2:
                break
            await asyncio.sleep(0.05)
    finally:
        logging.getLogger().removeHandler(handler)
    lines = [orjson.loads(line) for line in stream.getvalue().splitlines()]
    paired = {rid: eid for line in lines if line["event"] == "webhooks.accepted" for rid, eid in zip(line["request_ids"], line["execution_ids"], strict=True)}
    assert paired.get("trace-me-42") == via_gateway and paired.get("direct-7") == direct, lines
    finished = {line["execution_id"] for line in lines if line["event"] == "execution.finished"}
    assert {via_gateway, direct} <= finished, "the engine's lines carry the execution id the pair leads to"


async def test_large_webhooks_arriving_together_are_each_accepted(stack) -> None:
    """Bodies near the 1 MiB limit: the webhooks that leave the gateway together stay within
    a gRPC message (4 MiB), so none fails for its neighbours' size."""
    core, http, slack = stack
    created = await create_workflow(http, slack, trigger="webhook")
    wf_id, secret = created["workflow"]["id"], created["webhook_secret"]
    big = [signed_webhook(secret, {"order": {"id": f"B-{i}"}, "pad": "x" * 900_000}, f"evt_b{i}") for i in range(6)]
    limits = httpx.Limits(max_connections=16, max_keepalive_connections=16)
    async with httpx.AsyncClient(base_url=str(http.base_url), limits=limits, timeout=30) as anonymous:
        answers = await asyncio.gather(*(anonymous.post(f"/api/webhooks/{wf_id}", content=raw, headers=headers) for raw, headers in big))
    assert [a.status_code for a in answers] == [202] * 6, [a.text[:200] for a in answers]
    assert len({a.json()["data"]["execution_id"] for a in answers}) == 6
    for _ in range(200):
        if len(slack.received) >= 6:
            break
        await asyncio.sleep(0.05)
    assert sorted(m["text"] for m in slack.received) == sorted(f"Order B-{i}" for i in range(6))
    # Six such payloads are more than one gRPC message: pages end early instead of failing.
    listed, token = [], ""
    for _ in range(6):
        page = await http.get("/api/executions", params={"workflow_id": wf_id, "page_size": 20, "page_token": token})
        body = assert_envelope(page, True)
        assert 0 < len(body["data"]["executions"]) < 6
        listed += [e["id"] for e in body["data"]["executions"]]
        if not (token := body["meta"]["pagination"]["next_page_token"]):
            break
    assert sorted(listed) == sorted(a.json()["data"]["execution_id"] for a in answers)


async def test_health_probes(stack) -> None:
    core, http, slack = stack
    live = await http.get("/health/live")
    ready = await http.get("/health/ready")
    health = await http.get("/health")
    assert live.status_code == ready.status_code == health.status_code == 200
    report = health.json()["data"]
    assert report["status"] == "healthy" and report["checks"] == {"core": "ok", "database": "ok", "runtime": "ok"}
    assert "ratelimit-policy" not in health.headers, "health is not rate limited"


async def test_health_follows_the_core(tmp_path) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    listen = {"IPAAS_GRPC_LISTEN": f"127.0.0.1:{port}"}
    async with gateway_for(f"127.0.0.1:{port}", tmp_path) as url, httpx.AsyncClient(base_url=url, timeout=10) as http:
        async with core_with(tmp_path / "a", **listen):
            assert (await http.get("/health")).status_code == 200
        down = await http.get("/health")
        assert down.status_code == 503 and down.json()["error"]["code"] == "unavailable"
        assert down.json()["error"]["reason"] == "NOT_READY"
        assert (await http.get("/health/ready")).status_code == 503
        assert (await http.get("/health/live")).status_code == 200
        async with core_with(tmp_path / "b", **listen):
            for _ in range(50):
                if (await http.get("/health")).status_code == 200:
                    break
                await asyncio.sleep(0.1)
            assert (await http.get("/health")).status_code == 200


async def test_free_tenant_is_limited_while_paid_is_not(tmp_path) -> None:
    async with core_with(tmp_path) as core, gateway_for(core.target, tmp_path) as url:
        free, paid = await core.new_tenant(tier="free"), await core.new_tenant(tier="paid")
        async with httpx.AsyncClient(base_url=url, timeout=10) as http:
            async def burst(key: str, n: int) -> list[httpx.Response]:
                return list(await asyncio.gather(*(http.get("/api/workflows", headers={"authorization": f"Bearer {key}"}) for _ in range(n))))

            free_answers, paid_answers = await asyncio.gather(burst(free.key, 15), burst(paid.key, 15))
    assert sorted(r.status_code for r in free_answers).count(200) == 10
    limited = [r for r in free_answers if r.status_code == 429]
    assert len(limited) == 5 and all(int(r.headers["retry-after"]) >= 1 for r in limited)
    assert limited[0].json()["error"]["code"] == "rate_limited" and limited[0].json()["error"]["reason"] == "RATE_LIMITED"
    assert all(r.status_code == 200 for r in paid_answers)
    ok = next(r for r in free_answers if r.status_code == 200)
    assert ok.headers["x-ratelimit-limit"] == "10" and ok.headers["ratelimit-policy"] == '"free";q=10;w=2'
    assert ok.headers["ratelimit"].startswith('"free";r=')


async def test_openapi_and_docs(stack) -> None:
    core, http, slack = stack
    doc = (await http.get("/openapi.json")).json()
    assert doc["openapi"] == "3.1.0"
    assert {"/api/workflows", "/api/workflows/{id}", "/api/webhooks/{workflow_id}", "/api/workflows/dry-run", "/api/executions/{id}/replay"} <= set(doc["paths"])
    assert "201" in doc["paths"]["/api/workflows"]["post"]["responses"]
    assert doc["paths"]["/api/workflows/{id}"]["get"]["parameters"][0]["schema"] == {"type": "string", "maxLength": 256}
    docs = await http.get("/docs")
    assert docs.status_code == 200 and "/openapi.json" in docs.text


async def test_openapi_describes_the_answers_and_headers_the_gateway_uses(stack) -> None:
    """The document said meta.next_page_token and data.next_page_token (the gateway answers
    meta.pagination.next_page_token), documented neither If-Match (PATCH without it or the
    query parameter is 422) nor Idempotency-Key nor a webhook's signature headers."""
    core, http, slack = stack
    doc = (await http.get("/openapi.json")).json()
    schemas = doc["components"]["schemas"]
    workflow = (await create_workflow(http, slack))["workflow"]
    await create_workflow(http, slack, trigger="webhook")
    page = assert_envelope(await http.get("/api/workflows", params={"page_size": 1}), True)
    meta = schemas["Meta"]["properties"]
    assert set(page["meta"]) <= set(meta) and set(page["meta"]["pagination"]) == set(meta["pagination"]["properties"]) == {"next_page_token"}
    assert page["meta"]["pagination"]["next_page_token"]
    assert set(page["data"]) == set(schemas["ListWorkflowsResponse"]["properties"])
    assert not [name for name, schema in schemas.items() if "next_page_token" in schema.get("properties", {})]
    reason = schemas["ErrorEnvelope"]["properties"]["error"]["properties"]["reason"]
    assert set(reason["enum"]) == set(reasons.ALL) and "docs/errors.md" in reason["description"]
    error = schemas["ErrorEnvelope"]["properties"]["error"]["properties"]
    assert error["domain"]["const"] == reasons.DOMAIN and error["metadata"]["additionalProperties"] == {"type": "string"}
    assert "docs/errors.md" in error["code"]["description"], "code is not the HTTP status lower-cased: say where it is defined"

    def headers(path: str, verb: str) -> dict[str, dict]:
        return {p["name"]: p for p in doc["paths"][path][verb]["parameters"] if p["in"] == "header"}

    # If-Match was marked required, so generated clients forced it, though the
    # expected_version query parameter does the same: one of the two is needed.
    patch = headers("/api/workflows/{id}", "patch")
    assert patch["If-Match"]["required"] is False and "expected_version" in patch["If-Match"]["description"]
    unversioned = await http.patch(f"/api/workflows/{workflow['id']}", json={"name": "n"})
    versioned = await http.patch(f"/api/workflows/{workflow['id']}", json={"name": "n"}, headers={"If-Match": '"1"'})
    by_query = await http.patch(f"/api/workflows/{workflow['id']}", json={"name": "q"}, params={"expected_version": 2})
    assert (unversioned.status_code, versioned.status_code, by_query.status_code) == (422, 200, 200), (unversioned.text, versioned.text, by_query.text)
    assert headers("/api/workflows/{id}/rollback", "post")["If-Match"]["required"] is False
    writes = [(path, verb) for path, item in doc["paths"].items() for verb in item if verb in ("post", "patch")]
    assert writes and all("Idempotency-Key" in headers(path, verb) for path, verb in writes)
    assert not [(path, verb) for path, item in doc["paths"].items() for verb in item if verb not in ("post", "patch") and "Idempotency-Key" in headers(path, verb)]
    assert {"webhook-id", "webhook-timestamp", "webhook-signature"} <= set(headers("/api/webhooks/{workflow_id}", "post"))

    # The health probes were missing from the document.
    for path in ("/health", "/health/live", "/health/ready"):
        probe = doc["paths"][path]["get"]
        assert probe["security"] == [] and {"200", "503"} <= set(probe["responses"]), probe
        described = probe["responses"]["200"]["content"]["application/json"]["schema"]["properties"]["data"]["properties"]
        async with httpx.AsyncClient(base_url=str(http.base_url)) as anonymous:
            answer = await anonymous.get(path)
        assert answer.status_code == 200 and set(assert_envelope(answer, True)["data"]) <= set(described), (path, answer.text)


async def test_connectors_breakers_and_caller_over_rest(stack) -> None:
    core, http, slack = stack
    connectors = assert_envelope(await http.get("/api/connectors"), True)["data"]["connectors"]
    by_name = {c["name"]: c for c in connectors}
    assert {"slack", "discord", "openweather"} <= set(by_name)
    assert by_name["slack"]["actions"][0]["config_schema"]["required"] == ["text"]
    assert by_name["discord"]["distribution"] == "ipaas-discord"
    assert assert_envelope(await http.get("/api/breakers"), True)["data"] == {"breakers": []}
    assert assert_envelope(await http.get("/api/caller"), True)["data"]["tier"] == "paid"


async def test_revoking_a_key_answers_200_with_the_key_not_204(stack) -> None:
    """DELETE /api/keys/{key_id} is RevokeApiKey, not a Delete RPC: the key is kept, listed
    with revoked_at, so the answer is the key (as docs/architecture.md says), and revoking
    it again answers the same."""
    core, http, slack = stack
    async with httpx.AsyncClient(base_url=http.base_url, headers={"authorization": f"Bearer {ADMIN_KEY}"}, timeout=10) as admin:
        tenant = assert_envelope(await admin.post("/api/tenants", json={"name": "revoked", "tier": "free"}), True)["data"]
        key = assert_envelope(await admin.post(f"/api/tenants/{tenant['id']}/keys", json={"name": "k"}), True)["data"]
        revoked = await admin.delete(f"/api/keys/{key['api_key']['id']}")
        again = await admin.delete(f"/api/keys/{key['api_key']['id']}")
        listed = assert_envelope(await admin.get(f"/api/tenants/{tenant['id']}/keys"), True)["data"]["api_keys"]
    assert revoked.status_code == again.status_code == 200, (revoked.text, again.text)
    first, second = assert_envelope(revoked, True)["data"]["api_key"], assert_envelope(again, True)["data"]["api_key"]
    assert first["id"] == key["api_key"]["id"] and first["revoked_at"] and second["revoked_at"] == first["revoked_at"]
    assert [(k["id"], k["revoked_at"]) for k in listed] == [(first["id"], first["revoked_at"])]
    async with httpx.AsyncClient(base_url=http.base_url, headers={"authorization": f"Bearer {key['secret']}"}, timeout=10) as holder:
        assert (await holder.get("/api/caller")).status_code == 401


async def test_slow_or_silent_clients_lose_their_connection(tmp_path) -> None:
    """A client that never finishes its request head, or sends its body too slowly, must not
    hold a connection forever (slowloris): the head is due within IPAAS_HTTP_HEAD_TIMEOUT of
    connecting or of the previous response, the body within IPAAS_HTTP_BODY_TIMEOUT (408)."""
    deadlines = {"IPAAS_HTTP_HEAD_TIMEOUT": "0.5", "IPAAS_HTTP_BODY_TIMEOUT": "0.5"}
    async with core_with(tmp_path) as core, gateway_for(core.target, tmp_path, **deadlines) as url:
        port = int(url.rsplit(":", 1)[1])
        head = b"POST /api/webhooks/wf_missing HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"

        async def closed_after(sent: bytes, trickle: bytes = b"") -> tuple[float, bytes]:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            started = asyncio.get_running_loop().time()
            writer.write(sent)

            async def drip() -> None:  # a byte every 0.1 s must not keep the deadline away
                for byte in trickle:
                    await asyncio.sleep(0.1)
                    writer.write(bytes([byte]))

            dripping = asyncio.create_task(drip())
            try:
                answer = await asyncio.wait_for(reader.read(), 5)  # until the gateway closes
            finally:
                dripping.cancel()
                writer.close()
            return asyncio.get_running_loop().time() - started, answer

        elapsed, answer = await closed_after(b"")
        assert answer == b"" and elapsed < 2, "a connection that sends nothing is closed"
        elapsed, answer = await closed_after(head, trickle=b"X-Slow: " + b"y" * 40)
        assert answer == b"" and elapsed < 2, "a head trickled in is closed at its deadline"
        elapsed, answer = await closed_after(head + b"Content-Length: 100\r\n\r\n" + b'{"a":', trickle=b'"bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb')
        status, _, rest = answer.partition(b"\r\n")
        assert status == b"HTTP/1.1 408 Request Timeout" and elapsed < 2, answer[:200]
        assert b'"code":"request_timeout"' in rest and b"connection: close" in rest.lower()

        # Clients that keep to the deadlines are served, on one kept-alive connection too.
        async with httpx.AsyncClient(base_url=url, timeout=5) as http:
            for pause in (0, 0.3):
                await asyncio.sleep(pause)
                assert (await http.get("/health/live")).status_code == 200
            reused = http._transport._pool.connections
            assert len(reused) == 1, "the same connection served both"
        # After a response, the next head is due within the deadline as well.
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /health/live HTTP/1.1\r\nHost: x\r\n\r\n" + head)
        first = await asyncio.wait_for(reader.readuntil(b"}}"), 5)
        assert first.startswith(b"HTTP/1.1 200")
        assert await asyncio.wait_for(reader.read(), 3) == b"", "the unfinished second head is cut off"
        writer.close()


async def wait_until_settled(http: httpx.AsyncClient, execution_id: str) -> str:
    for _ in range(200):
        status = (await http.get(f"/api/executions/{execution_id}")).json()["data"]["status"]
        if status in ("succeeded", "failed"):
            return status
        await asyncio.sleep(0.05)
    return status


async def test_a_full_queue_is_not_kept_for_the_idempotency_key(tmp_path) -> None:
    """429 (the core's queue is full) is no answer to the request: a retry with the same key
    once the queue has drained runs, instead of being told 429 again for 24 h."""
    async with FakeSlack(delay=0.5) as slack, core_with(tmp_path, IPAAS_MAX_QUEUE_DEPTH="1", **FAST) as core, gateway_for(core.target, tmp_path) as url:
        paid = await core.new_tenant(tier="paid")
        async with httpx.AsyncClient(base_url=url, headers={"authorization": f"Bearer {paid.key}"}, timeout=10) as http:
            wf = (await create_workflow(http, slack))["workflow"]
            first = await http.post(f"/api/workflows/{wf['id']}/run", json={}, headers={"Idempotency-Key": "k1"})
            full = await http.post(f"/api/workflows/{wf['id']}/run", json={}, headers={"Idempotency-Key": "k2"})
            assert first.status_code == 202 and full.status_code == 429, (first.text, full.text)
            assert await wait_until_settled(http, first.json()["data"]["execution"]["id"]) == "succeeded"
            for _ in range(30):  # the core counts its queue again within a second
                retry = await http.post(f"/api/workflows/{wf['id']}/run", json={}, headers={"Idempotency-Key": "k2"})
                if retry.status_code != 429 or "x-idempotency-replay" in retry.headers:
                    break
                await asyncio.sleep(0.2)
            assert retry.status_code == 202 and "x-idempotency-replay" not in retry.headers, retry.text
            again = await http.post(f"/api/workflows/{wf['id']}/run", json={}, headers={"Idempotency-Key": "k2"})
            assert again.headers["x-idempotency-replay"] == "true" and again.json()["data"] == retry.json()["data"]


async def test_core_unavailable_is_not_kept_but_a_conflict_is(tmp_path) -> None:
    """503 (the core was down) runs again on a retry with the same key; a version conflict
    (409) is the request's real answer and is replayed."""
    port = free_port()
    listen = {"IPAAS_GRPC_LISTEN": f"127.0.0.1:{port}", **FAST}
    credential = {"connector": "slack", "name": "x", "secrets": {"webhook_url": "http://127.0.0.1:9/x"}}
    async with FakeSlack() as slack, gateway_for(f"127.0.0.1:{port}", tmp_path) as url:
        async with core_with(tmp_path / "c", **listen) as core:
            paid = await core.new_tenant(tier="paid")
            http = httpx.AsyncClient(base_url=url, headers={"authorization": f"Bearer {paid.key}"}, timeout=10)
            wf = (await create_workflow(http, slack))["workflow"]
            stale = {"Idempotency-Key": "p1", "If-Match": '"7"'}
            conflict = await http.patch(f"/api/workflows/{wf['id']}", json={"name": "n"}, headers=stale)
            replayed = await http.patch(f"/api/workflows/{wf['id']}", json={"name": "n"}, headers=stale)
            assert conflict.status_code == replayed.status_code == 409 and replayed.headers["x-idempotency-replay"] == "true"
            assert_envelope(replayed, False)
        down = await http.post("/api/credentials", json=credential, headers={"Idempotency-Key": "c1"})
        assert down.status_code == 503, down.text
        async with core_with(tmp_path / "c", **listen):
            for _ in range(50):
                if (await http.get("/health/ready")).status_code == 200:
                    break
                await asyncio.sleep(0.1)
            retry = await http.post("/api/credentials", json=credential, headers={"Idempotency-Key": "c1"})
        await http.aclose()
    assert retry.status_code == 201 and "x-idempotency-replay" not in retry.headers, retry.text


async def test_the_cores_not_now_answers_say_when_to_retry(tmp_path) -> None:
    """A full queue (429) and a core that is down (503) come with Retry-After, as the
    gateway's own 429 does: without it a client either gives up or retries at once."""
    port = free_port()
    listen = {"IPAAS_GRPC_LISTEN": f"127.0.0.1:{port}", "IPAAS_MAX_QUEUE_DEPTH": "0", **FAST}
    async with FakeSlack() as slack, gateway_for(f"127.0.0.1:{port}", tmp_path) as url:
        async with core_with(tmp_path / "c", **listen) as core:
            paid = await core.new_tenant(tier="paid")
            http = httpx.AsyncClient(base_url=url, headers={"authorization": f"Bearer {paid.key}"}, timeout=10)
            wf = (await create_workflow(http, slack))["workflow"]
            full = await http.post(f"/api/workflows/{wf['id']}/run", json={})
        down = await http.get("/api/workflows")
        await http.aclose()
    assert full.status_code == 429 and assert_envelope(full, False)["error"]["code"] == "resource_exhausted", full.text
    assert full.headers.get("retry-after") == "1" and full.json()["error"]["reason"] == "QUEUE_FULL"
    assert down.status_code == 503 and assert_envelope(down, False)["error"]["code"] == "unavailable", down.text
    assert down.json()["error"]["reason"] == "CORE_UNAVAILABLE"
    assert down.headers.get("retry-after") == "5"


async def test_webhook_idempotency_keys_are_the_cores_not_the_gateways(stack) -> None:
    """The gateway keeps no answer for a webhook's Idempotency-Key: it would be kept before
    the core checked the signature, so anyone could answer the genuine delivery (a stored
    401) or read its answer (a stored 202). The key goes to the core, which dedupes only
    what it accepted."""
    core, http, slack = stack
    created = await create_workflow(http, slack, trigger="webhook")
    wf_id, secret = created["workflow"]["id"], created["webhook_secret"]
    hook = f"/api/webhooks/{wf_id}"
    unsigned = {"content-type": "application/json"}
    async with httpx.AsyncClient(base_url=str(http.base_url), timeout=10) as anonymous:
        raw, signed = signed_webhook(secret, {"order": {"id": "P"}}, "evt_p")
        forged = await anonymous.post(hook, content=raw, headers={**unsigned, "Idempotency-Key": "d-42"})
        genuine = await anonymous.post(hook, content=raw, headers={**signed, "Idempotency-Key": "d-42"})
        assert forged.status_code == 401 and genuine.status_code == 202, genuine.text
        copy = await anonymous.post(hook, content=raw, headers={**unsigned, "Idempotency-Key": "d-42"})
        assert copy.status_code == 401 and genuine.json()["data"]["execution_id"] not in copy.text
        retried = await anonymous.post(hook, content=raw, headers={**signed, "Idempotency-Key": "d-42"})
        assert retried.status_code == 202 and retried.json()["data"]["execution_id"] == genuine.json()["data"]["execution_id"]
        assert retried.json()["data"]["duplicate"] is True
        # A webhook's key does not take the owner's own key of the same name.
        await anonymous.post(hook, content=raw, headers={**signed, "Idempotency-Key": "order-1"})
        own = await http.post("/api/credentials", json={"connector": "slack", "name": "k", "secrets": {"webhook_url": slack.url}}, headers={"Idempotency-Key": "order-1"})
        assert own.status_code == 201, own.text
        # The key still reaches the core: unsigned senders (allowed by the workflow) dedupe on it.
        opened = await http.patch(f"/api/workflows/{wf_id}", json={"options": {"allow_unsigned_webhooks": True}}, headers={"If-Match": '"1"'})
        assert opened.status_code == 200, opened.text
        open_ = [await anonymous.post(hook, content=b'{"order":{"id":"U"}}', headers={**unsigned, "Idempotency-Key": "u-1"}) for _ in range(2)]
        assert [r.status_code for r in open_] == [202, 202] and open_[0].json()["data"]["execution_id"] == open_[1].json()["data"]["execution_id"]
        # An anonymous sender's key is not the owner's: it does not answer with a run the owner started.
        ran = await http.post(f"/api/workflows/{wf_id}/run", json={"payload": {"order": {"id": "R"}}}, headers={"Idempotency-Key": "u-2"})
        sent = await anonymous.post(hook, content=b'{"order":{"id":"V"}}', headers={**unsigned, "Idempotency-Key": "u-2"})
        assert ran.status_code == 202 and sent.status_code == 202 and sent.json()["data"]["duplicate"] is False
        assert sent.json()["data"]["execution_id"] != ran.json()["data"]["execution"]["id"]
    for _ in range(200):
        if len(slack.received) >= 4:
            break
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.2)
    assert sorted(m["text"] for m in slack.received) == ["Order P", "Order R", "Order U", "Order V"]


async def test_an_unsigned_delivery_cannot_take_a_signed_senders_webhook_id(stack) -> None:
    """Where unsigned webhooks are allowed, anyone may send one, with any webhook-id. Sent
    first with the id a genuine sender will use (Svix's ids are often guessable), it used to
    make the signed delivery a "duplicate" of the forgery: its own payload never ran. Signed
    deliveries now dedupe apart from unverified ones, and each still dedupes its retries."""
    core, http, slack = stack
    created = await create_workflow(http, slack, trigger="webhook")
    wf_id, secret = created["workflow"]["id"], created["webhook_secret"]
    opened = await http.patch(f"/api/workflows/{wf_id}", json={"options": {"allow_unsigned_webhooks": True}}, headers={"If-Match": '"1"'})
    assert opened.status_code == 200, opened.text
    hook = f"/api/webhooks/{wf_id}"
    async with httpx.AsyncClient(base_url=str(http.base_url), timeout=10) as anonymous:
        forged_raw = b'{"order":{"id":"FORGED"}}'
        forged = {"content-type": "application/json", "webhook-id": "evt_42"}
        first = await anonymous.post(hook, content=forged_raw, headers=forged)
        raw, signed = signed_webhook(secret, {"order": {"id": "GENUINE"}}, "evt_42")
        genuine = await anonymous.post(hook, content=raw, headers=signed)
        assert first.status_code == 202 and genuine.status_code == 202, genuine.text
        assert genuine.json()["data"]["duplicate"] is False
        assert genuine.json()["data"]["execution_id"] != first.json()["data"]["execution_id"]
        # A signature that does not verify proves nothing: that delivery is an unsigned one.
        bad = {**signed, "webhook-signature": "v1," + "A" * 44}
        retried = [await anonymous.post(hook, content=raw, headers=signed), await anonymous.post(hook, content=forged_raw, headers=bad)]
        assert [r.json()["data"]["execution_id"] for r in retried] == [genuine.json()["data"]["execution_id"], first.json()["data"]["execution_id"]]
        assert all(r.json()["data"]["duplicate"] for r in retried)
    for _ in range(200):
        if len(slack.received) >= 2:
            break
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.2)
    assert sorted(m["text"] for m in slack.received) == ["Order FORGED", "Order GENUINE"]


async def test_only_accepted_webhooks_spend_the_owners_rate_limit(tmp_path) -> None:
    """Anyone who knows a workflow id can post to its webhook: requests the core refuses
    (unsigned) must not use up the owner's budget and rate-limit its own API calls. Accepted
    webhooks are still charged to the owner, and past the budget get 429 with Retry-After."""
    async with FakeSlack() as slack, core_with(tmp_path, **FAST) as core, gateway_for(core.target, tmp_path, IPAAS_RATE_FREE="1/10") as url:
        owner = await core.new_tenant(tier="free")
        async with httpx.AsyncClient(base_url=url, headers={"authorization": f"Bearer {owner.key}"}, timeout=10) as http, httpx.AsyncClient(base_url=url, timeout=10) as anonymous:
            created = await create_workflow(http, slack, trigger="webhook")  # 2 of 10 spent
            hook, secret = f"/api/webhooks/{created['workflow']['id']}", created["webhook_secret"]
            raw, signed = signed_webhook(secret, {"order": {"id": 0}}, "evt_0")
            accepted = await anonymous.post(hook, content=raw, headers=signed)  # 3: the owner is known from here on
            assert accepted.status_code == 202
            junk = await asyncio.gather(*(anonymous.post(hook, content=b"{}", headers={"content-type": "application/json"}) for _ in range(12)))
            assert [r.status_code for r in junk] == [401] * 12
            own = await http.get("/api/workflows")  # 4
            assert own.status_code == 200 and own.headers["x-ratelimit-remaining"] == "6", (own.status_code, own.headers.get("x-ratelimit-remaining"))
            answers = []
            for i in range(1, 8):
                raw, signed = signed_webhook(secret, {"order": {"id": i}}, f"evt_{i}")
                answers.append(await anonymous.post(hook, content=raw, headers=signed))
    assert [r.status_code for r in answers] == [202] * 6 + [429], [r.status_code for r in answers]
    assert answers[-1].json()["error"]["code"] == "rate_limited" and int(answers[-1].headers["retry-after"]) >= 1
    assert answers[0].headers["x-ratelimit-remaining"] == "5" and "retry-after" not in answers[5].headers


async def test_webhooks_the_core_refuses_spend_their_addresss_budget_for_that_workflow(tmp_path) -> None:
    """Refused webhooks (bad signature, unknown workflow) spent nobody's budget: 2,000 from
    one address all reached the core, each unknown id a database read. Each refusal now
    spends the budget of its (address, workflow): past it, that address's webhooks to that
    workflow wait (429, Retry-After) without the core being asked; the same address's
    webhooks to other workflows, and other addresses (here through the trusted local
    proxy's X-Forwarded-For), are unaffected, and accepted webhooks never spend it."""
    async with FakeSlack() as slack, core_with(tmp_path, **FAST) as core, gateway_for(core.target, tmp_path, IPAAS_RATE_ANONYMOUS_WEBHOOKS="0.5/4") as url:
        owner = await core.new_tenant(tier="paid")
        async with httpx.AsyncClient(base_url=url, headers={"authorization": f"Bearer {owner.key}"}, timeout=10) as http, httpx.AsyncClient(base_url=url, timeout=10) as anonymous:
            created = await create_workflow(http, slack, trigger="webhook")
            hook, secret = f"/api/webhooks/{created['workflow']['id']}", created["webhook_secret"]
            forged = {"content-type": "application/json", "webhook-id": "evt_x", "webhook-timestamp": "1", "webhook-signature": "v1,AAAA"}
            elsewhere = {"x-forwarded-for": "203.0.113.9"}
            refused = [await anonymous.post(hook, content=b"{}", headers=forged) for _ in range(4)]
            limited = await anonymous.post(hook, content=b"{}", headers=forged)
            raw, signed = signed_webhook(secret, {"order": {"id": 1}}, "evt_1")
            waits_too = await anonymous.post(hook, content=raw, headers=signed)
            unknown = await anonymous.post("/api/webhooks/wf_nope1", content=b"{}", headers=forged)
            accepted = []
            for i in range(6):  # more than the budget's 4, from another address
                raw, signed = signed_webhook(secret, {"order": {"id": i}}, f"evt_other_{i}")
                accepted.append(await anonymous.post(hook, content=raw, headers={**signed, **elsewhere}))
            other_refused = await anonymous.post(hook, content=b"{}", headers={**forged, **elsewhere})
    assert [r.status_code for r in refused] == [401] * 4, [r.text for r in refused]
    assert refused[-1].headers["ratelimit-policy"] == '"anonymous_webhooks";q=4;w=8' and refused[-1].headers["x-ratelimit-remaining"] == "0"
    assert limited.status_code == 429 and waits_too.status_code == 429, limited.text
    assert assert_envelope(limited, False)["error"]["reason"] == "RATE_LIMITED" and int(limited.headers["retry-after"]) >= 1
    assert unknown.status_code == 404 and unknown.headers["x-ratelimit-remaining"] == "3", "another workflow's budget"
    assert [r.status_code for r in accepted] == [202] * 6, [r.text for r in accepted]
    assert other_refused.status_code == 401 and other_refused.headers["x-ratelimit-remaining"] == "3", "accepted webhooks spent none of it"


async def test_one_tenants_refused_webhooks_never_hold_up_another_tenants(tmp_path) -> None:
    """SaaS senders deliver for every tenant from a few addresses. Tenant A's deleted
    workflow, still wired into the SaaS, was refused from that address until the address's
    budget ran out, and then tenant B's signed webhooks from the same address got 429."""
    async with FakeSlack() as slack, core_with(tmp_path, **FAST) as core, gateway_for(core.target, tmp_path, IPAAS_RATE_ANONYMOUS_WEBHOOKS="0.5/4") as url:
        a, b = await core.new_tenant(tier="paid", name="a"), await core.new_tenant(tier="paid", name="b")
        async with (
            httpx.AsyncClient(base_url=url, headers={"authorization": f"Bearer {a.key}"}, timeout=10) as tenant_a,
            httpx.AsyncClient(base_url=url, headers={"authorization": f"Bearer {b.key}"}, timeout=10) as tenant_b,
            httpx.AsyncClient(base_url=url, timeout=10) as saas,
        ):
            dead = (await create_workflow(tenant_a, slack, trigger="webhook"))["workflow"]["id"]
            live = await create_workflow(tenant_b, slack, trigger="webhook")
            assert (await tenant_a.delete(f"/api/workflows/{dead}")).status_code in (200, 204)
            retries = [(await saas.post(f"/api/webhooks/{dead}", content=b"{}", headers={"content-type": "application/json"})).status_code for _ in range(10)]
            answers = []
            for i in range(5):
                raw, signed = signed_webhook(live["webhook_secret"], {"order": {"id": i}}, f"evt_b{i}")
                answers.append(await saas.post(f"/api/webhooks/{live['workflow']['id']}", content=raw, headers=signed))
    assert retries[:4] == [404] * 4 and 429 in retries, retries
    assert [r.status_code for r in answers] == [202] * 5, [r.text for r in answers]


async def test_a_flood_of_unknown_workflow_ids_waits_but_live_workflows_do_not(tmp_path) -> None:
    """Made-up workflow ids each cost the core a call and a database read. An address's 404s
    for distinct ids spend a budget of their own (ten times IPAAS_RATE_ANONYMOUS_WEBHOOKS),
    and past it its webhooks to ids not known live wait; a workflow this gateway accepted a
    webhook for lately does not."""
    async with FakeSlack() as slack, core_with(tmp_path, **FAST) as core, gateway_for(core.target, tmp_path, IPAAS_RATE_ANONYMOUS_WEBHOOKS="0.1/1") as url:
        owner = await core.new_tenant(tier="paid")
        async with httpx.AsyncClient(base_url=url, headers={"authorization": f"Bearer {owner.key}"}, timeout=10) as http, httpx.AsyncClient(base_url=url, timeout=10) as flood:
            created = await create_workflow(http, slack, trigger="webhook")
            hook, secret = f"/api/webhooks/{created['workflow']['id']}", created["webhook_secret"]
            raw, signed = signed_webhook(secret, {"order": {"id": 0}}, "evt_0")
            assert (await flood.post(hook, content=raw, headers=signed)).status_code == 202
            made_up = [(await flood.post(f"/api/webhooks/wf_made_up_{i}", content=b"{}", headers={"content-type": "application/json"})).status_code for i in range(12)]
            raw, signed = signed_webhook(secret, {"order": {"id": 1}}, "evt_1")
            live = await flood.post(hook, content=raw, headers=signed)
            elsewhere = await flood.post("/api/webhooks/wf_made_up_x", content=b"{}", headers={"content-type": "application/json", "x-forwarded-for": "203.0.113.9"})
    assert made_up[:10] == [404] * 10 and made_up[10:] == [429, 429], made_up
    assert live.status_code == 202 and elsewhere.status_code == 404, (live.text, elsewhere.text)


async def test_an_address_never_refused_does_not_look_at_its_webhook_budget(tmp_path, monkeypatch) -> None:
    """Looking at the anonymous-webhook budget before each webhook cost ~5 us, 5 % of the
    gateway's CPU for a webhook, for every sender, though only a refused one has anything
    spent. An address's webhooks look at it only after the core has refused one of them."""
    from ipaas.gateway import app as gateway_app

    made = []
    create = gateway_app.create_app
    monkeypatch.setattr(gateway_app, "create_app", lambda *a, **k: made.append(create(*a, **k)) or made[-1])
    async with FakeSlack() as slack, core_with(tmp_path, **FAST) as core, gateway_for(core.target, tmp_path) as url:
        owner = await core.new_tenant(tier="paid")
        looks: list[str] = []
        limiter = made[0].limiter
        check = limiter.check

        async def counted(tenant_id: str, tier_name: str, spend: bool = True):
            if tier_name == "anonymous_webhooks":
                looks.append("spend" if spend else "look")
            return await check(tenant_id, tier_name, spend=spend)

        monkeypatch.setattr(limiter, "check", counted)
        async with httpx.AsyncClient(base_url=url, headers={"authorization": f"Bearer {owner.key}"}, timeout=10) as http, httpx.AsyncClient(base_url=url, timeout=10) as anonymous:
            created = await create_workflow(http, slack, trigger="webhook")
            hook, secret = f"/api/webhooks/{created['workflow']['id']}", created["webhook_secret"]
            for i in range(3):
                raw, signed = signed_webhook(secret, {"order": {"id": i}}, f"evt_{i}")
                assert (await anonymous.post(hook, content=raw, headers=signed)).status_code == 202
            assert looks == []
            assert (await anonymous.post(hook, content=b"{}", headers={"content-type": "application/json"})).status_code == 401
            raw, signed = signed_webhook(secret, {"order": {"id": 9}}, "evt_9")
            assert (await anonymous.post(hook, content=raw, headers=signed)).status_code == 202
    assert looks == ["spend", "look"]


async def test_the_webhook_owner_cache_is_bounded(tmp_path, monkeypatch) -> None:
    """The gateway kept the owner of every webhook workflow it ever accepted a webhook for,
    for good, unlike its other caches: bounded now like them (cleared when full)."""
    from ipaas.gateway import app as gateway_app

    made = []
    create = gateway_app.create_app
    monkeypatch.setattr(gateway_app, "create_app", lambda *a, **k: made.append(create(*a, **k)) or made[-1])
    monkeypatch.setattr(gateway_app, "MAX_CACHED_KEYS", 2)
    async with FakeSlack() as slack, core_with(tmp_path, **FAST) as core, gateway_for(core.target, tmp_path) as url:
        owner = await core.new_tenant(tier="paid")
        async with httpx.AsyncClient(base_url=url, headers={"authorization": f"Bearer {owner.key}"}, timeout=10) as http:
            first = (await create_workflow(http, slack, trigger="webhook"))["workflow"]
            definition = {"name": "hook", "trigger": {"type": "webhook"}, "steps": first["steps"]}
            answers, sizes = [], []
            for i in range(5):
                created = (await http.post("/api/workflows", json=definition)).json()["data"]
                raw, signed = signed_webhook(created["webhook_secret"], {"order": {"id": i}}, f"evt_{i}")
                answers.append((await http.post(f"/api/webhooks/{created['workflow']['id']}", content=raw, headers=signed)).status_code)
                sizes.append(len(made[0]._owners))
    assert answers == [202] * 5 and max(sizes) <= 3, (answers, sizes)


async def test_requests_with_no_known_caller_have_a_budget_per_address(tmp_path, monkeypatch) -> None:
    """Requests with no API key or a made-up one were never limited: each cost a core call
    and a database read. They now spend their address's anonymous budget before the core is
    asked, and a key the core refused is answered here for a few seconds. Keys accepted
    before, webhooks and health probes from the same address do not depend on that budget."""
    monkeypatch.setattr("ipaas.gateway.app.CALLER_TTL", 0.1)  # tenants are re-checked with the core
    async with FakeSlack() as slack, core_with(tmp_path, **FAST) as core, gateway_for(core.target, tmp_path, IPAAS_RATE_ANONYMOUS="0.5/4") as url:
        paid = await core.new_tenant(tier="paid")
        async with httpx.AsyncClient(base_url=url, headers={"authorization": f"Bearer {paid.key}"}, timeout=10) as http, httpx.AsyncClient(base_url=url, timeout=10) as anonymous:
            created = await create_workflow(http, slack, trigger="webhook")  # the key's first check: 1 of 4
            bad = {"authorization": "Bearer ipk_made_up"}
            refused = await anonymous.get("/api/workflows", headers=bad)  # 2
            keyless = [await anonymous.get("/api/workflows") for _ in range(3)]  # 3, 4, over
            other_bad = await anonymous.get("/api/workflows", headers={"authorization": "Bearer ipk_other"})
            refused_again = await anonymous.get("/api/workflows", headers=bad)
            await asyncio.sleep(0.2)
            own = await http.get("/api/workflows")
            raw, signed = signed_webhook(created["webhook_secret"], {"order": {"id": 1}}, "evt_1")
            hook = await anonymous.post(f"/api/webhooks/{created['workflow']['id']}", content=raw, headers=signed)
            live = await anonymous.get("/health/live")
    assert refused.status_code == 401 and [r.status_code for r in keyless] == [401, 401, 429], [r.text for r in keyless]
    assert assert_envelope(keyless[-1], False)["error"]["code"] == "rate_limited" and int(keyless[-1].headers["retry-after"]) >= 1
    assert keyless[0].headers["ratelimit-policy"] == '"anonymous";q=4;w=8'
    assert other_bad.status_code == 429  # a key never accepted waits with the anonymous requests
    # Refused from memory, before the budget (which would say 429) and the core are asked.
    assert refused_again.status_code == 401 and refused_again.json()["error"] == refused.json()["error"]
    assert own.status_code == 200 and own.headers["ratelimit-policy"].startswith('"paid"'), own.text
    assert hook.status_code == 202 and live.status_code == 200, hook.text


async def test_a_dead_redis_lets_requests_through_but_not_keyed_ones(tmp_path, caplog) -> None:
    """Redis down: the rate limiter lets requests through (one warning, not one per request,
    without the URL's password), a keyed request gets 503 (its key cannot be honoured),
    /health reports Redis failing, and /health/ready stays ready: every gateway shares the
    Redis, and taking all of them out of the balancer would turn a partial outage into a
    full one."""
    caplog.set_level(logging.WARNING)
    dead = f"redis://:s3cret-pw@127.0.0.1:{free_port()}/0"
    async with core_with(tmp_path) as core, gateway_for(core.target, tmp_path, IPAAS_REDIS_URL=dead) as url:
        paid = await core.new_tenant(tier="paid")
        async with httpx.AsyncClient(base_url=url, headers={"authorization": f"Bearer {paid.key}"}, timeout=10) as http:
            listed = [await http.get("/api/workflows") for _ in range(3)]
            keyed = await http.post("/api/credentials", json={"connector": "slack", "name": "x", "secrets": {"webhook_url": "http://127.0.0.1:9/x"}}, headers={"Idempotency-Key": "c1"})
            ready = await http.get("/health/ready")
            live = await http.get("/health/live")
            health = await http.get("/health")
    assert [r.status_code for r in listed] == [200] * 3, [r.text for r in listed]
    assert keyed.status_code == 503 and assert_envelope(keyed, False)["error"]["code"] == "unavailable", keyed.text
    assert keyed.headers["retry-after"] == "5", "a 503 says when to come back, as the core's do"
    assert ready.status_code == 200 and live.status_code == 200, ready.text
    assert health.status_code == 503 and assert_envelope(health, False)["error"]["details"][0]["checks"]["redis"] == "failing", health.text
    assert [r.getMessage() for r in caplog.records].count("ratelimit.unavailable") == 1, [r.getMessage() for r in caplog.records]
    assert "s3cret-pw" not in caplog.text and "s3cret-pw" not in keyed.text + health.text


async def test_oversized_input_gets_a_plain_answer_not_transport_text(stack) -> None:
    """An id, a query value or an Authorization header far longer than any real one is
    refused by the gateway (404, 400, 401); an error echoing a 20 KB field (which gRPC could
    not carry in its trailers: 429 with the transport's words) is clipped by the core."""
    core, http, slack = stack
    long_id = await http.get("/api/workflows/" + "a" * 60000)
    long_query = await http.get("/api/executions", params={"workflow_id": "w" * 300})
    long_key = await http.get("/api/caller", headers={"authorization": "Bearer " + "x" * 20000})
    echoed = await http.post("/api/credentials", json={"connector": "x" * 20000, "name": "n", "secrets": {}})
    steps = [{"id": f"s{i}", "connector": "x" * 4900 + str(i), "action": "a", "config": {}} for i in range(50)]
    many = await http.post("/api/workflows", json={"name": "n", "trigger": {"type": "manual"}, "steps": steps})
    for response, status, code in [(long_id, 404, "not_found"), (long_query, 400, "bad_request"), (long_key, 401, "unauthenticated"), (echoed, 422, "invalid_argument"), (many, 422, "invalid_argument")]:
        assert (response.status_code, assert_envelope(response, False)["error"]["code"]) == (status, code), response.text[:300]
        # The transport's words ("... metadata size exceeds ..."), not the envelope's error.metadata.
        words = response.text.replace('"metadata":', "")
        assert "metadata" not in words and "Stream removed" not in words and "x" * 1100 not in words
    assert 1 <= len(many.json()["error"]["details"]) < 50, "as many violations as fit the answer"
    assert long_query.json()["error"]["details"] == [{"field": "workflow_id", "description": "at most 256 characters"}]
    # Within the bounds nothing changes, and the core's own 429 (queue full) stays a 429: see above.
    assert (await http.get("/api/workflows/" + "a" * 256)).status_code == 404
    assert (await http.get("/api/executions", params={"workflow_id": "w" * 256})).status_code == 200


async def test_request_headers_past_64_kib_get_431_on_every_route(stack) -> None:
    """A signed webhook with megabytes of headers got 502 ("the core's answer could not be
    read": its headers overran the gRPC message), which its sender retries forever. Heads
    past 64 KiB are refused at once, on every route, in the envelope."""
    core, http, slack = stack
    created = await create_workflow(http, slack, trigger="webhook")
    raw, signed = signed_webhook(created["webhook_secret"], {"order": {"id": "H"}}, "evt_h")
    hook = f"/api/webhooks/{created['workflow']['id']}"
    host, port = str(http.base_url).removeprefix("http://").rstrip("/").split(":")

    async def sent(head: bytes, body: bytes = b"") -> tuple[int, dict]:
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(head + b"".join(b"x-pad-%d: " % i + b"a" * 100_000 + b"\r\n" for i in range(50)) + b"\r\n" + body)
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), 20)  # the connection is closed after it
        writer.close()
        status_line, _, rest = answer.partition(b"\r\n")
        return int(status_line.split()[1]), orjson.loads(rest.partition(b"\r\n\r\n")[2])

    webhook_head = f"POST {hook} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(raw)}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in signed.items())
    for head, body in [(webhook_head.encode(), raw), (b"GET /api/workflows HTTP/1.1\r\nHost: x\r\n", b""), (b"GET /health/live HTTP/1.1\r\nHost: x\r\n", b"")]:
        status, answer = await sent(head, body)
        assert status == 431 and answer["success"] is False and answer["error"]["code"] == "request_header_fields_too_large", (head, answer)
        assert answer["error"]["reason"] == "HEADERS_TOO_LARGE"
    # Within the limit a webhook's headers still reach the core.
    padded = await http.post(hook, content=raw, headers={**signed, "x-pad": "a" * 60_000})
    assert padded.status_code == 202, padded.text


async def test_a_request_head_past_its_limit_is_cut_off_while_it_arrives(stack) -> None:
    """The 431 came only once the whole head had been read and parsed: 4 connections sending
    100 MiB of header lines took the gateway from 92 MB to 504 MB. A head still unfinished
    past 64 KiB of headers (plus a request line) is answered 431 and closed as it arrives;
    each request head on a kept-alive or pipelined connection has that much, not the
    connection."""
    core, http, slack = stack
    host, port = str(http.base_url).removeprefix("http://").rstrip("/").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    reading = asyncio.create_task(reader.read())  # until the gateway closes
    writer.write(b"POST /api/webhooks/wf_x HTTP/1.1\r\nHost: x\r\n")
    line, sent = b"x-pad: " + b"a" * 16_000 + b"\r\n", 0
    with contextlib.suppress(ConnectionError):
        while sent < 10 * 1024 * 1024 and not reading.done():
            writer.write(line)
            sent += len(line)
            await writer.drain()
            await asyncio.sleep(0.002)  # the gateway, in this event loop, reads it
    answer = await asyncio.wait_for(reading, 5)
    writer.close()
    status_line, _, rest = answer.partition(b"\r\n")
    assert status_line == b"HTTP/1.1 431 Request Header Fields Too Large", (sent, answer[:200])
    assert sent < 1024 * 1024, f"the gateway read {sent} bytes of head before answering"
    error = orjson.loads(rest.partition(b"\r\n\r\n")[2])["error"]
    assert error["reason"] == "HEADERS_TOO_LARGE" and b"connection: close" in rest.lower()

    # 50 KiB of headers per request, three times on one kept-alive connection, then once
    # more pipelined behind a fourth whose head arrives in two parts: all are served.
    def request(n: int) -> bytes:
        return b"GET /health/live HTTP/1.1\r\nHost: x\r\nx-pad: " + b"a" * 50_000 + b"\r\nx-n: %d\r\n\r\n" % n

    reader, writer = await asyncio.open_connection(host, int(port))
    answers = []
    for n in range(3):
        writer.write(request(n))
        answers.append(await asyncio.wait_for(reader.readuntil(b"}}"), 5))
    writer.write(request(3) + request(4)[:40_000])
    await writer.drain()
    await asyncio.sleep(0.1)
    writer.write(request(4)[40_000:])
    answers += [await asyncio.wait_for(reader.readuntil(b"}}"), 5) for _ in range(2)]
    writer.close()
    assert [a.split(b"\r\n")[0] for a in answers] == [b"HTTP/1.1 200 OK"] * 5, answers


async def test_past_the_connection_limit_requests_get_503_but_liveness_stays_200(tmp_path) -> None:
    """Nothing bounded the requests in progress, each of which may hold a head and a body
    in memory. Past IPAAS_HTTP_MAX_CONNECTIONS of them (here: heads being read), requests are
    answered 503 with Retry-After and their connection closed; /health/live still answers
    200, so a busy gateway is not restarted for it."""
    async with core_with(tmp_path) as core, gateway_for(core.target, tmp_path, IPAAS_HTTP_MAX_CONNECTIONS="3") as url:
        port = int(url.rsplit(":", 1)[1])
        idle = [await asyncio.open_connection("127.0.0.1", port) for _ in range(3)]
        for _, writer in idle:
            writer.write(b"GET /api/workflows HTTP/1.1\r\nhost: x\r\n")  # a head not finished yet
        await asyncio.sleep(0.05)
        async with httpx.AsyncClient(base_url=url, timeout=5) as http:
            busy = await http.get("/api/workflows")
            live = await http.get("/health/live")
        for _, writer in idle:
            writer.close()
        await asyncio.sleep(0.1)
        async with httpx.AsyncClient(base_url=url, timeout=5) as http:
            later = await http.get("/api/workflows")
    assert busy.status_code == 503 and assert_envelope(busy, False)["error"]["reason"] == "SERVICE_UNAVAILABLE", busy.text
    assert busy.headers["retry-after"] == "1" and busy.headers["connection"] == "close"
    assert live.status_code == 200, live.text
    assert later.status_code == 401, "below the limit again, requests are served"


async def test_idle_connections_do_not_count_toward_the_connection_limit(tmp_path) -> None:
    """Idle keep-alive connections counted toward IPAAS_HTTP_MAX_CONNECTIONS: a client
    holding that many idle sockets had every other request answered 503. They hold no head
    or body; only requests in progress count, and the idle ones are served when they speak."""
    async with core_with(tmp_path) as core, gateway_for(core.target, tmp_path, IPAAS_HTTP_MAX_CONNECTIONS="3") as url:
        port = int(url.rsplit(":", 1)[1])
        held = []
        for _ in range(3):  # one request each, then the connection sits idle, kept alive
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET /health/live HTTP/1.1\r\nhost: x\r\n\r\n")
            assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200")
            held.append((reader, writer))
        held.append(await asyncio.open_connection("127.0.0.1", port))  # and one that sends nothing
        await asyncio.sleep(0.05)
        async with httpx.AsyncClient(base_url=url, timeout=5) as http:
            fresh = [(await http.get("/openapi.json")).status_code for _ in range(3)]
            live = await http.get("/health/live")
        reader, writer = held[0]
        await reader.readuntil(b"}}")  # the rest of the first answer's body
        writer.write(b"GET /openapi.json HTTP/1.1\r\nhost: x\r\n\r\n")
        again = await reader.readuntil(b"\r\n")
        for _, writer in held:
            writer.close()
    assert fresh == [200] * 3 and live.status_code == 200, fresh
    assert again.startswith(b"HTTP/1.1 200"), again


async def test_header_values_that_cannot_be_passed_on_get_4xx(stack) -> None:
    """If-Match past int32 or with a non-ASCII digit, and non-ASCII Authorization or
    Idempotency-Key (gRPC metadata is ASCII) were 500s; they are the caller's mistakes."""
    core, http, slack = stack
    wf = (await create_workflow(http, slack))["workflow"]
    answers = [
        (await http.patch(f"/api/workflows/{wf['id']}", json={"name": "z"}, headers={"If-Match": '"99999999999"'}), 400, "bad_request"),
        (await http.patch(f"/api/workflows/{wf['id']}", json={"name": "z"}, headers={"If-Match": '"\xb2"'.encode("latin-1")}), 400, "bad_request"),
        (await http.patch(f"/api/workflows/{wf['id']}", json={"name": "z"}, headers={"If-Match": "9" * 5000}), 400, "bad_request"),
        (await http.get("/api/caller", headers={"authorization": "Bearer \xe9".encode("latin-1")}), 401, "unauthenticated"),
        (await http.post(f"/api/workflows/{wf['id']}/run", json={}, headers={"Idempotency-Key": "k\xe9".encode("latin-1")}), 400, "bad_request"),
    ]
    for response, status, code in answers:
        assert (response.status_code, assert_envelope(response, False)["error"]["code"]) == (status, code), response.text
    # A read has no use for a key: it is not passed on, so it cannot fail the read.
    assert (await http.get("/api/workflows", headers={"Idempotency-Key": "k\xe9".encode("latin-1")})).status_code == 200
    assert (await http.patch(f"/api/workflows/{wf['id']}", json={"name": "z"}, headers={"If-Match": 'W/"1"'})).status_code == 200


async def test_head_is_get_without_the_body(stack) -> None:
    """RFC 9110: every general-purpose server supports GET and HEAD. HEAD on the API's GET
    routes answered 405, which monitors that probe with HEAD read as down."""
    core, http, slack = stack
    wf = (await create_workflow(http, slack))["workflow"]
    got, head = await http.get(f"/api/workflows/{wf['id']}"), await http.head(f"/api/workflows/{wf['id']}")
    assert (head.status_code, head.content) == (200, b"") and got.status_code == 200
    assert head.headers["content-type"] == got.headers["content-type"] and int(head.headers["content-length"]) == len(got.content)
    missing = await http.head("/api/workflows/wf_missing")
    assert (missing.status_code, missing.content) == (404, b"")
    run_only = await http.head(f"/api/workflows/{wf['id']}/run")
    assert run_only.status_code == 405 and run_only.headers["allow"] == "POST"


async def test_an_encoded_slash_is_part_of_its_segment_not_a_separator(stack) -> None:
    """Routing follows the path as sent: `{id}%2Fversions` is one (unknown) id, not the
    versions list of {id}, as grpc-gateway and Envoy read it."""
    _, http, slack = stack
    wf = (await create_workflow(http, slack))["workflow"]
    listed = await http.get(f"/api/workflows/{wf['id']}/versions")
    assert listed.status_code == 200, listed.text
    smuggled = await http.get(f"/api/workflows/{wf['id']}%2Fversions")
    assert smuggled.status_code == 404, smuggled.text
    assert assert_envelope(smuggled, False)["error"]["code"] == "not_found"
    # Other escapes are still decoded inside a segment.
    escaped = "".join(f"%{b:02X}" for b in wf["id"].encode())
    assert (await http.get(f"/api/workflows/{escaped}")).status_code == 200


async def test_a_key_reused_with_another_if_match_is_a_different_request(stack) -> None:
    """If-Match decides what an update does, so it is part of what a key stands for."""
    _, http, slack = stack
    wf = (await create_workflow(http, slack))["workflow"]
    first = await http.patch(f"/api/workflows/{wf['id']}", json={"name": "n"}, headers={"Idempotency-Key": "im", "If-Match": '"9"'})
    assert first.status_code == 409, first.text
    other = await http.patch(f"/api/workflows/{wf['id']}", json={"name": "n"}, headers={"Idempotency-Key": "im", "If-Match": '"1"'})
    assert other.status_code == 422, other.text
    assert "x-idempotency-replay" not in other.headers


async def test_integers_a_double_cannot_hold_are_refused_not_rounded(stack) -> None:
    """Payloads travel as protobuf Struct (doubles): 2^60 + 1 would arrive as 2^60."""
    _, http, slack = stack
    wf = (await create_workflow(http, slack))["workflow"]
    refused = await http.post(f"/api/workflows/{wf['id']}/run", json={"payload": {"order": {"ids": [1, 2**60 + 1]}}})
    assert refused.status_code == 400, refused.text
    error = assert_envelope(refused, False)["error"]
    assert error["details"] == [{"field": "payload.order.ids[1]", "description": "integers must lie within ±9007199254740991"}]
    for edge in (2**53 - 1, -(2**53 - 1), 2.0**60):  # a float was a double already
        assert (await http.post(f"/api/workflows/{wf['id']}/run", json={"payload": {"n": edge}})).status_code == 202
    # Past 64 bits orjson reads an integer as a float: it was let through, rounded.
    for raw, field in [(b"123456789012345678901234567890", "payload.n"), (b"-18446744073709551617", "payload.n")]:
        big = await http.post(f"/api/workflows/{wf['id']}/run", content=b'{"payload":{"s":"1e30","n":' + raw + b"}}", headers={"content-type": "application/json"})
        assert big.status_code == 400 and assert_envelope(big, False)["error"]["details"][0]["field"] == field, big.text
    for written in (b"1e30", b"1.5e25", b'"123456789012345678901234567890"'):  # floats and text stay as they are
        kept = await http.post(f"/api/workflows/{wf['id']}/run", content=b'{"payload":{"n":' + written + b"}}", headers={"content-type": "application/json"})
        assert kept.status_code == 202, kept.text


async def test_an_error_the_cores_handlers_did_not_send_is_a_generic_502(tmp_path) -> None:
    """Something that answers gRPC without the core's x-request-id trailer (a proxy, a stream
    reset, an answer over the metadata limit): its words are the transport's and stay out of
    the answer. The same error with the trailer is the core's and is mapped as usual."""
    import grpc

    def handler(trailer: bool):
        async def answer(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            if trailer:
                context.set_trailing_metadata((("x-request-id", "r1"),))
            await context.abort(grpc.StatusCode.INTERNAL, "upstream connect error: reset reason 0x7 at 10.0.0.3")

        class Any(grpc.GenericRpcHandler):
            def service(self, details):  # noqa: ANN001
                return grpc.unary_unary_rpc_method_handler(answer)

        return Any()

    for trailer, status in ((False, 502), (True, 500)):
        server = grpc.aio.server()
        server.add_generic_rpc_handlers((handler(trailer),))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with gateway_for(f"127.0.0.1:{port}", tmp_path / str(trailer)) as url, httpx.AsyncClient(base_url=url, timeout=10) as http:
                answer = await http.get("/api/workflows", headers={"authorization": "Bearer ipk_x"})
        finally:
            await server.stop(None)
        assert answer.status_code == status, answer.text
        error = assert_envelope(answer, False)["error"]
        assert ("10.0.0.3" in error["message"]) is trailer, error
        # No ErrorInfo in either: the core's own INTERNAL (it sends one) is INTERNAL_ERROR too.
        assert error["reason"] == ("INTERNAL_ERROR" if trailer else "CORE_ANSWER_UNREADABLE"), error


async def test_a_body_of_the_wrong_shape_names_the_field_in_the_apis_words(stack) -> None:
    _, http, slack = stack
    wf = (await create_workflow(http, slack))["workflow"]
    cases = [
        (f"/api/workflows/{wf['id']}/run", {"paylod": {}}, "paylod", "is not a field of this request"),
        ("/api/workflows", {"name": "x", "steps": 3}, "steps", "must be a list"),
        ("/api/workflows", {"name": "x", "steps": [{"id": 3}]}, "steps.id", "must be a string"),
        ("/api/workflows", {"name": "x", "trigger": 3}, "trigger", "must be a JSON object"),
        ("/api/workflows", {"name": "x", "trigger": "manual"}, "trigger", "must be a JSON object"),
        ("/api/workflows", {"name": "x", "steps": ["notify"]}, "steps", "must be a JSON object"),
        ("/api/credentials", {"connector": "slack", "name": "n", "secrets": [1]}, "secrets", "must be a JSON object"),
        ("/api/workflows", {"name": "x", "options": {"allow_unsigned_webhooks": "yes"}}, "options.allow_unsigned_webhooks", "must be true or false"),
        ("/api/workflows", {"n" * 5000: 1}, "n" * 256 + "…", "is not a field of this request"),
    ]
    for path, body, field, problem in cases:
        answer = await http.post(path, json=body)
        assert answer.status_code == 400, answer.text
        error = assert_envelope(answer, False)["error"]
        assert error["details"] == [{"field": field, "description": problem}], error
        assert "Failed to parse" not in error["message"] and "bytes-like" not in error["message"], error


async def test_a_patch_of_one_option_keeps_the_others(stack) -> None:
    """PATCH {"options": {"max_attempts": 3}} changes that option only: before, proto3 could
    not tell the options left out from false and 0, and reset them."""
    core, http, slack = stack
    wf = await create_workflow(http, slack)
    wf_id = wf["workflow"]["id"]
    strict = await http.patch(f"/api/workflows/{wf_id}", json={"options": {"strict_templates": True}}, headers={"If-Match": '"1"'})
    assert strict.status_code == 200, strict.text
    patched = await http.patch(f"/api/workflows/{wf_id}", json={"options": {"max_attempts": 3}}, headers={"If-Match": '"2"'})
    assert patched.status_code == 200, patched.text
    assert assert_envelope(patched, True)["data"]["options"] == {"strict_templates": True, "max_attempts": 3, "allow_unsigned_webhooks": False}
    off = await http.patch(f"/api/workflows/{wf_id}", json={"options": {"strict_templates": False}}, headers={"If-Match": '"3"'})
    assert off.json()["data"]["options"] == {"strict_templates": False, "max_attempts": 3, "allow_unsigned_webhooks": False}, off.text


async def test_whole_numbers_come_back_as_integers_not_floats(stack) -> None:
    """Struct holds numbers as doubles; a REST answer shows a payload's 7 as 7, as sent."""
    _, http, slack = stack
    wf = (await create_workflow(http, slack))["workflow"]
    run = await http.post(f"/api/workflows/{wf['id']}/run", json={"payload": {"order": {"id": 7, "price": 2.5}}})
    assert run.status_code == 202, run.text
    execution = run.json()["data"]["execution"]["id"]
    read = await http.get(f"/api/executions/{execution}")
    for answer in (run, read):  # Struct keeps no key order
        assert re.search(r'"id":7[,}]', answer.text) and re.search(r'"price":2\.5[,}]', answer.text), answer.text


async def test_a_revoked_key_gets_no_replay(tmp_path) -> None:
    """A replay is answered from the gateway's store, not the core: the key is checked with
    the core first, so one revoked a moment ago cannot read the kept answer (here, a new
    webhook secret)."""
    from ipaas.v1 import tenants_pb2, tenants_pb2_grpc
    from tests.integration.helpers import Api, slack_step

    async with core_with(tmp_path, **FAST) as core:
        tenant = await core.new_tenant()
        api = Api(core.channel, tenant.md)
        cred = await api.credential("slack", {"webhook_url": "https://hooks.slack.com/services/T0/B0/x"})
        wf = (await api.create({"name": "w", "trigger": {"type": "webhook"}, "steps": [slack_step(cred)]})).workflow
        async with gateway_for(core.target, tmp_path) as url, httpx.AsyncClient(base_url=url, timeout=10) as http:
            keyed = {"authorization": f"Bearer {tenant.key}", "Idempotency-Key": "rot-1"}
            first = await http.post(f"/api/workflows/{wf.id}/webhook-secret/rotate", headers=keyed, json={})
            assert first.status_code == 200 and "whsec_" in first.text, first.text
            replay = await http.post(f"/api/workflows/{wf.id}/webhook-secret/rotate", headers=keyed, json={})
            assert replay.status_code == 200 and replay.headers["x-idempotency-replay"] == "true"
            await tenants_pb2_grpc.TenantServiceStub(core.channel).RevokeApiKey(tenants_pb2.RevokeApiKeyRequest(key_id=tenant.key_id), metadata=core.admin)
            revoked = await http.post(f"/api/workflows/{wf.id}/webhook-secret/rotate", headers=keyed, json={})
    assert revoked.status_code == 401 and "whsec_" not in revoked.text, revoked.text


@pytest.mark.parametrize("store", ["sql", pytest.param("redis", marks=pytest.mark.redis)])
async def test_kept_answers_hold_no_secret_at_rest_and_open_only_for_their_key(tmp_path, request, store: str) -> None:
    """An answer kept for replays (a new API key, a webhook secret) is sealed with the API key
    that made the request: the store holds no secret in plaintext, that key's replay reads
    it, and another key of the same tenant gets 422 instead of the answer."""
    import sqlite3

    import redis.asyncio as aioredis

    from ipaas.v1 import tenants_pb2, tenants_pb2_grpc
    from tests.integration.helpers import Api, slack_step

    env = {}
    if store == "redis":
        redis_url = request.getfixturevalue("redis_url")
        await aioredis.from_url(redis_url).flushdb()
        env["IPAAS_REDIS_URL"] = redis_url
    async with core_with(tmp_path, **FAST) as core:
        tenant = await core.new_tenant()
        other = await tenants_pb2_grpc.TenantServiceStub(core.channel).CreateApiKey(tenants_pb2.CreateApiKeyRequest(tenant_id=tenant.tenant_id, name="second"), metadata=core.admin)
        async with gateway_for(core.target, tmp_path, **env) as url, httpx.AsyncClient(base_url=url, timeout=10) as http:
            admin = {"authorization": f"Bearer {ADMIN_KEY}", "Idempotency-Key": "key-1"}
            made = await http.post(f"/api/tenants/{tenant.tenant_id}/keys", headers=admin, json={"name": "third"})
            assert made.status_code == 201, made.text
            new_key = made.json()["data"]["secret"]
            cred = await Api(core.channel, tenant.md).credential("slack", {"webhook_url": "https://hooks.slack.com/services/T0/B0/x"})
            body = {"name": "w", "trigger": {"type": "webhook"}, "steps": [slack_step(cred)]}
            hook = await http.post("/api/workflows", headers={"authorization": f"Bearer {tenant.key}", "Idempotency-Key": "wf-1"}, json=body)
            assert hook.status_code == 201, hook.text
            secret = hook.json()["data"]["webhook_secret"]

            again = await http.post(f"/api/tenants/{tenant.tenant_id}/keys", headers=admin, json={"name": "third"})
            assert again.headers["x-idempotency-replay"] == "true" and again.json()["data"]["secret"] == new_key
            by_other = await http.post("/api/workflows", headers={"authorization": f"Bearer {other.secret}", "Idempotency-Key": "wf-1"}, json=body)
            assert by_other.status_code == 422 and secret not in by_other.text, by_other.text

    if store == "sql":
        with sqlite3.connect(tmp_path / "gw" / "gateway-idempotency.db") as conn:
            kept = b"".join(bytes(row[0]) for row in conn.execute("SELECT body FROM gateway_idempotency_keys"))
    else:
        client = aioredis.from_url(env["IPAAS_REDIS_URL"])
        kept = b"".join([await client.dump(k) or b"" for k in await client.keys("*")])
        await client.flushdb()
        await client.aclose()
    assert kept and new_key.encode() not in kept and secret.encode() not in kept, f"the {store} store keeps a secret in plaintext"


async def test_a_client_still_sending_reads_the_answer_that_ends_its_request(tmp_path) -> None:
    """A body past its deadline gets 408 and the connection ends. Closed at once, the socket
    answered the bytes the client kept sending with a reset, which could destroy the 408
    before the client read it ("connection reset by peer"); the close is staged instead."""
    async with core_with(tmp_path) as core, gateway_for(core.target, tmp_path, IPAAS_HTTP_BODY_TIMEOUT="0.3") as url:
        port = int(url.rsplit(":", 1)[1])
        for _ in range(3):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"POST /api/webhooks/wf_missing HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n{")

            async def keep_sending() -> None:
                while True:  # a steady stream, well past the deadline
                    await asyncio.sleep(0.01)
                    writer.write(b" " * 64)

            sending = asyncio.create_task(keep_sending())
            try:
                answer = await asyncio.wait_for(reader.read(), 5)  # until the gateway's FIN
            finally:
                sending.cancel()
                writer.close()
            assert answer.startswith(b"HTTP/1.1 408 Request Timeout"), answer[:200]
