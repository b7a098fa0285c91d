"""Every error the core sends names its cause in a google.rpc.ErrorInfo (docs/errors.md),
through a real grpc.aio server. Before, errors carried a code and English only: a client
could tell the two PERMISSION_DENIED apart, or a missing workflow from a missing execution,
only by parsing the message."""

from __future__ import annotations

from typing import Any

import grpc
import pytest
from google.api import httpbody_pb2
from google.protobuf import field_mask_pb2
from google.protobuf import message as pb_message
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from ipaas import reasons
from ipaas.v1 import credentials_pb2 as cpb
from ipaas.v1 import executions_pb2 as epb
from ipaas.v1 import tenants_pb2 as tpb
from ipaas.v1 import tenants_pb2_grpc
from ipaas.v1 import workflows_pb2 as wpb
from tests.conftest import core_with
from tests.integration.helpers import Api, signed_webhook, slack_step


async def refused(call: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return caught.value


def details_of(status: status_pb2.Status, kind: type[pb_message.Message]) -> list[Any]:
    found = []
    for detail in status.details:
        message = kind()
        if detail.Unpack(message):
            found.append(message)
    return found


def error_info(error: grpc.aio.AioRpcError | status_pb2.Status) -> error_details_pb2.ErrorInfo:
    """The one ErrorInfo of the status a call failed with (or of a batch item's status)."""
    status = error if isinstance(error, status_pb2.Status) else rpc_status.from_call(error)
    assert status is not None, f"no rich status: {error}"
    infos = details_of(status, error_details_pb2.ErrorInfo)
    assert len(infos) == 1, status
    assert infos[0].domain == reasons.DOMAIN == "ipaas.v1"
    return infos[0]


async def manual_workflow(api: Api, active: bool = True) -> wpb.Workflow:
    cred = await api.credential("slack", {"webhook_url": "http://127.0.0.1:9/unreachable"})
    return (await api.create({"name": "w", "trigger": {"type": "manual"}, "active": active, "steps": [slack_step(cred)]})).workflow


async def test_the_two_permission_denied_causes_have_their_own_reasons(core) -> None:
    tenant = await core.new_tenant()
    tenants = tenants_pb2_grpc.TenantServiceStub(core.channel)
    not_admin = await refused(tenants.ListTenants(tpb.ListTenantsRequest(), metadata=tenant.md))
    not_tenant = await refused(Api(core.channel, core.admin).workflows.ListWorkflows(wpb.ListWorkflowsRequest(), metadata=core.admin))
    assert not_admin.code() == not_tenant.code() == grpc.StatusCode.PERMISSION_DENIED
    assert (error_info(not_admin).reason, error_info(not_tenant).reason) == ("ADMIN_KEY_REQUIRED", "TENANT_KEY_REQUIRED")
    assert dict(error_info(not_admin).metadata) == {}


async def test_not_found_names_the_resource_kind_and_id(core) -> None:
    tenant = await core.new_tenant()
    api = Api(core.channel, tenant.md)
    wf = await manual_workflow(api)
    tenants = tenants_pb2_grpc.TenantServiceStub(core.channel)
    cases = [
        (api.workflows.GetWorkflow(wpb.GetWorkflowRequest(id="wf_nope"), metadata=tenant.md), "WORKFLOW_NOT_FOUND", {"resourceType": "workflow", "workflowId": "wf_nope"}),
        (api.workflows.GetWorkflowVersion(wpb.GetWorkflowVersionRequest(id=wf.id, version=9), metadata=tenant.md), "WORKFLOW_VERSION_NOT_FOUND", {"resourceType": "workflow_version", "workflowId": wf.id, "version": "9"}),
        (api.executions.GetExecution(epb.GetExecutionRequest(id="ex_nope"), metadata=tenant.md), "EXECUTION_NOT_FOUND", {"resourceType": "execution", "executionId": "ex_nope"}),
        (api.executions.CancelExecution(epb.CancelExecutionRequest(id="ex_gone"), metadata=tenant.md), "EXECUTION_NOT_FOUND", {"resourceType": "execution", "executionId": "ex_gone"}),
        (api.credentials.DeleteCredential(cpb.DeleteCredentialRequest(id="cred_nope"), metadata=tenant.md), "CREDENTIAL_NOT_FOUND", {"resourceType": "credential", "credentialId": "cred_nope"}),
        (tenants.ListApiKeys(tpb.ListApiKeysRequest(tenant_id="ten_nope"), metadata=core.admin), "TENANT_NOT_FOUND", {"resourceType": "tenant", "tenantId": "ten_nope"}),
        (tenants.RevokeApiKey(tpb.RevokeApiKeyRequest(key_id="key_nope"), metadata=core.admin), "API_KEY_NOT_FOUND", {"resourceType": "api_key", "keyId": "key_nope"}),
    ]
    for call, reason, metadata in cases:
        error = await refused(call)
        assert error.code() == grpc.StatusCode.NOT_FOUND, error
        info = error_info(error)
        assert (info.reason, dict(info.metadata)) == (reason, metadata)


async def test_a_huge_id_is_clipped_in_the_metadata(core) -> None:
    """Ids come from the caller: at gRPC's 4 MiB, quoted whole, the trailers would pass the
    client's limit and the answer become the client's own RESOURCE_EXHAUSTED."""
    tenant = await core.new_tenant()
    error = await refused(Api(core.channel, tenant.md).workflows.GetWorkflow(wpb.GetWorkflowRequest(id="wf_" + "x" * 100_000), metadata=tenant.md))
    assert error.code() == grpc.StatusCode.NOT_FOUND, error
    assert len(error_info(error).metadata["workflowId"]) == reasons.MAX_METADATA_CHARS


async def test_invalid_argument_keeps_its_bad_request_first_and_adds_error_info(core) -> None:
    tenant = await core.new_tenant()
    api = Api(core.channel, tenant.md)
    error = await refused(api.workflows.CreateWorkflow(wpb.CreateWorkflowRequest(workflow=wpb.Workflow(name="w")), metadata=tenant.md))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error
    status = rpc_status.from_call(error)
    bad = error_details_pb2.BadRequest()
    assert status.details[0].Unpack(bad) and bad.field_violations  # where clients read it before
    assert error_info(error).reason == "INVALID_FIELD"
    empty_id = await refused(api.workflows.GetWorkflow(wpb.GetWorkflowRequest(), metadata=tenant.md))
    assert details_of(rpc_status.from_call(empty_id), error_details_pb2.BadRequest)[0].field_violations[0].field == "id"
    assert error_info(empty_id).reason == "INVALID_FIELD"


async def test_an_unparsable_request_and_unauthenticated_calls_have_reasons(core) -> None:
    tenant = await core.new_tenant()
    get_workflow = core.channel.unary_unary("/ipaas.v1.WorkflowService/GetWorkflow")
    unparsable = await refused(get_workflow(b"\x0a\x10abc", metadata=tenant.md))
    assert unparsable.code() == grpc.StatusCode.INVALID_ARGUMENT
    info = error_info(unparsable)
    assert (info.reason, dict(info.metadata)) == ("REQUEST_UNPARSABLE", {"requestType": "ipaas.v1.GetWorkflowRequest"})

    stub = tenants_pb2_grpc.TenantServiceStub(core.channel)
    cases = [
        ((), "API_KEY_MISSING"),
        ((("authorization", "Bearer ipk_wrong"),), "API_KEY_INVALID"),
        ((("authorization", "Bearer ipk_a"), ("authorization", "Bearer " + tenant.key)), "AUTHORIZATION_AMBIGUOUS"),
    ]
    for metadata, reason in cases:
        error = await refused(stub.GetCaller(tpb.GetCallerRequest(), metadata=metadata))
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED
        assert error_info(error).reason == reason
        assert "ipk_wrong" not in str(error_info(error)), "a presented key is no id: never echoed"


async def test_each_failed_precondition_and_a_stale_version_say_which(core) -> None:
    tenant = await core.new_tenant()
    api = Api(core.channel, tenant.md)
    inactive = await manual_workflow(api, active=False)
    not_run = await refused(api.run(inactive.id))
    assert not_run.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert (error_info(not_run).reason, dict(error_info(not_run).metadata)) == ("WORKFLOW_INACTIVE", {"resourceType": "workflow", "workflowId": inactive.id})
    no_secret = await refused(api.workflows.RotateWebhookSecret(wpb.RotateWebhookSecretRequest(id=inactive.id), metadata=tenant.md))
    assert no_secret.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_info(no_secret).reason == "WORKFLOW_NOT_WEBHOOK_TRIGGERED"

    stale = await refused(api.workflows.UpdateWorkflow(wpb.UpdateWorkflowRequest(id=inactive.id, workflow=wpb.Workflow(name="n"), update_mask=field_mask_pb2.FieldMask(paths=["name"]), expected_version=7), metadata=tenant.md))
    assert stale.code() == grpc.StatusCode.ABORTED, stale
    assert (error_info(stale).reason, dict(error_info(stale).metadata)) == ("STALE_VERSION", {"resourceType": "workflow", "workflowId": inactive.id, "currentVersion": "1"})


async def test_a_full_queue_says_so(tmp_path) -> None:
    async with core_with(tmp_path, IPAAS_MAX_QUEUE_DEPTH="0") as core:
        tenant = await core.new_tenant()
        api = Api(core.channel, tenant.md)
        full = await refused(api.run((await manual_workflow(api)).id))
    assert full.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert error_info(full).reason == "QUEUE_FULL"


async def test_webhooks_refused_in_a_batch_carry_their_reasons(core) -> None:
    tenant = await core.new_tenant()
    api = Api(core.channel, tenant.md)
    cred = await api.credential("slack", {"webhook_url": "http://127.0.0.1:9/unreachable"})
    created = await api.create({"name": "hook", "trigger": {"type": "webhook"}, "steps": [slack_step(cred)]})
    raw, headers = signed_webhook(created.webhook_secret, {"order": {"id": "1"}})

    def item(workflow_id: str, headers: dict[str, str]) -> epb.WebhookDelivery:
        return epb.WebhookDelivery(webhook=epb.ReceiveWebhookRequest(workflow_id=workflow_id, http_body=httpbody_pb2.HttpBody(data=raw), headers=headers))

    batch = [item(created.workflow.id, {**headers, "webhook-signature": "v1,AAAA"}), item("wf_unknown", headers)]
    unsigned, unknown = (await api.executions.ReceiveWebhooks(epb.ReceiveWebhooksRequest(webhooks=batch))).results
    assert (unsigned.error.code, unknown.error.code) == (code_pb2.UNAUTHENTICATED, code_pb2.NOT_FOUND)
    assert (error_info(unsigned.error).reason, dict(error_info(unsigned.error).metadata)) == ("WEBHOOK_SIGNATURE_INVALID", {"resourceType": "workflow", "workflowId": created.workflow.id})
    assert error_info(unknown.error).reason == "WORKFLOW_NOT_FOUND"


async def test_a_bug_is_internal_error_without_its_words(core, monkeypatch) -> None:
    """A fault no client can cause on purpose: the database layer itself made to fail with
    an exception that is no outage (an outage is DATABASE_UNAVAILABLE, see test_operations)."""
    tenant = await core.new_tenant()
    api = Api(core.channel, tenant.md)

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("bug holding sk_live_secret")

    monkeypatch.setattr(core.server.db, "read", broken)
    monkeypatch.setattr(core.server.db, "session", broken)
    error = await refused(api.workflows.ListWorkflows(wpb.ListWorkflowsRequest(), metadata=tenant.md))
    assert error.code() == grpc.StatusCode.INTERNAL
    assert error_info(error).reason == "INTERNAL_ERROR" and "sk_live" not in str(rpc_status.from_call(error))
    batch = [epb.WebhookDelivery(webhook=epb.ReceiveWebhookRequest(workflow_id="wf_other", http_body=httpbody_pb2.HttpBody(data=b"{}")))]
    (result,) = (await api.executions.ReceiveWebhooks(epb.ReceiveWebhooksRequest(webhooks=batch))).results
    assert result.error.code == code_pb2.INTERNAL and error_info(result.error).reason == "INTERNAL_ERROR"
