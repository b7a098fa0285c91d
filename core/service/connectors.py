"""ConnectorService and BreakerService: what is installed, and how the breakers stand."""

from __future__ import annotations

import grpc

from ipaas.auth import current_tenant
from ipaas.engine.breakers import BreakerRegistry
from ipaas.pagination import PageRequest, page_in_memory, within_bytes
from ipaas.plugin_host import ConnectorRegistry
from ipaas.service import convert
from ipaas.v1 import breakers_pb2, breakers_pb2_grpc, connectors_pb2, connectors_pb2_grpc


class ConnectorServicer(connectors_pb2_grpc.ConnectorServiceServicer):
    def __init__(self, registry: ConnectorRegistry) -> None:
        self.registry = registry

    async def ListConnectors(self, request: connectors_pb2.ListConnectorsRequest, context: grpc.aio.ServicerContext) -> connectors_pb2.ListConnectorsResponse:
        page = page_in_memory(self.registry.describe(), PageRequest.of(request, current_tenant()), key=lambda c: c["name"])
        # A connector's JSON Schemas are a plugin's to size: a page of large ones ends early.
        items, token = within_bytes([convert.connector(c) for c in page.items], page, key=lambda c: c["name"])
        return connectors_pb2.ListConnectorsResponse(connectors=items, next_page_token=token)


class BreakerServicer(breakers_pb2_grpc.BreakerServiceServicer):
    def __init__(self, breakers: BreakerRegistry) -> None:
        self.breakers = breakers

    async def ListBreakers(self, request: breakers_pb2.ListBreakersRequest, context: grpc.aio.ServicerContext) -> breakers_pb2.ListBreakersResponse:
        tenant = current_tenant()
        # A tenant has one breaker per connector, so the connector's name is a stable key.
        page = page_in_memory(self.breakers.snapshot(tenant), PageRequest.of(request, tenant), key=lambda s: s.connector)
        return breakers_pb2.ListBreakersResponse(breakers=[convert.breaker(s) for s in page.items], next_page_token=page.next_token)
