"""What the interceptor refuses before any handler runs, through a real grpc.aio server:
requests that do not parse, ambiguous authorization, and empty ids. Each answer is a status
of the API's own, with its request id, like every other error."""

from __future__ import annotations

from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from ipaas.v1 import credentials_pb2 as cpb
from ipaas.v1 import executions_pb2 as epb
from ipaas.v1 import tenants_pb2 as tpb
from ipaas.v1 import tenants_pb2_grpc
from ipaas.v1 import workflows_pb2 as wpb
from tests.integration.helpers import Api, slack_step


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | 0x80 if n else byte)
        if not n:
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited field, on the wire."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _deep_value(objects: int) -> bytes:
    """A google.protobuf.Value {"a": {"a": ... "leaf"}}, built as bytes: nothing stops a
    client in another language from sending one deeper than protobuf reads."""
    value = _field(3, b"leaf")
    for _ in range(objects):
        value = _field(5, _field(1, _field(1, b"a") + _field(2, value)))
    return value


async def refused(call: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return caught.value


@pytest.mark.parametrize(
    "rpc,body,request_type",
    [
        ("/ipaas.v1.WorkflowService/GetWorkflow", _field(1, b"wf_\xff"), "ipaas.v1.GetWorkflowRequest"),  # invalid UTF-8
        ("/ipaas.v1.WorkflowService/GetWorkflow", b"\x0a\x10abc", "ipaas.v1.GetWorkflowRequest"),  # truncated
        ("/ipaas.v1.ExecutionService/RunWorkflow", _field(1, b"wf_1") + _field(2, _deep_value(40)), "ipaas.v1.RunWorkflowRequest"),
    ],
    ids=["invalid-utf8", "truncated", "nested-past-100"],
)
async def test_a_request_that_does_not_parse_is_invalid_argument_with_its_request_id(core, rpc: str, body: bytes, request_type: str) -> None:
    """Before, UNKNOWN with protobuf's own text ("Unexpected <class DecodeError>...") and no
    x-request-id, which the gateway turns into a generic 502."""
    tenant = await core.new_tenant()
    call = core.channel.unary_unary(rpc)
    error = await refused(call(body, metadata=(*tenant.md, ("x-request-id", "req-unparsable"))))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error
    assert error.details() == f"the request could not be parsed as {request_type}"
    assert ("x-request-id", "req-unparsable") in list(error.trailing_metadata())
    # Authentication still comes first: an anonymous caller learns nothing of the request.
    anonymous = await refused(call(body))
    assert anonymous.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_two_authorization_values_are_unauthenticated(core) -> None:
    """Before, the last value won: a call carrying two keys ran as whichever a client or proxy
    happened to put last."""
    a, b = await core.new_tenant(name="A"), await core.new_tenant(name="B")
    stub = tenants_pb2_grpc.TenantServiceStub(core.channel)
    for values in [("Bearer ipk_invalid", "Bearer " + a.key), ("Bearer " + a.key, "Bearer " + b.key), ("Bearer " + a.key, "Bearer " + a.key)]:
        error = await refused(stub.GetCaller(tpb.GetCallerRequest(), metadata=tuple(("authorization", v) for v in values)))
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED and error.details() == "send one authorization value"
        assert "x-request-id" in dict(error.trailing_metadata())
    assert (await stub.GetCaller(tpb.GetCallerRequest(), metadata=a.md)).tenant_id == a.tenant_id


# Every RPC whose REST path names a resource by an id ("/api/workflows/{id}").
EMPTY_IDS = [
    ("workflows", "GetWorkflow", wpb.GetWorkflowRequest(), "id"),
    ("workflows", "UpdateWorkflow", wpb.UpdateWorkflowRequest(), "id"),
    ("workflows", "DeleteWorkflow", wpb.DeleteWorkflowRequest(), "id"),
    ("workflows", "SetWorkflowActive", wpb.SetWorkflowActiveRequest(), "id"),
    ("workflows", "ListWorkflowVersions", wpb.ListWorkflowVersionsRequest(), "id"),
    ("workflows", "GetWorkflowVersion", wpb.GetWorkflowVersionRequest(version=1), "id"),
    ("workflows", "RollbackWorkflow", wpb.RollbackWorkflowRequest(), "id"),
    ("workflows", "RotateWebhookSecret", wpb.RotateWebhookSecretRequest(), "id"),
    ("executions", "RunWorkflow", epb.RunWorkflowRequest(), "workflow_id"),
    ("executions", "ReceiveWebhook", epb.ReceiveWebhookRequest(), "workflow_id"),
    ("executions", "GetExecution", epb.GetExecutionRequest(), "id"),
    ("executions", "ReplayExecution", epb.ReplayExecutionRequest(), "id"),
    ("executions", "CancelExecution", epb.CancelExecutionRequest(), "id"),
    ("credentials", "DeleteCredential", cpb.DeleteCredentialRequest(), "id"),
    ("tenants", "CreateApiKey", tpb.CreateApiKeyRequest(name="k"), "tenant_id"),
    ("tenants", "ListApiKeys", tpb.ListApiKeysRequest(), "tenant_id"),
    ("tenants", "RevokeApiKey", tpb.RevokeApiKeyRequest(), "key_id"),
]


@pytest.mark.parametrize("service,rpc,request_message,field", EMPTY_IDS, ids=[e[1] for e in EMPTY_IDS])
async def test_an_empty_id_is_invalid_argument_naming_the_field(core, service: str, rpc: str, request_message: Any, field: str) -> None:
    """Before, the empty id was looked up: NOT_FOUND "workflow  not found"."""
    tenant = await core.new_tenant()
    api = Api(core.channel, tenant.md)
    stubs = {"workflows": api.workflows, "executions": api.executions, "credentials": api.credentials, "tenants": tenants_pb2_grpc.TenantServiceStub(core.channel)}
    metadata = core.admin if service == "tenants" else tenant.md
    error = await refused(getattr(stubs[service], rpc)(request_message, metadata=metadata))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error
    assert error.details() == f"{field}: is required"
    bad = error_details_pb2.BadRequest()
    assert rpc_status.from_call(error).details[0].Unpack(bad)
    assert [(v.field, v.description) for v in bad.field_violations] == [(field, "is required")]


async def test_ids_that_are_given_still_reach_their_handler(core) -> None:
    tenant = await core.new_tenant()
    api = Api(core.channel, tenant.md)
    cred = await api.credential("slack", {"webhook_url": "http://127.0.0.1:9/unreachable"})
    wf = (await api.create({"name": "w", "trigger": {"type": "manual"}, "steps": [slack_step(cred)]})).workflow
    assert (await api.workflows.GetWorkflow(wpb.GetWorkflowRequest(id=wf.id), metadata=tenant.md)).workflow.id == wf.id
    missing = await refused(api.workflows.GetWorkflow(wpb.GetWorkflowRequest(id="wf_nope"), metadata=tenant.md))
    assert missing.code() == grpc.StatusCode.NOT_FOUND
