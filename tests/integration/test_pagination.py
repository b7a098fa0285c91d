"""Page tokens are bound to the listing that issued them (AIP-158): the same request walks
every page once, and a token replayed with another filter, by another List method or by
another caller is INVALID_ARGUMENT on page_token, over gRPC and through the gateway. A real
core with a fake Slack, a real gateway over HTTP."""

from __future__ import annotations

from typing import Any, Callable

import grpc
import httpx
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from ipaas.v1 import breakers_pb2, breakers_pb2_grpc, connectors_pb2, connectors_pb2_grpc, credentials_pb2, executions_pb2, tenants_pb2, tenants_pb2_grpc, workflows_pb2
from tests.conftest import ADMIN_KEY, core_with, gateway_for
from tests.fakes.slack import FakeSlack
from tests.integration.helpers import Api, slack_step

FAST = {"IPAAS_RETRY_BASE_DELAY": "0.01", "IPAAS_POLL_INTERVAL": "0.05"}
ADMIN = {"authorization": f"Bearer {ADMIN_KEY}"}


@pytest.fixture
async def env(tmp_path):
    async with FakeSlack() as slack, core_with(tmp_path, **FAST) as core, gateway_for(core.target, tmp_path) as url:
        tenant = await core.new_tenant()
        async with httpx.AsyncClient(base_url=url, headers={"authorization": f"Bearer {tenant.key}"}, timeout=10) as http:
            yield core, Api(core.channel, tenant.md), tenant, http, slack


async def refused_token(call) -> str:  # type: ignore[no-untyped-def]
    """The call fails with INVALID_ARGUMENT naming page_token; its message."""
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    bad = error_details_pb2.BadRequest()
    assert rpc_status.from_call(err.value).details[0].Unpack(bad)
    assert [v.field for v in bad.field_violations] == ["page_token"]
    return err.value.details() or ""


def refused_over_http(response: httpx.Response) -> None:
    # The gateway answers INVALID_ARGUMENT with field violations as 422 (gateway/envelope.py).
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid_argument" and [d["field"] for d in error["details"]] == ["page_token"]


async def walk(call: Callable[..., Any], request: Any, items: str, md: Any, key: Callable[[Any], Any] = lambda m: m.id) -> tuple[list[Any], list[str]]:
    """Every page of one listing over gRPC: the keys of its items and the tokens it gave."""
    listed, tokens = [], []
    while True:
        page = await call(request, metadata=md)
        listed += [key(m) for m in getattr(page, items)]
        if not page.next_page_token:
            return listed, tokens
        tokens.append(page.next_page_token)
        request.page_token = page.next_page_token


async def walk_http(http: httpx.AsyncClient, path: str, params: dict[str, Any], items: str, headers: dict[str, str] | None = None, key: str = "id") -> tuple[list[str], list[str]]:
    listed, tokens, token = [], [], ""
    while True:
        page = await http.get(path, params={**params, "page_token": token}, headers=headers)
        assert page.status_code == 200, page.text
        listed += [m[key] for m in page.json()["data"][items]]
        if not (token := page.json()["meta"]["pagination"]["next_page_token"]):
            return listed, tokens
        tokens.append(token)


async def finished_executions(api: Api, slack: FakeSlack) -> tuple[str, str, list[str], list[str]]:
    """Two workflows: one whose five runs succeed, one whose two runs fail (Slack answers 404
    to an unknown webhook). Their ids and their executions' ids, oldest first."""
    good = await api.credential("slack", {"webhook_url": slack.url}, name="good")
    gone = await api.credential("slack", {"webhook_url": slack.url.replace(slack.token, "revoked")}, name="gone")
    ok_wf = (await api.create({"name": "ok", "trigger": {"type": "manual"}, "steps": [slack_step(good)]})).workflow.id
    bad_wf = (await api.create({"name": "bad", "trigger": {"type": "manual"}, "steps": [slack_step(gone)]})).workflow.id
    ok = [(await api.run(ok_wf, {"order": {"id": i}})).execution.id for i in range(5)]
    bad = [(await api.run(bad_wf, {"order": {"id": i}})).execution.id for i in range(2)]
    for execution_id in ok:
        assert (await api.wait(execution_id)).status == "succeeded"
    for execution_id in bad:
        assert (await api.wait(execution_id)).status == "failed"
    return ok_wf, bad_wf, ok, bad


async def test_an_execution_token_walks_its_own_filter_and_no_other(env) -> None:
    core, api, tenant, http, slack = env
    ok_wf, bad_wf, ok, bad = await finished_executions(api, slack)
    listed, tokens = await walk(api.executions.ListExecutions, executions_pb2.ListExecutionsRequest(status="succeeded", page_size=2), "executions", api.md)
    assert listed == ok[::-1] and len(tokens) == 2  # newest first, each once: 2 + 2 + 1

    token = tokens[0]
    for other in (
        executions_pb2.ListExecutionsRequest(status="failed", page_token=token),
        executions_pb2.ListExecutionsRequest(page_token=token),
        executions_pb2.ListExecutionsRequest(status="succeeded", workflow_id=bad_wf, page_token=token),
    ):
        assert "another listing" in await refused_token(api.executions.ListExecutions(other, metadata=api.md))
    await refused_token(api.workflows.ListWorkflows(workflows_pb2.ListWorkflowsRequest(page_token=token), metadata=api.md))
    # page_size may change between pages: the rest of the listing, still without the failures.
    rest = await api.executions.ListExecutions(executions_pb2.ListExecutionsRequest(status="succeeded", page_size=50, page_token=token), metadata=api.md)
    assert [e.id for e in rest.executions] == ok[::-1][2:] and not rest.next_page_token

    # Through the gateway: the same walk, and the same refusal as a 400-class answer.
    listed, tokens = await walk_http(http, "/api/executions", {"status": "failed", "page_size": 1}, "executions")
    assert listed == bad[::-1] and len(tokens) == 1
    refused_over_http(await http.get("/api/executions", params={"status": "succeeded", "page_token": tokens[0]}))
    refused_over_http(await http.get("/api/executions", params={"status": "failed", "workflow_id": ok_wf, "page_token": tokens[0]}))
    refused_over_http(await http.get("/api/credentials", params={"page_token": tokens[0]}))


async def test_credential_and_version_tokens_are_bound_to_their_filter(env) -> None:
    core, api, tenant, http, slack = env
    creds = [await api.credential("slack", {"webhook_url": slack.url}, name=f"c{i}") for i in range(3)]
    listed, tokens = await walk(api.credentials.ListCredentials, credentials_pb2.ListCredentialsRequest(connector="slack", page_size=2), "credentials", api.md)
    assert listed == creds[::-1] and len(tokens) == 1
    other = credentials_pb2.ListCredentialsRequest(connector="discord", page_size=2, page_token=tokens[0])
    await refused_token(api.credentials.ListCredentials(other, metadata=api.md))

    one, two = [(await api.create({"name": name, "trigger": {"type": "manual"}, "steps": [slack_step(creds[0])]})).workflow for name in ("one", "two")]
    for wf in (one, two):
        for version in (2, 3):
            renamed = workflows_pb2.UpdateWorkflowRequest(id=wf.id, expected_version=version - 1, workflow=workflows_pb2.Workflow(name=f"{wf.name} v{version}"))
            await api.workflows.UpdateWorkflow(renamed, metadata=api.md)
    versions = workflows_pb2.ListWorkflowVersionsRequest(id=one.id, page_size=2)
    listed, tokens = await walk(api.workflows.ListWorkflowVersions, versions, "versions", api.md, key=lambda w: (w.id, w.version))
    assert listed == [(one.id, 3), (one.id, 2), (one.id, 1)] and len(tokens) == 1
    # Workflow two has versions below 3 too: before, its page silently continued from one's.
    other_wf = workflows_pb2.ListWorkflowVersionsRequest(id=two.id, page_size=2, page_token=tokens[0])
    await refused_token(api.workflows.ListWorkflowVersions(other_wf, metadata=api.md))
    refused_over_http(await http.get(f"/api/workflows/{two.id}/versions", params={"page_token": tokens[0]}))


async def test_a_token_never_reaches_another_tenant(env) -> None:
    core, api, tenant, http, slack = env
    cred = await api.credential("slack", {"webhook_url": slack.url})
    mine = [(await api.create({"name": f"a{i}", "trigger": {"type": "manual"}, "steps": [slack_step(cred)]})).workflow.id for i in range(3)]
    other = await core.new_tenant(name="other")
    other_api = Api(core.channel, other.md)
    other_cred = await other_api.credential("slack", {"webhook_url": slack.url})
    theirs = [(await other_api.create({"name": f"b{i}", "trigger": {"type": "manual"}, "steps": [slack_step(other_cred)]})).workflow.id for i in range(2)]

    listed, tokens = await walk(api.workflows.ListWorkflows, workflows_pb2.ListWorkflowsRequest(page_size=2), "workflows", api.md)
    assert listed == mine[::-1]
    # Before, the other tenant's call answered its own rows older than the token's id.
    await refused_token(other_api.workflows.ListWorkflows(workflows_pb2.ListWorkflowsRequest(page_size=2, page_token=tokens[0]), metadata=other.md))
    theirs_http = httpx.AsyncClient(base_url=str(http.base_url), headers={"authorization": f"Bearer {other.key}"}, timeout=10)
    async with theirs_http:
        refused_over_http(await theirs_http.get("/api/workflows", params={"page_token": tokens[0]}))
        listed, _ = await walk_http(theirs_http, "/api/workflows", {"page_size": 1}, "workflows")
    assert listed == theirs[::-1]


async def test_api_keys_page_over_grpc_and_rest(env) -> None:
    core, api, tenant, http, slack = env
    stub = tenants_pb2_grpc.TenantServiceStub(core.channel)
    made = [(await stub.CreateApiKey(tenants_pb2.CreateApiKeyRequest(tenant_id=tenant.tenant_id, name=f"k{i}"), metadata=core.admin)).api_key.id for i in range(6)]
    keys = [tenant.key_id, *made]  # 7, oldest first
    other = await core.new_tenant(name="other")

    listed, tokens = await walk(stub.ListApiKeys, tenants_pb2.ListApiKeysRequest(tenant_id=tenant.tenant_id, page_size=3), "api_keys", core.admin)
    assert listed == keys[::-1] and len(tokens) == 2  # 3 + 3 + 1
    whole = await stub.ListApiKeys(tenants_pb2.ListApiKeysRequest(tenant_id=tenant.tenant_id), metadata=core.admin)
    assert [k.id for k in whole.api_keys] == keys[::-1] and not whole.next_page_token
    # Another tenant's keys with this tenant's token: refused, not its keys after some id.
    other_keys = tenants_pb2.ListApiKeysRequest(tenant_id=other.tenant_id, page_size=3, page_token=tokens[0])
    await refused_token(stub.ListApiKeys(other_keys, metadata=core.admin))
    await refused_token(stub.ListTenants(tenants_pb2.ListTenantsRequest(page_token=tokens[0]), metadata=core.admin))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.ListApiKeys(tenants_pb2.ListApiKeysRequest(tenant_id=tenant.tenant_id, page_size=-1), metadata=core.admin)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    path = f"/api/tenants/{tenant.tenant_id}/keys"
    listed, tokens = await walk_http(http, path, {"page_size": 3}, "api_keys", headers=ADMIN)
    assert listed == keys[::-1] and len(tokens) == 2
    refused_over_http(await http.get(f"/api/tenants/{other.tenant_id}/keys", params={"page_token": tokens[0]}, headers=ADMIN))
    operation = (await http.get("/openapi.json")).json()["paths"]["/api/tenants/{tenant_id}/keys"]["get"]
    assert {"page_size", "page_token"} <= {p["name"] for p in operation["parameters"] if p["in"] == "query"}


async def test_connectors_page_by_name_over_grpc_and_rest(env) -> None:
    """Before, ListConnectors answered every installed connector at once, each with its JSON
    Schemas, and ignored page_size: the one List RPC a client could not page."""
    core, api, tenant, http, slack = env
    stub = connectors_pb2_grpc.ConnectorServiceStub(core.channel)
    # An empty request is what a client built before paging sends: the first page, by name.
    whole = await stub.ListConnectors(connectors_pb2.ListConnectorsRequest(), metadata=api.md)
    names = [c.name for c in whole.connectors]
    assert names == sorted(names) and {"slack", "discord", "openweather"} <= set(names) and not whole.next_page_token

    listed, tokens = await walk(stub.ListConnectors, connectors_pb2.ListConnectorsRequest(page_size=1), "connectors", api.md, key=lambda c: c.name)
    assert listed == names and len(tokens) == len(names) - 1
    other = await core.new_tenant(name="other")
    await refused_token(stub.ListConnectors(connectors_pb2.ListConnectorsRequest(page_token=tokens[0]), metadata=other.md))
    breakers = breakers_pb2_grpc.BreakerServiceStub(core.channel)
    await refused_token(breakers.ListBreakers(breakers_pb2.ListBreakersRequest(page_token=tokens[0]), metadata=api.md))

    listed, tokens = await walk_http(http, "/api/connectors", {"page_size": 2}, "connectors", key="name")
    assert listed == names and len(tokens) == (len(names) - 1) // 2
    refused_over_http(await http.get("/api/breakers", params={"page_token": tokens[0]}))
    operation = (await http.get("/openapi.json")).json()["paths"]["/api/connectors"]["get"]
    assert {"page_size", "page_token"} <= {p["name"] for p in operation["parameters"] if p["in"] == "query"}


async def test_breakers_page_by_connector_over_grpc_and_rest(env) -> None:
    """Before, ListBreakers answered all of a tenant's breakers at once and ignored page_size."""
    core, api, tenant, http, slack = env
    other = await core.new_tenant(name="other")
    # One breaker per (tenant, connector); the engine makes them as steps run. Made here
    # directly so a tenant has more than a page of them.
    mine = [f"conn_{i:02d}" for i in range(25)]
    for name in mine:
        core.server.breakers.get(tenant.tenant_id, name)
    for name in ("conn_00", "theirs"):
        core.server.breakers.get(other.tenant_id, name)
    stub = breakers_pb2_grpc.BreakerServiceStub(core.channel)

    first = await stub.ListBreakers(breakers_pb2.ListBreakersRequest(), metadata=api.md)
    assert [b.connector for b in first.breakers] == mine[:20] and first.next_page_token  # the default page
    rest = await stub.ListBreakers(breakers_pb2.ListBreakersRequest(page_token=first.next_page_token), metadata=api.md)
    assert [b.connector for b in rest.breakers] == mine[20:] and not rest.next_page_token

    page = await stub.ListBreakers(breakers_pb2.ListBreakersRequest(page_size=2), metadata=api.md)
    assert [b.connector for b in page.breakers] == mine[:2]
    # A breaker made between two pages, before the cursor: the walk goes on after the last
    # connector shown, neither repeating one nor skipping one.
    core.server.breakers.get(tenant.tenant_id, "aaa")
    after = await stub.ListBreakers(breakers_pb2.ListBreakersRequest(page_size=2, page_token=page.next_page_token), metadata=api.md)
    assert [b.connector for b in after.breakers] == mine[2:4]

    await refused_token(stub.ListBreakers(breakers_pb2.ListBreakersRequest(page_token=page.next_page_token), metadata=other.md))
    theirs = await stub.ListBreakers(breakers_pb2.ListBreakersRequest(page_size=1), metadata=other.md)
    assert [b.connector for b in theirs.breakers] == ["conn_00"] and theirs.next_page_token
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.ListBreakers(breakers_pb2.ListBreakersRequest(page_size=-1), metadata=api.md)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    listed, tokens = await walk_http(http, "/api/breakers", {"page_size": 10}, "breakers", key="connector")
    assert listed == ["aaa", *mine] and len(tokens) == 2  # 10 + 10 + 6
    refused_over_http(await http.get("/api/connectors", params={"page_token": tokens[0]}))
    operation = (await http.get("/openapi.json")).json()["paths"]["/api/breakers"]["get"]
    assert {"page_size", "page_token"} <= {p["name"] for p in operation["parameters"] if p["in"] == "query"}
