"""Workflows through the real gRPC API: validation, versions, optimistic concurrency,
rollback, tenant isolation and credentials that never come back out."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from google.api import httpbody_pb2
from grpc_status import rpc_status
from sqlalchemy import text

from ipaas.v1 import credentials_pb2, executions_pb2, workflows_pb2
from ipaas.workflow_store import WorkflowStore
from tests.conftest import core_with
from tests.integration.helpers import Api, signed_headers, slack_step, struct, value, workflow

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


async def test_an_update_that_changes_nothing_makes_no_version(api: Api) -> None:
    """Versions record definition changes: a retried PATCH, or one that only sets `active`
    (operational state, as SetWorkflowActive), keeps the version; a stale one is still ABORTED."""
    cred = await api.credential("slack", {"webhook_url": SLACK_URL})
    wf = (await api.create({"name": "same", "trigger": {"type": "manual"}, "steps": [slack_step(cred)]})).workflow

    def request(expected: int, **fields) -> workflows_pb2.UpdateWorkflowRequest:  # type: ignore[no-untyped-def]
        return workflows_pb2.UpdateWorkflowRequest(id=wf.id, expected_version=expected, workflow=workflow(fields))

    same = await api.workflows.UpdateWorkflow(request(1, name="same"), metadata=api.md)
    assert same.workflow.version == 1
    paused = await api.workflows.UpdateWorkflow(request(1, active=False), metadata=api.md)
    assert (paused.workflow.version, paused.workflow.active) == (1, False)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await api.workflows.UpdateWorkflow(request(2, name="same"), metadata=api.md)
    assert err.value.code() == grpc.StatusCode.ABORTED
    versions = await api.workflows.ListWorkflowVersions(workflows_pb2.ListWorkflowVersionsRequest(id=wf.id), metadata=api.md)
    assert [v.version for v in versions.versions] == [1]


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


async def code_of(call) -> grpc.StatusCode:  # type: ignore[no-untyped-def]
    try:
        await call
    except grpc.aio.AioRpcError as err:
        return err.code()
    return grpc.StatusCode.OK


async def test_text_no_database_can_store_is_refused_as_bad_input(any_core) -> None:
    """PostgreSQL refuses NUL characters in text: ids, names and keys holding one answered
    INTERNAL (webhooks too, unauthenticated). Now bad input on both backends; so are NaN
    and Infinity (JSON has neither) and an expected version past the last one."""
    from google.api import httpbody_pb2

    from ipaas.v1 import executions_pb2, tenants_pb2
    from ipaas.v1.tenants_pb2_grpc import TenantServiceStub

    tenant = await any_core.new_tenant()
    api = Api(any_core.channel, tenant.md)
    cred = await api.credential("slack", {"webhook_url": SLACK_URL})
    wf = (await api.create({"name": "n", "trigger": {"type": "manual"}, "steps": [slack_step(cred)]})).workflow
    hook = await api.create({"name": "h", "trigger": {"type": "webhook"}, "steps": [slack_step(cred)]})
    bad = "a\x00b"
    invalid, missing = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND
    cases = {
        "GetWorkflow": (api.workflows.GetWorkflow(workflows_pb2.GetWorkflowRequest(id=bad), metadata=api.md), invalid),
        "GetExecution": (api.executions.GetExecution(executions_pb2.GetExecutionRequest(id=bad), metadata=api.md), invalid),
        "CreateWorkflow": (api.workflows.CreateWorkflow(workflows_pb2.CreateWorkflowRequest(workflow=workflow({"name": bad, "trigger": {"type": "manual"}, "steps": [slack_step(cred)]})), metadata=api.md), invalid),
        "CreateCredential": (api.credentials.CreateCredential(credentials_pb2.CreateCredentialRequest(connector="slack", name=bad, secrets=struct({"webhook_url": SLACK_URL})), metadata=api.md), invalid),
        "CreateTenant": (TenantServiceStub(any_core.channel).CreateTenant(tenants_pb2.CreateTenantRequest(name=bad), metadata=any_core.admin), invalid),
        "ReceiveWebhook id": (api.executions.ReceiveWebhook(executions_pb2.ReceiveWebhookRequest(workflow_id=bad)), missing),
        "RunWorkflow NaN": (api.executions.RunWorkflow(executions_pb2.RunWorkflowRequest(workflow_id=wf.id, payload=value(float("nan"))), metadata=api.md), invalid),
        "CreateCredential Infinity": (api.credentials.CreateCredential(credentials_pb2.CreateCredentialRequest(connector="slack", name="inf", secrets=struct({"webhook_url": SLACK_URL, "n": float("inf")})), metadata=api.md), invalid),
        "UpdateWorkflow last version": (api.workflows.UpdateWorkflow(workflows_pb2.UpdateWorkflowRequest(id=wf.id, expected_version=2**31 - 1, workflow=workflow({"name": "x"})), metadata=api.md), grpc.StatusCode.ABORTED),
    }
    got = {name: await code_of(call) for name, (call, _) in cases.items()}
    assert got == {name: want for name, (_, want) in cases.items()}
    # In a webhook batch, a NUL in one item's webhook-id fails that item alone.
    raw = b'{"order":{"id":"1"}}'

    def delivery(msg_id: str) -> executions_pb2.WebhookDelivery:
        headers = signed_headers(hook.webhook_secret, raw, msg_id)
        return executions_pb2.WebhookDelivery(webhook=executions_pb2.ReceiveWebhookRequest(workflow_id=hook.workflow.id, http_body=httpbody_pb2.HttpBody(content_type="application/json", data=raw), headers=headers))

    batch = await api.executions.ReceiveWebhooks(executions_pb2.ReceiveWebhooksRequest(webhooks=[delivery("evt\x00x"), delivery("evt_ok")]))
    assert [r.WhichOneof("result") for r in batch.results] == ["error", "accepted"]
    assert batch.results[0].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0] and "webhook-id" in batch.results[0].error.message


async def test_a_workflow_that_becomes_webhook_triggered_gets_a_secret(api: Api) -> None:
    """Changed from manual to webhook, a workflow had no secret: every delivery was refused
    and only an undocumented rotation helped. The change now answers with a new secret."""
    cred = await api.credential("slack", {"webhook_url": SLACK_URL})
    created = await api.create({"name": "later-hook", "trigger": {"type": "manual"}, "steps": [slack_step(cred)]})
    assert created.webhook_secret == ""
    updated = await api.workflows.UpdateWorkflow(
        workflows_pb2.UpdateWorkflowRequest(id=created.workflow.id, expected_version=1, workflow=workflow({"trigger": {"type": "webhook"}})), metadata=api.md
    )
    assert updated.workflow.trigger.type == "webhook" and updated.webhook_secret.startswith("whsec_")
    back = await api.workflows.RollbackWorkflow(workflows_pb2.RollbackWorkflowRequest(id=created.workflow.id, version=1, expected_version=2), metadata=api.md)
    assert back.workflow.trigger.type == "manual" and back.webhook_secret == ""
    again = await api.workflows.RollbackWorkflow(workflows_pb2.RollbackWorkflowRequest(id=created.workflow.id, version=2, expected_version=3), metadata=api.md)
    assert again.webhook_secret == "", "the secret it has still verifies: no new one"
    raw = b'{"order":{"id":"7"}}'
    from google.api import httpbody_pb2

    from ipaas.v1 import executions_pb2

    accepted = await api.executions.ReceiveWebhook(
        executions_pb2.ReceiveWebhookRequest(workflow_id=created.workflow.id, http_body=httpbody_pb2.HttpBody(content_type="application/json", data=raw), headers=signed_headers(updated.webhook_secret, raw, "evt_later"))
    )
    assert accepted.execution_id


async def test_rotations_keep_the_current_secret_and_one_previous(core, api: Api) -> None:
    """Every rotation within the grace period used to add one more secret that verifies
    (3,001 after 3,000 rotations, each tried on every refused delivery)."""
    cred = await api.credential("slack", {"webhook_url": SLACK_URL})
    created = await api.create({"name": "rotating", "trigger": {"type": "webhook"}, "steps": [slack_step(cred)]})
    secrets = [created.webhook_secret]
    for _ in range(5):
        rotated = await api.workflows.RotateWebhookSecret(workflows_pb2.RotateWebhookSecretRequest(id=created.workflow.id, grace_period_seconds=3600), metadata=api.md)
        secrets.append(rotated.webhook_secret)
    from google.api import httpbody_pb2

    from ipaas.v1 import executions_pb2

    raw = b'{"order":{"id":"1"}}'
    verified = []
    for i, secret in enumerate(secrets):
        request = executions_pb2.ReceiveWebhookRequest(
            workflow_id=created.workflow.id, http_body=httpbody_pb2.HttpBody(content_type="application/json", data=raw), headers=signed_headers(secret, raw, f"evt_rot{i}")
        )
        verified.append(await code_of(api.executions.ReceiveWebhook(request)) == grpc.StatusCode.OK)
    assert verified == [False, False, False, False, True, True]
    async with core.server.db.session() as s:
        assert (await s.execute(text("select count(*) from webhook_secrets"))).scalar() == 2


@pytest.mark.postgres
async def test_rotations_at_once_through_two_replicas_leave_one_live_secret(tmp_path, postgres_url: str) -> None:
    """Revoking rotations at once through two replicas each saw only the secrets committed
    before they began: 8 left up to 5 live secrets where the caller expects one. The
    workflow row is locked now."""
    import asyncio

    from tests.conftest import core_with

    from cryptography.fernet import Fernet

    keys = Fernet.generate_key().decode()  # replicas share their keys
    async with core_with(tmp_path / "a", postgres_url, IPAAS_SECRET_KEYS=keys) as one, core_with(tmp_path / "b", postgres_url, IPAAS_SECRET_KEYS=keys) as two:
        tenant = await one.new_tenant()
        api = Api(one.channel, tenant.md)
        cred = await api.credential("slack", {"webhook_url": SLACK_URL})
        created = await api.create({"name": "rotating", "trigger": {"type": "webhook"}, "steps": [slack_step(cred)]})
        request = workflows_pb2.RotateWebhookSecretRequest(id=created.workflow.id, revoke_previous=True)
        for _ in range(3):
            await asyncio.gather(*(Api(core.channel, tenant.md).workflows.RotateWebhookSecret(request, metadata=tenant.md) for core in (one, two) for _ in range(8)))
            async with one.server.db.session() as s:
                live = (await s.execute(text("select count(*) from webhook_secrets where expires_at is null"))).scalar()
            assert live == 1


async def test_only_webhook_workflows_have_a_secret_to_rotate(api: Api) -> None:
    cred = await api.credential("slack", {"webhook_url": SLACK_URL})
    manual = (await api.create({"name": "m", "trigger": {"type": "manual"}, "steps": [slack_step(cred)]})).workflow
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await api.workflows.RotateWebhookSecret(workflows_pb2.RotateWebhookSecretRequest(id=manual.id), metadata=api.md)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "not triggered by webhooks" in err.value.details()


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


async def test_a_template_reading_a_step_that_has_not_run_is_refused(api: Api) -> None:
    """{{steps.X...}} must name an earlier step: a typo or a later step could never resolve,
    and the message would go out with blanks. Ids end at their last character: "a\\n" is not
    "a"."""
    cred = await api.credential("slack", {"webhook_url": SLACK_URL})
    steps = [
        slack_step(cred, "first {{steps.second.ts}}", step_id="first"),
        slack_step(cred, "{{steps.first.ts}} {{steps.frist.ts}} {{steps.second.ts}}", step_id="second"),
        slack_step(cred, "ok {{steps.first.ts}} {{steps}}", step_id="third\n"),
    ]
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await api.create({"name": "refs", "trigger": {"type": "manual"}, "steps": steps})
    bad = error_details_pb2.BadRequest()
    assert rpc_status.from_call(err.value).details[0].Unpack(bad)
    found = [(v.field, v.description) for v in bad.field_violations]
    assert [d for f, d in found if f == "steps[0].config.text"] == ["refers to step 'second', which is not an earlier step of this workflow"]
    assert sorted(d.split("'")[1] for f, d in found if f == "steps[1].config.text") == ["frist", "second"]
    assert [f for f, _ in found if f.startswith("steps[2]")] == ["steps[2].id"], found


@pytest.mark.parametrize("name", ["evil\x1b[31m", "two\nlines", "back\u202ewards"])
async def test_a_name_with_control_or_formatting_characters_is_refused(api: Api, name: str) -> None:
    cred = await api.credential("slack", {"webhook_url": SLACK_URL})
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await api.create({"name": name, "trigger": {"type": "manual"}, "steps": [slack_step(cred)]})
    assert violations(err.value) == {"name": "must not contain control or formatting characters"}
    assert (await api.create({"name": "Zürich orders ✓", "trigger": {"type": "manual"}, "steps": [slack_step(cred)]})).workflow.name == "Zürich orders ✓"


async def test_a_config_nested_deeper_than_any_render_allows_is_refused_at_save(api: Api) -> None:
    """Rendering refuses a config nested deeper than 32 levels; saved, it failed every run."""
    cred = await api.credential("slack", {"webhook_url": SLACK_URL})
    deep: Any = "x"
    for _ in range(32):  # lists: protobuf carries them in fewer message levels than objects
        deep = [deep]
    step = {**slack_step(cred), "config": {"text": "hi", "blocks": deep}}
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await api.create({"name": "deep", "trigger": {"type": "manual"}, "steps": [step]})
    assert violations(err.value) == {"steps[0].config": "nested deeper than 32 levels"}


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
    assert violations(err.value) == {"workflow": "is larger than 1048576 bytes"}, "refused before it is converted"
    # Over the stored limit but within the request's: the answer names where the bulk is.
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await api.create(definition(["x" * (MAX_DEFINITION_BYTES + 1000)]))
    assert f"{MAX_DEFINITION_BYTES}" in violations(err.value)["steps[0].config.blocks[0]"], "names the limit and where the bulk is"
    small = (await api.create(definition([{"type": "divider"}]))).workflow
    listed = await api.workflows.ListWorkflows(workflows_pb2.ListWorkflowsRequest(), metadata=api.md)
    assert [w.id for w in listed.workflows] == [small.id], "nothing was stored; the tenant's list works"


async def test_an_error_quoting_a_huge_input_still_reaches_the_caller(api: Api) -> None:
    """Messages quote unknown ids; quoting a ~60 KB one made the status larger than a
    client takes in metadata (16 KiB), so the caller got RESOURCE_EXHAUSTED from its own
    channel instead of NOT_FOUND."""
    huge = "x" * 60_000
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await api.workflows.GetWorkflow(workflows_pb2.GetWorkflowRequest(id=huge), metadata=api.md)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND and len(err.value.details()) <= 1024
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await api.create({"name": "n", "trigger": {"type": "manual"}, "steps": [slack_step("cred_" + huge)]})
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_messages_too_large_to_convert_quickly_are_refused(api: Api) -> None:
    """Converting a 4 MiB message of small numbers to JSON took the core's event loop ~0.9 s
    (every other call waited): a workflow, payload or credential over 1 MiB is refused first."""
    from ipaas.v1 import executions_pb2

    cred = await api.credential("slack", {"webhook_url": SLACK_URL})
    numbers = [0] * 120_000  # ~1.3 MB on the wire
    wf = (await api.create({"name": "n", "trigger": {"type": "manual"}, "steps": [slack_step(cred)]})).workflow
    calls = {
        "workflow": api.create({"name": "big", "trigger": {"type": "manual"}, "steps": [{**slack_step(cred), "config": {"text": "x", "blocks": numbers}}]}),
        "payload": api.executions.RunWorkflow(executions_pb2.RunWorkflowRequest(workflow_id=wf.id, payload=value(numbers)), metadata=api.md),
        "secrets": api.credentials.CreateCredential(credentials_pb2.CreateCredentialRequest(connector="slack", name="big", secrets=struct({"webhook_url": SLACK_URL, "n": numbers})), metadata=api.md),
    }
    for field, call in calls.items():
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and violations(err.value) == {field: "is larger than 1048576 bytes"}


async def test_an_update_changes_the_options_it_sets_and_keeps_the_others(api: Api) -> None:
    """Options have presence: an update setting one option keeps the others; a mask naming
    one option changes that one; a mask naming "options" replaces them all (AIP-134)."""
    cred = await api.credential("slack", {"webhook_url": SLACK_URL})
    wf = (await api.create({"name": "o", "trigger": {"type": "manual"}, "options": {"strict_templates": True, "max_attempts": 7}, "steps": [slack_step(cred)]})).workflow

    async def update(version: int, options: dict[str, Any], paths: list[str] | None = None) -> dict[str, Any]:
        request = workflows_pb2.UpdateWorkflowRequest(id=wf.id, expected_version=version, workflow=workflow({"name": f"o{version}", "options": options}))
        if paths is not None:
            request.update_mask.paths.extend(paths)
        updated = (await api.workflows.UpdateWorkflow(request, metadata=api.md)).workflow
        o = updated.options
        return {"strict_templates": o.strict_templates, "max_attempts": o.max_attempts, "allow_unsigned_webhooks": o.allow_unsigned_webhooks}

    assert await update(1, {"max_attempts": 3}) == {"strict_templates": True, "max_attempts": 3, "allow_unsigned_webhooks": False}
    assert await update(2, {"strict_templates": False}) == {"strict_templates": False, "max_attempts": 3, "allow_unsigned_webhooks": False}
    assert await update(3, {"allow_unsigned_webhooks": True, "max_attempts": 9}, ["options.max_attempts"]) == {"strict_templates": False, "max_attempts": 9, "allow_unsigned_webhooks": False}
    assert await update(4, {}, ["options.max_attempts"]) == {"strict_templates": False, "max_attempts": 0, "allow_unsigned_webhooks": False}, "named and unset: its default"
    assert await update(5, {"strict_templates": True}, ["name"]) == {"strict_templates": False, "max_attempts": 0, "allow_unsigned_webhooks": False}, "not in the mask: unchanged"
    assert await update(6, {"allow_unsigned_webhooks": True}, ["options"]) == {"strict_templates": False, "max_attempts": 0, "allow_unsigned_webhooks": True}
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await update(7, {}, ["options.retries"])
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "options.max_attempts" in violations(err.value)["update_mask"]


@pytest.mark.parametrize(
    "trigger,field",
    [
        ({"cron": "R R * * *"}, "trigger.cron"),  # croniter: a new random time at every computation
        ({"cron": "H 9 * * *"}, "trigger.cron"),
        ({"cron": "0 0 L * *"}, "trigger.cron"),  # Quartz extensions, not five-field cron
        ({"cron": "0 9 * * mon#2"}, "trigger.cron"),
        ({"cron": "0 9 ? * *"}, "trigger.cron"),
        ({"cron": "0 9 * * *", "timezone": "localtime"}, "trigger.timezone"),  # each host's own zone
        ({"cron": "0 9 * * *", "timezone": "Factory"}, "trigger.timezone"),
    ],
)
async def test_a_schedule_that_replicas_could_compute_differently_is_refused(api: Api, trigger: dict, field: str) -> None:
    cred = await api.credential("slack", {"webhook_url": SLACK_URL})
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await api.create({"name": "odd", "trigger": {"type": "schedule", **trigger}, "steps": [slack_step(cred)]})
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    found = violations(err.value)
    assert list(found) == [field]
    assert "beyond five-field cron" in found[field] or "names no place" in found[field]  # H was "never fires"


@pytest.mark.parametrize(
    "cron,step,field",
    [
        ("*/61 * * * *", "/61", "minute"),  # croniter fires it at :00 only, not every 61 minutes
        ("5/61 * * * *", "/61", "minute"),
        ("0,10-59/100 * * * *", "/100", "minute"),
        ("0 */25 * * *", "/25", "hour"),
        ("0 0 */32 * *", "/32", "day of month"),
        ("0 0 1 jan-dec/13 *", "/13", "month"),
        ("0 9 * * */8", "/8", "day of week"),
    ],
)
async def test_a_cron_step_larger_than_its_field_is_refused(api: Api, cron: str, step: str, field: str) -> None:
    cred = await api.credential("slack", {"webhook_url": SLACK_URL})
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await api.create({"name": "odd", "trigger": {"type": "schedule", "cron": cron}, "steps": [slack_step(cred)]})
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    found = violations(err.value)
    assert list(found) == ["trigger.cron"]
    assert f"step {step} in the {field} field is larger than its" in found["trigger.cron"]


@pytest.mark.parametrize("cron", ["*/15 9-17 * * mon-fri", "0 0 1 jan,JUL *", "5,35 */2 1-15/2 * 0", "0 0 * * 7", "*/60 */24 */31 */12 *"])
async def test_five_field_cron_with_names_ranges_lists_and_steps_is_accepted(api: Api, cron: str) -> None:
    cred = await api.credential("slack", {"webhook_url": SLACK_URL})
    created = await api.create({"name": "ok", "trigger": {"type": "schedule", "cron": cron, "timezone": "Europe/Paris"}, "steps": [slack_step(cred)]})
    assert created.workflow.trigger.cron == cron


async def test_webhooks_to_ids_with_no_workflow_are_answered_from_memory(tmp_path, monkeypatch) -> None:
    """A webhook to a made-up id, or a deleted workflow's, cost a database read each time
    the 1 s target cache had expired (made-up ids sent again, a sender retrying a deleted
    workflow's webhook). Neither can ever be accepted, so the answer is kept a minute; an
    inactive workflow is still read again (another replica may activate it)."""
    monkeypatch.setattr("ipaas.workflow_store.TARGET_TTL", 0.05)
    loads: list[str] = []
    load = WorkflowStore._load_webhook_target

    async def counted(self: WorkflowStore, workflow_id: str) -> Any:
        loads.append(workflow_id)
        return await load(self, workflow_id)

    monkeypatch.setattr(WorkflowStore, "_load_webhook_target", counted)
    async with core_with(tmp_path) as core:
        api = Api(core.channel, (await core.new_tenant()).md)
        cred = await api.credential("slack", {"webhook_url": SLACK_URL})
        hook = {"name": "hook", "trigger": {"type": "webhook"}, "steps": [slack_step(cred)]}
        deleted, inactive = (await api.create(hook)).workflow.id, (await api.create(hook)).workflow.id
        await api.workflows.DeleteWorkflow(workflows_pb2.DeleteWorkflowRequest(id=deleted), metadata=api.md)
        await api.workflows.SetWorkflowActive(workflows_pb2.SetWorkflowActiveRequest(id=inactive, active=False), metadata=api.md)
        for _ in range(3):
            for workflow_id in ("wf_made_up", deleted, inactive):
                request = executions_pb2.ReceiveWebhookRequest(workflow_id=workflow_id, http_body=httpbody_pb2.HttpBody(data=b"{}"))
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await api.executions.ReceiveWebhook(request)
                assert err.value.code() == grpc.StatusCode.NOT_FOUND
            await asyncio.sleep(0.1)  # past TARGET_TTL
    assert (loads.count("wf_made_up"), loads.count(deleted), loads.count(inactive)) == (1, 1, 3), loads
