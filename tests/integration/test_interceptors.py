"""What the interceptor refuses before any handler runs, through a real grpc.aio server. Each
answer is a status of the API's own, with its request id, like every other error."""

from __future__ import annotations

from typing import Any

import grpc
import pytest

from ipaas.v1 import tenants_pb2 as tpb
from ipaas.v1 import tenants_pb2_grpc


async def refused(call: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return caught.value


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
