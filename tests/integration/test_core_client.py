"""The channel between gateway and core: calls spread over every replica the target names
and keep flowing when one goes away (real gRPC servers standing in for replicas), and the
core ages connections out so that clients resolve its name again (a real core)."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from google.protobuf import wrappers_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gateway.core_client import CoreClient
from tests.conftest import core_with

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


async def test_the_core_closes_old_connections_so_clients_resolve_again(tmp_path) -> None:
    """IPAAS_GRPC_MAX_CONNECTION_AGE: the core sends GOAWAY to a connection of that age, the
    client's channel goes idle, and its next call connects (and resolves) again."""
    async with core_with(tmp_path, IPAAS_GRPC_MAX_CONNECTION_AGE="1") as core:
        async with grpc.aio.insecure_channel(core.target) as channel:  # gRPC's default policy
            health = health_pb2_grpc.HealthStub(channel)
            assert (await health.Check(health_pb2.HealthCheckRequest(), timeout=5)).status == health_pb2.HealthCheckResponse.SERVING
            assert channel.get_state() == grpc.ChannelConnectivity.READY
            await asyncio.wait_for(channel.wait_for_state_change(grpc.ChannelConnectivity.READY), timeout=10)
            assert channel.get_state() != grpc.ChannelConnectivity.READY
            assert (await health.Check(health_pb2.HealthCheckRequest(), timeout=5)).status == health_pb2.HealthCheckResponse.SERVING


def test_connection_age_setting() -> None:
    from ipaas.service.server import CONNECTION_AGE_GRACE_MS, connection_age_options

    assert connection_age_options(None) == [("grpc.max_connection_age_ms", 300_000), ("grpc.max_connection_age_grace_ms", CONNECTION_AGE_GRACE_MS)]
    assert connection_age_options("2.5")[0] == ("grpc.max_connection_age_ms", 2500)
    assert connection_age_options("0") == []
    for bad in ("soon", "-1", "nan"):
        with pytest.raises(SystemExit, match="IPAAS_GRPC_MAX_CONNECTION_AGE"):
            connection_age_options(bad)


async def test_a_core_back_after_an_outage_is_used_within_seconds(tmp_path) -> None:
    """gRPC's reconnect backoff grows to 120 s: a core back after 20 s down went unused for
    up to ~7 s more (after minutes down, up to two), every call and readiness 503 meanwhile.
    The gateway's channel caps it at MAX_RECONNECT_BACKOFF_MS."""
    import time

    from gateway.core_client import MAX_RECONNECT_BACKOFF_MS
    from tests.conftest import free_port

    port = free_port()
    client = CoreClient(f"127.0.0.1:{port}")
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:  # the gateway's probes meet a core that is down
            assert not await client.serving(timeout=0.5)
            await asyncio.sleep(0.2)
        async with core_with(tmp_path, IPAAS_GRPC_LISTEN=f"127.0.0.1:{port}"):
            back = time.monotonic()
            while not await client.serving(timeout=0.5):
                assert time.monotonic() - back < MAX_RECONNECT_BACKOFF_MS / 1000 + 1.5, "the channel is still backing off"
                await asyncio.sleep(0.1)
    finally:
        await client.close()
