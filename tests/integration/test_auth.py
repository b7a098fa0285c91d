"""Authentication and tenant administration through a real grpc.aio server."""

from __future__ import annotations

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from ipaas.v1 import tenants_pb2, tenants_pb2_grpc, workflows_pb2, workflows_pb2_grpc


async def test_no_key_is_unauthenticated(core) -> None:
    stub = tenants_pb2_grpc.TenantServiceStub(core.channel)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.GetCaller(tenants_pb2.GetCallerRequest())
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


@pytest.mark.parametrize("header", ["Bearer ipk_not_a_real_key", "Basic abc", "Bearer", "ipk_no_scheme"])
async def test_bad_keys_are_unauthenticated(core, header: str) -> None:
    stub = tenants_pb2_grpc.TenantServiceStub(core.channel)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.GetCaller(tenants_pb2.GetCallerRequest(), metadata=(("authorization", header),))
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "ipk_not_a_real_key" not in (err.value.details() or "")


async def test_tenant_key_identifies_its_tenant_and_revocation_is_immediate(any_core) -> None:
    tenant = await any_core.new_tenant(tier="paid")
    stub = tenants_pb2_grpc.TenantServiceStub(any_core.channel)
    caller = await stub.GetCaller(tenants_pb2.GetCallerRequest(), metadata=tenant.md)
    assert (caller.tenant_id, caller.tier, caller.key_id) == (tenant.tenant_id, "paid", tenant.key_id)

    revoked = await stub.RevokeApiKey(tenants_pb2.RevokeApiKeyRequest(key_id=tenant.key_id), metadata=any_core.admin)
    assert revoked.api_key.HasField("revoked_at")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.GetCaller(tenants_pb2.GetCallerRequest(), metadata=tenant.md)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_keys_are_stored_only_as_hashes(core) -> None:
    tenant = await core.new_tenant()
    from sqlalchemy import text

    async with core.server.db.engine.connect() as conn:
        rows = (await conn.execute(text("SELECT * FROM api_keys"))).all()
    dumped = repr(rows)
    assert tenant.key not in dumped
    assert tenant.key[4:] not in dumped


async def test_admin_rpcs_need_the_admin_key(core) -> None:
    tenant = await core.new_tenant()
    stub = tenants_pb2_grpc.TenantServiceStub(core.channel)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.CreateTenant(tenants_pb2.CreateTenantRequest(name="evil"), metadata=tenant.md)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.ListApiKeys(tenants_pb2.ListApiKeysRequest(tenant_id=tenant.tenant_id), metadata=tenant.md)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_bad_input_gives_field_violations(core) -> None:
    stub = tenants_pb2_grpc.TenantServiceStub(core.channel)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.CreateTenant(tenants_pb2.CreateTenantRequest(name="", tier="gold"), metadata=core.admin)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    status = rpc_status.from_call(err.value)
    bad = error_details_pb2.BadRequest()
    assert status.details[0].Unpack(bad)
    assert {v.field for v in bad.field_violations} == {"name", "tier"}


async def test_unknown_ids_are_not_found(core) -> None:
    stub = tenants_pb2_grpc.TenantServiceStub(core.channel)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.CreateApiKey(tenants_pb2.CreateApiKeyRequest(tenant_id="tn_missing"), metadata=core.admin)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


async def test_tenant_listing_pages(core) -> None:
    stub = tenants_pb2_grpc.TenantServiceStub(core.channel)
    for i in range(5):
        await stub.CreateTenant(tenants_pb2.CreateTenantRequest(name=f"t{i}"), metadata=core.admin)
    seen, token = [], ""
    while True:
        page = await stub.ListTenants(tenants_pb2.ListTenantsRequest(page_size=2, page_token=token), metadata=core.admin)
        seen += [t.name for t in page.tenants]
        if not (token := page.next_page_token):
            break
    assert seen == ["t4", "t3", "t2", "t1", "t0"]


async def test_request_id_is_echoed(core) -> None:
    tenant = await core.new_tenant()
    stub = tenants_pb2_grpc.TenantServiceStub(core.channel)
    call = stub.GetCaller(tenants_pb2.GetCallerRequest(), metadata=(*tenant.md, ("x-request-id", "req-123")))
    await call
    assert ("x-request-id", "req-123") in list(await call.trailing_metadata())
    # Errors carry it too, beside their status details; a missing or malformed id is replaced.
    workflows = workflows_pb2_grpc.WorkflowServiceStub(core.channel)
    missing = workflows.GetWorkflow(workflows_pb2.GetWorkflowRequest(id="wf_nope"), metadata=(*tenant.md, ("x-request-id", "bad id!")))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await missing
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    generated = dict(err.value.trailing_metadata())["x-request-id"]
    assert len(generated) == 32 and generated != "bad id!"
