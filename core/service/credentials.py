"""CredentialService: metadata out, secrets never."""

from __future__ import annotations

import grpc

from ipaas.credentials import CredentialStore
from ipaas.pagination import PageRequest
from ipaas.service import convert
from ipaas.auth import current_tenant as _tenant
from ipaas.v1 import credentials_pb2 as pb
from ipaas.v1 import credentials_pb2_grpc


def _credential(row) -> pb.Credential:  # type: ignore[no-untyped-def]
    return pb.Credential(id=row.id, connector=row.connector, name=row.name, fields=row.fields, created_at=convert.timestamp(row.created_at))


class CredentialServicer(credentials_pb2_grpc.CredentialServiceServicer):
    def __init__(self, store: CredentialStore) -> None:
        self.store = store

    async def CreateCredential(self, request: pb.CreateCredentialRequest, context: grpc.aio.ServicerContext) -> pb.CreateCredentialResponse:
        row = await self.store.create(_tenant(), request.connector, request.name, convert.from_struct(request.secrets, "secrets"))
        return pb.CreateCredentialResponse(credential=_credential(row))

    async def ListCredentials(self, request: pb.ListCredentialsRequest, context: grpc.aio.ServicerContext) -> pb.ListCredentialsResponse:
        page = await self.store.list(_tenant(), request.connector, PageRequest.of(request, _tenant()))
        return pb.ListCredentialsResponse(credentials=[_credential(r) for r in page.items], next_page_token=page.next_token)

    async def DeleteCredential(self, request: pb.DeleteCredentialRequest, context: grpc.aio.ServicerContext) -> pb.DeleteCredentialResponse:
        await self.store.delete(_tenant(), request.id)
        return pb.DeleteCredentialResponse()
