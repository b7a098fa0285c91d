"""The gateway's channel to the core against real gRPC servers standing in for core
replicas: calls spread over every address the target names, and keep flowing when one
replica goes away."""

from __future__ import annotations

import grpc
from google.protobuf import wrappers_pb2

from gateway.core_client import CoreClient

WHO = "/ipaas.test.Replica/Who"


async def replica(name: str, served: list[str]) -> tuple[grpc.aio.Server, int]:
    async def who(request: wrappers_pb2.StringValue, context: grpc.aio.ServicerContext) -> wrappers_pb2.StringValue:
        served.append(name)
        return wrappers_pb2.StringValue(value=name)

    handler = grpc.unary_unary_rpc_method_handler(
        who, request_deserializer=wrappers_pb2.StringValue.FromString, response_serializer=wrappers_pb2.StringValue.SerializeToString
    )
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("ipaas.test.Replica", {"Who": handler}),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, port


async def test_calls_spread_over_every_replica_and_survive_one_leaving() -> None:
    served: list[str] = []
    first, first_port = await replica("a", served)
    second, second_port = await replica("b", served)
    client = CoreClient(f"ipv4:127.0.0.1:{first_port},127.0.0.1:{second_port}")
    try:
        call = client.call(WHO, wrappers_pb2.StringValue)
        for _ in range(40):
            assert (await call(wrappers_pb2.StringValue(), timeout=5)).value in {"a", "b"}
        # pick_first, gRPC's default, would have sent all 40 to one replica.
        assert served.count("a") >= 10 and served.count("b") >= 10, served

        await second.stop(grace=None)
        served.clear()
        for _ in range(10):
            await call(wrappers_pb2.StringValue(), timeout=5)
        assert served == ["a"] * 10
    finally:
        await client.close()
        await first.stop(grace=None)
        await second.stop(grace=None)
