"""Manual runs of a chosen workflow version (two versions side by side, e.g. for A/B
testing), through a real grpc.aio core and real HTTP through the gateway. Before, a manual
run always took the current version: RunWorkflowRequest had no version."""

from __future__ import annotations

import asyncio

import grpc
import httpx
import pytest

from ipaas import reasons
from ipaas.v1 import executions_pb2, workflows_pb2
from tests.conftest import core_with, gateway_for
from tests.fakes.slack import FakeSlack
from tests.integration.helpers import Api, slack_step, workflow
from tests.integration.test_error_info import error_info, refused
from tests.integration.test_workflows import violations

FAST = {"IPAAS_RETRY_BASE_DELAY": "0.01", "IPAAS_POLL_INTERVAL": "0.05"}


@pytest.fixture
async def stack(tmp_path, database_url):
    async with FakeSlack() as slack, core_with(tmp_path, database_url, **FAST) as core:
        yield core, Api(core.channel, (await core.new_tenant()).md), slack


async def two_versions(api: Api, slack: FakeSlack) -> str:
    """A manual workflow at version 2, whose version 1 sends another text."""
    cred = await api.credential("slack", {"webhook_url": slack.url})
    wf = (await api.create({"name": "ab", "trigger": {"type": "manual"}, "steps": [slack_step(cred, "v1 {{order.id}}")]})).workflow
    update = workflows_pb2.UpdateWorkflowRequest(id=wf.id, expected_version=1, workflow=workflow({"steps": [slack_step(cred, "v2 {{order.id}}")]}))
    assert (await api.workflows.UpdateWorkflow(update, metadata=api.md)).workflow.version == 2
    return wf.id


async def received(slack: FakeSlack, count: int) -> list[str]:
    for _ in range(400):
        if len(slack.received) >= count:
            break
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.1)  # nothing more arrives
    return sorted(m["text"] for m in slack.received)


async def test_a_manual_run_runs_the_version_it_names_and_records_it(stack) -> None:
    core, api, slack = stack
    wf_id = await two_versions(api, slack)
    old = await api.run(wf_id, {"order": {"id": "A"}}, version=1)
    current = await api.run(wf_id, {"order": {"id": "B"}})
    named_current = await api.run(wf_id, {"order": {"id": "C"}}, version=2)
    runs = {"A": old.execution, "B": current.execution, "C": named_current.execution}
    assert {k: e.workflow_version for k, e in runs.items()} == {"A": 1, "B": 2, "C": 2}

    assert await received(slack, 3) == ["v1 A", "v2 B", "v2 C"], "each run used its version's steps"
    for name, accepted in runs.items():
        ex = await api.wait(accepted.id)
        assert (ex.status, ex.workflow_version) == ("succeeded", accepted.workflow_version), name
    listed = await api.executions.ListExecutions(executions_pb2.ListExecutionsRequest(workflow_id=wf_id), metadata=api.md)
    assert {e.id: e.workflow_version for e in listed.executions} == {e.id: e.workflow_version for e in runs.values()}


async def test_a_version_the_workflow_lacks_or_another_tenants_workflow_is_not_found(stack) -> None:
    core, api, slack = stack
    wf_id = await two_versions(api, slack)
    missing = await refused(api.run(wf_id, version=3))
    info = error_info(missing)
    assert missing.code() == grpc.StatusCode.NOT_FOUND
    assert (info.reason, dict(info.metadata)) == ("WORKFLOW_VERSION_NOT_FOUND", {"resourceType": "workflow_version", "workflowId": wf_id, "version": "3"})
    negative = await refused(api.run(wf_id, version=-1))
    assert negative.code() == grpc.StatusCode.INVALID_ARGUMENT and "version" in violations(negative)
    # Another tenant learns nothing, not even whether the workflow has that version.
    other = Api(core.channel, (await core.new_tenant(name="other")).md)
    for version in (1, 3):
        stranger = await refused(other.run(wf_id, version=version))
        assert (stranger.code(), error_info(stranger).reason) == (grpc.StatusCode.NOT_FOUND, "WORKFLOW_NOT_FOUND"), version
    listed = await api.executions.ListExecutions(executions_pb2.ListExecutionsRequest(workflow_id=wf_id), metadata=api.md)
    assert list(listed.executions) == [], "a refused run enqueues nothing"


async def test_an_idempotency_key_stands_for_the_version_too(stack) -> None:
    core, api, slack = stack
    wf_id = await two_versions(api, slack)
    first = await api.run(wf_id, {"order": {"id": "A"}}, key="k1", version=1)
    again = await api.run(wf_id, {"order": {"id": "A"}}, key="k1", version=1)
    assert (again.duplicate, again.execution.id, again.execution.workflow_version) == (True, first.execution.id, 1)
    other_version = await refused(api.run(wf_id, {"order": {"id": "A"}}, key="k1", version=2))
    assert other_version.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_info(other_version).reason == reasons.IDEMPOTENCY_KEY_REUSED.name and "version" in violations(other_version)
    # A repeat that names no version is a retry of whatever the key ran, as before.
    unnamed = await api.run(wf_id, {"order": {"id": "A"}}, key="k1")
    assert (unnamed.duplicate, unnamed.execution.id) == (True, first.execution.id)

    current = await api.run(wf_id, {"order": {"id": "B"}}, key="k2")
    assert (await api.run(wf_id, {"order": {"id": "B"}}, key="k2", version=2)).execution.id == current.execution.id
    assert (await refused(api.run(wf_id, {"order": {"id": "B"}}, key="k2", version=1))).code() == grpc.StatusCode.INVALID_ARGUMENT
    assert await received(slack, 2) == ["v1 A", "v2 B"], "a key started one run, of the version it named"


async def test_rest_runs_a_named_version_and_the_key_covers_it(tmp_path) -> None:
    async with FakeSlack() as slack, core_with(tmp_path, **FAST) as core, gateway_for(core.target, tmp_path) as url:
        tenant = await core.new_tenant(tier="paid")
        api = Api(core.channel, tenant.md)
        wf_id = await two_versions(api, slack)
        async with httpx.AsyncClient(base_url=url, headers={"authorization": f"Bearer {tenant.key}"}, timeout=10) as http:
            run = await http.post(f"/api/workflows/{wf_id}/run", json={"payload": {"order": {"id": "A"}}, "version": 1}, headers={"Idempotency-Key": "rest-1"})
            assert run.status_code == 202, run.text
            accepted = run.json()["data"]["execution"]
            assert accepted["workflow_version"] == 1
            assert await received(slack, 1) == ["v1 A"]
            got = await http.get(f"/api/executions/{accepted['id']}")
            assert got.json()["data"]["workflow_version"] == 1
            listed = await http.get("/api/executions", params={"workflow_id": wf_id})
            assert [(e["id"], e["workflow_version"]) for e in listed.json()["data"]["executions"]] == [(accepted["id"], 1)]

            missing = await http.post(f"/api/workflows/{wf_id}/run", json={"version": 9})
            error = missing.json()["error"]
            assert (missing.status_code, error["reason"], error["metadata"]["version"]) == (404, "WORKFLOW_VERSION_NOT_FOUND", "9")
            # The gateway kept the first answer: another version under its key is another request.
            reused = await http.post(f"/api/workflows/{wf_id}/run", json={"payload": {"order": {"id": "A"}}, "version": 2}, headers={"Idempotency-Key": "rest-1"})
            assert (reused.status_code, reused.json()["error"]["reason"]) == (422, "IDEMPOTENCY_KEY_REUSED")
            # A key the gateway kept no answer for (here used over gRPC; else a run whose answer
            # was lost to a timeout) reaches the core, which compares the version itself.
            await api.run(wf_id, {"order": {"id": "B"}}, key="shared", version=2)
            crossed = await http.post(f"/api/workflows/{wf_id}/run", json={"payload": {"order": {"id": "B"}}, "version": 1}, headers={"Idempotency-Key": "shared"})
            error = crossed.json()["error"]
            assert (crossed.status_code, error["reason"], [d["field"] for d in error["details"]]) == (422, "IDEMPOTENCY_KEY_REUSED", ["version"])
            assert await received(slack, 2) == ["v1 A", "v2 B"]
            schema = (await http.get("/openapi.json")).json()["components"]["schemas"]["RunWorkflowRequest"]
            assert schema["properties"]["version"] == {"type": "integer", "format": "int32"}
