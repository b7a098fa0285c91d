"""What the interceptor refuses before any handler runs, through a real grpc.aio server. Each
answer is a status of the API's own, with its request id, like every other error."""

from __future__ import annotations

from typing import Any

import grpc
import pytest

from ipaas.v1 import tenants_pb2 as tpb
from ipaas.v1 import tenants_pb2_grpc


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
