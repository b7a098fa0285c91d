"""Workflows through the real gRPC API: validation, versions, optimistic concurrency,
rollback, tenant isolation and credentials that never come back out."""

from __future__ import annotations

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from sqlalchemy import text

from ipaas.v1 import credentials_pb2, workflows_pb2
from tests.integration.helpers import Api, slack_step, workflow

SLACK_URL = "http://127.0.0.1:9/services/T1/B1/supersecretslacktoken"


def violations(err: grpc.aio.AioRpcError) -> dict[str, str]:
    status = rpc_status.from_call(err)
    bad = error_details_pb2.BadRequest()
    assert status is not None and status.details[0].Unpack(bad)
    return {v.field: v.description for v in bad.field_violations}


@pytest.fixture
async def api(core):
    tenant = await core.new_tenant()
    return Api(core.channel, tenant.md)


async def test_create_update_stale_rollback_and_versions(api: Api) -> None:
    cred = await api.credential("slack", {"webhook_url": SLACK_URL})
    created = await api.create({"name": "orders", "trigger": {"type": "manual"}, "steps": [slack_step(cred, "v1 {{order.id}}")]})
    wf = created.workflow
    assert (wf.version, wf.active, wf.trigger.type) == (1, True, "manual")
    assert created.webhook_secret == "", "only webhook workflows get a secret"

    v2 = await api.workflows.UpdateWorkflow(
        workflows_pb2.UpdateWorkflowRequest(id=wf.id, expected_version=1, workflow=workflow({"steps": [slack_step(cred, "v2 {{order.id}}")]})), metadata=api.md
    )
    assert v2.workflow.version == 2 and v2.workflow.name == "orders"
    assert v2.workflow.steps[0].config["text"] == "v2 {{order.id}}"

    with pytest.raises(grpc.aio.AioRpcError) as err:
        await api.workflows.UpdateWorkflow(workflows_pb2.UpdateWorkflowRequest(id=wf.id, expected_version=1, workflow=workflow({"name": "stale"})), metadata=api.md)
    assert err.value.code() == grpc.StatusCode.ABORTED

    rolled = await api.workflows.RollbackWorkflow(workflows_pb2.RollbackWorkflowRequest(id=wf.id, version=1, expected_version=2), metadata=api.md)
    assert rolled.workflow.version == 3
    assert rolled.workflow.steps[0].config["text"] == "v1 {{order.id}}"

    versions = await api.workflows.ListWorkflowVersions(workflows_pb2.ListWorkflowVersionsRequest(id=wf.id), metadata=api.md)
    assert [v.version for v in versions.versions] == [3, 2, 1]
    old = await api.workflows.GetWorkflowVersion(workflows_pb2.GetWorkflowVersionRequest(id=wf.id, version=2), metadata=api.md)
    assert old.workflow.steps[0].config["text"] == "v2 {{order.id}}"


async def test_validation_reports_every_problem_with_field_paths(api: Api) -> None:
    cred = await api.credential("slack", {"webhook_url": SLACK_URL})
    bad = {
        "name": "",
        "trigger": {"type": "schedule", "cron": "61 * * *", "timezone": "Mars/Olympus"},
        "steps": [
            slack_step(cred),
            {"id": "notify", "connector": "slack", "action": "send_message", "config": {"text": 5}, "credential_id": cred},
            {"id": "x", "connector": "nope", "action": "go", "config": {}},
            {"id": "y", "connector": "slack", "action": "shout", "config": {}},
            {"id": "z", "connector": "slack", "action": "send_message", "config": {"text": "{{$.items[?}}"}, "credential_id": cred},
        ],
    }
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await api.create(bad)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    fields = violations(err.value)
    for field in ("name", "trigger.cron", "trigger.timezone", "steps[1].id", "steps[1].config.text", "steps[2].connector", "steps[3].action", "steps[4].config.text"):
        assert field in fields, (field, fields)


async def test_credential_must_exist_and_match_the_connector(api: Api) -> None:
    discord = await api.credential("discord", {"webhook_url": "http://127.0.0.1:9/api/webhooks/1/tok"})
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await api.create({"name": "x", "trigger": {"type": "manual"}, "steps": [slack_step(discord), slack_step("cred_missing", step_id="b")]})
    fields = violations(err.value)
    assert "is for 'discord'" in fields["steps[0].credential_id"]
    assert "no credential" in fields["steps[1].credential_id"]


async def test_tenants_cannot_see_or_touch_each_others_objects(core) -> None:
    a = Api(core.channel, (await core.new_tenant(name="a")).md)
    b = Api(core.channel, (await core.new_tenant(name="b")).md)
    cred = await a.credential("slack", {"webhook_url": SLACK_URL})
    wf = (await a.create({"name": "a-only", "trigger": {"type": "manual"}, "steps": [slack_step(cred)]})).workflow

    calls = [
        b.workflows.GetWorkflow(workflows_pb2.GetWorkflowRequest(id=wf.id), metadata=b.md),
        b.workflows.UpdateWorkflow(workflows_pb2.UpdateWorkflowRequest(id=wf.id, expected_version=1, workflow=workflow({"name": "mine"})), metadata=b.md),
        b.workflows.DeleteWorkflow(workflows_pb2.DeleteWorkflowRequest(id=wf.id), metadata=b.md),
        b.workflows.ListWorkflowVersions(workflows_pb2.ListWorkflowVersionsRequest(id=wf.id), metadata=b.md),
        b.credentials.DeleteCredential(credentials_pb2.DeleteCredentialRequest(id=cred), metadata=b.md),
    ]
    for call in calls:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await b.run(wf.id)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    # b cannot use a's credential either
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await b.create({"name": "steal", "trigger": {"type": "manual"}, "steps": [slack_step(cred)]})
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (await b.workflows.ListWorkflows(workflows_pb2.ListWorkflowsRequest(), metadata=b.md)).workflows == []
    assert (await b.credentials.ListCredentials(credentials_pb2.ListCredentialsRequest(), metadata=b.md)).credentials == []
    still = await a.workflows.GetWorkflow(workflows_pb2.GetWorkflowRequest(id=wf.id), metadata=a.md)
    assert still.workflow.name == "a-only"


async def test_credential_secrets_never_come_back_and_are_encrypted_at_rest(core, api: Api) -> None:
    cred = await api.credential("slack", {"webhook_url": SLACK_URL})
    listed = await api.credentials.ListCredentials(credentials_pb2.ListCredentialsRequest(), metadata=api.md)
    assert [c.id for c in listed.credentials] == [cred]
    assert list(listed.credentials[0].fields) == ["webhook_url"]
    assert "supersecretslacktoken" not in str(listed)
    async with core.server.db.engine.connect() as conn:
        stored = repr((await conn.execute(text("SELECT * FROM credentials"))).all())
    assert "supersecretslacktoken" not in stored
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await api.credential("slack", {"webhook_url": "ftp://nope"}, name="bad")
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "secrets.webhook_url" in violations(err.value)


async def test_webhook_workflows_get_a_secret_once_and_can_rotate_it(api: Api) -> None:
    cred = await api.credential("slack", {"webhook_url": SLACK_URL})
    created = await api.create({"name": "hook", "trigger": {"type": "webhook"}, "steps": [slack_step(cred)]})
    assert created.webhook_secret.startswith("whsec_")
    fetched = await api.workflows.GetWorkflow(workflows_pb2.GetWorkflowRequest(id=created.workflow.id), metadata=api.md)
    assert "whsec_" not in str(fetched)
    rotated = await api.workflows.RotateWebhookSecret(workflows_pb2.RotateWebhookSecretRequest(id=created.workflow.id, grace_period_seconds=60), metadata=api.md)
    assert rotated.webhook_secret.startswith("whsec_") and rotated.webhook_secret != created.webhook_secret


async def test_listing_pages_and_deleted_workflows_disappear(api: Api) -> None:
    cred = await api.credential("slack", {"webhook_url": SLACK_URL})
    ids = [(await api.create({"name": f"w{i}", "trigger": {"type": "manual"}, "steps": [slack_step(cred)]})).workflow.id for i in range(3)]
    await api.workflows.DeleteWorkflow(workflows_pb2.DeleteWorkflowRequest(id=ids[1]), metadata=api.md)
    page1 = await api.workflows.ListWorkflows(workflows_pb2.ListWorkflowsRequest(page_size=1), metadata=api.md)
    page2 = await api.workflows.ListWorkflows(workflows_pb2.ListWorkflowsRequest(page_size=1, page_token=page1.next_page_token), metadata=api.md)
    assert [w.id for w in [*page1.workflows, *page2.workflows]] == [ids[2], ids[0]]
    assert page2.next_page_token == ""
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await api.workflows.ListWorkflows(workflows_pb2.ListWorkflowsRequest(page_token="!!garbage"), metadata=api.md)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize("cron", ["0 0 30 2 *", "0 0 31 4,6,9,11 *"])
async def test_a_cron_no_date_matches_is_refused(api: Api, cron: str) -> None:
    cred = await api.credential("slack", {"webhook_url": SLACK_URL})
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await api.create({"name": "never", "trigger": {"type": "schedule", "cron": cron}, "steps": [slack_step(cred)]})
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "never fires" in violations(err.value)["trigger.cron"]


async def test_templates_with_regular_expressions_are_refused_on_create_and_update(api: Api) -> None:
    cred = await api.credential("slack", {"webhook_url": SLACK_URL})
    redos = "{{$[?match(@.s, '(a+)+b')]}}"
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await api.create({"name": "redos", "trigger": {"type": "manual"}, "steps": [slack_step(cred, redos)]})
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "regular expressions" in violations(err.value)["steps[0].config.text"]
    wf = (await api.create({"name": "ok", "trigger": {"type": "manual"}, "steps": [slack_step(cred, "{{$.items[?@.n > 1]}}")]})).workflow
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await api.workflows.UpdateWorkflow(
            workflows_pb2.UpdateWorkflowRequest(id=wf.id, expected_version=1, workflow=workflow({"steps": [slack_step(cred, "{{$[?@.s =~ /(a+)+b/]}}")]})), metadata=api.md
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "regular expressions" in violations(err.value)["steps[0].config.text"]


async def test_a_definition_too_large_to_read_back_is_refused(api: Api) -> None:
    from ipaas.definitions import MAX_DEFINITION_BYTES
    from ipaas.wire import MAX_MESSAGE_BYTES

    cred = await api.credential("slack", {"webhook_url": SLACK_URL})

    def definition(blocks: list) -> dict:
        step = {**slack_step(cred, "hi"), "config": {"text": "hi", "blocks": blocks}}
        return {"name": "big", "trigger": {"type": "manual"}, "steps": [step]}

    # Just under the request's limit: it was stored, then its reply (and every later
    # ListWorkflows of the tenant) was larger than a message may be.
    def request(n: int) -> workflows_pb2.CreateWorkflowRequest:
        return workflows_pb2.CreateWorkflowRequest(workflow=workflow(definition(["x" * n])))

    n = MAX_MESSAGE_BYTES - request(0).ByteSize()
    while request(n).ByteSize() > MAX_MESSAGE_BYTES - 40:
        n -= 1
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await api.workflows.CreateWorkflow(request(n), metadata=api.md)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"{MAX_DEFINITION_BYTES}" in violations(err.value)["steps[0].config.blocks[0]"], "names the limit and where the bulk is"
    small = (await api.create(definition([{"type": "divider"}]))).workflow
    listed = await api.workflows.ListWorkflows(workflows_pb2.ListWorkflowsRequest(), metadata=api.md)
    assert [w.id for w in listed.workflows] == [small.id], "nothing was stored; the tenant's list works"
