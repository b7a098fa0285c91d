"""ConnectorService and BreakerService: what is installed, and how the breakers stand."""

from __future__ import annotations

import grpc

from ipaas.auth import current_tenant
from ipaas.engine.breakers import BreakerRegistry
from ipaas.plugin_host import ConnectorRegistry
from ipaas.service import convert
from ipaas.v1 import breakers_pb2, breakers_pb2_grpc, connectors_pb2, connectors_pb2_grpc


class ConnectorServicer(connectors_pb2_grpc.ConnectorServiceServicer):
    def __init__(self, registry: ConnectorRegistry) -> None:
        self.registry = registry

    async def ListConnectors(self, request: connectors_pb2.ListConnectorsRequest, context: grpc.aio.ServicerContext) -> connectors_pb2.ListConnectorsResponse:
        return connectors_pb2.ListConnectorsResponse(
            connectors=[
                connectors_pb2.Connector(
                    name=c["name"],
                    version=c["version"],
                    description=c["description"],
                    distribution=c["distribution"],
                    credential_schema=convert.to_struct(c["credential_schema"]),
                    actions=[
                        connectors_pb2.ConnectorAction(
                            name=a["name"], description=a["description"], config_schema=convert.to_struct(a["config_schema"]), secret_fields=a["secret_fields"]
                        )
                        for a in c["actions"]
                    ],
                )
                for c in self.registry.describe()
            ]
        )


class BreakerServicer(breakers_pb2_grpc.BreakerServiceServicer):
    def __init__(self, breakers: BreakerRegistry) -> None:
        self.breakers = breakers

    async def ListBreakers(self, request: breakers_pb2.ListBreakersRequest, context: grpc.aio.ServicerContext) -> breakers_pb2.ListBreakersResponse:
        return breakers_pb2.ListBreakersResponse(
            breakers=[
                breakers_pb2.Breaker(
                    connector=s.connector,
                    state=s.state,
                    failure_count=s.failure_count,
                    success_count=s.success_count,
                    opened_at=convert.timestamp(s.opened_at),
                    half_open_at=convert.timestamp(s.half_open_at),
                )
                for s in self.breakers.snapshot(current_tenant())
            ]
        )
