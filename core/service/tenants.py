"""TenantService: tenants and API keys (admin), and GetCaller (any key)."""

from __future__ import annotations

import grpc

from ipaas import auth
from ipaas.pagination import PageRequest
from ipaas.service import convert
from ipaas.tenants import TenantStore
from ipaas.v1 import tenants_pb2 as pb
from ipaas.v1 import tenants_pb2_grpc


class TenantServicer(tenants_pb2_grpc.TenantServiceServicer):
    def __init__(self, store: TenantStore) -> None:
        self.store = store

    async def CreateTenant(self, request: pb.CreateTenantRequest, context: grpc.aio.ServicerContext) -> pb.CreateTenantResponse:
        row = await self.store.create_tenant(request.name, request.tier)
        return pb.CreateTenantResponse(tenant=convert.tenant(row))

    async def ListTenants(self, request: pb.ListTenantsRequest, context: grpc.aio.ServicerContext) -> pb.ListTenantsResponse:
        # Admin-only (the interceptor checks): tokens are bound to the admin, not a tenant.
        page = await self.store.list_tenants(PageRequest.of(request, None))
        return pb.ListTenantsResponse(tenants=[convert.tenant(t) for t in page.items], next_page_token=page.next_token)

    async def CreateApiKey(self, request: pb.CreateApiKeyRequest, context: grpc.aio.ServicerContext) -> pb.CreateApiKeyResponse:
        new = await self.store.create_key(request.tenant_id, request.name)
        return pb.CreateApiKeyResponse(api_key=convert.api_key(new.key), secret=new.secret)

    async def ListApiKeys(self, request: pb.ListApiKeysRequest, context: grpc.aio.ServicerContext) -> pb.ListApiKeysResponse:
        page = await self.store.list_keys(request.tenant_id, PageRequest.of(request, None))
        return pb.ListApiKeysResponse(api_keys=[convert.api_key(k) for k in page.items], next_page_token=page.next_token)

    async def RevokeApiKey(self, request: pb.RevokeApiKeyRequest, context: grpc.aio.ServicerContext) -> pb.RevokeApiKeyResponse:
        row = await self.store.revoke_key(request.key_id)
        return pb.RevokeApiKeyResponse(api_key=convert.api_key(row))

    async def GetCaller(self, request: pb.GetCallerRequest, context: grpc.aio.ServicerContext) -> pb.GetCallerResponse:
        caller = auth.current_caller()
        assert caller is not None  # the interceptor authenticated this RPC
        return pb.GetCallerResponse(tenant_id=caller.tenant_id or "", tier=caller.tier, key_id=caller.key_id or "")
